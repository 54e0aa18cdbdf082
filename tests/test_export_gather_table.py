"""A tied embedding's table stored in gather order (export/llm/gather_table.py): the same
logits, no Transpose left, the heap copy ONNX Runtime made of the folded Transpose gone, and
the weight-only quantiser still finds the tie. Small graphs (a 16 MB table): seconds."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from appliance.export.llm.gather_table import store_gather_tables, stored_copy_bytes
from appliance.export.llm.quantize import quantize_weight_only, save_with_weights
from appliance.export.tasks.text_generation import VARIANT_RECIPES
from appliance.ops.memory import allocated_bytes

VOCAB, HIDDEN = 16_384, 256
TABLE_BYTES = VOCAB * HIDDEN * 4
IDS = np.asarray([[0, 5, 4_000, VOCAB - 1]], dtype=np.int64)


def _tied(path: Path, reader: str = "Gather") -> np.ndarray:
    """input_ids -> Gather(Transpose(W)) -> MatMul(W) -> logits, as the model builder writes a
    tied embedding; returns W."""
    weight = np.random.default_rng(3).standard_normal((HIDDEN, VOCAB), dtype=np.float32)
    nodes = [
        helper.make_node("Transpose", ["lm_head.weight"], ["embed.table"], name="/model/embed_tokens/Transpose"),
        helper.make_node(reader, ["embed.table", "input_ids"], ["hidden"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["hidden", "lm_head.weight"], ["logits"], name="/lm_head/MatMul"),
    ]
    if reader != "Gather":  # a table read by something else: hidden = table[ids] as a GatherElements would not do
        nodes[1] = helper.make_node("Gather", ["embed.table.copy", "input_ids"], ["hidden"], name="/model/embed_tokens/Gather")
        nodes.insert(1, helper.make_node("Identity", ["embed.table"], ["embed.table.copy"], name="Keep"))
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", VOCAB])], [numpy_helper.from_array(weight, "lm_head.weight")],
    )
    save_with_weights(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return weight


def _run(path: Path) -> tuple[np.ndarray, int]:
    gc.collect()
    before = allocated_bytes()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    held = allocated_bytes() - before
    logits = session.run(None, {"input_ids": IDS})[0]
    del session
    return logits, held


def test_the_tied_table_is_stored_in_gather_order_and_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    weight = _tied(path)
    expected, heap_with_transpose = _run(path)
    assert stored_copy_bytes(path) == 0

    assert store_gather_tables(path) == ["embed.table"]
    assert stored_copy_bytes(path) == TABLE_BYTES  # what the report's size ratio leaves out

    model = onnx.load(str(path), load_external_data=False)
    assert [node.op_type for node in model.graph.node] == ["Gather", "MatMul"]
    tensors = {init.name: init for init in model.graph.initializer}
    assert list(tensors["embed.table"].dims) == [VOCAB, HIDDEN]
    offset = int({entry.key: entry.value for entry in tensors["embed.table"].external_data}["offset"])
    assert offset % 4096 == 0
    np.testing.assert_array_equal(numpy_helper.to_array(tensors["embed.table"], base_dir=str(tmp_path)), weight.T)
    logits, heap_stored = _run(path)
    np.testing.assert_array_equal(logits, expected)
    # The folded Transpose was a heap copy of the whole table; the stored one is mapped.
    assert heap_with_transpose - heap_stored > 0.9 * TABLE_BYTES


def test_the_quantiser_still_shares_the_8_bit_lm_head_with_a_stored_table(tmp_path: Path) -> None:
    source = tmp_path / "fp32" / "model.onnx"
    _tied(source)
    store_gather_tables(source)
    report = quantize_weight_only(source, tmp_path / "int8" / "model.onnx", VARIANT_RECIPES["int8"])
    assert report["embedding_shared_with_lm_head"]
    quantised = onnx.load(str(tmp_path / "int8" / "model.onnx"), load_external_data=False)
    assert "embed.table" not in {init.name for init in quantised.graph.initializer}  # not carried twice


def test_a_transpose_read_by_anything_but_a_gather_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    _tied(path, reader="Identity")
    before = path.read_bytes(), (tmp_path / "model.onnx.data").stat().st_size
    assert store_gather_tables(path) == []
    assert (path.read_bytes(), (tmp_path / "model.onnx.data").stat().st_size) == before
