"""A tied embedding's table stored in gather order, so ONNX Runtime maps it instead of copying it.

Why: the model builder writes a tied embedding as `Gather(Transpose(W))` over the LM head's
weight W ([hidden, vocab]). ONNX Runtime folds that constant Transpose when the session loads
into a new initializer on the heap, while the LM head's MatMul pre-packs W into a heap copy of
its own: the table is held twice (889 MiB of 6,797 at Qwen2.5-1.5B's shape in fp32). Written
once more to the data file as W's transpose ([vocab, hidden]) and named as the Transpose's
output, the table is read by the Gather straight from the file (ONNX Runtime maps external
data), so it costs page cache (shared, reclaimable, only the rows looked up) instead of heap,
for 4 bytes per table entry more on disk. docs/BENCHMARKS.md ("The tied embedding's table")
has the figures.

Quantising a version made from such a reference still finds the tie: the table and the LM head
weight are compared by value (quantize._is_tied). Never imports torch.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from appliance.export.onnx_tools import drop_unread_initializers

#: Rows of the table transposed and written per step (bounds the memory the pass needs).
ROWS_PER_CHUNK = 8192
#: doc_string of a table written here: it repeats another initializer's values, so sizes
#: that compare a variant with the fp32 weights (the report's size ratio) leave it out.
COPY_DOC_PREFIX = "gather-order copy of "


def store_gather_tables(model_path: Path) -> list[str]:
    """Replace each `Transpose` of an external 2-D weight that only Gathers read by the
    transposed weight appended to the same data file; returns the new initializers' names."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    outputs = {output.name for output in graph.output}
    stored: list[str] = []
    removed: list[onnx.NodeProto] = []
    for node in graph.node:
        weight = _transposed_weight(node, initializers, readers, outputs)
        if weight is None:
            continue
        graph.initializer.append(_append_transposed(model_path.parent, weight, node.output[0]))
        removed.append(node)
        stored.append(node.output[0])
    if not stored:
        return []
    for node in removed:
        graph.node.remove(node)
    drop_unread_initializers(graph)
    onnx.save(model, str(model_path))
    return stored


def _transposed_weight(
    node: onnx.NodeProto,
    initializers: dict[str, TensorProto],
    readers: dict[str, list[tuple[onnx.NodeProto, int]]],
    outputs: set[str],
) -> TensorProto | None:
    """The weight `node` transposes, when it is an external 2-D float initializer and only
    Gathers read the result as their table."""
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
        return None
    weight = initializers.get(node.input[0])
    if weight is None or weight.data_location != TensorProto.EXTERNAL or len(weight.dims) != 2:
        return None
    if weight.data_type != TensorProto.FLOAT or node.output[0] in outputs:
        return None
    perm = next((list(attr.ints) for attr in node.attribute if attr.name == "perm"), [1, 0])
    uses = readers.get(node.output[0], [])
    if perm != [1, 0] or not uses or any(reader.op_type != "Gather" or index != 0 for reader, index in uses):
        return None
    return weight


def _append_transposed(folder: Path, weight: TensorProto, name: str) -> TensorProto:
    """Write `weight`'s transpose at the end of its data file (page-aligned) and describe it."""
    where = {entry.key: entry.value for entry in weight.external_data}
    path = folder / where["location"]
    offset = int(where.get("offset", "0"))
    rows, columns = (int(dim) for dim in weight.dims)
    with open(path, "r+b") as handle:
        handle.seek(0, 2)
        start = -(-handle.tell() // mmap.PAGESIZE) * mmap.PAGESIZE
        handle.write(b"\0" * (start - handle.tell()))
        source = np.memmap(path, dtype=np.float32, mode="r", offset=offset, shape=(rows, columns))
        for first in range(0, columns, ROWS_PER_CHUNK):
            handle.write(np.ascontiguousarray(source[:, first : first + ROWS_PER_CHUNK].T).tobytes())
        length = handle.tell() - start
        del source
    table = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[columns, rows], doc_string=COPY_DOC_PREFIX + weight.name)
    table.data_location = TensorProto.EXTERNAL
    for key, value in (("location", where["location"]), ("offset", str(start)), ("length", str(length))):
        entry = table.external_data.add()
        entry.key, entry.value = key, value
    return table


def stored_copy_bytes(model_path: Path) -> int:
    """Bytes of the data file that repeat another initializer in gather order (written here)."""
    model = onnx.load(str(model_path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        if init.doc_string.startswith(COPY_DOC_PREFIX):
            total += int({entry.key: entry.value for entry in init.external_data}.get("length", "0"))
    return total
