"""Benchmark: the most tokens per second this box can compute for a batch of streams, from an
exported version's own weight matrices.

Why: issue 18's batched targets (8 streams at 3x, 32 streams at 4x llama.cpp's single stream)
are multiples of a figure bound by memory bandwidth, while a batch on two cores is bound by how
fast the CPU multiplies: every weight read serves all rows of a step, so bytes stop mattering
and the int8 multiply-adds of MatMulNBits (accuracy level 4) decide. This script times every
distinct weight matrix of a version (its K, N, bits and block size, or fp32) alone at a batch's
rows and at a prefill chunk's, and sums them into the least time a prompt token and a generated
token can take on this box. For streams that each send `prompt` tokens and get `new` back,

    ceiling tokens/s = new / (prompt x t_prompt_token + new x t_generated_token(streams))

whatever the number of streams (t_generated_token at the batch's rows, t_prompt_token at the
chunk's, which skips the LM head: a prompt needs only its last position's logits); a long
prompt's first token likewise takes at least its length x t_prompt_token, and a decode step of
N streams at least N x t_generated_token (against which the issue's bound on the inter-token
p99, 5x the single stream's, is read). Attention, norms,
sampling, the HTTP path and the scheduler's choices are left out, and a matrix timed alone may
sit in the L3 cache where a whole model does not (which flatters few rows most: one-row figures
are bandwidth-bound and belong to bench/llm_sizes_vs_llamacpp.py), so each figure is an upper
bound: a measured aggregate as a fraction of it says what the engine leaves on the table, and a
target above it is out of reach with these kernels on this box.

    .venv/bin/python bench/compute_limit.py STATE/models/NAME/N --sizes-json RUN.json

`--sizes-json` reads a `bench/llm_sizes_vs_llamacpp.py --json` run of the same version and
prints its measured aggregates, llama.cpp's single stream and llama.cpp's time to first token
beside the ceilings (ratios across runs: make the two runs on the same box and day). Needs a quiet
machine (it does not gate itself). Never imported by the appliance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(BENCH))  # the sibling scripts, after every package so none is shadowed

from appliance.generation.model_runner import cpu_session_options  # noqa: E402
from appliance.repository.store import read_version  # noqa: E402
from matmulnbits_forms import run_walls  # noqa: E402

#: The LM head is told apart by name (the model builder's and the Optimum graph's both say so).
LM_HEAD_MARK = "lm_head"
#: The benchmark's stream workload (bench/llm_sizes_vs_llamacpp.py): prompt and new tokens.
DEFAULT_PROMPT_TOKENS = 100
DEFAULT_NEW_TOKENS = 128
DEFAULT_STREAMS = (8, 32)
#: The long prompt whose first token the bench times (its `ttft_2000` / `decode_after_2000` run).
DEFAULT_LONG_PROMPT = 2000
#: The appliance's chunked-prefill size (generation.prefill_chunk_tokens' default).
DEFAULT_CHUNK_ROWS = 256
#: Issue 18's batched targets, as multiples of llama.cpp's single-stream decode.
TARGET_MULTIPLES = {8: 3.0, 32: 4.0}
#: Issue 18's time-to-first-token target for the long prompt, as a fraction of llama.cpp's.
TTFT_TARGET = 0.7
#: Multiply-adds count as two operations, as GOPS figures elsewhere in docs/BENCHMARKS.md.
OPS_PER_MAC = 2


@dataclass(frozen=True)
class Matrix:
    """One weight matrix's form: what the kernel's speed depends on (not its values)."""

    k_dim: int
    n_dim: int
    #: 4 or 8 for MatMulNBits; 32 for a plain fp32 MatMul.
    bits: int
    block: int
    accuracy_level: int
    zero_points: bool
    lm_head: bool

    @property
    def name(self) -> str:
        form = "fp32" if self.bits == 32 else f"{self.bits}-bit/{self.block}"
        return f"{form} {self.k_dim}x{self.n_dim}" + (" (LM head)" if self.lm_head else "")


#: Seconds per row of each matrix form, by row count.
Timings = dict[Matrix, dict[int, float]]


def weight_matrices(model_path: Path) -> Counter[Matrix]:
    """Every MatMulNBits node, and every MatMul whose second input is an initializer, by form."""
    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    found: Counter[Matrix] = Counter()
    for node in model.graph.node:
        lm_head = LM_HEAD_MARK in node.name
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            found[
                Matrix(
                    k_dim=attrs["K"], n_dim=attrs["N"], bits=attrs["bits"], block=attrs["block_size"],
                    accuracy_level=attrs.get("accuracy_level", 0), zero_points=len(node.input) > 3 and bool(node.input[3]), lm_head=lm_head,
                )
            ] += 1
        elif node.op_type == "MatMul" and node.input[1] in initializers:
            dims = list(initializers[node.input[1]].dims)
            if len(dims) == 2:
                found[Matrix(k_dim=dims[0], n_dim=dims[1], bits=32, block=0, accuracy_level=0, zero_points=False, lm_head=lm_head)] += 1
    if not found:
        raise SystemExit(f"{model_path}: no MatMulNBits or weight MatMul nodes to time")
    return found


def _matrix_graph(matrix: Matrix, seed: int) -> onnx.ModelProto:
    """One node of `matrix`'s form with seeded codes: the kernel's speed does not depend on them."""
    rng = np.random.default_rng(seed)
    if matrix.bits == 32:
        weight = numpy_helper.from_array(rng.standard_normal((matrix.k_dim, matrix.n_dim), dtype=np.float32) * 0.02, "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        initializers = [weight]
        opsets = [helper.make_opsetid("", 17)]
    else:
        blocks = math.ceil(matrix.k_dim / matrix.block)
        codes = rng.integers(0, 256, size=(matrix.n_dim, blocks, matrix.block * matrix.bits // 8), dtype=np.uint8)
        scales = (rng.random(matrix.n_dim * blocks, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
        initializers = [numpy_helper.from_array(codes, "q"), numpy_helper.from_array(scales, "s")]
        inputs = ["x", "q", "s"]
        if matrix.zero_points:
            per_byte = 8 // matrix.bits
            zero_points = np.full((matrix.n_dim, math.ceil(blocks / per_byte)), 0x88 if per_byte == 2 else 128, np.uint8)
            initializers.append(numpy_helper.from_array(zero_points, "z"))
            inputs.append("z")
        node = helper.make_node(
            "MatMulNBits", inputs, ["y"], domain="com.microsoft", K=matrix.k_dim, N=matrix.n_dim,
            bits=matrix.bits, block_size=matrix.block, accuracy_level=matrix.accuracy_level,
        )
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    graph = helper.make_graph(
        [node], "matrix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, matrix.k_dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers,
    )
    return helper.make_model(graph, opset_imports=opsets)


def seconds_per_row(matrix: Matrix, rows: list[int], *, threads: int, runs: int, seed: int = 0) -> dict[int, float]:
    """The fastest of `runs` products at each row count, divided by the rows: noise (another
    process, a neighbour on the host that no process list shows) only adds time, and this is
    a ceiling."""
    session = ort.InferenceSession(
        _matrix_graph(matrix, seed).SerializeToString(), cpu_session_options(threads, stop_spinning_after_run=True), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(seed + 1)
    result = {}
    for count in rows:
        feed = {"x": rng.standard_normal((count, matrix.k_dim), dtype=np.float32)}
        result[count] = min(run_walls(session, feed, runs)) / count
    return result


def time_matrices(counts: Counter[Matrix], rows: list[int], *, threads: int, runs: int) -> Timings:
    """Seconds per row of every matrix form at every row count."""
    return {m: seconds_per_row(m, rows, threads=threads, runs=runs) for m in counts}


def fastest(*probes: Timings) -> Timings:
    """Per matrix and row count, the fastest of several probes (a slow spell of the host in
    one probe does not lower the ceiling)."""
    return {m: {r: min(probe[m][r] for probe in probes) for r in probes[0][m]} for m in probes[0]}


def token_seconds(timings: Timings, counts: Counter[Matrix], rows: int, *, prompt: bool) -> float:
    """Least time one token spends in the weight matrices at `rows` rows; a prompt token skips
    the LM head."""
    return sum(counts[m] * per_row[rows] for m, per_row in timings.items() if not (prompt and m.lm_head))


def ceiling_tok_s(t_prompt_token: float, t_generated_token: float, prompt_tokens: int, new_tokens: int) -> float:
    """Generated tokens per second when every stream sends `prompt_tokens` and gets `new_tokens`."""
    return new_tokens / (prompt_tokens * t_prompt_token + new_tokens * t_generated_token)


def rows_timed(streams: tuple[int, ...], chunk_rows: int) -> list[int]:
    """The row counts a workload's ceilings need: each batch's and the prefill chunk's."""
    return sorted({*streams, chunk_rows})


def limits(
    model_path: Path, *, streams: tuple[int, ...], chunk_rows: int, prompt_tokens: int, new_tokens: int, long_prompt: int, threads: int, runs: int
) -> dict[str, Any]:
    """One probe of every matrix of the graph at `model_path`, summarised (the standalone run)."""
    counts = weight_matrices(model_path)
    timings = time_matrices(counts, rows_timed(streams, chunk_rows), threads=threads, runs=runs)
    return summarise(
        model_path, counts, timings, streams=streams, chunk_rows=chunk_rows, prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, long_prompt=long_prompt, threads=threads,
    )


def summarise(
    model_path: Path, counts: Counter[Matrix], timings: Timings, *, streams: tuple[int, ...], chunk_rows: int,
    prompt_tokens: int, new_tokens: int, long_prompt: int, threads: int,
) -> dict[str, Any]:
    """The ceilings of a workload from the matrices' timings (JSON-ready)."""
    rows = rows_timed(streams, chunk_rows)
    t_prompt = token_seconds(timings, counts, chunk_rows, prompt=True)
    matrices = [
        {
            "matrix": m.name, "count": counts[m],
            "gops": {str(r): OPS_PER_MAC * m.k_dim * m.n_dim / per_row[r] / 1e9 for r in rows},
        }
        for m, per_row in timings.items()
    ]
    per_streams = {}
    for count in streams:
        t_generated = token_seconds(timings, counts, count, prompt=False)
        per_streams[str(count)] = {
            "generated_token_ms": t_generated * 1e3,
            "decode_ceiling_tok_s": 1.0 / t_generated,
            "ceiling_tok_s": ceiling_tok_s(t_prompt, t_generated, prompt_tokens, new_tokens),
        }
    return {
        "model": str(model_path), "threads": threads, "chunk_rows": chunk_rows, "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens, "prompt_token_ms": t_prompt * 1e3, "long_prompt_tokens": long_prompt, "long_prompt_s": long_prompt * t_prompt,
        "matrices": matrices, "streams": per_streams,
    }


@dataclass(frozen=True)
class SizesRun:
    """What a bench/llm_sizes_vs_llamacpp.py run measured that the ceilings compare with."""

    llama_single_tok_s: float | None = None
    #: The appliance's single-stream inter-token p50 after a 100-token prompt.
    single_step_s: float | None = None
    llama_long_ttft_s: float | None = None
    long_ttft_s: float | None = None
    #: The appliance's stream runs by stream count ("8", "32").
    streams: dict[str, dict[str, Any]] | None = None


def sizes_run(pair: dict[str, Any], long_prompt: int = DEFAULT_LONG_PROMPT) -> SizesRun:
    """One pair of a bench/llm_sizes_vs_llamacpp.py report (its `pairs` values)."""
    ours, theirs = pair.get("appliance", {}), pair.get("llama.cpp", {})
    long_run = f"decode_after_{long_prompt}"
    return SizesRun(
        llama_single_tok_s=theirs.get("decode_after_100", {}).get("decode_tok_s"),
        single_step_s=ours.get("decode_after_100", {}).get("itl_p50_s"),
        llama_long_ttft_s=theirs.get(long_run, {}).get("ttft_s"),
        long_ttft_s=ours.get(long_run, {}).get("ttft_s"),
        streams={key.removeprefix("streams_"): value for key, value in ours.items() if key.startswith("streams_")},
    )


def measured(sizes_json: Path, long_prompt: int = DEFAULT_LONG_PROMPT) -> SizesRun:
    """The first pair of a sizes run (its `--json` file)."""
    report = json.loads(sizes_json.read_text())
    return sizes_run(next(iter(report["pairs"].values())), long_prompt)


def print_report(result: dict[str, Any], run: SizesRun) -> None:
    print(f"{result['model']}: {result['threads']} threads, prompt token {result['prompt_token_ms']:.2f} ms at {result['chunk_rows']} rows")
    for entry in result["matrices"]:
        rates = ", ".join(f"{r} rows {g:.0f}" for r, g in entry["gops"].items())
        print(f"  {entry['count']:>3} x {entry['matrix']}: GOPS {rates}")
    long_prompt, least = result["long_prompt_tokens"], result["long_prompt_s"]
    line = f"\n{long_prompt}-token prompt: first token after at least {least:.2f} s in the weight matrices"
    if run.long_ttft_s:
        line += f" (measured {run.long_ttft_s:.2f} s: {least / run.long_ttft_s:.0%} of it there)"
    if run.llama_long_ttft_s:
        line += f"; llama.cpp measured {run.llama_long_ttft_s:.2f} s, so at best {least / run.llama_long_ttft_s:.2f}x (target <= {TTFT_TARGET}x)"
    print(line)
    print(f"\n{result['prompt_tokens']}-token prompts, {result['new_tokens']} new tokens per stream")
    print(
        "| streams | generated token | least decode step | vs our single step | decode-only ceiling | workload ceiling "
        "| measured aggregate | of the ceiling | ceiling / llama.cpp single | target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for count, figures in result["streams"].items():
        mine = (run.streams or {}).get(count, {}).get("aggregate_tok_s")
        share = f"{mine / figures['ceiling_tok_s']:.0%}" if mine else ""
        versus = f"{figures['ceiling_tok_s'] / run.llama_single_tok_s:.2f}x" if run.llama_single_tok_s else ""
        target = f">= {TARGET_MULTIPLES[int(count)]:.0f}x" if int(count) in TARGET_MULTIPLES else ""
        step_ms = int(count) * figures["generated_token_ms"]
        step_ratio = f"{step_ms / 1e3 / run.single_step_s:.1f}x" if run.single_step_s else ""
        print(
            f"| {count} | {figures['generated_token_ms']:.2f} ms | {step_ms:.0f} ms | {step_ratio} "
            f"| {figures['decode_ceiling_tok_s']:.1f} tok/s | {figures['ceiling_tok_s']:.1f} tok/s "
            f"| {f'{mine:.1f} tok/s' if mine else ''} | {share} | {versus} | {target} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a version folder (STATE/models/NAME/N)")
    parser.add_argument("--streams", type=lambda s: tuple(int(x) for x in s.split(",")), default=DEFAULT_STREAMS, help="e.g. 1,8,32")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="prefill chunk size (rows of a prompt's products)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--long-prompt", type=int, default=DEFAULT_LONG_PROMPT, help="the prompt whose first token is bounded")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per matrix and row count (the fastest counts)")
    parser.add_argument("--sizes-json", type=Path, help="a bench/llm_sizes_vs_llamacpp.py --json run of this version")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if min(args.streams) < 1 or min(args.chunk_rows, args.new_tokens, args.long_prompt, args.runs) < 1 or args.prompt_tokens < 0:
        raise SystemExit("--streams, --chunk-rows, --new-tokens, --long-prompt and --runs must be at least 1, --prompt-tokens at least 0")
    version = read_version(args.model)
    result = limits(
        version.model_path, streams=args.streams, chunk_rows=args.chunk_rows, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, long_prompt=args.long_prompt, threads=args.threads, runs=args.runs,
    )
    run = measured(args.sizes_json, args.long_prompt) if args.sizes_json else SizesRun()
    print_report(result, run)
    if args.json:
        args.json.write_text(json.dumps({**result, "measured": asdict(run)}, indent=1))


if __name__ == "__main__":
    main()
