"""The int8 cache's fp32 attention branch (export/llm/kv_prefill.py), on one GroupQueryAttention
node run by ONNX Runtime: what a prompt chunk computes and writes, against the fp32 kernel on
the dequantised past and against the int8 kernel's own codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from appliance.export.llm.kv_prefill import FP32_ATTENTION_INPUT
from appliance.export.llm.kv_quant import KvScales, write_int8_kv
from appliance.repository import GenerationSpec

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
PAST, NEW = 37, 11


def _spec() -> GenerationSpec:
    return GenerationSpec(graph="genai", num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=8, context_length=256)


def _fp32_graph(path: Path) -> None:
    """One attention layer with an fp32 cache, the model builder's names for its cache."""
    inputs = [
        helper.make_tensor_value_info("query", TensorProto.FLOAT, ["batch", "sequence", HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("key", TensorProto.FLOAT, ["batch", "sequence", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", "sequence", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_DIM]),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD_DIM]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "sequence", HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", KV_HEADS, "total", HEAD_DIM]),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", KV_HEADS, "total", HEAD_DIM]),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        [value.name for value in inputs],
        [value.name for value in outputs],
        name="attention",
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
    )
    graph = helper.make_graph([node], "attention", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, KvScales]:
    folder = tmp_path_factory.mktemp("kv_prefill")
    source, target = folder / "fp32" / "model.onnx", folder / "int8" / "model.onnx"
    source.parent.mkdir()
    _fp32_graph(source)
    rng = np.random.default_rng(0)
    scales = KvScales(
        keys=[(rng.random(KV_HEADS * HEAD_DIM) * 0.02 + 0.01).astype(np.float32)],
        values=[(rng.random(KV_HEADS * HEAD_DIM) * 0.02 + 0.01).astype(np.float32)],
    )
    spec = write_int8_kv(source, target, _spec(), scales)
    assert spec.kv_datatype == "INT8" and spec.fp32_attention_input == FP32_ATTENTION_INPUT
    return source, target, scales


def _feeds(rows: int, past: int, new: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "query": rng.standard_normal((rows, new, HEADS * HEAD_DIM)).astype(np.float32),
        "key": (rng.standard_normal((rows, new, KV_HEADS * HEAD_DIM)) * 0.3).astype(np.float32),
        "value": (rng.standard_normal((rows, new, KV_HEADS * HEAD_DIM)) * 0.3).astype(np.float32),
        "past_key_values.0.key": rng.integers(-127, 128, (rows, KV_HEADS, past, HEAD_DIM)).astype(np.int8),
        "past_key_values.0.value": rng.integers(-127, 128, (rows, KV_HEADS, past, HEAD_DIM)).astype(np.int8),
        "seqlens_k": np.full(rows, past + new - 1, np.int32),
        "total_sequence_length": np.array(past + new, np.int32),
    }


def _dequantised(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale.reshape(1, KV_HEADS, 1, HEAD_DIM)


@pytest.mark.parametrize(("rows", "past"), [(1, PAST), (1, 0), (3, 0)])
def test_a_prompt_chunk_attends_in_fp32_over_the_dequantised_past(graphs: tuple[Path, Path, KvScales], rows: int, past: int) -> None:
    source, target, scales = graphs
    feeds = _feeds(rows, past, NEW, seed=rows + past)
    int8 = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    output, new_keys, new_values = int8.run(None, {**feeds, FP32_ATTENTION_INPUT: np.array([True])})
    # Only the call's own positions come back, as int8 codes.
    assert new_keys.shape == new_values.shape == (rows, KV_HEADS, NEW, HEAD_DIM) and new_keys.dtype == np.int8

    fp32 = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    reference = {
        **feeds,
        "past_key_values.0.key": _dequantised(feeds["past_key_values.0.key"], scales.keys[0]),
        "past_key_values.0.value": _dequantised(feeds["past_key_values.0.value"], scales.values[0]),
    }
    want_output, want_keys, want_values = fp32.run(None, reference)
    np.testing.assert_array_equal(output, want_output)
    # The codes are the int8 kernel's rounding of the fp32 keys and values...
    for got, present, scale in ((new_keys, want_keys, scales.keys[0]), (new_values, want_values, scales.values[0])):
        steps = present[:, :, past:] / scale.reshape(1, KV_HEADS, 1, HEAD_DIM)
        np.testing.assert_array_equal(got, np.clip(np.rint(steps), -128, 127).astype(np.int8))
    # ...and the same codes the int8 kernel writes for the same call.
    _, kernel_keys, kernel_values = int8.run(None, {**feeds, FP32_ATTENTION_INPUT: np.array([False])})
    np.testing.assert_array_equal(kernel_keys[:, :, past:], new_keys)
    np.testing.assert_array_equal(kernel_values[:, :, past:], new_values)


def test_a_decode_step_keeps_the_int8_kernel(graphs: tuple[Path, Path, KvScales]) -> None:
    _, target, _ = graphs
    feeds = _feeds(2, PAST, 1, seed=7)
    int8 = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    output, keys, _ = int8.run(None, {**feeds, FP32_ATTENTION_INPUT: np.array([False])})
    # The whole cache comes back (past and the new position), the past untouched.
    assert keys.shape == (2, KV_HEADS, PAST + 1, HEAD_DIM)
    np.testing.assert_array_equal(keys[:, :, :PAST], feeds["past_key_values.0.key"])
    assert np.isfinite(output).all()


def test_the_rewritten_graph_is_valid_onnx(graphs: tuple[Path, Path, KvScales]) -> None:
    _, target, _ = graphs
    model = onnx.load(str(target))
    onnx.checker.check_model(model, full_check=True)
    flag = next(value for value in model.graph.input if value.name == FP32_ATTENTION_INPUT)
    assert flag.type.tensor_type.elem_type == TensorProto.BOOL
