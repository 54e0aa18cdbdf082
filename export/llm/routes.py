"""The two ways a decoder becomes an fp32 ONNX graph with a KV cache.

* "genai": onnxruntime-genai's model builder. Its graph uses GroupQueryAttention (rotary
  embedding and KV append inside one operator), fused QKV and fused norms: 343 nodes for
  SmolLM2 against Optimum's ~7,400, and about 1.8x the decode speed from a plain Python loop
  (measured on the 2-core box; docs/BENCHMARKS.md). It supports the Llama family and relatives.
* "optimum": Optimum's `main_export` with task text-generation-with-past, for architectures the
  builder lacks (GPT-2, Qwen3 MoE).

Both run in-process with the offline flags forced and with a local folder only: the builder is
given `hf_token=false` and a local path, so it never asks the hub for anything.
Never used by the server; torch and the exporters are imported lazily.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Literal

from appliance.errors import ExportError
from appliance.export.llm.gather_table import store_gather_tables
from appliance.export.llm.layer_attention import align_layer_attention, layer_attention
from appliance.export.llm.logits_start import add_logits_start
from appliance.offline import enforce_offline

GraphKind = Literal["genai", "optimum"]

#: Architectures the model builder (0.15.2) writes, which we route through it. Each (and the
#: Optimum ones below) is proven on a tiny random model with its own config features: exported,
#: served and continuing as transformers' `generate` does (tests/test_export_llm_architectures.py).
#: Every layer's window, rotary table and rotation is set from the config after the builder
#: (align_layer_attention, export/llm/layer_attention.py), which Gemma 2 needs (the builder slid
#: the wrong layer of each pair: logits 5.5 off from position 8 of a tiny model with an 8-token
#: window), Gemma 3 wherever its `layer_types` leave the builder's fixed 5:1 pattern, and
#: SmolLM3 (with `fit_config_for_builder`: the builder failed on NoPE layers). Mistral's window
#: needed nothing: measured identical across an 8-token window. Gemma 2's PyTorch reference
#: runs eager attention (sdpa drops its attention softcapping; export/llm/torch_reference.py).
#: Phi-3 needs `fit_config_for_builder`; Phi-3 with LongRoPE (Phi-3.5-mini, Phi-4-mini) is
#: served within its original context only (graph_facts.served_context: past it the engine's
#: cached keys keep the short factors while transformers recomputes them with the long ones).
GENAI_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "GraniteForCausalLM",
    "SmolLM3ForCausalLM",
)
#: Architectures exported through Optimum instead. Qwen3 MoE: the builder has no Qwen3-MoE
#: (NotImplementedError); Optimum's graph routes each token to its experts (all 8 of the tiny
#: model's experts are in the graph, each running on the tokens routed to it), within 1.4e-5 of
#: PyTorch on prefill and decode.
OPTIMUM_ARCHITECTURES: tuple[str, ...] = ("GPT2LMHeadModel", "Qwen3MoeForCausalLM")
#: Architectures refused by name, with why: a user reads the reason, not only the list.
REFUSED_ARCHITECTURES: dict[str, str] = {
    # Measured: the builder's graph differs from PyTorch's logits by 5-11 and no prompt
    # continues right (tests/test_export_llm_gate.py).
    "OlmoForCausalLM": "the model builder's OLMo graph computes other logits than PyTorch (5-11 apart)",
    # From the builder's source: it writes only the text decoder, fed `inputs_embeds` by a
    # vision encoder it does not build, while the engine feeds token ids.
    "Gemma3ForConditionalGeneration": (
        "the model builder writes only its text decoder, which takes embeddings from a vision encoder "
        "it does not build; a text-only Gemma 3 (Gemma3ForCausalLM, such as Gemma 3 1B) is supported"
    ),
}
#: Files of a builder/Optimum output folder that belong to the model (the rest, such as the
#: tokenizer copies they write, is replaced by the export's own, fixed tokenizer files).
MODEL_FILE = "model.onnx"
GENAI_CONFIG_FILE = "genai_config.json"


def route_for(architectures: list[str]) -> GraphKind:
    """Which exporter handles these architectures; ExportError names the supported ones and,
    for an architecture refused by name, why."""
    for architecture in architectures:
        if architecture in GENAI_ARCHITECTURES:
            return "genai"
        if architecture in OPTIMUM_ARCHITECTURES:
            return "optimum"
    supported = ", ".join((*GENAI_ARCHITECTURES, *OPTIMUM_ARCHITECTURES))
    found = ", ".join(architectures) or "unknown"
    reasons = [REFUSED_ARCHITECTURES[a] for a in architectures if a in REFUSED_ARCHITECTURES]
    why = f" ({'; '.join(reasons)})" if reasons else ""
    raise ExportError(
        f"source: architecture {found} is not supported for text-generation{why}; supported: {supported}",
        field="source",
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def fit_config_for_builder(config: object) -> list[str]:
    """Correct, in the builder's in-memory copy of config.json, what the builder misreads;
    returns what was changed (the weights and the PyTorch reference are untouched).

    Phi-3: the builder picks its LongRoPE graph whenever `max_position_embeddings` differs from
    `original_max_position_embeddings`, and that graph needs the LongRoPE factors
    (`rope_scaling.short_factor/long_factor`); a config without them (a context-trimmed or
    fine-tuned Phi-3, or Phi3Config's default 4096 with a shorter context) failed with
    `KeyError: 'multi_cache'`. Transformers uses plain rotary embeddings there and ignores the
    original length, so the builder is told the same: original = max, its plain Phi-3 graph.

    SmolLM3: the builder fails on a NoPE layer (`KeyError: 'position_ids'`: it turns the fused
    rotary off for the layer and then looks for the separate rotary's input, which its graph
    does not have), so it is told that every layer rotates; `align_layer_attention` then turns
    rotation off where transformers does (read from the config before this change).
    """
    changed: list[str] = []
    architectures = getattr(config, "architectures", None) or []
    if "Phi3ForCausalLM" in architectures:
        rope = getattr(config, "rope_scaling", None) or {}
        longrope = isinstance(rope, dict) and "short_factor" in rope and "long_factor" in rope
        context = getattr(config, "max_position_embeddings", None)
        if not longrope and getattr(config, "original_max_position_embeddings", context) != context:
            config.original_max_position_embeddings = context  # type: ignore[attr-defined]
            changed.append(f"original_max_position_embeddings={context} (no LongRoPE factors)")
    no_rope = getattr(config, "no_rope_layers", None)
    if "SmolLM3ForCausalLM" in architectures and no_rope and not all(no_rope):
        config.no_rope_layers = [1] * len(no_rope)  # type: ignore[attr-defined]
        changed.append("no_rope_layers: every layer rotates (the NoPE layers' rotation is turned off in the graph)")
    return changed


def build_genai(hf_dir: Path, out_dir: Path, cache_dir: Path, precision: str = "fp32", provider: str = "cpu") -> Path:
    """Run the model builder on a local folder; returns out_dir/model.onnx.

    The builder prints progress bars and notes; they are captured and only the last line is
    shown if it fails.
    """
    enforce_offline()
    from onnxruntime_genai.models import builder

    scratch = out_dir.parent / f"{out_dir.name}-builder"
    shutil.rmtree(scratch, ignore_errors=True)
    captured = io.StringIO()
    options: dict[str, object] = {"hf_token": "false", "hf_remote": "false"}
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            builder.check_extra_options(None, str(hf_dir), str(scratch), precision, provider, str(cache_dir), options)
            options["hf_details"] = builder.get_hf_details(None, str(hf_dir), str(cache_dir), options)
            layers = layer_attention(options["hf_details"]["hf_config"])  # type: ignore[index]
            fit_config_for_builder(options["hf_details"]["hf_config"])  # type: ignore[index]
            builder.create_model(None, str(hf_dir), str(scratch), precision, provider, str(cache_dir), **options)
    except Exception as exc:  # noqa: BLE001 - the builder raises bare Exceptions and asserts
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else _last_line(captured.getvalue())
        raise ExportError(f"model builder failed on {hf_dir.name}: {type(exc).__name__}: {detail}", field="source") from None
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, MODEL_FILE + ".data", GENAI_CONFIG_FILE):
        if (scratch / name).exists():
            shutil.move(str(scratch / name), out_dir / name)
    shutil.rmtree(scratch, ignore_errors=True)
    if not (out_dir / MODEL_FILE).is_file():
        raise ExportError(f"model builder wrote no {MODEL_FILE} for {hf_dir.name}", field="source")
    align_layer_attention(out_dir / MODEL_FILE, layers)
    add_logits_start(out_dir / MODEL_FILE)
    store_gather_tables(out_dir / MODEL_FILE)  # a tied embedding: mapped, not folded onto the heap
    return out_dir / MODEL_FILE


def export_optimum(hf_dir: Path, out_dir: Path) -> Path:
    """Optimum's text-generation-with-past export, re-saved as model.onnx + model.onnx.data."""
    enforce_offline()
    from optimum.exporters.onnx import main_export

    from appliance.export.llm.quantize import load_with_weights, save_with_weights

    scratch = out_dir.parent / f"{out_dir.name}-optimum"
    shutil.rmtree(scratch, ignore_errors=True)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            main_export(
                str(hf_dir),
                output=str(scratch),
                task="text-generation-with-past",
                library_name="transformers",
                device="cpu",
                local_files_only=True,
            )
    except Exception as exc:  # noqa: BLE001 - optimum raises many unrelated types
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else _last_line(captured.getvalue())
        raise ExportError(f"ONNX export (Optimum) failed on {hf_dir.name}: {detail}", field="source") from None
    produced = scratch / MODEL_FILE
    if not produced.is_file():
        raise ExportError(f"Optimum wrote no {MODEL_FILE} for {hf_dir.name}", field="source")
    target = out_dir / MODEL_FILE
    save_with_weights(load_with_weights(produced), target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target
