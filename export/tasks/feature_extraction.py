"""Task feature-extraction: sentence-embedding encoders with pooling and L2 normalisation fused
into the graph as a `sentence_embedding` output.

Pooling and normalisation are what the sentence-transformers files declare
(modules.json naming a Pooling module whose folder holds config.json, usually 1_Pooling/, and a
Normalize entry): mean, CLS, max or last-token pooling. A plain encoder folder without
modules.json gets the default, mean pooling and normalisation. Every variant's report says which
pooling was used and where it came from (`details.pooling`, `details.pooling_from`), and the
manifest's `embedding` carries it to the server. Quality is cosine similarity to
the PyTorch reference (transformers AutoModel plus the same pooling in torch) over the shipped
sentences, and whether each sentence's nearest neighbour stays the same. Imports torch only
inside methods.
"""

from __future__ import annotations

import functools
import json
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.errors import ExportError
from appliance.export import onnx_tools
from appliance.export.tasks.base import Artifact, Evaluation, ManifestFields, register_task
from appliance.export.tasks.encoder import EMBEDDING_ONLY_ENCODERS, EVAL_BATCH_SIZE, SUPPORTED_ENCODERS, EncoderExporter
from appliance.kernels.pooling import PoolingMode, pooling_piece
from appliance.repository import EmbeddingSpec
from appliance.repository.manifest import ProviderHints

EMBEDDING_OUTPUT = "sentence_embedding"
HIDDEN_OUTPUT = "last_hidden_state"
MASK_INPUT = "attention_mask"
#: sentence-transformers pooling flags and the mode each stands for.
POOLING_FLAGS: dict[str, PoolingMode] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}
#: sentence-transformers pooling flags the fused graph cannot reproduce (refused by name).
UNSUPPORTED_POOLING_FLAGS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
#: sentence-transformers modules this export understands (others, e.g. Dense, are refused).
KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")
#: What a folder without sentence-transformers files gets (what sentence-transformers itself
#: does with a plain transformers model is mean pooling; we also normalise, for cosine search).
DEFAULT_POOLING: PoolingMode = "mean"
DEFAULT_NORMALIZE = True
DEFAULT_ORIGIN = "default: no sentence-transformers modules.json"


class DeclaredPooling(NamedTuple):
    """The pooling an export fuses, and where it was read."""

    mode: PoolingMode
    normalize: bool
    #: Whether the folder declared it (False: the default).
    declared: bool
    #: The file it came from, or DEFAULT_ORIGIN.
    origin: str

    def details(self) -> dict[str, Any]:
        """For report.json's `details`."""
        return {"pooling": self.mode, "normalize": self.normalize, "pooling_from": self.origin}


@functools.lru_cache(maxsize=8)
def _read_json(path_text: str) -> Any:
    with open(path_text) as handle:
        return json.load(handle)


def declared_pooling(folder: Any) -> DeclaredPooling:
    """The pooling the sentence-transformers files of `folder` declare (the default without
    modules.json); ExportError names what it cannot reproduce."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return DeclaredPooling(DEFAULT_POOLING, DEFAULT_NORMALIZE, False, DEFAULT_ORIGIN)
    try:
        modules = _read_json(str(modules_path))
    except json.JSONDecodeError:
        raise ExportError("source: modules.json is not valid JSON", field="source") from None
    if not isinstance(modules, list) or not all(isinstance(entry, dict) for entry in modules):
        raise ExportError("source: modules.json is not a list of modules", field="source")
    kinds = [str(entry.get("type", "")).rsplit(".", 1)[-1] for entry in modules]
    unknown = [kind for kind in kinds if kind not in KNOWN_MODULES]
    if unknown:
        raise ExportError(
            f"source: sentence-transformers module {unknown[0]} is not supported "
            f"(supported: {', '.join(KNOWN_MODULES)})",
            field="source",
        )
    normalize = "Normalize" in kinds
    pooling_entry = next((entry for entry, kind in zip(modules, kinds) if kind == "Pooling"), None)
    if pooling_entry is None:
        return DeclaredPooling(DEFAULT_POOLING, normalize, True, "modules.json (no Pooling module: mean)")
    relative = f"{str(pooling_entry.get('path', '')).strip('/') or '.'}/config.json"
    config_path = folder / relative
    try:
        config = _read_json(str(config_path))
    except (OSError, json.JSONDecodeError):
        raise ExportError(f"source: pooling config {relative} is missing or invalid", field="source") from None
    modes = [mode for flag, mode in POOLING_FLAGS.items() if config.get(flag)]
    unsupported = [flag for flag in UNSUPPORTED_POOLING_FLAGS if config.get(flag)]
    if unsupported:
        raise ExportError(
            f"source: pooling mode {unsupported[0].removeprefix('pooling_mode_')} ({relative}) is not supported "
            f"(supported: {', '.join(flag.removeprefix('pooling_mode_') for flag in POOLING_FLAGS)})",
            field="source",
        )
    if len(modes) != 1:
        raise ExportError(
            f"source: expected exactly one pooling mode, found {', '.join(modes) or 'none'}", field="source"
        )
    return DeclaredPooling(modes[0], normalize, True, relative)


def fuse_pooling(model: onnx.ModelProto, mode: PoolingMode, normalize: bool) -> onnx.ModelProto:
    """Append the pooling piece and make `sentence_embedding` the graph's only output."""
    graph = model.graph
    outputs = {value.name: value for value in graph.output}
    if HIDDEN_OUTPUT not in outputs or MASK_INPUT not in {value.name for value in graph.input}:
        raise ExportError(
            f"export: the encoder graph lacks {HIDDEN_OUTPUT} or {MASK_INPUT}; cannot fuse pooling", field="source"
        )
    hidden_dims = outputs[HIDDEN_OUTPUT].type.tensor_type.shape.dim
    hidden_size = hidden_dims[-1].dim_value if hidden_dims and hidden_dims[-1].HasField("dim_value") else None
    opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    piece = pooling_piece(HIDDEN_OUTPUT, MASK_INPUT, EMBEDDING_OUTPUT, mode=mode, normalize=normalize, opset=opset)
    graph.node.extend(piece.nodes)
    graph.initializer.extend(piece.initializers)
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info(EMBEDDING_OUTPUT, TensorProto.FLOAT, ["batch_size", hidden_size or "hidden"])
    )
    onnx.checker.check_model(model)
    return model


def torch_pool(hidden: Any, mask: Any, mode: PoolingMode, normalize: bool) -> Any:
    """The same pooling in torch, for the PyTorch reference (mirrors kernels.pooling)."""
    import torch

    mask_f = mask.to(hidden.dtype)
    if mode == "mean":
        pooled = (hidden * mask_f.unsqueeze(-1)).sum(1) / mask_f.sum(1, keepdim=True).clamp(min=1e-9)
    elif mode == "max":
        pooled = (hidden + (1.0 - mask_f.unsqueeze(-1)) * -1e9).max(1).values
    elif mode == "cls":
        pooled = hidden[:, 0]
    else:
        last = mask.sum(1) - 1
        pooled = hidden[torch.arange(hidden.shape[0]), last]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


@register_task
class FeatureExtractionExporter(EncoderExporter):
    task = "feature-extraction"
    optimum_task = "feature-extraction"
    encoders = {**SUPPORTED_ENCODERS, **EMBEDDING_ONLY_ENCODERS}
    default_max_quality_loss = 0.02
    quality_metric = "1 - cosine_min (cosine to the PyTorch reference, worst sentence)"

    @classmethod
    def claims(cls, source: Any) -> bool:
        if source.format != "hf-folder":
            return False
        if (source.path / "modules.json").is_file() or (source.path / "sentence_bert_config.json").is_file():
            return True
        return any(arch in cls.encoders.values() for arch in source.architectures)

    @functools.cached_property
    def pooling(self) -> DeclaredPooling:
        return declared_pooling(self.source.path)

    def check_source(self) -> None:
        super().check_source()
        _ = self.pooling  # refuse unsupported sentence-transformers modules before any work

    def load_torch_model(self) -> Any:
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(self.source.path), **self.model_kwargs())

    def export_reference(self) -> Artifact:
        raw = self.export_optimum()
        mode, normalize = self.pooling.mode, self.pooling.normalize
        self.ctx.progress.step(f"fusing {mode} pooling{' + L2 normalisation' if normalize else ''} into the graph")
        model = fuse_pooling(onnx.load(str(raw)), mode, normalize)
        out = self.ctx.subdir("reference")
        onnx.save_model(model, str(out / "model.onnx"))
        return self._with_pooling(Artifact(directory=out, variant="fp32", quantization="fp32", details={"exporter": "optimum-onnx"}))

    def make_variant(self, name: str, reference: Artifact) -> Artifact:
        return self._with_pooling(super().make_variant(name, reference))

    def _with_pooling(self, artifact: Artifact) -> Artifact:
        """Every variant's report says which pooling its graph computes and where it came from."""
        artifact.details = {**artifact.details, **self.pooling.details()}
        note = "no sentence-transformers files: mean pooling + L2 normalisation assumed"
        if not self.pooling.declared and note not in artifact.notes:
            artifact.notes.append(note)
        return artifact

    @functools.cached_property
    def reference_embeddings(self) -> np.ndarray:
        mode, normalize = self.pooling.mode, self.pooling.normalize
        return self.torch_reference(
            self.read_lines("sentences.txt"),
            lambda output, batch: torch_pool(output.last_hidden_state, batch["attention_mask"], mode, normalize),
        )

    def evaluate(self, candidate: Artifact) -> Evaluation:
        reference = self.reference_embeddings
        sentences = self.read_lines("sentences.txt")
        self.ctx.progress.step(f"{candidate.variant} over {len(sentences)} sentences")
        embeddings = np.concatenate(self.run_onnx(candidate, sentences))
        cosines = cosine_rows(embeddings, reference)
        agreement = float((nearest_neighbours(embeddings) == nearest_neighbours(reference)).mean())
        quality = {
            "cosine_mean": round(float(cosines.mean()), 6),
            "cosine_min": round(float(cosines.min()), 6),
            "nn_agreement": round(agreement, 6),
            "sentences": len(sentences),
            "reference": "PyTorch (transformers AutoModel + the same pooling)",
        }
        return Evaluation(quality=quality, loss=1.0 - float(cosines.min()))

    def manifest_fields(self, candidate: Artifact) -> ManifestFields:
        inputs, outputs = onnx_tools.signature(candidate.model_path)
        mode, normalize = self.pooling.mode, self.pooling.normalize
        dimension = int((self.source.config or {}).get("hidden_size") or outputs[0].shape[-1])
        return ManifestFields(
            inputs=inputs,
            outputs=outputs,
            max_batch_size=EVAL_BATCH_SIZE,
            tokenizer=self.tokenizer_spec(),
            embedding=EmbeddingSpec(output=EMBEDDING_OUTPUT, dimension=dimension, pooling=mode, normalize=normalize),
            providers=_provider_hints(candidate),
        )


def _provider_hints(candidate: Artifact) -> ProviderHints:
    if candidate.quantization == "fp16":
        return ProviderHints(preferred=["tensorrt", "cuda", "cpu"], trt_fp16=True)
    if candidate.quantization in ("int8", "int8-static"):
        # Dynamic int8 (MatMulInteger / DynamicQuantizeLinear) is a CPU recipe.
        return ProviderHints(preferred=["cpu", "cuda"], trt_int8=candidate.quantization == "int8-static")
    return ProviderHints()


__all__ = ["DeclaredPooling", "FeatureExtractionExporter", "declared_pooling", "fuse_pooling", "torch_pool"]
