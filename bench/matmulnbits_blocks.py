"""Benchmark: MatMulNBits at 4 and 8 bits in blocks of 32, 64 and 128, timed alone at decode,
batched-decode and prefill sizes, side by side in one process.

Why: the block size is the export's choice (export/llm/quantize.py) and ONNX Runtime's CPU
kernel (MLAS, accuracy level 4: int8 activations) pays per block as well as per code: it keeps
two fp32 values per block (the scale and the block sum, bench/mlas_packing.py) and scales each
block's integer dot product on its own. This script says what each block size costs on this
box, per bits and per query rows, so the recipe's block sizes rest on numbers. GB/s counts the
bytes the kernel packs (codes, scales, block sums), which a one-row product streams; the bits
per weight each session adds to the heap when it loads are printed first, as the check of that
layout on this box.

What runs: for each (bits, block) one graph of `--layers` MatMulNBits nodes of `--k` x `--n`
(default the Qwen2.5-1.5B MLP's gate/up shape) reading one activation, as a decoder layer's
projections do; symmetric codes (no zero-point input), accuracy_level 4, `--threads` intra-op
threads. The codes and scales are seeded random: the kernel's speed does not depend on their
values, and each session's output is checked against numpy's product of the dequantised
weights. All sessions stay open; their timed batches alternate after a warm-up, and every
session parks its threads when a run returns (`session.force_spinning_stop`): otherwise the
idle pool of the session that ran last spins on the cores the next one needs, which slowed
millisecond-long runs up to 3x on the 2-core box and made such comparisons noise.

    .venv/bin/python bench/matmulnbits_blocks.py                    # 1536 x 8960 (gate/up)
    .venv/bin/python bench/matmulnbits_blocks.py --k 8960 --n 1536  # down

Needs a quiet machine (it does not gate itself). Never imported by the appliance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from matmulnbits_forms import add_matrix_arguments, time_batch  # noqa: E402
from mlas_packing import heap_bytes_in_use, packed_bits_per_weight, packed_bytes  # noqa: E402

BITS = (4, 8)
BLOCKS = (32, 64, 128)
#: Query rows timed: a decode step, an 8-stream decode batch, a prefill chunk.
ROWS = (1, 8, 256)
#: The int8 activations of accuracy level 4 bound the error against the fp32 product.
RELATIVE_ERROR_LIMIT = 0.02


@dataclass(frozen=True)
class Form:
    """One (bits, block) storage of `layers` matrices: packed codes, scales, the dequantised
    [K, N] weights numpy checks against, and the bytes the node reads per pass."""

    bits: int
    block: int
    codes: list[np.ndarray]
    scales: list[np.ndarray]
    weights: list[np.ndarray]

    @property
    def name(self) -> str:
        return f"{self.bits}-bit/{self.block}"

    @property
    def weight_bytes(self) -> int:
        return sum(c.nbytes + s.nbytes for c, s in zip(self.codes, self.scales, strict=True))

    @property
    def packed_bytes(self) -> int:
        """What the CPU kernel keeps of the same matrices (codes, scales and block sums)."""
        k_dim, n_dim = self.weights[0].shape
        return len(self.codes) * packed_bytes(k_dim, n_dim, self.bits, self.block)


def make_form(bits: int, block: int, k_dim: int, n_dim: int, layers: int, seed: int) -> Form:
    """Seeded symmetric codes (zero point 2^(bits-1), MatMulNBits' default) and positive scales."""
    if k_dim % block:
        raise SystemExit(f"--k {k_dim} is not a multiple of the block size {block}")
    rng = np.random.default_rng(seed)
    blocks = k_dim // block
    codes, scales, weights = [], [], []
    for _ in range(layers):
        values = rng.integers(0, 2**bits, size=(n_dim, blocks, block), dtype=np.uint8)
        scale = (rng.random((n_dim, blocks), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
        dequantised = (values.astype(np.float32) - 2 ** (bits - 1)) * scale[..., None]
        weights.append(np.ascontiguousarray(dequantised.reshape(n_dim, k_dim).T))
        if bits == 4:  # two codes per byte, the first in the low nibble
            values = values[..., 0::2] | (values[..., 1::2] << 4)
        codes.append(np.ascontiguousarray(values))
        scales.append(scale.reshape(-1))
    return Form(bits=bits, block=block, codes=codes, scales=scales, weights=weights)


def session(form: Form, threads: int) -> ort.InferenceSession:
    k_dim, n_dim = form.weights[0].shape
    nodes, initializers = [], []
    for i, (codes, scales) in enumerate(zip(form.codes, form.scales, strict=True)):
        initializers += [numpy_helper.from_array(codes, f"q{i}"), numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(
            helper.make_node(
                "MatMulNBits", ["x", f"q{i}", f"s{i}"], [f"y{i}"], name=f"proj{i}", domain="com.microsoft",
                K=k_dim, N=n_dim, bits=form.bits, block_size=form.block, accuracy_level=4,
            )
        )
    graph = helper.make_graph(
        nodes,
        "blocks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k_dim])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(nodes))],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # Loaded from a file with its weights in external data, as the appliance loads a version:
    # the session then keeps only the kernel's packed copy (from serialised bytes it kept the
    # stored initializers as well, which hid the packed size in the heap figure).
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "blocks.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="blocks.onnx.data", size_threshold=0)
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def relative_error(runner: ort.InferenceSession, form: Form, x: np.ndarray) -> float:
    outputs = runner.run(None, {"x": x})
    return max(
        float(np.abs(got - x @ w).max() / np.abs(x @ w).max()) for got, w in zip(outputs, form.weights, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_arguments(parser, repeats=15)
    args = parser.parse_args()
    forms = [make_form(bits, block, args.k, args.n, args.layers, args.seed) for bits in BITS for block in BLOCKS]
    weights = args.k * args.n * args.layers
    print(f"{args.layers} matrices of {args.k} x {args.n} per form, {args.threads} threads, load {tuple(round(v, 2) for v in os.getloadavg())}")
    print("| form | bits/weight stored | packed (codes + scale + block sum) | heap added by loading the session |")
    print("| --- | --- | --- | --- |")
    runners = {}
    for form in forms:
        before = heap_bytes_in_use()
        runners[form.name] = session(form, args.threads)
        added = heap_bytes_in_use() - before
        print(f"| {form.name} | {8 * form.weight_bytes / weights:.2f} | {packed_bits_per_weight(form.bits, form.block):.2f} | {8 * added / weights:.2f} |")
    rng = np.random.default_rng(args.seed + 1)
    print("| rows | form | MB stored | MB packed | ms | GB/s packed | vs blocks of 32 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rows in ROWS:
        x = rng.standard_normal((1, rows, args.k)).astype(np.float32)
        for form in forms:
            error = relative_error(runners[form.name], form, x)
            if error > RELATIVE_ERROR_LIMIT:
                raise SystemExit(f"{form.name} at {rows} rows: relative error {error:.4f} against the dequantised product")
            time_batch(runners[form.name], {"x": x})  # warm-up
        batches: dict[str, list[float]] = {form.name: [] for form in forms}
        for _ in range(args.repeats):  # alternating, so drift on the shared box hits every form alike
            for form in forms:
                batches[form.name].append(time_batch(runners[form.name], {"x": x}))
        medians = {name: statistics.median(times) for name, times in batches.items()}
        for form in forms:
            base = medians[f"{form.bits}-bit/{BLOCKS[0]}"]
            seconds = medians[form.name]
            print(
                f"| {rows} | {form.name} | {form.weight_bytes / 1e6:.1f} | {form.packed_bytes / 1e6:.1f} | {seconds * 1e3:.2f} | "
                f"{form.packed_bytes / seconds / 1e9:.1f} | {base / seconds:.2f}x |",
                flush=True,
            )
    print(f"load at end {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
