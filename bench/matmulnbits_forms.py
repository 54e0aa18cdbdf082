"""Benchmark: one Q4_0 matrix stored two ways in MatMulNBits, with explicit zero points or in the
symmetric form (signed scales, no zero-point input), timed alone at decode and prefill sizes.

Why: `--quant int4-exact` keeps a Q4_0 file's own 4-bit codes (export/llm/grid_exact.py). The
same codes can be written with a positive scale and a per-block zero point of 7 or 8, or with a
signed scale and the default zero point 8; the two compute the same product, but ONNX Runtime
may take a different CPU kernel path for each. This script says whether one is faster on this
box, so the export's choice rests on a number (2026-12-04: no, within noise).

Both forms come from the same weights: `--layers` matrices of `--k` x `--n` (default the
Qwen2.5-1.5B MLP's gate/up shape), drawn seeded, written as Q4_0 by the `gguf` package and
dequantised, then recovered by the export's own `recover_grid`; the zero-point form flips each
negative-scale block back to a positive scale (codes 15 - q, zero point 7). One graph per form
runs the matrices side by side on one input (as a decoder layer's projections read one
activation), accuracy_level 4, `--threads` intra-op threads. Both sessions stay open and their
timed batches of five runs alternate after a warm-up (drift on a shared box hits both alike);
each figure is the median of `--repeats` batches. The relative error against the fp32 product
is printed as a check that both forms compute the same thing.

    .venv/bin/python bench/matmulnbits_forms.py                    # 1536 x 8960 (gate/up)
    .venv/bin/python bench/matmulnbits_forms.py --k 8960 --n 1536  # down

Needs a quiet machine (it does not gate itself). Never imported by the appliance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.export.llm.grid_exact import DEFAULT_ZERO_POINT, GRID_LEVELS, GridBlocks, encode_grid_exact, recover_grid  # noqa: E402

BLOCK = 32
#: Query rows timed: a decode step, an 8-stream decode batch, a prefill chunk.
ROWS = (1, 8, 256)
RUNS_PER_BATCH = 5


def q4_0_weights(k_dim: int, n_dim: int, count: int, seed: int) -> list[np.ndarray]:
    """[K, N] MatMul weights exactly as a Q4_0 GGUF dequantises them."""
    import gguf

    rng = np.random.default_rng(seed)
    weights = []
    for _ in range(count):
        rows = rng.standard_normal((n_dim, k_dim)).astype(np.float32)
        quantised = gguf.quants.quantize(rows, gguf.GGMLQuantizationType.Q4_0)
        weights.append(np.ascontiguousarray(gguf.quants.dequantize(quantised, gguf.GGMLQuantizationType.Q4_0).T))
    return weights


def with_zero_points(grid: GridBlocks) -> GridBlocks:
    """The same weights with positive scales: a negative-scale block's codes flipped (15 - q),
    its zero point 7."""
    flip = grid.scales < 0
    scales = np.abs(grid.scales)
    codes = np.where(flip[..., None], GRID_LEVELS - 1 - grid.codes, grid.codes)
    mins = np.where(flip, -(DEFAULT_ZERO_POINT - 1) * scales, -DEFAULT_ZERO_POINT * scales)
    return GridBlocks(codes=codes.astype(np.uint8), scales=scales.astype(np.float32), mins=mins.astype(np.float32))


def session(weights: list[np.ndarray], symmetric: bool, threads: int) -> ort.InferenceSession:
    k_dim = weights[0].shape[0]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(len(weights))]
    graph = helper.make_graph(
        nodes,
        "forms",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k_dim])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(weights))],
        [numpy_helper.from_array(weight, f"w{i}") for i, weight in enumerate(weights)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    grids = {}
    for i, weight in enumerate(weights):
        grid = recover_grid(weight, BLOCK)
        if grid is None or not grid.is_symmetric():
            raise SystemExit("the Q4_0 weights were not recovered in the symmetric form")
        grids[f"proj{i}"] = grid if symmetric else with_zero_points(grid)
    encode_grid_exact(model, grids, BLOCK)
    inputs = {len(node.input) for node in model.graph.node}
    assert inputs == ({3} if symmetric else {4}), inputs
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Park the pool when a run returns: the two sessions take turns on the same cores, and an
    # idle pool that spins on them slowed the other's millisecond-long runs up to 3x.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def add_matrix_arguments(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    """The matrices and timing options of the MatMulNBits benchmarks (this one and matmulnbits_blocks.py)."""
    parser.add_argument("--k", type=int, default=1536, help="input features (default 1536: Qwen2.5-1.5B hidden)")
    parser.add_argument("--n", type=int, default=8960, help="output features (default 8960: its MLP)")
    parser.add_argument("--layers", type=int, default=8, help="matrices run side by side in one graph")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed batches per form, alternating")
    parser.add_argument("--seed", type=int, default=0)


#: Untimed runs before `run_walls` times a session (first-run allocations, thread-pool start).
WARMUP_RUNS = 2


def run_walls(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> list[float]:
    """Wall seconds of `runs` runs of `feed`, after WARMUP_RUNS untimed ones."""
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        walls.append(time.perf_counter() - started)
    return walls


def time_batch(runner: ort.InferenceSession, feed: dict[str, np.ndarray], warmup: bool = False) -> float:
    """Seconds per run over a batch of RUNS_PER_BATCH runs (a warm-up batch is not timed)."""
    start = time.perf_counter()
    for _ in range(RUNS_PER_BATCH):
        runner.run(None, feed)
    return 0.0 if warmup else (time.perf_counter() - start) / RUNS_PER_BATCH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_arguments(parser, repeats=21)
    args = parser.parse_args()
    weights = q4_0_weights(args.k, args.n, args.layers, args.seed)
    mebibytes = sum(w.size for w in weights) * (4 + 32 / BLOCK) / 8 / 2**20
    print(f"{args.layers} Q4_0 matrices of {args.k} x {args.n} ({mebibytes:.0f} MiB as 4-bit codes + fp32 scales), {args.threads} threads")
    rng = np.random.default_rng(args.seed + 1)
    runners = {symmetric: session(weights, symmetric, args.threads) for symmetric in (False, True)}
    names = {False: "explicit zero points", True: "symmetric (no zero points)"}
    for rows in ROWS:
        x = rng.standard_normal((1, rows, args.k)).astype(np.float32)
        batches: dict[bool, list[float]] = {False: [], True: []}
        for symmetric, runner in runners.items():
            outputs = runner.run(None, {"x": x})
            error = max(float(np.abs(got - x @ w).max() / np.abs(x @ w).max()) for got, w in zip(outputs, weights, strict=True))
            print(f"  {names[symmetric]:28s} M={rows:<4d} relative error {error:.4f}")
            time_batch(runner, {"x": x}, warmup=True)
        for _ in range(args.repeats):  # alternating, so drift on the shared box hits both forms alike
            for symmetric, runner in runners.items():
                batches[symmetric].append(time_batch(runner, {"x": x}))
        medians = {symmetric: statistics.median(times) for symmetric, times in batches.items()}
        bandwidth = mebibytes * 2**20 / medians[True] / 1e9
        print(
            f"M={rows:<4d} zero points {medians[False] * 1e3:8.2f} ms, symmetric {medians[True] * 1e3:8.2f} ms: "
            f"{medians[False] / medians[True]:.2f}x   (symmetric form reads {bandwidth:.1f} GB/s)"
        )


if __name__ == "__main__":
    main()
