"""Benchmark: what the privacy layer's request logging costs per request, in one run.

The same published embedding model is served by three private `appliance serve` processes on
loopback that differ only in `APPLIANCE_LOGGING_MODE` (off, metadata, full). One client sends
sequential `/v1/embeddings` requests (one sentence each) round-robin, one to each server in
turn, so a burst of foreign load hits every mode alike; `--requests` rounds per pass, after a
warm-up, for `--repeats` passes. The median latency per mode and its ratio to `off` are
printed. Client and servers are separate
processes; the request log is written by the server's background thread, so this measures what
the request path pays (parsing, queueing), not the database's write speed.

Runs with the appliance's own environment:

    .venv/bin/python bench/request_logging_overhead.py --state-dir DIR --model NAME [--version V]
        [--requests 200] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.benchmark.serverproc import PrivateServer  # noqa: E402
from appliance.offline import enforce_offline  # noqa: E402
from appliance.repository import ModelRepository  # noqa: E402

MODES = ("off", "metadata", "full")
SENTENCE = "The appliance keeps what its owner decides and sends nothing anywhere."
WARMUP_REQUESTS = 20


def one_pass(client: httpx.Client, urls: dict[str, str], model: str, rounds: int) -> dict[str, list[float]]:
    """`rounds` requests per server, interleaved: latencies in ms by mode."""
    latencies_ms: dict[str, list[float]] = {mode: [] for mode in urls}
    for _ in range(rounds):
        for mode, url in urls.items():
            started = time.perf_counter()
            answer = client.post(f"{url}/v1/embeddings", json={"model": model, "input": SENTENCE})
            latencies_ms[mode].append((time.perf_counter() - started) * 1000.0)
            answer.raise_for_status()
    return latencies_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", type=int)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    enforce_offline()
    version = ModelRepository(args.state_dir / "models").get(args.model, args.version)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"model: {version.name} v{version.version} ({version.manifest.quantization}); {args.requests} interleaved requests x {args.repeats} passes per mode")
    medians: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="logging-bench-") as work:
        servers = {mode: PrivateServer(version, Path(work) / mode, extra_env={"APPLIANCE_LOGGING_MODE": mode}) for mode in MODES}
        for server in servers.values():
            server.__enter__()
        try:
            urls = {mode: server.url for mode, server in servers.items()}
            with httpx.Client(timeout=60) as client:
                one_pass(client, urls, version.name, WARMUP_REQUESTS)
                for _ in range(args.repeats):
                    for mode, latencies in one_pass(client, urls, version.name, args.requests).items():
                        medians[mode].append(statistics.median(latencies))
        finally:
            for server in servers.values():
                server.__exit__(None, None, None)
    baseline = statistics.median(medians["off"])
    results = {}
    print(f"{'mode':<10} {'median ms':>10} {'vs off':>8}   passes")
    for mode in MODES:
        value = statistics.median(medians[mode])
        results[mode] = {"median_ms": value, "ratio_vs_off": value / baseline, "passes_ms": medians[mode]}
        passes = " / ".join(f"{v:.2f}" for v in medians[mode])
        print(f"{mode:<10} {value:>10.2f} {value / baseline:>8.3f}   {passes}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
