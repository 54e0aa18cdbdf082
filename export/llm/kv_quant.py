"""An 8-bit KV cache for the model builder's graphs: calibrate per-channel scales, rewrite the
GroupQueryAttention nodes to store int8 keys and values.

Why int8 and not fp16 on the CPU: ONNX Runtime 1.32's CPU GroupQueryAttention accepts fp32
activations with an fp16, int8 or uint8 cache, but its fp16-cache path converts the cache to
fp32 on every call (measured, Qwen2.5-0.5B attention shape, 2 threads: 0.42 ms per layer at
2,000 past tokens against 0.27 for fp32 and 0.12-0.23 for int8; 32 rows at 500 tokens 16.9 ms
against 2.3 for fp32 and 1.5 for int8). int8 reads a quarter of fp32's bytes and is the
fastest of the three; it is also half of llama.cpp's default f16 cache.

The quantisation is static and symmetric per channel (one scale per KV head and head
dimension, ONNX Runtime's PER_CHANNEL mode): the cache stores round(x / scale) clipped to
int8, and attention reads the dequantised values (a prompt chunk reads its own keys and
values unrounded: kv_prefill.py runs it in fp32, which the int8 kernel does 3-4x slower).
Keys are stored after rotary embedding, so a channel's range covers every angle its pair
takes over the calibration tokens; CALIBRATION_MARGIN leaves room for values the calibration
text did not reach. The scales live in the graph as initializers: the server binds an int8
cache and sets one boolean input (the manifest's `generation.kv_datatype` is INT8 and its
`fp32_attention_input` names the input).

Never imports torch or the server's generation engine.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.errors import ExportError
from appliance.export.llm.kv_prefill import FP32_ATTENTION_INPUT, K_SCALE_INPUT, V_SCALE_INPUT, branch_on_fp32_attention, fp32_attention_input
from appliance.export.llm.onnx_decoder import (
    PERPLEXITY_WINDOW_TOKENS,
    OnnxDecoder,
    negative_log_likelihood,
    window_spans,
)
from appliance.repository import GenerationSpec

#: Scales cover this much more than the largest magnitude the calibration saw per channel.
CALIBRATION_MARGIN = 1.5
#: Largest int8 code used (symmetric: -127..127).
INT8_MAX = 127
#: Smallest scale, for a channel that was always zero in the calibration.
MIN_SCALE = 1e-6
#: Calibration stops adding prompts once this many tokens were seen.
CALIBRATION_TOKENS = 4096


@dataclass(frozen=True)
class KvScales:
    """Per-layer scales, each of shape (num_kv_heads * head_dim,)."""

    keys: list[np.ndarray]
    values: list[np.ndarray]


def supports_int8_kv(model_path: Path, spec: GenerationSpec) -> str | None:
    """Why the graph cannot take an int8 cache, or None when it can: every past tensor must
    feed exactly one GroupQueryAttention node (the model builder's layout), and nothing else."""
    model = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for layer in range(spec.num_layers):
        for name in (spec.past_key_name.format(layer=layer), spec.past_value_name.format(layer=layer)):
            users = consumers.get(name, [])
            if len(users) != 1 or users[0].op_type != "GroupQueryAttention":
                return f"{name} does not feed one GroupQueryAttention node (an Optimum graph keeps the fp32 cache)"
    return None


def calibrate(decoder: OnnxDecoder, prompts: list[list[int]]) -> KvScales:
    """Per-channel scales from the cache the graph writes for the calibration prompts."""
    spec = decoder.spec
    channels = spec.num_kv_heads * spec.head_dim
    key_peak = [np.zeros(channels, np.float32) for _ in range(spec.num_layers)]
    value_peak = [np.zeros(channels, np.float32) for _ in range(spec.num_layers)]
    seen = 0
    for ids in prompts:
        if seen >= CALIBRATION_TOKENS:
            break
        seen += len(ids)
        present = decoder.cache_after(ids)
        for layer in range(spec.num_layers):
            for peaks, name in ((key_peak, spec.past_key_name), (value_peak, spec.past_value_name)):
                cache = present[name.format(layer=layer)]  # (1, kv heads, tokens, head dim)
                peak = np.abs(cache[0]).max(axis=1).reshape(channels)
                np.maximum(peaks[layer], peak, out=peaks[layer])
    if seen == 0:
        raise ExportError("model: no calibration tokens for the int8 KV cache", field="model")

    def scales(peaks: list[np.ndarray]) -> list[np.ndarray]:
        return [np.maximum(peak * CALIBRATION_MARGIN / INT8_MAX, MIN_SCALE).astype(np.float32) for peak in peaks]

    return KvScales(keys=scales(key_peak), values=scales(value_peak))


def write_int8_kv(source: Path, target: Path, spec: GenerationSpec, scales: KvScales) -> GenerationSpec:
    """A copy of the graph at `source` (its folder) in `target`'s folder, with an int8 cache;
    returns the generation spec that drives it.

    Each GroupQueryAttention node becomes an If on the FP32_ATTENTION_INPUT (kv_prefill.py):
    false runs the int8 kernel in place (decode steps), true attends in fp32 and returns the
    new positions only (prompt chunks). Only model.onnx changes; the weights file is linked
    (or copied) beside it unchanged."""
    model = onnx.load(str(source), load_external_data=False)
    layer_of = {spec.past_key_name.format(layer=layer): layer for layer in range(spec.num_layers)}
    cache_names = {
        name.format(layer=layer)
        for layer in range(spec.num_layers)
        for name in (spec.past_key_name, spec.past_value_name, spec.present_key_name, spec.present_value_name)
    }
    flag, constants = fp32_attention_input()
    model.graph.input.append(flag)
    model.graph.initializer.extend(constants)
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 5 or node.input[3] not in layer_of:
            nodes.append(node)
            continue
        layer = layer_of[node.input[3]]
        inputs = list(node.input) + [""] * (V_SCALE_INPUT + 1 - len(node.input))
        key_scale, value_scale = f"kv_scale.{layer}.key", f"kv_scale.{layer}.value"
        inputs[K_SCALE_INPUT], inputs[V_SCALE_INPUT] = key_scale, value_scale
        del node.input[:]
        node.input.extend(inputs)
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(scales.keys[layer], key_scale),
                numpy_helper.from_array(scales.values[layer], value_scale),
            ]
        )
        branch, broadcast_scales = branch_on_fp32_attention(
            node, layer, scales.keys[layer], scales.values[layer], spec.num_kv_heads, spec.head_dim
        )
        nodes.append(branch)
        model.graph.initializer.extend(broadcast_scales)
        rewritten += 1
    if rewritten != spec.num_layers:
        raise ExportError(
            f"model: {rewritten} of {spec.num_layers} attention layers could take an int8 KV cache", field="model"
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for value in (*model.graph.input, *model.graph.output):
        if value.name in cache_names:
            value.type.tensor_type.elem_type = TensorProto.INT8
    target.parent.mkdir(parents=True, exist_ok=True)
    for item in source.parent.iterdir():
        if item.is_file() and item.name != source.name:
            _link_or_copy(item, target.parent / item.name)
    onnx.save_model(model, str(target))
    return spec.model_copy(update={"kv_datatype": "INT8", "fp32_attention_input": FP32_ATTENTION_INPUT})


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link the (large, unchanged) weights file; copy where links are not possible."""
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@dataclass(frozen=True)
class KvComparison:
    """The same weights with an fp32 and an int8 cache, on the same text."""

    perplexity_fp32: float
    perplexity_int8: float
    #: Share of positions whose most likely next token is the same with both caches.
    top1_agreement: float

    @property
    def increase(self) -> float:
        return self.perplexity_int8 / self.perplexity_fp32 - 1.0


def compare_caches(fp32: OnnxDecoder, int8: OnnxDecoder, ids: list[int]) -> KvComparison:
    """Perplexity with each cache and their next-token agreement, one prefill per window and
    graph (the windows the evaluation's perplexity uses, so its figures can be reused). The
    int8 graph reads its whole window through the cache's rounding, as a decode step reads its
    context (a prompt chunk reads its own keys and values unrounded: kv_prefill.py)."""
    window = min(PERPLEXITY_WINDOW_TOKENS, fp32.spec.context_length)
    nll = {"fp32": 0.0, "int8": 0.0}
    scored = agreeing = positions = 0
    for start, end in window_spans(len(ids), window):
        chunk = ids[start:end]
        logits_fp32 = fp32.logits(chunk).astype(np.float64)
        logits_int8 = int8.logits(chunk, through_cache=True).astype(np.float64)
        agreeing += int((logits_fp32.argmax(axis=-1) == logits_int8.argmax(axis=-1)).sum())
        positions += len(chunk)
        for label, logits in (("fp32", logits_fp32), ("int8", logits_int8)):
            value, count = negative_log_likelihood(logits, chunk)
            nll[label] += value
        scored += count
    if scored == 0:
        raise ExportError("model: no text to compare the KV caches on", field="model")
    return KvComparison(
        perplexity_fp32=float(np.exp(nll["fp32"] / scored)),
        perplexity_int8=float(np.exp(nll["int8"] / scored)),
        top1_agreement=agreeing / positions,
    )
