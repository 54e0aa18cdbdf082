"""Prompts over an int8 KV cache at fp32 attention speed: each int8 GroupQueryAttention node
becomes an If on a boolean graph input, FP32_ATTENTION_INPUT.

Why: ONNX Runtime 1.32's CPU GroupQueryAttention runs a multi-token query over a quantised
cache 3-4x slower than over fp32 (bench/kv_cache_precision.py), which made a 2,000-token
prompt's first token 1.4x slower with `--kv-cache int8` than with the fp32 cache. With the
input false the node runs as before: the int8 kernel, which is the fastest of the three for a
decode step and writes its new positions in place in the buffer the engine binds as both past
and present. With it true (the engine sets it for prompt chunks: one row continuing its past,
or a first prompt of any number of rows) the call instead:

1. dequantises only the past it continues (positions [0, total - new), Cast and a
   per-channel Mul), not the whole bound buffer;
2. runs the fp32 kernel over that past and its own keys and values;
3. quantises only its new positions with the node's scales (QuantizeLinear of x / scale:
   round half to even, saturating: the codes the int8 kernel itself writes).

The fp32 branch's present outputs are those new positions, [rows, kv heads, new tokens, head
dim], not the whole buffer: writing a full-context buffer from a branch would make every page
of the slot resident. The engine copies them into its cache (manifest
`generation.fp32_attention_input`). Within one call, queries see their own call's keys and
values unrounded, as an fp32 cache would; everything before it is read as the cache holds it.
So a prompt's tokens can depend on where its chunks were cut, at the level of the cache's
rounding. Decode steps and speculative verification keep the kernel (false), so speculation
still reproduces plain decoding token for token, and the export's quality check scores the
kernel's reads (kv_quant.compare_caches).

Never imports torch or the server's generation engine.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper

#: GroupQueryAttention's slots: the packed or separate query, past key/value, the two lengths.
QUERY_INPUT = 0
PAST_KEY_INPUT = 3
PAST_VALUE_INPUT = 4
TOTAL_LENGTH_INPUT = 6
#: The cache scales' slots (after head_sink, slot 11); an fp32-cache node ends before them.
K_SCALE_INPUT = 12
V_SCALE_INPUT = 13
#: Attributes that make GroupQueryAttention read and write a quantised cache.
QUANT_ATTRIBUTES = ("k_quant_type", "v_quant_type", "kv_cache_bit_width")
#: BOOL [1] graph input: true runs the call's attention in fp32 and returns new positions only.
FP32_ATTENTION_INPUT = "fp32_attention"
#: Where the shared helper tensors of the rewrite live in the graph's names.
PREFIX = "/kv_prefill"


def fp32_attention_input() -> tuple[ValueInfoProto, list[TensorProto]]:
    """The graph input every If branches on, and the constants the fp32 branches share."""
    constants = [
        numpy_helper.from_array(np.array([1], np.int64), f"{PREFIX}/one"),
        numpy_helper.from_array(np.array([0], np.int64), f"{PREFIX}/zero"),
        numpy_helper.from_array(np.array([2], np.int64), f"{PREFIX}/sequence_axis"),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{PREFIX}/to_end"),
        numpy_helper.from_array(np.array(1.0, np.float32), f"{PREFIX}/unit_scale"),
        numpy_helper.from_array(np.array(0, np.int8), f"{PREFIX}/zero_point"),
    ]
    return helper.make_tensor_value_info(FP32_ATTENTION_INPUT, TensorProto.BOOL, [1]), constants


def _value_info(name: str, elem_type: int, rank: int) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, [None] * rank)


def branch_on_fp32_attention(
    node: NodeProto, layer: int, key_scale: np.ndarray, value_scale: np.ndarray, kv_heads: int, head_dim: int
) -> tuple[NodeProto, list[TensorProto]]:
    """An If replacing the int8 GroupQueryAttention `node` (same inputs and outputs; its scale
    inputs hold `key_scale` and `value_scale`, per channel), and the [1, kv heads, 1, head dim]
    copies of the scales its fp32 branch reads."""
    output, present_key, present_value = node.output[0], node.output[1], node.output[2]
    name = f"{PREFIX}/layer{layer}"
    shape = (1, kv_heads, 1, head_dim)
    key_broadcast = f"{node.input[K_SCALE_INPUT]}.broadcast"
    value_broadcast = f"{node.input[V_SCALE_INPUT]}.broadcast"
    initializers = [
        numpy_helper.from_array(key_scale.reshape(shape), key_broadcast),
        numpy_helper.from_array(value_scale.reshape(shape), value_broadcast),
    ]

    decode_outputs = [f"{output}/decode", f"{present_key}/decode", f"{present_value}/decode"]
    decode_node = helper.make_node(
        node.op_type, list(node.input), decode_outputs, name=f"{node.name}/decode", domain=node.domain
    )
    decode_node.attribute.extend(node.attribute)

    past_length = f"{name}/past_length"
    nodes = [
        helper.make_node("Shape", [node.input[QUERY_INPUT]], [f"{name}/width"], name=f"{name}/Shape", start=1, end=2),
        helper.make_node("Cast", [node.input[TOTAL_LENGTH_INPUT]], [f"{name}/total"], name=f"{name}/CastTotal", to=TensorProto.INT64),
        helper.make_node("Reshape", [f"{name}/total", f"{PREFIX}/one"], [f"{name}/total_1d"], name=f"{name}/Reshape"),
        helper.make_node("Sub", [f"{name}/total_1d", f"{name}/width"], [past_length], name=f"{name}/Sub"),
    ]
    fp32_inputs = list(node.input[:K_SCALE_INPUT])
    while fp32_inputs and not fp32_inputs[-1]:
        fp32_inputs.pop()
    for slot, kind, broadcast in ((PAST_KEY_INPUT, "key", key_broadcast), (PAST_VALUE_INPUT, "value", value_broadcast)):
        codes, dequantised = f"{name}/past_{kind}_codes", f"{name}/past_{kind}"
        nodes += [
            helper.make_node(
                "Slice", [node.input[slot], f"{PREFIX}/zero", past_length, f"{PREFIX}/sequence_axis"], [codes], name=f"{name}/SlicePast_{kind}"
            ),
            helper.make_node("Cast", [codes], [f"{codes}_fp32"], name=f"{name}/CastPast_{kind}", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{codes}_fp32", broadcast], [dequantised], name=f"{name}/Dequantise_{kind}"),
        ]
        fp32_inputs[slot] = dequantised
    fp32_outputs = [f"{output}/fp32", f"{name}/present_key_fp32", f"{name}/present_value_fp32"]
    fp32_node = helper.make_node(node.op_type, fp32_inputs, fp32_outputs, name=f"{node.name}/fp32", domain=node.domain)
    fp32_node.attribute.extend(attribute for attribute in node.attribute if attribute.name not in QUANT_ATTRIBUTES)
    nodes.append(fp32_node)
    new_positions = [f"{present_key}/fp32", f"{present_value}/fp32"]
    for kind, present, broadcast, target in (
        ("key", fp32_outputs[1], key_broadcast, new_positions[0]),
        ("value", fp32_outputs[2], value_broadcast, new_positions[1]),
    ):
        nodes += [
            helper.make_node(
                "Slice", [present, past_length, f"{PREFIX}/to_end", f"{PREFIX}/sequence_axis"], [f"{name}/new_{kind}"], name=f"{name}/SliceNew_{kind}"
            ),
            helper.make_node("Div", [f"{name}/new_{kind}", broadcast], [f"{name}/new_{kind}_steps"], name=f"{name}/Scale_{kind}"),
            helper.make_node(
                "QuantizeLinear", [f"{name}/new_{kind}_steps", f"{PREFIX}/unit_scale", f"{PREFIX}/zero_point"], [target], name=f"{name}/Quantise_{kind}"
            ),
        ]

    def outputs(names: list[str]) -> list[ValueInfoProto]:
        return [_value_info(names[0], TensorProto.FLOAT, 3), _value_info(names[1], TensorProto.INT8, 4), _value_info(names[2], TensorProto.INT8, 4)]

    fp32_graph = helper.make_graph(nodes, f"{name}/fp32", [], outputs([fp32_outputs[0], *new_positions]))
    decode_graph = helper.make_graph([decode_node], f"{name}/decode", [], outputs(decode_outputs))
    branch = helper.make_node(
        "If", [FP32_ATTENTION_INPUT], [output, present_key, present_value], name=f"{name}/If", then_branch=fp32_graph, else_branch=decode_graph
    )
    return branch, initializers
