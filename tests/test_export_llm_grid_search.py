"""export/llm/grid_search.py: 4-bit codes by a per-block scale search, in MatMulNBits'
symmetric form or with searched integer zero points, with less weight error than
round-to-nearest (and, with zero points, than the symmetric search on lopsided blocks) and the
product ONNX Runtime computes from them equal to the dequantised weights'."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from appliance.errors import ExportError
from appliance.export.llm.grid_exact import encode_grid_exact
from appliance.export.llm.grid_search import search_grid
from appliance.export.llm.quantize import WeightOnlyRecipe


def _dequantised(grid) -> np.ndarray:  # noqa: ANN001 - GridBlocks
    """[K, N] weights the grid stands for."""
    values = grid.codes.astype(np.float32) * grid.scales[..., None] + grid.mins[..., None]
    return values.reshape(grid.codes.shape[0], -1).T


def _round_to_nearest(weight: np.ndarray, block: int) -> np.ndarray:
    """ONNX Runtime's and ggml Q4_0's symmetric rounding: step = largest-magnitude value / -8."""
    k_dim, n_dim = weight.shape
    blocks = weight.T.reshape(n_dim, k_dim // block, block)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    step = largest / -8
    codes = np.clip(np.rint(blocks / np.where(step != 0, step, 1)), -8, 7)
    return (codes * step).reshape(n_dim, k_dim).T


def _relative_error(approx: np.ndarray, weight: np.ndarray) -> float:
    return float(np.linalg.norm(approx - weight) / np.linalg.norm(weight))


@pytest.mark.parametrize("block", [32, 64, 128])
def test_searched_codes_are_symmetric_4_bit_and_closer_than_round_to_nearest(block: int) -> None:
    rng = np.random.default_rng(block)
    # Heavy-tailed like trained weights: a few outliers per block are what round-to-nearest pays for.
    weight = rng.standard_t(df=4, size=(256, 96)).astype(np.float32) / 20
    grid = search_grid(weight, block)
    assert grid.codes.shape == (96, 256 // block, block) and grid.codes.dtype == np.uint8
    assert grid.codes.max() <= 15 and grid.is_symmetric()
    searched = _relative_error(_dequantised(grid), weight)
    rounded = _relative_error(_round_to_nearest(weight, block), weight)
    assert searched < 0.98 * rounded


def test_an_all_zero_block_stays_zero_and_k_must_be_a_multiple_of_the_block() -> None:
    weight = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    weight[:32, 3] = 0.0
    grid = search_grid(weight, 32)
    assert grid.scales[3, 0] == 0.0 and np.all(_dequantised(grid)[:32, 3] == 0.0)
    assert np.isfinite(grid.scales).all()
    with pytest.raises(ValueError, match="multiple of the block size"):
        search_grid(weight[:48], 32)


@pytest.mark.parametrize("zero_points", [False, True])
def test_onnx_runtime_computes_the_searched_weights_product(zero_points: bool) -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((128, 40)).astype(np.float32) + 0.8 * zero_points  # lopsided with zero points
    grid = search_grid(weight, 64, zero_points=zero_points)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.reshape(-1))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    assert encode_grid_exact(model, {"proj": grid}, 64) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits"]  # one node, no block-sum fix-up
    assert len(model.graph.node[0].input) == (4 if zero_points else 3)  # zero-point input only when searched
    x = rng.standard_normal((1, 5, 128)).astype(np.float32)
    (got,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    expected = x @ _dequantised(grid)
    # accuracy level 4 rounds the activations to int8 inside the kernel.
    assert np.abs(got - expected).max() <= 0.01 * np.abs(expected).max()


def test_searched_zero_points_fit_lopsided_blocks_closer_and_never_worse() -> None:
    rng = np.random.default_rng(5)
    centred = rng.standard_t(df=4, size=(256, 64)).astype(np.float32) / 20
    lopsided = np.abs(centred) + 0.01  # every weight positive: half the symmetric codes go unused
    for weight, gain in ((centred, 1.0), (lopsided, 0.8)):
        symmetric = _relative_error(_dequantised(search_grid(weight, 32)), weight)
        grid = search_grid(weight, 32, zero_points=True)
        points = grid.integer_zero_points()
        assert points is not None and points.max() <= 15  # whole steps: one MatMulNBits, exact
        assert _relative_error(_dequantised(grid), weight) <= gain * symmetric
    assert not grid.is_symmetric()


def test_a_recipe_asks_for_zero_points_through_the_search_only() -> None:
    with pytest.raises(ExportError) as caught:
        WeightOnlyRecipe(bits=4, search_scales=True, symmetric=False)
    assert caught.value.field == "quant" and "search_zero_points" in str(caught.value)
    with pytest.raises(ExportError) as caught:
        WeightOnlyRecipe(bits=4, search_zero_points=True)
    assert caught.value.field == "quant" and "search_scales" in str(caught.value)
    assert WeightOnlyRecipe(bits=4, search_scales=True, search_zero_points=True).search_zero_points
