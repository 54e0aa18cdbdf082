"""Task text-classification: sequence classifiers exported with their logits output; labels
come from config.json's id2label, and how the logits become one relevance score (for
reranking with a cross-encoder) from the activation the configuration names. Quality against
the PyTorch reference (AutoModelForSequenceClassification): for a classifier with several
labels, label agreement over the shipped sentences; for a one-label model (a cross-encoder
that scores query-document pairs) ranking agreement over the shipped queries and documents
(mean Spearman correlation per query, and how often the top document is the same); both with
the largest logit difference. Imports torch only inside methods.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
import onnx

from appliance.errors import ExportError
from appliance.export import onnx_tools
from appliance.export.tasks.base import Artifact, Evaluation, ManifestFields, register_task
from appliance.export.tasks.encoder import EVAL_BATCH_SIZE, SUPPORTED_ENCODERS, EncoderExporter
from appliance.repository.manifest import ProviderHints, ScoringSpec

CLASSIFIER_SUFFIX = "ForSequenceClassification"
#: sentence-transformers' activation class names (CrossEncoder's config keys) -> ours.
ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Softmax": "softmax"}
#: Query-document data (written for this project) a cross-encoder is judged on.
RERANK_DATA = "rerank.jsonl"
#: Label names that mean "relevant" in several-label rerankers (NLI models: entailment).
RELEVANT_LABELS = ("relevant", "entailment", "positive", "yes", "true")


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their mean rank); 1.0 when either side is flat."""
    ranks = [_ranks(np.asarray(values, dtype=np.float64)) for values in (first, second)]
    if ranks[0].std() == 0 or ranks[1].std() == 0:
        return 1.0
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def scoring_spec(config: dict[str, Any], labels: list[str]) -> ScoringSpec:
    """The activation a cross-encoder's configuration names (sentence-transformers writes
    `sbert_ce_default_activation_function`, or `sentence_transformers.activation_fn`), else
    what CrossEncoder does by default: a sigmoid for one label, a softmax for several, whose
    score is the probability of the label named relevant (else the last)."""
    named = config.get("sbert_ce_default_activation_function") or (config.get("sentence_transformers") or {}).get("activation_fn")
    activation = next((ours for theirs, ours in ACTIVATIONS.items() if named and str(named).endswith(theirs)), None)
    if len(labels) == 1:
        return ScoringSpec(activation=activation or "sigmoid", label=0)  # type: ignore[arg-type]
    lowered = [label.lower() for label in labels]
    relevant = next((lowered.index(name) for name in RELEVANT_LABELS if name in lowered), len(labels) - 1)
    return ScoringSpec(activation=activation or "softmax", label=relevant)  # type: ignore[arg-type]


@register_task
class TextClassificationExporter(EncoderExporter):
    task = "text-classification"
    optimum_task = "text-classification"
    default_max_quality_loss = 0.02
    quality_metric = "1 - label_agreement (argmax label equal to the PyTorch reference's)"
    ranking_metric = "1 - spearman_mean (rank correlation with the PyTorch reference's scores, per query)"

    @classmethod
    def claims(cls, source: Any) -> bool:
        return source.format == "hf-folder" and any(arch.endswith(CLASSIFIER_SUFFIX) for arch in source.architectures)

    @classmethod
    def supported_architectures(cls) -> tuple[str, ...]:
        return tuple(name.removesuffix("Model") + CLASSIFIER_SUFFIX for name in SUPPORTED_ENCODERS.values())

    @functools.cached_property
    def labels(self) -> list[str]:
        config = self.source.config or {}
        id2label = config.get("id2label") or {}
        count = int(config.get("num_labels") or len(id2label) or 0)
        if count < 1:
            raise ExportError("source: config.json declares no labels (id2label / num_labels)", field="source")
        return [str(id2label.get(str(index), id2label.get(index, f"LABEL_{index}"))) for index in range(count)]

    def load_torch_model(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(str(self.source.path), **self.model_kwargs())

    def export_reference(self) -> Artifact:
        raw = self.export_optimum()
        out = self.ctx.subdir("reference")
        model = onnx.load(str(raw))
        onnx.save_model(model, str(out / "model.onnx"))
        return Artifact(directory=out, variant="fp32", quantization="fp32", details={"exporter": "optimum-onnx"})

    @property
    def ranks_pairs(self) -> bool:
        """A one-label classifier scores relevance: it is judged on query-document pairs."""
        return len(self.labels) == 1

    def check_source(self) -> None:
        super().check_source()
        if self.ranks_pairs:  # (reading the labels also refuses a config without any)
            self.quality_metric = self.ranking_metric  # type: ignore[misc] - per source, not per class

    @functools.cached_property
    def reference_logits(self) -> np.ndarray:
        if self.ranks_pairs:
            queries, documents, _sizes = self.rerank_pairs
            return self.torch_reference(queries, lambda output, _batch: output.logits, pairs=documents)
        return self.torch_reference(self.read_lines("sentences.txt"), lambda output, _batch: output.logits)

    @functools.cached_property
    def rerank_pairs(self) -> tuple[list[str], list[str], list[int]]:
        """The shipped queries, each repeated beside its documents, and the group sizes."""
        queries: list[str] = []
        documents: list[str] = []
        sizes: list[int] = []
        for line in self.read_lines(RERANK_DATA):
            item = json.loads(line)
            queries.extend([item["query"]] * len(item["documents"]))
            documents.extend(item["documents"])
            sizes.append(len(item["documents"]))
        return queries, documents, sizes

    def evaluate(self, candidate: Artifact) -> Evaluation:
        if self.ranks_pairs:
            return self._evaluate_ranking(candidate)
        reference = self.reference_logits
        sentences = self.read_lines("sentences.txt")
        self.ctx.progress.step(f"{candidate.variant} over {len(sentences)} sentences")
        logits = np.concatenate(self.run_onnx(candidate, sentences))
        agreement = float((logits.argmax(axis=1) == reference.argmax(axis=1)).mean())
        quality = {
            "label_agreement": round(agreement, 6),
            "max_abs_logit_diff": round(float(np.abs(logits - reference).max()), 6),
            "sentences": len(sentences),
            "reference": "PyTorch (transformers AutoModelForSequenceClassification)",
        }
        return Evaluation(quality=quality, loss=1.0 - agreement)

    def _evaluate_ranking(self, candidate: Artifact) -> Evaluation:
        queries, documents, sizes = self.rerank_pairs
        self.ctx.progress.step(f"{candidate.variant} over {len(sizes)} queries, {len(documents)} documents")
        logits = np.concatenate(self.run_onnx(candidate, queries, pairs=documents)).reshape(-1)
        reference = self.reference_logits.reshape(-1)
        correlations, top_agree, start = [], 0, 0
        for size in sizes:
            ours, theirs = logits[start : start + size], reference[start : start + size]
            correlations.append(spearman(ours, theirs))
            top_agree += int(ours.argmax() == theirs.argmax())
            start += size
        mean = float(np.mean(correlations))
        quality = {
            "spearman_mean": round(mean, 6),
            "spearman_min": round(float(np.min(correlations)), 6),
            "top1_agreement": round(top_agree / len(sizes), 6),
            "max_abs_logit_diff": round(float(np.abs(logits - reference).max()), 6),
            "queries": len(sizes),
            "documents": len(documents),
            "reference": "PyTorch (transformers AutoModelForSequenceClassification) on query-document pairs",
        }
        return Evaluation(quality=quality, loss=1.0 - mean)

    def manifest_fields(self, candidate: Artifact) -> ManifestFields:
        inputs, outputs = onnx_tools.signature(candidate.model_path)
        hints = ProviderHints(trt_fp16=candidate.quantization == "fp16")
        if candidate.quantization in ("int8", "int8-static"):
            hints = ProviderHints(preferred=["cpu", "cuda"])
        return ManifestFields(
            inputs=inputs,
            outputs=outputs,
            max_batch_size=EVAL_BATCH_SIZE,
            tokenizer=self.tokenizer_spec(),
            labels=self.labels,
            providers=hints,
            scoring=scoring_spec(self.source.config or {}, self.labels),
        )
