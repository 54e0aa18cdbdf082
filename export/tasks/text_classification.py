"""Task text-classification: sequence classifiers exported with their logits output; labels
come from config.json's id2label. Quality is label agreement with the PyTorch reference
(AutoModelForSequenceClassification) over the shipped sentences, plus the largest logit
difference. Imports torch only inside methods.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import onnx

from appliance.errors import ExportError
from appliance.export import onnx_tools
from appliance.export.tasks.base import Artifact, Evaluation, ManifestFields, register_task
from appliance.export.tasks.encoder import EVAL_BATCH_SIZE, SUPPORTED_ENCODERS, EncoderExporter
from appliance.repository.manifest import ProviderHints

CLASSIFIER_SUFFIX = "ForSequenceClassification"


@register_task
class TextClassificationExporter(EncoderExporter):
    task = "text-classification"
    optimum_task = "text-classification"
    default_max_quality_loss = 0.02
    quality_metric = "1 - label_agreement (argmax label equal to the PyTorch reference's)"

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

    def check_source(self) -> None:
        super().check_source()
        _ = self.labels

    def load_torch_model(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(str(self.source.path), **self.model_kwargs())

    def export_reference(self) -> Artifact:
        raw = self.export_optimum()
        out = self.ctx.subdir("reference")
        model = onnx.load(str(raw))
        onnx.save_model(model, str(out / "model.onnx"))
        return Artifact(directory=out, variant="fp32", quantization="fp32", details={"exporter": "optimum-onnx"})

    @functools.cached_property
    def reference_logits(self) -> np.ndarray:
        return self.torch_reference(self.read_lines("sentences.txt"), lambda output, _batch: output.logits)

    def evaluate(self, candidate: Artifact) -> Evaluation:
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
        )
