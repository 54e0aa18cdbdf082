"""Task exporter: text-generation (decoder LLMs with a KV cache), from a Hugging Face folder,
a GGUF file or a package that ships either.

Route (measured on SmolLM2-135M, docs/BENCHMARKS.md "Export stage: SmolLM2"): the model
builder's fp32 graph (GroupQueryAttention, fused QKV/norms) for the architectures it knows,
Optimum's text-generation-with-past graph for the others (GPT-2); then our own weight-only
quantisation (llm/quantize.py): int4 = 4-bit MatMulNBits body with the LM head in 8 bits and
the embedding in 4 bits, int8 = 8-bit MatMulNBits everywhere it applies. Evaluation runs the
graphs with a small numpy loop against the float32 PyTorch model (llm/evaluation.py).

Per-variant quality budgets (perplexity increase over the fp32 export): int4 +10%, int8 +1%,
fp32 +1%. Everything the server needs (tokenizer.json with the GGUF-correct special tokens,
chat template, KV tensor names, EOS ids, sampling defaults, genai_config.json) lands in the
version folder; the server never needs transformers. Imports torch only lazily, inside the
llm modules it calls.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, ClassVar

from appliance.errors import ExportError
from appliance.export.llm.eval_data import TokenizerFile, load_prompts
from appliance.export.llm.evaluation import STAND_IN_LOGITS_DIFF, DecoderEvaluator, greedy_prompt_count, needs_torch_perplexity
from appliance.export.llm.gather_table import stored_copy_bytes
from appliance.export.llm.graph_facts import eos_ids_from, generation_spec
from appliance.export.llm.kv_quant import CALIBRATION_MARGIN, calibrate, compare_caches, supports_int8_kv, write_int8_kv
from appliance.export.llm.onnx_decoder import OnnxDecoder
from appliance.export.llm.quantize import WeightOnlyRecipe, quantize_weight_only
from appliance.export.llm.routes import (
    GENAI_ARCHITECTURES,
    GENAI_CONFIG_FILE,
    MODEL_FILE,
    OPTIMUM_ARCHITECTURES,
    GraphKind,
    build_genai,
    export_optimum,
    route_for,
)
from appliance.export.onnx_tools import load_graph_only, op_counts, open_session, signature
from appliance.export.sources.base import ResolvedSource
from appliance.export.tasks.base import (
    Artifact,
    Evaluation,
    ExportContext,
    ManifestFields,
    Measurement,
    TaskExporter,
    register_task,
)
from appliance.repository import GenerationSpec, TokenizerSpec
from appliance.repository.manifest import ProviderHints

DEFAULT_BLOCK_SIZE = 32
#: Block size of every 8-bit MatMul (int8 weights, int4's 8-bit layers, the LM head).
#: ONNX Runtime 1.32's 8-bit MatMulNBits kernel (accuracy level 4) pays per block, not only
#: per byte: on the 2-core AVX-512 VNNI box a Qwen2.5-1.5B int8 decode step took 0.72x the time
#: with blocks of 128 (0.91x the bytes) and a 2,000-token prefill 0.78x; SmolLM2's perplexity
#: did not move (docs/BENCHMARKS.md). 4-bit blocks stay at 32 although ONNX Runtime runs 4-bit
#: blocks of 128 1.4x faster too (bench/matmulnbits_blocks.py): on SmolLM2 blocks of 64 cost
#: +9.3% perplexity against +7.3% (round-to-nearest), +11.5% with the scale search.
EIGHT_BIT_BLOCK_SIZE = 128
#: The weight-only recipe of each quantised variant (block size filled in per export).
#: int4 keeps the attention projections and down_proj in 8 bits: measured on SmolLM2 (a Q4_1
#: GGUF, so its int4 is a second rounding), plain 4-bit RTN everywhere cost +20% perplexity;
#: per-group, down_proj alone cost +6.6%, qkv +3.4%, up +3.5%. With those in 8 bits and the
#: tied embedding read from the 8-bit LM head, int4 is +8% at 24% of the fp32 size. Its 4-bit
#: codes come from a per-block search of the scale and the zero point
#: (export/llm/grid_search.py): +4.3% on SmolLM2, against +6.4% with the scale alone and +7.3%
#: with round-to-nearest, at the same bytes read and speed (ONNX Runtime's CPU kernel keeps a
#: per-block sum that carries the zero point either way). With the zero points, moving down_proj
#: to 4 bits as well gives +9.5%, too close to the budget for 8% fewer bytes at 1.5B.
VARIANT_RECIPES: dict[str, WeightOnlyRecipe] = {
    "int4": WeightOnlyRecipe(
        bits=4,
        block_size=DEFAULT_BLOCK_SIZE,
        eight_bit_block_size=EIGHT_BIT_BLOCK_SIZE,
        lm_head_bits=8,
        embedding_bits=4,
        promoted_bits=8,
        promoted_groups=("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
        promoted_layers="all",
        share_embedding=True,
        search_scales=True,
        search_zero_points=True,
    ),
    "int8": WeightOnlyRecipe(
        bits=8,
        block_size=DEFAULT_BLOCK_SIZE,
        eight_bit_block_size=EIGHT_BIT_BLOCK_SIZE,
        lm_head_bits=8,
        embedding_bits=None,
        share_embedding=True,
    ),
    # The source's own 4-bit grid, re-encoded without a second rounding (export/llm/grid_exact.py):
    # SmolLM2 (Q4_1) perplexity +1.1% instead of int4's +7.3%, 9% smaller than int4; on the
    # 2-core AVX2 box a Q4_1 source's block-sum nodes cost 12% of single-stream decode speed
    # (docs/BENCHMARKS.md); a Q4_0 source needs none (MatMulNBits' symmetric form, no zero points).
    "int4-exact": WeightOnlyRecipe(
        bits=4,
        block_size=DEFAULT_BLOCK_SIZE,
        eight_bit_block_size=EIGHT_BIT_BLOCK_SIZE,
        lm_head_bits=8,
        embedding_bits=None,
        share_embedding=True,
        grid_exact=True,
    ),
}
#: Largest accepted perplexity increase over the fp32 export, per variant (the issue's targets).
VARIANT_BUDGETS: dict[str, float] = {"fp32": 0.01, "fp16": 0.01, "int8": 0.01, "int4": 0.10, "int4-exact": 0.02}
#: Largest perplexity increase an int8 KV cache may add over the fp32 cache with the same
#: weights (`--kv-cache int8`). Measured on SmolLM2-135M int4: -0.08% with 94% of next tokens
#: unchanged (docs/BENCHMARKS.md).
KV_CACHE_BUDGET = 0.01
#: Files of the Hugging Face folder that travel into the version folder when present.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
#: Prompt length and decode steps of the report's speed figures.
MEASURE_PROMPT_TOKENS = 100
MEASURE_DECODE_STEPS = 32


@register_task
class TextGenerationExporter(TaskExporter):
    """Decoder LLMs: builder or Optimum graph, weight-only int8/int4, perplexity budgets."""

    task = "text-generation"
    variants: ClassVar[tuple[str, ...]] = ("int4", "int4-exact", "int8", "fp16", "fp32")
    int8_kv_variants: ClassVar[tuple[str, ...]] = tuple(VARIANT_RECIPES)
    default_max_quality_loss = VARIANT_BUDGETS["int4"]
    quality_metric = (
        "perplexity / torch_perplexity - 1 (the PyTorch model on the same text; for a large model the fp32 "
        f"export's perplexity stands in when its logits are within {STAND_IN_LOGITS_DIFF:g} of PyTorch's: "
        "quality.perplexity_basis)"
    )

    def __init__(self, source: ResolvedSource, ctx: ExportContext) -> None:
        super().__init__(source, ctx)
        self._hf_dir: Path | None = None
        self._reference: Artifact | None = None
        self._evaluator: DecoderEvaluator | None = None
        self._spec: GenerationSpec | None = None
        self._graph: GraphKind | None = None

    # -- detection ------------------------------------------------------------------------
    @classmethod
    def claims(cls, source: ResolvedSource) -> bool:
        return any(arch in (*GENAI_ARCHITECTURES, *OPTIMUM_ARCHITECTURES) for arch in source.architectures)

    @classmethod
    def supported_architectures(cls) -> tuple[str, ...]:
        return (*GENAI_ARCHITECTURES, *OPTIMUM_ARCHITECTURES)

    def check_source(self) -> None:
        if self.source.format not in ("hf-folder", "gguf"):
            raise ExportError(
                f"task: text-generation needs a Hugging Face folder or a GGUF file, not {self.source.format}",
                field="task",
            )
        self._graph = route_for(self.source.architectures)

    # -- variants -------------------------------------------------------------------------
    def auto_variant(self, provider: str) -> str:
        """int4 for the CPU: decode is bound by per-step overhead and weight bandwidth, which
        int4 shrinks most. fp16 for a GPU: the model builder's CUDA layout (fp16 activations and
        KV cache) is what the engine decodes on CUDA; the int4 graphs are laid out for the CPU
        (fp32 activations, GroupQueryAttention in fp32) and would stay there."""
        return "fp16" if provider in ("cuda", "tensorrt") else "int4"

    def resolve_variant(self, requested: str) -> str:
        name = super().resolve_variant(requested)
        if name == "int4-exact" and self.source.format == "gguf":
            # Refused from the header, before the weights are dequantised, naming the types.
            from appliance.export.llm.gguf_header import read_gguf_header
            from appliance.export.sources.gguf import check_grid_exact_types

            check_grid_exact_types(read_gguf_header(self.source.path))
        # The pipeline reads the budget from this attribute; decoders budget per variant.
        self.default_max_quality_loss = VARIANT_BUDGETS[name]
        return name

    def recipe(self, name: str) -> WeightOnlyRecipe:
        block_size = self.ctx.block_size or DEFAULT_BLOCK_SIZE
        return dataclasses.replace(VARIANT_RECIPES[name], block_size=block_size)

    # -- stages ---------------------------------------------------------------------------
    def hf_dir(self) -> Path:
        """The Hugging Face folder the graph and the PyTorch reference are built from."""
        if self._hf_dir is None:
            if self.source.format == "gguf":
                from appliance.export.llm.gguf_header import read_gguf_header
                from appliance.export.llm.gguf_load import gguf_to_hf_folder

                self.ctx.progress.step("dequantising the GGUF weights")
                folder = self.ctx.subdir("hf")
                gguf_to_hf_folder(read_gguf_header(self.source.path), folder)
                self._hf_dir = folder
            else:
                self._hf_dir = self.source.path
            if not (self._hf_dir / "tokenizer.json").is_file():
                raise ExportError(
                    f"source: {self.source.uri} has no tokenizer.json; the server tokenizes with it",
                    field="source",
                )
        return self._hf_dir

    def export_reference(self) -> Artifact:
        graph = self._graph or route_for(self.source.architectures)
        self._graph = graph
        hf_dir = self.hf_dir()
        out_dir = self.ctx.subdir("reference")
        self.ctx.progress.step(f"building the fp32 graph ({'model builder' if graph == 'genai' else 'Optimum'})")
        if graph == "genai":
            build_genai(hf_dir, out_dir, self.ctx.work_dir / "builder-cache")
        else:
            export_optimum(hf_dir, out_dir)
        counts = op_counts(load_graph_only(out_dir / MODEL_FILE))
        self._reference = Artifact(
            directory=out_dir,
            variant="fp32",
            quantization="fp32",
            details={"graph": graph, "nodes": sum(counts.values()), "ops": dict(counts.most_common(8))},
        )
        return self._reference

    def make_variant(self, name: str, reference: Artifact) -> Artifact:
        if name == "fp32":
            return reference
        if name == "fp16":
            return self._fp16(reference)
        recipe = self.recipe(name)
        out_dir = self.ctx.subdir(f"variant-{name}")
        self.ctx.progress.step(
            f"weight-only {name}: MatMulNBits, blocks of {recipe.block_size} (8-bit: {recipe.eight_bit_block_size or recipe.block_size})"
        )
        details = quantize_weight_only(reference.model_path, out_dir / MODEL_FILE, recipe)
        if (reference.directory / GENAI_CONFIG_FILE).exists():
            shutil.copyfile(reference.directory / GENAI_CONFIG_FILE, out_dir / GENAI_CONFIG_FILE)
        details["graph"] = reference.details.get("graph")
        fp32_bytes = _fp32_weight_bytes(reference)
        details["reference_size_bytes"] = fp32_bytes
        details["size_ratio_to_fp32"] = round(
            sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file()) / max(fp32_bytes, 1), 4
        )
        embedding = (
            "shared with the LM head"
            if details.get("embedding_shared_with_lm_head")
            else f"{recipe.embedding_bits or 32}-bit"
        )
        promoted = (
            f", {details['promoted_matmuls']} sensitive MatMuls ({'/'.join(recipe.promoted_groups)}) in {recipe.promoted_bits}-bit"
            if details.get("promoted_matmuls")
            else ""
        )
        weights = (
            f"weights 4-bit on the source's own grid ({details['grid_exact_matmuls']} MatMuls, no second rounding)"
            if details.get("grid_exact_matmuls")
            else f"weights {recipe.bits}-bit{promoted}{_describe_search(recipe) if details.get('scale_searched_matmuls') else ''}"
        )
        notes = [
            f"{weights}, LM head {recipe.lm_head_bits or 32}-bit, embedding {embedding}, "
            f"blocks {_describe_blocks(details, recipe.block_size)}, accuracy_level {recipe.accuracy_level}"
        ]
        quantization = "int4" if recipe.grid_exact else name
        artifact = Artifact(directory=out_dir, variant=name, quantization=quantization, details=details, notes=notes)  # type: ignore[arg-type]
        return self._choose_kv_cache(artifact)

    def _choose_kv_cache(self, artifact: Artifact) -> Artifact:
        """The weight-quantised graph with an int8 KV cache when `--kv-cache int8` asked for it
        and it costs at most KV_CACHE_BUDGET perplexity against the same weights with the fp32
        cache; the fp32 cache otherwise. The report's `kv_cache` says what was chosen and why,
        with both perplexities, the next-token agreement and the bytes per token.

        Why fp32 stays the default: the int8 cache rounds what every decode step reads (the
        quality gate above), and a 2-core box runs out of compute long before it runs out of
        fp32 KV memory at the sizes it serves. int8 is for sites bound by KV memory (long
        contexts, many sequences): a quarter of the bytes, faster decode at long context, and
        prompts at the fp32 cache's speed (kv_prefill.py; ONNX Runtime 1.32's int8 kernel alone
        ran a prompt chunk 3-4x slower per layer)."""
        if self.ctx.kv_cache != "int8":
            artifact.details["kv_cache"] = {"datatype": "FP32", "chosen_by": "--kv-cache fp32 (the default)"}
            return artifact
        spec = self.generation(artifact.model_path)
        unsupported = supports_int8_kv(artifact.model_path, spec)
        if unsupported is not None:
            raise ExportError(f"kv_cache: int8 needs the model builder's graph; {unsupported}", field="kv_cache")
        evaluator = self.evaluator()
        self.ctx.progress.step("int8 KV cache: calibrating per-channel scales")
        fp32_decoder = OnnxDecoder(artifact.model_path, spec, evaluator.threads)
        scales = calibrate(fp32_decoder, evaluator.prompt_ids)
        int8_dir = self.ctx.subdir(f"variant-{artifact.variant}-kv8")
        int8_spec = write_int8_kv(artifact.model_path, int8_dir / MODEL_FILE, spec, scales)
        self.ctx.progress.step("int8 KV cache: perplexity against the fp32 cache")
        comparison = compare_caches(fp32_decoder, OnnxDecoder(int8_dir / MODEL_FILE, int8_spec, evaluator.threads), evaluator.prose_ids)
        evaluator.record_perplexity(artifact.model_path, comparison.perplexity_fp32)
        evaluator.record_perplexity(int8_dir / MODEL_FILE, comparison.perplexity_int8)
        per_token_fp32 = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
        accepted = comparison.increase <= KV_CACHE_BUDGET
        report = {
            "datatype": "INT8" if accepted else "FP32",
            "chosen_by": f"--kv-cache int8 within +{KV_CACHE_BUDGET:.0%} perplexity over the fp32 cache",
            "perplexity_fp32_cache": round(comparison.perplexity_fp32, 4),
            "perplexity_int8_cache": round(comparison.perplexity_int8, 4),
            "perplexity_increase": round(comparison.increase, 5),
            "next_token_agreement": round(comparison.top1_agreement, 4),
            "bytes_per_token_fp32": per_token_fp32,
            "bytes_per_token": per_token_fp32 // 4 if accepted else per_token_fp32,
            "calibration": f"per-channel max |x| x {CALIBRATION_MARGIN} over the {len(evaluator.prompt_ids)} chat prompts",
        }
        if not accepted:
            artifact.details["kv_cache"] = report
            artifact.notes.append(
                f"KV cache kept fp32: int8 cost {comparison.increase:+.2%} perplexity (budget +{KV_CACHE_BUDGET:.0%})"
            )
            return artifact
        details = {**artifact.details, "kv_cache": report}
        notes = [
            *artifact.notes,
            f"KV cache int8 per channel ({per_token_fp32 // 4:,} bytes per token, a quarter of fp32): "
            f"perplexity {comparison.increase:+.2%} against the fp32 cache, next token agreeing at "
            f"{comparison.top1_agreement:.1%} of positions",
        ]
        return dataclasses.replace(artifact, directory=int8_dir, details=details, notes=notes)

    def _fp16(self, reference: Artifact) -> Artifact:
        """fp16 for GPU providers: the builder's own fp16 graph (fp16 KV cache and logits),
        or the registry's fp16 conversion (fp32 io) for Optimum graphs. It also runs, slowly,
        on the CPU provider, which is how the export evaluates it on a box without a GPU."""
        if reference.details.get("graph") != "genai":
            artifact = super().make_variant("fp16", reference)
            artifact.details["graph"] = reference.details.get("graph")
            return artifact
        out_dir = self.ctx.subdir("variant-fp16")
        self.ctx.progress.step("building the fp16 graph (model builder, CUDA layout)")
        build_genai(self.hf_dir(), out_dir, self.ctx.work_dir / "builder-cache", precision="fp16", provider="cuda")
        counts = op_counts(load_graph_only(out_dir / MODEL_FILE))
        details = {"graph": "genai", "nodes": sum(counts.values()), "method": "model builder fp16 (cuda)"}
        return Artifact(directory=out_dir, variant="fp16", quantization="fp16", details=details)

    def generation(self, model_path: Path) -> GenerationSpec:
        hf_dir = self.hf_dir()
        config = _read_json(hf_dir / "config.json")
        generation_config = _read_json(hf_dir / "generation_config.json")
        eos = eos_ids_from(generation_config.get("eos_token_id"), config.get("eos_token_id"))
        bos = generation_config.get("bos_token_id", config.get("bos_token_id"))
        return generation_spec(
            model_path,
            graph=self._graph or route_for(self.source.architectures),
            config=config,
            generation_config=generation_config,
            eos_token_ids=eos,
            bos_token_id=bos if isinstance(bos, int) else None,
        )

    def evaluator(self) -> DecoderEvaluator:
        if self._evaluator is None:
            hf_dir = self.hf_dir()
            tokenizer_config = _read_json(hf_dir / "tokenizer_config.json")
            reference = self._reference or self.export_reference()
            spec = self.generation(reference.model_path)
            fp32_bytes = _fp32_weight_bytes(reference)
            self._evaluator = DecoderEvaluator(
                hf_dir=hf_dir,
                tokenizer_path=hf_dir / "tokenizer.json",
                chat_template=_chat_template(hf_dir, tokenizer_config),
                special_tokens=_special_tokens(tokenizer_config),
                context_length=spec.context_length,
                data_dir=self.ctx.data_dir,
                threads=self.ctx.threads,
                progress=self.ctx.progress,
                greedy_prompts=greedy_prompt_count(fp32_bytes, len(load_prompts(self.ctx.data_dir))),
                torch_perplexity=needs_torch_perplexity(fp32_bytes),
            )
        return self._evaluator

    def evaluate(self, candidate: Artifact) -> Evaluation:
        reference = self._reference or self.export_reference()
        spec = self.generation(candidate.model_path)
        reference_spec = self.generation(reference.model_path)
        quality, loss, failure = self.evaluator().evaluate(candidate.model_path, reference.model_path, spec, reference_spec)
        notes = []
        if candidate.variant != "fp32":
            notes.append(f"perplexity {quality['perplexity']} vs fp32 export {quality['reference_perplexity']}")
        if failure is not None:
            notes.append(f"the fp32 conversion is wrong: {failure}")
        return Evaluation(quality=quality, loss=loss, notes=notes, failure=failure)

    def measure(self, candidate: Artifact) -> Measurement:
        """Load time, prefill of a ~100-token prompt and the median decode step (batch 1)."""
        from appliance.export.llm.onnx_decoder import OnnxDecoder

        spec = self.generation(candidate.model_path)
        started = time.perf_counter()
        open_session(candidate.model_path, threads=self.ctx.threads)
        load_s = time.perf_counter() - started
        decoder = OnnxDecoder(candidate.model_path, spec, self.ctx.threads)
        prompt = self.evaluator().prose_ids[:MEASURE_PROMPT_TOKENS]
        decoder.greedy(prompt[:8], 2)  # warm-up
        _, timing = decoder.greedy_timed(prompt, MEASURE_DECODE_STEPS + 1)
        step_ms = statistics.median(timing.decode_step_s) * 1000.0
        latency: dict[str, Any] = {
            "prefill_ms": round(timing.prefill_s * 1000.0, 2),
            "prefill_tokens": len(prompt),
            "decode_step_ms": round(step_ms, 3),
            "decode_tokens_per_s": round(1000.0 / step_ms, 1),
            "batch": 1,
            "loop": "export-stage numpy loop, KV copied each step",
            "provider": "cpu",
        }
        return Measurement(load_s=round(load_s, 4), latency=latency)

    def manifest_fields(self, candidate: Artifact) -> ManifestFields:
        hf_dir = self.hf_dir()
        inputs, outputs = signature(candidate.model_path)
        spec = self.generation(candidate.model_path)
        tokenizer_config = _read_json(hf_dir / "tokenizer_config.json")
        special = _special_tokens(tokenizer_config)
        tokenizer_file = TokenizerFile(hf_dir / "tokenizer.json")
        vocab = tokenizer_file.tokenizer.get_vocab()
        pad_token = special.get("pad_token")
        tokenizer = TokenizerSpec(
            file="tokenizer.json",
            max_length=spec.context_length,
            add_bos_token=tokenizer_file.adds_bos(spec.bos_token_id),
            add_eos_token=tokenizer_file.adds_eos(spec.eos_token_ids[0] if spec.eos_token_ids else None),
            bos_token=special.get("bos_token"),
            eos_token=special.get("eos_token"),
            pad_token=pad_token,
            pad_token_id=vocab.get(pad_token) if pad_token else None,
            truncation_side="left",
        )
        contrib = sorted({op for op in op_counts(load_graph_only(candidate.model_path)) if op in _CONTRIB_OPS})
        return ManifestFields(
            inputs=inputs,
            outputs=outputs,
            tokenizer=tokenizer,
            generation=spec,
            chat_template=_chat_template(hf_dir, tokenizer_config),
            providers=ProviderHints(preferred=["cuda", "cpu"], contrib_ops=contrib),
        )

    def files_to_copy(self) -> list[tuple[Path, str]]:
        hf_dir = self.hf_dir()
        return [(hf_dir / name, name) for name in TOKENIZER_FILES if (hf_dir / name).is_file()]


#: Microsoft-domain operators the exported graphs may use (TensorRT lacks some of them).
_CONTRIB_OPS = frozenset(
    {"GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "RotaryEmbedding"}
)


def _describe_search(recipe: WeightOnlyRecipe) -> str:
    """The report's words for the 4-bit search (what a reader compares between exports)."""
    return ", 4-bit scales and zero points searched per block" if recipe.search_zero_points else ", 4-bit scales searched per block"


def _describe_blocks(details: dict[str, Any], block_size: int) -> str:
    """'4-bit/32 x112, 8-bit/128 x85': how many MatMuls got which bits and block size."""
    groups = dict(details["blocks"])
    if details.get("grid_exact_matmuls"):
        groups[f"4-bit/{block_size} (source grid)"] = details["grid_exact_matmuls"]
    return ", ".join(f"{group} x{count}" for group, count in groups.items())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"source: {path.name} is not valid JSON ({exc.msg})", field="source") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, Any]:
    return {key: _token_text(tokenizer_config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}


def _chat_template(hf_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The chat template from tokenizer_config.json, or a chat_template.jinja beside it."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: take "default"
        template = next((entry.get("template") for entry in template if entry.get("name") == "default"), None)
    if isinstance(template, str) and template.strip():
        return template
    jinja = hf_dir / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


def _fp32_weight_bytes(reference: Artifact) -> int:
    """The fp32 reference's size with each weight counted once: a tied table it also keeps in
    gather order (export/llm/gather_table.py) is not another weight."""
    return reference.size_bytes - stored_copy_bytes(reference.model_path)
