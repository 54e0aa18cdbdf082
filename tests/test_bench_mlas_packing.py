"""bench/mlas_packing.py and the sizes bench's bytes per token: a MatMulNBits weight counts as
ONNX Runtime's CPU kernel keeps it (codes, fp32 scales and fp32 block sums at accuracy level 4),
and a real session's heap grows by at least that much when it loads. Small graphs: seconds."""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.bench_modules import load_bench_module

packing = load_bench_module("mlas_packing")
blocks = load_bench_module("matmulnbits_blocks")
sizes = load_bench_module("llm_sizes_vs_llamacpp")

#: What a session adds besides its packed weights (node bookkeeping), as a share of them.
HEAP_SLACK = 0.05


@pytest.mark.parametrize(("bits", "block", "expected"), [(4, 32, 6.0), (4, 64, 5.0), (4, 128, 4.5), (8, 32, 10.0), (8, 128, 8.5)])
def test_bits_per_weight_add_a_scale_and_a_block_sum_per_block(bits: int, block: int, expected: float) -> None:
    assert packing.packed_bits_per_weight(bits, block) == expected
    assert packing.packed_bytes(1024, 64, bits, block) * 8 == expected * 1024 * 64


def test_block_sums_are_padded_to_sixteen_columns_and_other_levels_count_as_stored() -> None:
    codes_and_scales = 20 * 4 * (16 + 4)  # N=20, 4 blocks of 32 4-bit codes
    assert packing.stored_bytes(128, 20, 4, 32) == codes_and_scales
    assert packing.packed_bytes(128, 20, 4, 32) == codes_and_scales + 32 * 4 * 4  # N padded to 32
    assert packing.packed_bytes(128, 20, 4, 32, accuracy_level=0) == codes_and_scales


def test_a_session_loaded_from_a_file_holds_the_packed_bytes() -> None:
    """The layout the figures assume, checked against ONNX Runtime itself: loading four
    4-bit/32 matrices from a file (as a served version is loaded) adds their packed bytes to the
    heap (6 bits per weight), not the 5 stored, and not the stored copy on top."""
    if packing.heap_bytes_in_use() == 0:
        pytest.skip("glibc's mallinfo2 is not available here")
    warm_up = blocks.session(blocks.make_form(4, 32, k_dim=64, n_dim=16, layers=1, seed=0), threads=1)  # one-time pools
    form = blocks.make_form(4, 32, k_dim=1536, n_dim=2048, layers=4, seed=3)
    gc.collect()
    before = packing.heap_bytes_in_use()
    runner = blocks.session(form, threads=1)
    added = packing.heap_bytes_in_use() - before
    assert form.packed_bytes == 4 * packing.packed_bytes(1536, 2048, 4, 32) > form.weight_bytes
    assert form.packed_bytes <= added <= form.packed_bytes * (1 + HEAP_SLACK)
    x = np.ones((1, 1, 1536), np.float32)
    assert blocks.relative_error(runner, form, x) <= blocks.RELATIVE_ERROR_LIMIT
    del warm_up


def _four_bit_session(folder: Path, *, zero_points: bool) -> ort.InferenceSession:
    """Four 1536 x 2048 4-bit/32 MatMulNBits (seeded codes), with or without a zero-point
    input, loaded from a file with external data as a served version is."""
    k_dim, n_dim, blocks = 1536, 2048, 1536 // 32
    rng = np.random.default_rng(4)
    nodes, initializers = [], []
    for i in range(4):
        inputs = ["x", f"q{i}", f"s{i}"]
        initializers += [
            numpy_helper.from_array(rng.integers(0, 256, (n_dim, blocks, 16), dtype=np.uint8), f"q{i}"),
            numpy_helper.from_array(rng.random(n_dim * blocks, dtype=np.float32) * 0.01 + 0.001, f"s{i}"),
        ]
        if zero_points:
            initializers.append(numpy_helper.from_array(rng.integers(0, 256, n_dim * blocks // 2, dtype=np.uint8), f"z{i}"))
            inputs.append(f"z{i}")
        nodes.append(
            helper.make_node("MatMulNBits", inputs, [f"y{i}"], domain="com.microsoft", K=k_dim, N=n_dim, bits=4, block_size=32, accuracy_level=4)
        )
    graph = helper.make_graph(
        nodes,
        "four",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k_dim])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(4)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = folder / ("zero-points.onnx" if zero_points else "symmetric.onnx")
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_zero_points_add_nothing_to_what_the_kernel_keeps(tmp_path: Path) -> None:
    """Why the int4 recipe's searched zero points are free at run time: the kernel folds them
    into the block sums it keeps anyway, so both forms hold the same packed bytes."""
    if packing.heap_bytes_in_use() == 0:
        pytest.skip("glibc's mallinfo2 is not available here")
    sessions = [_four_bit_session(tmp_path, zero_points=False)]  # one-time pools
    added = {}
    for zero_points in (False, True):
        gc.collect()
        before = packing.heap_bytes_in_use()
        sessions.append(_four_bit_session(tmp_path, zero_points=zero_points))
        added[zero_points] = packing.heap_bytes_in_use() - before
    packed = 4 * packing.packed_bytes(1536, 2048, 4, 32)
    for grown in added.values():
        assert packed <= grown <= packed * (1 + HEAP_SLACK)


def _decoder_like_graph(folder: Path) -> Path:
    """An embedding looked up by row, one MatMulNBits (4-bit/32, level 4) and one fp32 MatMul."""
    k_dim, n_dim, vocab = 64, 48, 100
    codes = np.zeros((n_dim, k_dim // 32, 16), np.uint8)
    scales = np.ones(n_dim * (k_dim // 32), np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"]),
        helper.make_node(
            "MatMulNBits", ["h", "q", "s"], ["y"], domain="com.microsoft", K=k_dim, N=n_dim, bits=4, block_size=32, accuracy_level=4
        ),
        helper.make_node("MatMul", ["y", "w"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(np.zeros((vocab, k_dim), np.float32), "table"),
        numpy_helper.from_array(codes, "q"),
        numpy_helper.from_array(scales, "s"),
        numpy_helper.from_array(np.zeros((n_dim, vocab), np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder-like",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # a graph ONNX Runtime runs
    return path


def test_sizes_bench_counts_matmulnbits_weights_as_packed(tmp_path: Path) -> None:
    version = SimpleNamespace(model_path=_decoder_like_graph(tmp_path))  # the one field it reads
    fp32_matmul = 48 * 100 * 4
    stored = sizes.appliance_weight_bytes(version, packed=False)
    assert stored == packing.stored_bytes(64, 48, 4, 32) + fp32_matmul  # the Gather table is not read whole
    assert sizes.appliance_weight_bytes(version) == packing.packed_bytes(64, 48, 4, 32) + fp32_matmul
