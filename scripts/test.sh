#!/usr/bin/env bash
# Set up the environment with the test tools and run the whole test suite.
# Extra arguments go to pytest (e.g. -k export, -m ray, or --reliability for the long suite).
# The `ray` extra is installed too, so the scale-out tests (tests/test_scale_ray.py) run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev,ray
scripts/test_system_deps.sh
# Test modules run in parallel worker processes (pytest-xdist), one module per worker at a time
# (--dist loadfile: module fixtures are built once): most of the suite waits on servers and
# subprocesses with one core busy, so two workers on a 2-core box nearly halve its time. At most
# MAX_WORKERS: each worker holds its own models and servers in memory. `-n 0` runs serially.
MAX_WORKERS=4
workers=$(nproc)
if ((workers > MAX_WORKERS)); then workers=$MAX_WORKERS; fi
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
