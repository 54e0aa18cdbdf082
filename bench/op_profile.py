"""Benchmark: where one run of an exported decoder's graph spends its time, operator kind by
operator kind, from ONNX Runtime's own profiler.

Why: the issue's rule for a target out of reach is "profile first": a decode step of 8 rows and
a prefill chunk at a long context are different runs of the same graph, and which operator
holds each (MatMulNBits at which bits and block, attention, the LM head) decides what could
move it. MatMulNBits nodes are told apart by bits and block size, and the LM head by name.

What runs: the version's graph in one session with the serving engine's CPU options, fed
seeded token ids and a random KV past of `--past` positions per row, either a decode step
(`--rows` rows, one new token each) or a prefill chunk (`--chunk` new tokens of one row, with
only the last position's logits when the graph can skip the rest, as the engine asks). The
feed is plain numpy (past in, present out), not the engine's shared buffers, so compare
shares, not absolute milliseconds, with the serving figures.

    .venv/bin/python bench/op_profile.py STATE/models/NAME/N --rows 8 --past 150
    .venv/bin/python bench/op_profile.py STATE/models/NAME/N --chunk 256 --past 1744

Needs a quiet machine (it does not gate itself). Never imported by the appliance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # the sibling scripts, after every package so none is shadowed

from appliance.generation.model_runner import cpu_session_options  # noqa: E402
from appliance.repository.manifest import GenerationSpec  # noqa: E402
from appliance.repository.store import read_version  # noqa: E402
from matmulnbits_forms import run_walls  # noqa: E402

#: Token ids below this are left out of the feed (control and byte tokens in most vocabularies).
FIRST_ID = 3
#: Operator kinds listed; the rest are summed into one line.
LISTED_KINDS = 8


def node_kinds(model_path: Path) -> dict[str, str]:
    """Node name -> what the report groups it under: the op type, MatMulNBits with its bits and
    block size, and the LM head apart."""
    kinds = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        kind = node.op_type
        if kind == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            kind = f"MatMulNBits {attrs['bits']}-bit/{attrs['block_size']}" + (" (LM head)" if "lm_head" in node.name else "")
        kinds[node.name] = kind
    return kinds


def feeds(spec: GenerationSpec, input_names: set[str], *, rows: int, new_tokens: int, past: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for layer in range(spec.num_layers):
        for template in (spec.past_key_name, spec.past_value_name):
            feed[template.format(layer=layer)] = (rng.standard_normal((rows, spec.num_kv_heads, past, spec.head_dim)) * 0.1).astype(np.float32)
    feed["input_ids"] = rng.integers(FIRST_ID, spec.vocab_size, (rows, new_tokens)).astype(np.int64)
    feed["attention_mask"] = np.ones((rows, past + new_tokens), np.int64)
    if "position_ids" in input_names:
        feed["position_ids"] = np.broadcast_to(np.arange(past, past + new_tokens), (rows, new_tokens)).astype(np.int64)
    if spec.logits_start_input:
        feed[spec.logits_start_input] = np.asarray([new_tokens - 1 if rows == 1 else 0], np.int64)
    return feed


def profile(version_dir: Path, *, rows: int, new_tokens: int, past: int, runs: int, threads: int) -> dict[str, object]:
    version = read_version(version_dir)
    spec = version.manifest.generation
    if spec is None:
        raise SystemExit(f"{version_dir} is not a text-generation version")
    if spec.kv_datatype != "FP32":
        raise SystemExit(f"{version_dir}: this profiler feeds an fp32 past; the version's KV cache is {spec.kv_datatype}")
    options = cpu_session_options(threads)
    options.enable_profiling = True
    session = ort.InferenceSession(str(version.model_path), options, providers=["CPUExecutionProvider"])
    feed = feeds(spec, {i.name for i in session.get_inputs()}, rows=rows, new_tokens=new_tokens, past=past, seed=0)
    walls = run_walls(session, feed, runs)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    kinds = node_kinds(version.model_path)
    micros: Counter[str] = Counter()
    profiled_runs = 0  # the profiler records every run since the session opened, warm-ups too
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"].removesuffix("_kernel_time")
            micros[kinds.get(name, event.get("args", {}).get("op_name", "?"))] += event["dur"]
        elif event.get("cat") == "Session" and event.get("name") == "model_run":
            profiled_runs += 1
    return {
        "model": str(version_dir),
        "variant": version.variant,
        "rows": rows,
        "new_tokens": new_tokens,
        "past": past,
        "run_ms_median": statistics.median(walls) * 1e3,
        "kinds_ms": {kind: us / max(profiled_runs, 1) / 1e3 for kind, us in micros.most_common()},
    }


def print_table(result: dict[str, object]) -> None:
    kinds: dict[str, float] = result["kinds_ms"]  # type: ignore[assignment]
    total = sum(kinds.values())
    print(
        f"{result['model']} ({result['variant']}): {result['rows']} row(s) x {result['new_tokens']} new token(s) "
        f"after {result['past']}; run {result['run_ms_median']:.1f} ms (median), operators {total:.1f} ms; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print("| operator | ms per run | share |")
    print("| --- | --- | --- |")
    listed = list(kinds.items())[:LISTED_KINDS]
    for kind, ms in listed:
        print(f"| {kind} | {ms:.2f} | {100 * ms / total:.1f}% |")
    rest = total - sum(ms for _, ms in listed)
    if rest > 0:
        print(f"| the rest | {rest:.2f} | {100 * rest / total:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a version folder (STATE/models/NAME/N)")
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--rows", type=int, help="a decode step of this many rows, one new token each")
    shape.add_argument("--chunk", type=int, help="a prefill chunk of this many new tokens, one row")
    parser.add_argument("--past", type=int, default=100, help="positions already in each row's KV cache")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows, new_tokens = (args.rows, 1) if args.rows else (1, args.chunk)
    if rows < 1 or new_tokens < 1 or args.past < 0:
        raise SystemExit("--rows / --chunk must be at least 1 and --past at least 0")
    result = profile(args.model, rows=rows, new_tokens=new_tokens, past=args.past, runs=args.runs, threads=args.threads)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
