"""Make each attention layer of a model builder graph attend as transformers' layer does.

Newer decoders vary attention from layer to layer: some layers see only a sliding window of
recent keys, some rotate with another rotary table (Gemma 3's local layers) or not at all
(SmolLM3's NoPE layers). Transformers reads this from the config (`layer_types`,
`sliding_window`, `no_rope_layers`); the model builder (0.15.2) hard-codes its own patterns,
and where they disagree the graph is silently wrong once a sequence outgrows the window:

* Gemma 2: the builder makes the odd layers local, transformers (and Google's reference) the
  even ones. Measured on a tiny Gemma 2 with an 8-token window: logits 5.5 off from position 8.
  Real Gemma 2 models (window 4,096, context 8,192) would part from PyTorch past 4,096 tokens.
* SmolLM3: the builder fails on any NoPE layer (`KeyError: 'position_ids'`: it turns the fused
  rotary off and then looks for the separate rotary's input), so `fit_config_for_builder`
  tells it every layer rotates, and this rewrite turns rotation off where transformers does.

So the config decides, and this rewrite sets on every GroupQueryAttention node its
`local_window_size` (transformers' `sliding_window` on "sliding_attention" layers, -1 on the
others; every layer when the config has no `layer_types`, as Mistral and Phi-3 have), its
`do_rotary`, and, where the graph holds Gemma 3's two rotary tables, which of them it reads.
Transformers' window of W and the kernel's `local_window_size` W both mean: the query and
the W-1 keys before it (measured identical on tiny Mistral, Gemma 2/3 and SmolLM3 models whose
continuations cross an 8-token window). The engine keeps every position in its KV cache and
the kernel masks by position, so windows hold in the engine too.

Only the graph changes: the weights stay where they are (external data untouched). Never
imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import helper

from appliance.errors import ExportError

#: The kernel's value for "no window": every earlier position is attended.
FULL_ATTENTION = -1
SLIDING_LAYER_TYPE = "sliding_attention"
FULL_LAYER_TYPE = "full_attention"
#: Gemma 3's rotary tables in the builder's graph: local layers use `rope_local_base_freq`.
LOCAL_ROPE_CACHES = ("cos_cache_local", "sin_cache_local")
GLOBAL_ROPE_CACHES = ("cos_cache_global", "sin_cache_global")
#: GroupQueryAttention's inputs 7 and 8 are the cos and sin caches.
_COS_INPUT, _SIN_INPUT = 7, 8
_LAYER = re.compile(r"/model/layers\.(\d+)/")


@dataclass(frozen=True)
class LayerAttention:
    """How one decoder layer attends, as transformers computes it."""

    #: Keys attended before and including the query (FULL_ATTENTION: all of them).
    window: int
    #: Whether queries and keys are rotated (False: a NoPE layer).
    rotary: bool
    #: A "sliding_attention" layer: Gemma 3 rotates it with its local rotary tables.
    local: bool


def layer_attention(config: object) -> list[LayerAttention]:
    """Each layer's attention from a transformers config (read before the builder's copy is
    fitted: `fit_config_for_builder` may change what the builder is told, never this)."""
    layers = int(getattr(config, "num_hidden_layers"))
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or [SLIDING_LAYER_TYPE if window else FULL_LAYER_TYPE] * layers
    no_rope = getattr(config, "no_rope_layers", None) or [1] * layers
    if len(types) != layers or len(no_rope) != layers:
        raise ExportError(
            f"source: config lists {len(types)} layer types and {len(no_rope)} NoPE flags for {layers} layers", field="source"
        )
    result: list[LayerAttention] = []
    for kind, rotary in zip(types, no_rope, strict=True):
        sliding = kind == SLIDING_LAYER_TYPE
        result.append(LayerAttention(window=int(window) if sliding and window else FULL_ATTENTION, rotary=bool(rotary), local=sliding))
    return result


def _set_int(node: onnx.NodeProto, name: str, value: int, default: int) -> int:
    """Set an int attribute; returns its previous value (`default`, the kernel's, if absent)."""
    for attribute in node.attribute:
        if attribute.name == name:
            previous = int(helper.get_attribute_value(attribute))
            attribute.i = value
            return previous
    node.attribute.append(helper.make_attribute(name, value))
    return default


def align_layer_attention(model_path: Path, layers: list[LayerAttention]) -> list[str]:
    """Rewrite the graph at `model_path` in place; returns what changed ('layer 1: ...')."""
    model = onnx.load(str(model_path), load_external_data=False)
    nodes = [node for node in model.graph.node if node.op_type == "GroupQueryAttention"]
    if len(nodes) != len(layers):
        raise ExportError(f"model: {len(nodes)} attention nodes for {len(layers)} layers", field="model")
    # The builder rotates inside the attention kernel for the CPU and CUDA; `do_rotary` and the
    # cos/sin inputs govern nothing where separate RotaryEmbedding nodes rotate instead.
    fused_rotary = not any(node.op_type == "RotaryEmbedding" for node in model.graph.node)
    if not fused_rotary and not all(layer.rotary for layer in layers):
        raise ExportError("model: the graph rotates outside its attention nodes, so NoPE layers cannot be kept", field="model")
    names = {value.name for value in model.graph.initializer} | {
        output for node in model.graph.node if node.op_type == "Constant" for output in node.output
    }
    two_tables = fused_rotary and set(LOCAL_ROPE_CACHES + GLOBAL_ROPE_CACHES) <= names
    changed: list[str] = []
    for node in nodes:
        match = _LAYER.search(node.name)
        if match is None or int(match.group(1)) >= len(layers):
            raise ExportError(f"model: cannot tell the layer of attention node {node.name}", field="model")
        index = int(match.group(1))
        want = layers[index]
        previous_window = _set_int(node, "local_window_size", want.window, FULL_ATTENTION)
        if previous_window != want.window:
            changed.append(f"layer {index}: window {want.window} (builder: {previous_window})")
        if fused_rotary and _set_int(node, "do_rotary", int(want.rotary), 0) != int(want.rotary):
            changed.append(f"layer {index}: rotary {'on' if want.rotary else 'off'}")
        if two_tables:
            cos, sin = LOCAL_ROPE_CACHES if want.local else GLOBAL_ROPE_CACHES
            if node.input[_COS_INPUT] != cos:
                changed.append(f"layer {index}: rotary tables {cos}/{sin}")
            node.input[_COS_INPUT], node.input[_SIN_INPUT] = cos, sin
    if changed:
        onnx.save(model, str(model_path))
    return changed
