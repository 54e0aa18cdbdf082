"""Let a decoder graph compute logits only from a given position on.

Serving needs the logits of a prompt's last position only, yet the model builder's graph
runs the LM head over every position: on SmolLM2-135M that is 49,152 x 576 weights per
position against ~106M in the body, a fifth of a prefill. This rewrite puts a Slice before the
LM head, driven by the input `logits_start` (positions before it are skipped; 0 gives every
position, as before). It is a plain required input: ONNX Runtime's IO binding cannot bind an
input that has a default (an initializer of the same name), and the engine binds everything.
onnxruntime-genai does not know the input, so it cannot run these graphs; the engine does not
use it (README, design).

Only the graph changes: the weights stay where they are (external data untouched). Never
imports torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.export.llm.quantize import find_lm_head

#: The graph input, as the manifest's generation spec names it.
LOGITS_START_INPUT = "logits_start"
_SLICE_ENDS = "logits_start/ends"
_SLICE_AXES = "logits_start/axes"
#: The logits output's sequence axis no longer follows input_ids' length.
_LOGITS_LENGTH_DIM = "logits_length"


def add_logits_start(model_path: Path) -> bool:
    """Rewrite the graph at `model_path` in place; False when it has no recognisable LM head."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if any(value.name == LOGITS_START_INPUT for value in graph.input):
        return True
    head = find_lm_head(model)
    if head is None:
        return False
    hidden = head.input[0]
    sliced = f"{hidden}/from_logits_start"
    graph.input.append(helper.make_tensor_value_info(LOGITS_START_INPUT, TensorProto.INT64, [1]))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), _SLICE_ENDS),
            numpy_helper.from_array(np.ones(1, np.int64), _SLICE_AXES),
        ]
    )
    position = list(graph.node).index(head)
    graph.node.insert(
        position,
        helper.make_node("Slice", [hidden, LOGITS_START_INPUT, _SLICE_ENDS, _SLICE_AXES], [sliced], name="/lm_head/LogitsStart"),
    )
    head.input[0] = sliced
    for output in graph.output:
        if output.name == "logits" and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].dim_param = _LOGITS_LENGTH_DIM
    onnx.save(model, str(model_path))
    return True


def strip_logits_start(model: onnx.ModelProto) -> bool:
    """Undo `add_logits_start` in `model` (for runtimes that do not feed the input, such as
    onnxruntime-genai); False when the graph has no such Slice."""
    graph = model.graph
    cut = next((node for node in graph.node if node.op_type == "Slice" and LOGITS_START_INPUT in node.input), None)
    if cut is None:
        return False
    for node in graph.node:
        node.input[:] = [cut.input[0] if name == cut.output[0] else name for name in node.input]
    graph.node.remove(cut)
    for value in [value for value in graph.input if value.name == LOGITS_START_INPUT]:
        graph.input.remove(value)
    return True
