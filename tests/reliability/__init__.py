"""The reliability and security suite: load, faults, hostile input, auth and privacy.

A short part runs with the ordinary test suite; the long part (64 clients for a minute, three
rounds of memory checks, kill -9 at several export moments, full disks) is marked
`reliability` and runs with `--reliability`. docs/RELIABILITY.md lists every check.
"""
