"""The shared embedding's table as a second name for the LM head's bytes: same outputs, no
Reshape left, and the heap copy ONNX Runtime made of the folded Reshape is gone. Small graphs
(an 8 MB table): seconds."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.export.llm.initializer_alias import alias_constant_reshapes
from appliance.export.llm.quantize import save_with_weights
from appliance.ops.memory import allocated_bytes

VOCAB, HIDDEN, BLOCK = 16_384, 512, 128
BLOCKS = HIDDEN // BLOCK
CODES_BYTES = VOCAB * HIDDEN


def _shared_head(path: Path, shape: list[int] | None = None) -> None:
    """ids -> GatherBlockQuantized(Reshape(B)) -> MatMulNBits(B) -> logits, B an 8-bit LM head
    in [vocab, blocks, block] form, as quantize.share_embedding_with_lm_head writes it."""
    rng = np.random.default_rng(7)
    initializers = [
        numpy_helper.from_array(rng.integers(0, 256, (VOCAB, BLOCKS, BLOCK), dtype=np.uint8), "head.codes"),
        numpy_helper.from_array((rng.random((VOCAB, BLOCKS), dtype=np.float32) + 0.5) * 0.01, "head.scales"),
        numpy_helper.from_array(np.full((VOCAB, BLOCKS), 128, dtype=np.uint8), "head.zero_points"),
        numpy_helper.from_array(np.asarray(shape or [VOCAB, HIDDEN], dtype=np.int64), "table.shape"),
    ]
    nodes = [
        helper.make_node("Reshape", ["head.codes", "table.shape"], ["table"], name="SharedReshape"),
        helper.make_node(
            "GatherBlockQuantized", ["table", "ids", "head.scales", "head.zero_points"], ["hidden"],
            name="SharedGather", domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=BLOCK, bits=8,
        ),
        helper.make_node(
            "MatMulNBits", ["hidden", "head.codes", "head.scales"], ["logits"],
            name="LmHead", domain="com.microsoft", K=HIDDEN, N=VOCAB, bits=8, block_size=BLOCK, accuracy_level=4,
        ),
    ]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", VOCAB])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    save_with_weights(model, path)


def _run(path: Path) -> tuple[np.ndarray, int]:
    """Logits for a few ids, and the heap the session holds."""
    gc.collect()
    before = allocated_bytes()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    held = allocated_bytes() - before
    logits = session.run(None, {"ids": np.asarray([[0, 5, 4_000, VOCAB - 1]], dtype=np.int64)})[0]
    del session
    return logits, held


def test_the_shared_table_becomes_an_initializer_over_the_lm_head_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    _shared_head(path)
    expected, heap_with_reshape = _run(path)

    assert alias_constant_reshapes(path) == ["table"]

    model = onnx.load(str(path), load_external_data=False)
    assert [node.op_type for node in model.graph.node] == ["GatherBlockQuantized", "MatMulNBits"]
    tensors = {init.name: init for init in model.graph.initializer}
    assert "table.shape" not in tensors  # nothing else used it
    assert list(tensors["table"].dims) == [VOCAB, HIDDEN]
    where = {entry.key: entry.value for entry in tensors["table"].external_data}
    assert where == {entry.key: entry.value for entry in tensors["head.codes"].external_data}
    logits, heap_aliased = _run(path)
    np.testing.assert_array_equal(logits, expected)
    # The folded Reshape's copy was the whole table; the mapped one costs no heap.
    assert heap_with_reshape - heap_aliased > 0.9 * CODES_BYTES


@pytest.mark.parametrize("shape", [[-1, HIDDEN], [0, -1]])
def test_zero_and_minus_one_in_the_shape_resolve_as_reshape_does(tmp_path: Path, shape: list[int]) -> None:
    path = tmp_path / "model.onnx"
    _shared_head(path, shape)
    assert alias_constant_reshapes(path) == ["table"]
    tensors = {init.name: init for init in onnx.load(str(path), load_external_data=False).graph.initializer}
    assert list(tensors["table"].dims) == [VOCAB, HIDDEN]


def test_reshapes_it_cannot_alias_are_left_as_they_are(tmp_path: Path) -> None:
    # Data stored inline: no file range to share.
    inline = tmp_path / "inline.onnx"
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["w", "shape"], ["y"])], "inline", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.arange(6, dtype=np.float32), "w"), numpy_helper.from_array(np.asarray([2, 3], dtype=np.int64), "shape")],
    )
    onnx.save(helper.make_model(graph), str(inline))
    assert alias_constant_reshapes(inline) == []
    # A shape that does not describe the data's elements.
    wrong = tmp_path / "wrong" / "model.onnx"
    _shared_head(wrong, [VOCAB, HIDDEN + 1])
    before = wrong.read_bytes()
    assert alias_constant_reshapes(wrong) == []
    assert wrong.read_bytes() == before
