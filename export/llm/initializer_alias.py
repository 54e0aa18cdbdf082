"""Constant reshapes of stored weights become second names for the same bytes on disk.

Why: the tied embedding reads the 8-bit LM head's codes (quantize.share_embedding_with_lm_head)
through a Reshape of MatMulNBits' [vocab, blocks, block bytes] tensor into GatherBlockQuantized's
[vocab, hidden bytes] table. ONNX Runtime folds that Reshape when the session loads into a new
initializer on the heap: a full copy of the LM head's codes (136 MB at Qwen2.5-0.5B's shape,
233 MB at 1.5B), while MatMulNBits repacks the original anyway. A second initializer whose
external data points at the same file range, with the reshaped dims, is the same tensor without
the node: ONNX Runtime maps external data from the file instead of copying it (1.32, checked
with offsets aligned or not), so the table costs page cache (shared between servers,
reclaimable, only the rows looked up) instead of heap. docs/BENCHMARKS.md ("The shared
embedding's copy") has the measured heap before and after.

Only the graph file is rewritten; the data file stays as it is. Never imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from appliance.export.onnx_tools import drop_unread_initializers


def alias_constant_reshapes(model_path: Path) -> list[str]:
    """Replace each Reshape of an externally stored initializer by a constant shape with an
    initializer over the same bytes; returns the names of the new initializers.

    A Reshape is left alone when its data is stored inline (no file range to share), its shape
    is not an initializer, its output is a graph output, or the shape does not resolve to the
    data's element count."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    graph_outputs = {output.name for output in graph.output}
    aliased: list[str] = []
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        alias = _alias_for(node, initializers, graph_outputs)
        if alias is None:
            kept.append(node)
            continue
        graph.initializer.append(alias)
        initializers[alias.name] = alias
        aliased.append(alias.name)
    if not aliased:
        return []
    del graph.node[:]
    graph.node.extend(kept)
    drop_unread_initializers(graph)
    onnx.save(model, str(model_path))
    return aliased


def _alias_for(node: onnx.NodeProto, initializers: dict[str, TensorProto], graph_outputs: set[str]) -> TensorProto | None:
    if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    data, shape = (initializers.get(name) for name in node.input)
    if data is None or shape is None or data.data_location != TensorProto.EXTERNAL or node.output[0] in graph_outputs:
        return None
    allow_zero = any(attr.name == "allowzero" and attr.i for attr in node.attribute)
    dims = _resolved_dims(list(data.dims), numpy_helper.to_array(shape).astype(np.int64).tolist(), allow_zero)
    if dims is None:
        return None
    alias = TensorProto()
    alias.CopyFrom(data)
    alias.name = node.output[0]
    del alias.dims[:]
    alias.dims.extend(dims)
    return alias


def _resolved_dims(source: list[int], target: list[int], allow_zero: bool) -> list[int] | None:
    """Reshape's target dims with 0 (copy) and -1 (infer) resolved, or None when they cannot
    describe the source's elements."""
    count = int(np.prod(source, dtype=np.int64))
    resolved = [source[index] if value == 0 and not allow_zero and index < len(source) else value for index, value in enumerate(target)]
    if resolved.count(-1) > 1 or any(value < -1 for value in resolved):
        return None
    if -1 in resolved:
        known = int(np.prod([value for value in resolved if value != -1], dtype=np.int64))
        if known == 0 or count % known:
            return None
        resolved[resolved.index(-1)] = count // known
    return resolved if int(np.prod(resolved, dtype=np.int64)) == count else None
