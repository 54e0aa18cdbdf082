"""manifest.json and report.json: what a published model version declares about itself.

The server trusts nothing else about a model: inputs and outputs (names, KServe datatypes,
shapes with -1 for dynamic dimensions), the task, the tokenizer and generation settings, and
provider hints all come from here. Unknown keys are kept (forward compatible), but the fields
below are validated strictly because a lying manifest must be refused, not half-served.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
MANIFEST_FORMAT_VERSION = 1

#: Model names are used in URLs and paths: keep them to a safe alphabet.
MODEL_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Version folders are ASCII decimal numbers. `str.isdigit()` also accepts '¹' or '٣', which
#: `int()` then refuses, so the rule is spelled out instead.
VERSION_PATTERN = re.compile(r"^[0-9]{1,9}$")

Task = Literal["text-generation", "feature-extraction", "text-classification", "tensor"]
Datatype = Literal["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
Quantization = Literal["fp32", "fp16", "int8", "int8-static", "int4"]


def check_model_name(name: str) -> str:
    """Return `name` if it is a safe model name, else raise ValueError naming the rule."""
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid model name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    return name


def parse_version(text: str) -> int | None:
    """The version number in `text` (a folder name or URL segment), or None if it is not one."""
    if not VERSION_PATTERN.fullmatch(text):
        return None
    return int(text)


class TensorSpec(BaseModel):
    """One input or output as the KServe V2 metadata endpoint reports it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    datatype: Datatype
    shape: list[int] = Field(description="Dimensions; -1 marks a dynamic one.")

    @field_validator("shape")
    @classmethod
    def _dims_valid(cls, value: list[int]) -> list[int]:
        if len(value) > 8:
            raise ValueError("more than 8 dimensions")
        for dim in value:
            if dim < -1 or dim > 1 << 31:
                raise ValueError(f"dimension {dim} out of range")
        return value


class SourceInfo(BaseModel):
    """Where the version came from, so it can be reproduced and audited."""

    kind: Literal["hf-folder", "gguf", "package", "onnx"]
    uri: str
    sha256: str = Field(description="Hash over the source's weight files.")


class TokenizerSpec(BaseModel):
    """How the server turns text into ids: the `tokenizers` file plus special-token facts.

    Special tokens and BOS behaviour come from the source's own metadata (for GGUF, the file's
    header), not from a converter's guess.
    """

    file: str = "tokenizer.json"
    max_length: int = Field(512, ge=1)
    add_bos_token: bool = False
    add_eos_token: bool = False
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    pad_token_id: int | None = None
    truncation_side: Literal["left", "right"] = "right"


class EmbeddingSpec(BaseModel):
    """Sentence-embedding post-processing, already fused into the graph by the export stage."""

    output: str = "sentence_embedding"
    dimension: int = Field(ge=1)
    pooling: Literal["mean", "cls", "max", "last"] = "mean"
    normalize: bool = True
    #: Smallest prefix length `dimensions` may truncate to (Matryoshka-trained models); None
    #: means the model does not support truncation.
    min_dimensions: int | None = None


class ScoringSpec(BaseModel):
    """How a text classifier's logits become one relevance score (reranking with a
    cross-encoder): the activation its configuration names, and for several labels which
    label's probability is the score."""

    output: str = "logits"
    activation: Literal["sigmoid", "softmax", "identity"] = "sigmoid"
    #: The label whose probability is the score (softmax over several labels).
    label: int = Field(0, ge=0)


class GenerationSpec(BaseModel):
    """What the generation engine needs to drive a decoder graph with a KV cache."""

    graph: Literal["optimum", "genai"] = Field(
        description="'optimum': past_key_values.N.key/value inputs; 'genai': model-builder graph "
        "with GroupQueryAttention that can share one KV buffer between steps."
    )
    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    context_length: int = Field(ge=1)
    kv_datatype: Datatype = "FP32"
    fp32_attention_input: str | None = Field(
        default=None,
        description="BOOL [1] input of an int8-cache 'genai' graph. True: the call attends over "
        "the cache dequantised to fp32 and its present outputs hold only its new positions "
        "[rows, kv_heads, tokens, head_dim], which the engine copies into its cache (prompt "
        "chunks: one row continuing its past, or a first prompt). False: the int8 kernel, "
        "writing in place (decode steps, speculative verification). None: no such input.",
    )
    past_key_name: str = "past_key_values.{layer}.key"
    past_value_name: str = "past_key_values.{layer}.value"
    present_key_name: str = "present.{layer}.key"
    present_value_name: str = "present.{layer}.value"
    eos_token_ids: list[int] = Field(default_factory=list)
    bos_token_id: int | None = None
    defaults: dict[str, Any] = Field(default_factory=dict, description="Sampling defaults.")
    logits_start_input: str | None = Field(
        default=None,
        description="INT64 [1] input: logits are computed from this position on (the last "
        "prompt position when only the next token is needed). None: every position.",
    )


class ProviderHints(BaseModel):
    """What the export stage knows about running this graph on each provider."""

    preferred: list[Literal["tensorrt", "cuda", "cpu"]] = Field(
        default_factory=lambda: ["tensorrt", "cuda", "cpu"]
    )
    trt_fp16: bool = False
    trt_int8: bool = False
    #: Operators some providers lack (e.g. MatMulNBits on TensorRT); informational.
    contrib_ops: list[str] = Field(default_factory=list)


class Manifest(BaseModel):
    """manifest.json of one model version."""

    model_config = ConfigDict(extra="allow")

    format_version: int = MANIFEST_FORMAT_VERSION
    name: str
    version: int = Field(ge=1)
    task: Task
    source: SourceInfo
    created_at: str = Field(description="UTC, ISO 8601.")
    opset: int = Field(ge=1)
    quantization: Quantization
    model_file: str = "model.onnx"
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    max_batch_size: int = Field(32, ge=0, description="0: the model takes no batch dimension.")
    tokenizer: TokenizerSpec | None = None
    embedding: EmbeddingSpec | None = None
    generation: GenerationSpec | None = None
    labels: list[str] | None = None
    #: Text classifiers: how their logits become a relevance score (`/v1/rerank`). Absent in
    #: older exports: one label means a sigmoid, several a softmax over the last label.
    scoring: ScoringSpec | None = None
    chat_template: str | None = None
    providers: ProviderHints = Field(default_factory=ProviderHints)
    #: True when the report's verdict is accepted, or when an admin forced a rejected one.
    deployable: bool = True
    #: Set by the export stage for the variant the server should serve when several exist.
    default: bool = False

    @field_validator("name")
    @classmethod
    def _name_safe(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("model_file")
    @classmethod
    def _model_file_local(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
            raise ValueError("model_file must be a plain file name inside the version folder")
        return value

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)


class Report(BaseModel):
    """report.json: size, speed and quality against the reference, and the verdict."""

    model_config = ConfigDict(extra="allow")

    variant: str
    size_bytes: int = Field(ge=0)
    load_s: float = Field(ge=0)
    latency: dict[str, Any] = Field(default_factory=dict)
    quality: dict[str, Any] = Field(default_factory=dict)
    verdict: Literal["accepted", "rejected"]
    budget: dict[str, Any] = Field(default_factory=dict)
    fusions: dict[str, int] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
