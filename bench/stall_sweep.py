"""Benchmark: the stall limit's trade (issue 18's 32-stream inter-token p99), one server per
`generation.decode_stall_factor`, all alive at once and measured in turn, same box, same run.

For each factor: a lone stream after a 100-token prompt (its inter-token p99 is the unit of the
issue's target, and it times the lone decode step the limit is measured in), then 8 and 32
concurrent streams of different 100-token prompts (128 new tokens each): inter-token latency
p50/p99, time to first token (median and max), aggregate tokens/s. Each figure the median of
`--repeats` quiet-gated passes after a warm-up, the factors interleaved pass by pass so a slow
phase of the box hits them alike. Reuses bench/llm_sizes_vs_llamacpp.py's files, exports,
workload, gate and HTTP client (the appliance side only: llama.cpp is not part of this trade).

Writes the figures (`--json`) and a PNG (`--plot`): inter-token p99 against median time to first
token, a point per factor, one line per stream count.

    .venv/bin/python bench/stall_sweep.py --shape qwen2.5-0.5b --pair Q8_0:int8 --factors 0,8,6,4 \\
        --json bench/.work/sizes/stall-sweep.json --plot docs/diagrams/stall_sweep.png
    # smoke test (a minute, tiny random model):
    .venv/bin/python bench/stall_sweep.py --shape tiny --pair Q8_0:int8 --factors 0,4 --repeats 1 --no-gate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf_shapes  # noqa: E402
import llm_sizes_vs_llamacpp as sizes  # noqa: E402
from llm_vs_llamacpp import machine  # noqa: E402

SINGLE_PROMPT = 100


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.offline import enforce_offline

    enforce_offline()
    gate = sizes.Gate(args.max_foreign, args.quiet_wait_s, args.max_tries, enabled=not args.no_gate)
    (pair,) = sizes.resolve_pairs(args)
    version, export_facts = sizes.ensure_export(pair, args)
    workload = sizes.prompt_ids(pair.gguf_file, args.seed)
    jobs = [("single", sizes._single(workload.decode[SINGLE_PROMPT], args.new_tokens), sizes._single(workload.decode[SINGLE_PROMPT], sizes.WARMUP_TOKENS))]
    for count, prompts in workload.streams.items():
        jobs.append((f"streams_{count}", sizes._streams(prompts, args.new_tokens), sizes._streams(prompts, sizes.WARMUP_TOKENS)))
    raw: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    max_streams = max(sizes.STREAM_COUNTS)
    with ExitStack() as stack:
        servers = {
            factor: stack.enter_context(
                sizes.ApplianceSide(
                    version, args.work, args.threads, max_streams, args.prefill_chunk_tokens,
                    extra_env={"APPLIANCE_GENERATION__DECODE_STALL_FACTOR": str(factor)},
                )
            )
            for factor in args.factors
        }
        for job, measure, warm in jobs:
            print(f"{job}: warm-up", flush=True)
            for server in servers.values():
                warm(server)
            for repeat in range(args.repeats):
                for factor, server in servers.items():
                    figures = gate.run({os.getpid(), server.pid}, lambda server=server: measure(server))
                    raw[str(factor)][job].append(figures)
                    print(f"factor {factor} {job} pass {repeat + 1}: {sizes._brief(figures)}", flush=True)
    return {
        "command": " ".join(sys.argv),
        "box": {"machine": machine(), "cpu_flags": sizes.cpu_flags()},
        "shape": args.shape, "pair": pair.label, "threads": args.threads, "new_tokens": args.new_tokens,
        "prefill_chunk_tokens": args.prefill_chunk_tokens, "repeats": args.repeats, "gated": not args.no_gate,
        "export": export_facts,
        "factors": {factor: {job: sizes.medians(passes) for job, passes in jobs_raw.items()} for factor, jobs_raw in raw.items()},
        "passes": {factor: {job: [sizes._strip(p) for p in passes] for job, passes in jobs_raw.items()} for factor, jobs_raw in raw.items()},
    }


def print_report(report: dict[str, Any]) -> None:
    box = report["box"]
    print(f"\nmachine: {box['machine']}; flags {' '.join(box['cpu_flags']) or '-'}; {report['shape']} {report['pair']}, {report['threads']} threads")
    counts = [int(job.split("_")[1]) for job in next(iter(report["factors"].values())) if job.startswith("streams_")]
    header = f"{'factor':>7}{'lone p99':>10}" + "".join(f"{f'{n}: p50/p99 ms':>18}{'p99/lone':>9}{'TTFT med/max s':>16}{'tok/s':>7}" for n in counts)
    print(header)
    for factor, jobs in report["factors"].items():
        lone = jobs.get("single", {}).get("itl_p99_s")
        cells = [f"{factor:>7}", f"{lone * 1000 if lone else float('nan'):>10.1f}"]
        for n in counts:
            figures = jobs.get(f"streams_{n}", {})
            p50, p99 = figures.get("itl_p50_s"), figures.get("itl_p99_s")
            cells.append(f"{f'{p50 * 1000:.0f}/{p99 * 1000:.0f}' if p50 and p99 else '-':>18}")
            cells.append(f"{f'{p99 / lone:.1f}x' if p99 and lone else '-':>9}")
            ttft, ttft_max = figures.get("ttft_s"), figures.get("ttft_max_s")
            cells.append(f"{f'{ttft:.2f}/{ttft_max:.2f}' if ttft and ttft_max else '-':>16}")
            cells.append(f"{figures.get('aggregate_tok_s', 0):>7.0f}")
        print("".join(cells))
    shares = [s for jobs in report["factors"].values() for figures in jobs.values() for s in figures.get("foreign_cpu_shares", [])]
    if shares:
        print(f"foreign CPU during passes: max {max(shares):.0%}")


def plot(report: dict[str, Any], path: Path) -> None:
    """Inter-token p99 (y) against median time to first token (x): a line per stream count,
    a point per factor, labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    factors = list(report["factors"])
    for job in [job for job in report["factors"][factors[0]] if job.startswith("streams_")]:
        points = [(report["factors"][f][job].get("ttft_s"), report["factors"][f][job].get("itl_p99_s"), f) for f in factors]
        points = [(x, y * 1000, f) for x, y, f in points if x and y]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{job.split('_')[1]} streams")
        for x, y, factor in points:
            axes.annotate("off" if float(factor) == 0 else f"{float(factor):g}x", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("median time to first token (s)")
    axes.set_ylabel("inter-token latency p99 (ms)")
    axes.set_title(f"Stall limit: {report['shape']} {report['pair']} ({report['threads']} threads; labels: decode_stall_factor)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(gguf_shapes.SHAPES), required=True)
    parser.add_argument("--pair", action="append", required=True, help="TYPE:QUANT, once (e.g. Q8_0:int8)")
    parser.add_argument("--factors", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 8.0, 6.0, 4.0])
    parser.add_argument("--work", type=Path, default=sizes.DEFAULT_WORK)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=sizes.NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=gguf_shapes.DEFAULT_SEED)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256)
    parser.add_argument("--kv-cache", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--fresh-export", action="store_true", help="export a new version even when one from the same file is there")
    sizes.add_gate_arguments(parser)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if len(args.pair) != 1:
        parser.error("one --pair per sweep")
    args.work = args.work.resolve()
    report = sweep(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    if args.plot:
        plot(report, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
