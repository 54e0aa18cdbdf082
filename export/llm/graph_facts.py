"""Read what the generation engine needs to drive a decoder graph: the manifest's
`GenerationSpec`, built from the graph's own inputs and outputs plus the model's config.

The server never sees transformers or the Hugging Face config, so everything it must know
(layer count, KV heads, head size, exact past/present tensor names, EOS ids, sampling
defaults) is written here into the manifest. Names come from the graph, not from a convention,
so an exporter that names its KV tensors differently still yields a correct manifest.

Never imports torch or transformers; reads the graph without its weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from appliance.errors import ExportError
from appliance.export.llm.logits_start import LOGITS_START_INPUT
from appliance.export.llm.kv_prefill import FP32_ATTENTION_INPUT
from appliance.export.onnx_tools import ONNX_TO_KSERVE, load_graph_only
from appliance.repository import GenerationSpec

_LAYER_NUMBER = re.compile(r"(?<=[._])(\d+)(?=[._])")
#: generation_config.json keys that become the engine's sampling defaults.
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _layer_template(name: str) -> str | None:
    """'past_key_values.12.key' -> 'past_key_values.{layer}.key' (None without a number)."""
    match = _LAYER_NUMBER.search(name)
    if match is None:
        return None
    return name[: match.start()] + "{layer}" + name[match.end() :]


def _kv_templates(names: list[str], prefix: str) -> tuple[str, str, int]:
    """(key template, value template, layer count) among names starting with `prefix`."""
    templates: dict[str, set[int]] = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        template = _layer_template(name)
        match = _LAYER_NUMBER.search(name)
        if template is None or match is None:
            continue
        templates.setdefault(template, set()).add(int(match.group(1)))
    keys = [t for t in templates if "key" in t.split("{layer}")[-1]]
    values = [t for t in templates if "value" in t.split("{layer}")[-1]]
    if len(keys) != 1 or len(values) != 1:
        raise ExportError(f"model: cannot tell the {prefix}* key/value tensors apart: {sorted(templates)}", field="model")
    layers = templates[keys[0]]
    if layers != templates[values[0]] or layers != set(range(len(layers))):
        raise ExportError(f"model: {prefix}* tensors do not cover layers 0..n-1", field="model")
    return keys[0], values[0], len(layers)


def _config_int(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_ids_from(*candidates: Any) -> list[int]:
    """All EOS ids named by the candidates (ints or lists, first ones first, no repeats)."""
    found: list[int] = []
    for candidate in candidates:
        values = candidate if isinstance(candidate, list) else [candidate]
        for value in values:
            if isinstance(value, int) and value >= 0 and value not in found:
                found.append(value)
    return found


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings a model ships with (temperature, top_p, ...), as given."""
    return {key: generation_config[key] for key in SAMPLING_KEYS if generation_config.get(key) is not None}


def served_context(config: dict[str, Any]) -> int | None:
    """The longest sequence the engine may run: the config's context, except for LongRoPE.

    A LongRoPE model (Phi-3.5-mini, Phi-4-mini: `rope_scaling` with short and long factors)
    rotates with the short factors up to `original_max_position_embeddings` and with the long
    ones beyond. The builder's graph picks the table by the sequence's current length, and the
    keys already cached keep the rotation they were written with; transformers' `generate`
    instead recomputes the whole cache with the long factors when a sequence grows past the
    original length. Measured on a tiny LongRoPE Phi-3 switching at 128 tokens: logits within
    2e-5 of PyTorch's up to 128 tokens (prefills past it too), 4.7-8.6 off from token 129 of a
    continuation. So the engine is held to the original length, where both use the short
    factors throughout (Phi-3.5-mini and Phi-4-mini: 4,096 of their 131,072 tokens).
    """
    context = _config_int(config, "max_position_embeddings", "n_positions", "n_ctx")
    rope = config.get("rope_scaling")
    if context and isinstance(rope, dict) and "short_factor" in rope and "long_factor" in rope:
        original = _config_int(config, "original_max_position_embeddings") or _config_int(rope, "original_max_position_embeddings")
        if original and original < context:
            return original
    return context


def generation_spec(
    model_path: Path,
    *,
    graph: Literal["genai", "optimum"],
    config: dict[str, Any],
    generation_config: dict[str, Any],
    eos_token_ids: list[int],
    bos_token_id: int | None,
) -> GenerationSpec:
    """The manifest's generation block for the graph at `model_path`."""
    model = load_graph_only(model_path)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    input_names = [value.name for value in inputs]
    output_names = [value.name for value in model.graph.output]
    for required in ("input_ids", "attention_mask"):
        if required not in input_names:
            raise ExportError(f"model: decoder graph lacks the {required!r} input", field="model")
    if "logits" not in output_names:
        raise ExportError("model: decoder graph lacks the 'logits' output", field="model")
    past_key, past_value, layers = _kv_templates(input_names, "past")
    present_key, present_value, present_layers = _kv_templates(output_names, "present")
    if layers != present_layers:
        raise ExportError(f"model: {layers} past layers but {present_layers} present layers", field="model")

    first_past = next(value for value in inputs if value.name == past_key.format(layer=0))
    dims = first_past.type.tensor_type.shape.dim
    kv_heads_dim = dims[1].dim_value if len(dims) == 4 and dims[1].HasField("dim_value") else 0
    head_dim_dim = dims[3].dim_value if len(dims) == 4 and dims[3].HasField("dim_value") else 0
    heads = _config_int(config, "num_attention_heads", "n_head")
    hidden = _config_int(config, "hidden_size", "n_embd")
    num_kv_heads = kv_heads_dim or _config_int(config, "num_key_value_heads") or heads
    head_dim = head_dim_dim or _config_int(config, "head_dim") or (hidden // heads if hidden and heads else None)
    logits = next(value for value in model.graph.output if value.name == "logits")
    logits_dims = logits.type.tensor_type.shape.dim
    vocab = (logits_dims[-1].dim_value if logits_dims and logits_dims[-1].HasField("dim_value") else 0) or _config_int(
        config, "vocab_size"
    )
    context = served_context(config)
    if not (num_kv_heads and head_dim and vocab and context):
        raise ExportError("model: cannot determine KV heads, head size, vocabulary or context length", field="model")
    kv_type = ONNX_TO_KSERVE.get(first_past.type.tensor_type.elem_type, "FP32")
    return GenerationSpec(
        graph=graph,
        num_layers=layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        context_length=context,
        kv_datatype=kv_type,  # type: ignore[arg-type]
        past_key_name=past_key,
        past_value_name=past_value,
        present_key_name=present_key,
        present_value_name=present_value,
        eos_token_ids=eos_token_ids,
        bos_token_id=bos_token_id,
        defaults=sampling_defaults(generation_config),
        fp32_attention_input=FP32_ATTENTION_INPUT if FP32_ATTENTION_INPUT in input_names else None,
        logits_start_input=LOGITS_START_INPUT if any(value.name == LOGITS_START_INPUT for value in model.graph.input) else None,
    )
