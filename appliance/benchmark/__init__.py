"""`appliance bench`: drive a running appliance over HTTP and report throughput, latency and
cost per 1k tokens, for one model or every published variant of one.

A client of the server like any other: it speaks HTTP (OpenAI-compatible and KServe V2) and
reads the model repository and the cost settings, nothing else. Never imports the runtime, the
generation engine, the API layer, torch or transformers.
"""
