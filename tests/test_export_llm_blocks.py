"""Block sizes of the weight-only recipes: 8-bit MatMuls in blocks of 128 (falling back to the
largest power of two that divides K), 4-bit ones in blocks of 32, and a tied embedding read
from the 8-bit LM head at whatever block the head got."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.errors import ExportError
from appliance.export.llm.quantize import WeightOnlyRecipe, quantize_weight_only
from appliance.export.tasks.text_generation import EIGHT_BIT_BLOCK_SIZE, VARIANT_RECIPES

HIDDEN = 256
#: Not a multiple of 128: down_proj's 8-bit blocks must fall back to 64.
MLP = 192
VOCAB = 64


def _decoder_like(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """input_ids -> tied embedding -> q_proj -> up_proj -> down_proj -> LM head -> logits, named
    as the model builder names a layer's MatMuls."""
    rng = np.random.default_rng(seed)
    weights = {
        "q.weight": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 16,
        "up.weight": rng.standard_normal((HIDDEN, MLP)).astype(np.float32) / 16,
        "down.weight": rng.standard_normal((MLP, HIDDEN)).astype(np.float32) / 14,
        "lm_head.weight": rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["lm_head.weight"], ["embed.T"], name="/model/embed_tokens/Transpose"),
        helper.make_node("Gather", ["embed.T", "input_ids"], ["hidden"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["hidden", "q.weight"], ["q"], name="/model/layers.0/attn/q_proj/MatMul"),
        helper.make_node("MatMul", ["q", "up.weight"], ["up"], name="/model/layers.0/mlp/up_proj/MatMul"),
        helper.make_node("MatMul", ["up", "down.weight"], ["down"], name="/model/layers.0/mlp/down_proj/MatMul"),
        helper.make_node("MatMul", ["down", "lm_head.weight"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder-like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", VOCAB]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "s", HIDDEN]),
        ],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, weights


def _matmulnbits(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Node name -> (bits, block_size) of every MatMulNBits."""
    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            found[node.name] = (attrs["bits"], attrs["block_size"])
    return found


def test_the_shipped_recipes_put_8_bit_matmuls_in_blocks_of_128_and_4_bit_in_32() -> None:
    assert EIGHT_BIT_BLOCK_SIZE == 128
    for name in ("int4", "int8", "int4-exact"):
        assert VARIANT_RECIPES[name].eight_bit_block_size == EIGHT_BIT_BLOCK_SIZE
        assert VARIANT_RECIPES[name].block_size == 32


@pytest.mark.parametrize(
    ("bits", "k_dim", "expected"),
    [(8, 1536, 128), (8, 8960, 128), (8, 576, 64), (8, 96, 32), (8, 100, 16), (4, 1536, 32), (4, 48, 16)],
)
def test_an_8_bit_block_is_the_largest_power_of_two_that_divides_k(bits: int, k_dim: int, expected: int) -> None:
    recipe = WeightOnlyRecipe(bits=4, block_size=32, eight_bit_block_size=128)
    assert recipe.block_for(bits, k_dim) == expected


@pytest.mark.parametrize(("k_dim", "expected"), [(1536, 128), (576, 64), (896, 128), (200, 16)])
def test_a_4_bit_block_falls_back_the_same_way(k_dim: int, expected: int) -> None:
    assert WeightOnlyRecipe(bits=4, block_size=128).block_for(4, k_dim) == expected


def test_without_an_8_bit_block_size_every_matmul_takes_the_block_size() -> None:
    assert WeightOnlyRecipe(bits=8, block_size=64).block_for(8, 1536) == 64


@pytest.mark.parametrize("size", [8, 96, 512])
def test_an_8_bit_block_size_matmulnbits_cannot_use_is_refused_by_name(size: int) -> None:
    with pytest.raises(ExportError) as caught:
        WeightOnlyRecipe(bits=8, eight_bit_block_size=size)
    assert caught.value.field == "eight_bit_block_size"


def test_the_int4_recipe_writes_each_matmul_at_its_bits_and_block_and_shares_the_embedding(tmp_path: Path) -> None:
    model, weights = _decoder_like()
    source = tmp_path / "fp32" / "model.onnx"
    source.parent.mkdir()
    onnx.save(model, str(source))
    target = tmp_path / "int4" / "model.onnx"

    report = quantize_weight_only(source, target, VARIANT_RECIPES["int4"])

    quantised = onnx.load(str(target))
    assert _matmulnbits(quantised) == {
        "/model/layers.0/attn/q_proj/MatMul_Q8": (8, 128),
        "/model/layers.0/mlp/up_proj/MatMul_Q4": (4, 32),
        "/model/layers.0/mlp/down_proj/MatMul_Q8": (8, 64),
        "/lm_head/MatMul_Q8": (8, 128),
    }
    assert report["blocks"] == {"4-bit/32": 1, "8-bit/64": 1, "8-bit/128": 2}
    assert report["scale_searched_matmuls"] == 1
    up = next(node for node in quantised.graph.node if node.name == "/model/layers.0/mlp/up_proj/MatMul_Q4")
    assert len(up.input) == 4 and up.input[3]  # searched zero points, one per block
    assert report["embedding_shared_with_lm_head"]
    gather = next(node for node in quantised.graph.node if node.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in gather.attribute}["block_size"] == 128
    # Its table is a second name for the LM head's codes on disk, not a Reshape ONNX Runtime
    # would fold into a heap copy (export/llm/initializer_alias.py).
    assert "Reshape" not in {node.op_type for node in quantised.graph.node}
    stored = {init.name: init for init in onnx.load(str(target), load_external_data=False).graph.initializer}
    head = next(node for node in quantised.graph.node if node.name == "/lm_head/MatMul_Q8")
    assert stored[gather.input[0]].external_data == stored[head.input[1]].external_data

    ids = np.array([[0, 5, 17, 63, 5]], dtype=np.int64)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    logits, hidden = session.run(["logits", "hidden"], {"input_ids": ids})
    table = weights["lm_head.weight"].T
    # 8-bit rows of the shared table: within half a step (1/254 of a block's largest value).
    np.testing.assert_allclose(hidden[0], table[ids[0]], atol=np.abs(table).max() / 254 + 1e-6)
    # The product of the blocks as written, dequantised here: only the int8 activations of
    # accuracy level 4 stand between the two.
    stored = _dequantised(quantised)
    expected = hidden[0]
    for name in ("q_proj", "up_proj", "down_proj"):
        expected = expected @ stored[f"/model/layers.0/{'attn' if name == 'q_proj' else 'mlp'}/{name}/MatMul_Q{8 if name != 'up_proj' else 4}"]
    expected = expected @ stored["/lm_head/MatMul_Q8"]
    assert np.linalg.norm(logits[0] - expected) / np.linalg.norm(expected) < 0.02
    # ... and the written blocks are the fp32 weights at 4 and 8 bits.
    for name, weight in (("/model/layers.0/mlp/up_proj/MatMul_Q4", "up.weight"), ("/lm_head/MatMul_Q8", "lm_head.weight")):
        error = np.linalg.norm(stored[name] - weights[weight]) / np.linalg.norm(weights[weight])
        assert error < (0.12 if name.endswith("Q4") else 0.01)


def _dequantised(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Node name -> the [K, N] fp32 weight each MatMulNBits holds (each block's zero point from
    the node's zero-point input, two 4-bit points per byte, else the default 2^(bits-1))."""
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        codes = initializers[node.input[1]]
        if attrs["bits"] == 4:
            codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:2], -1)
        scales = initializers[node.input[2]].reshape(attrs["N"], -1, 1)
        points: np.ndarray | int = 2 ** (attrs["bits"] - 1)
        if len(node.input) > 3 and node.input[3]:
            packed = initializers[node.input[3]].reshape(attrs["N"], -1)
            if attrs["bits"] == 4:
                packed = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(attrs["N"], -1)
            points = packed[:, : scales.shape[1], None].astype(np.float32)
        values = (codes.astype(np.float32) - points) * scales
        weights[node.name] = values.reshape(attrs["N"], -1)[:, : attrs["K"]].T
    return weights
