"""Benchmark: continuous batching on vs off for chat, through the real server, in one run.

The same published LLM version is served twice by `appliance serve` on loopback (private
servers, as `appliance bench --compare` starts them): once as configured (continuous batching,
up to `generation.max_running_sequences` sequences decoded together) and once with
`APPLIANCE_GENERATION__MAX_RUNNING_SEQUENCES=1` (one sequence at a time: batching off). Each is
loaded by `--clients` closed-loop clients streaming chat completions of exactly `--tokens`
generated tokens (EOS ignored) from the shipped prompt set, after a warm-up. The two servers
alternate for `--repeats` passes (so a burst of foreign load hits both) and the median of each
figure is reported: generated tokens/s, requests/s, TTFT p50/p99, end-to-end p50/p99, and the
ratios on/off. Client and server are separate processes.

Runs with the appliance's own environment (no peer to install):

    .venv/bin/python bench/batching_on_off.py --state-dir DIR --model NAME [--version V]
        [--clients 8] [--tokens 64] [--duration 20] [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.benchmark.results import machine_facts  # noqa: E402
from appliance.benchmark.runner import BenchOptions, SilentProgress, measure  # noqa: E402
from appliance.benchmark.serverproc import PrivateServer  # noqa: E402
from appliance.config import CostSettings  # noqa: E402
from appliance.offline import enforce_offline  # noqa: E402
from appliance.repository import ModelRepository  # noqa: E402

#: The setting that turns continuous batching off: one running sequence at a time.
BATCHING_OFF_ENV = {"APPLIANCE_GENERATION__MAX_RUNNING_SEQUENCES": "1"}


def _figures(point: Any) -> dict[str, float]:
    stats = point.stats
    return {
        "tokens_per_s": stats["output_tokens_per_s"],
        "requests_per_s": stats["requests_per_s"],
        "ttft_p50_s": stats["ttft"]["p50_s"] or 0.0,
        "ttft_p99_s": stats["ttft"]["p99_s"] or 0.0,
        "latency_p50_s": stats["latency"]["p50_s"] or 0.0,
        "latency_p99_s": stats["latency"]["p99_s"] or 0.0,
        "errors": float(stats["requests"] - stats["ok"]),
    }


def _one_pass(server: PrivateServer, args: argparse.Namespace) -> dict[str, float]:
    options = BenchOptions(
        model=args.model,
        workload="chat",
        url=server.url,
        concurrency=[args.clients],
        duration_s=args.duration,
        max_requests=args.max_requests,
        warmup_requests=args.clients,
        output_tokens=(args.tokens, args.tokens),
        ignore_eos=True,
        request_timeout_s=args.timeout,
    )
    _workload, points = asyncio.run(measure(server.url, options, CostSettings(), SilentProgress(), args.model))
    return _figures(points[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="state directory holding the model")
    parser.add_argument("--model", required=True, help="text-generation model name")
    parser.add_argument("--version", type=int, default=None, help="version (default: the serving one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    enforce_offline()

    version = ModelRepository(args.state_dir / "models").get(args.model, args.version)
    work = args.state_dir / "bench" / ".servers"
    passes: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    with PrivateServer(version, work) as batching_on, PrivateServer(version, work, extra_env=BATCHING_OFF_ENV) as batching_off:
        for repeat in range(args.repeats):
            for label, server in (("on", batching_on), ("off", batching_off)):
                figures = _one_pass(server, args)
                passes[label].append(figures)
                print(f"pass {repeat + 1} batching {label}: {figures['tokens_per_s']:.1f} tok/s, "
                      f"TTFT p50 {figures['ttft_p50_s'] * 1000:.0f} ms", flush=True)

    median = {label: {key: statistics.median(p[key] for p in runs) for key in runs[0]} for label, runs in passes.items()}
    print(f"\n{version.name} version {version.version} ({version.manifest.quantization}), {args.clients} clients, "
          f"{args.tokens} tokens each, median of {args.repeats} passes")
    machine = machine_facts()
    print(f"machine: {machine['processor']}, {machine['cpu_count']} cores, {machine['platform']}, "
          f"load average {machine['load_average']}")
    print(f"{'':12} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'e2e p50':>8} {'e2e p99':>8} {'errors':>6}")
    for label in ("on", "off"):
        m = median[label]
        print(f"batching {label:3} {m['tokens_per_s']:8.1f} {m['requests_per_s']:7.2f} {m['ttft_p50_s'] * 1000:8.0f}ms "
              f"{m['ttft_p99_s'] * 1000:8.0f}ms {m['latency_p50_s']:7.2f}s {m['latency_p99_s']:7.2f}s {m['errors']:6.0f}")
    ratio = median["on"]["tokens_per_s"] / median["off"]["tokens_per_s"] if median["off"]["tokens_per_s"] else float("nan")
    print(f"throughput ratio on/off: {ratio:.2f}x")
    if args.json is not None:
        document = {"passes": passes, "median": median, "ratio_tokens_per_s": ratio, "machine": machine}
        args.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
