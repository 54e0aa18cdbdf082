"""What the encoder tasks (feature-extraction, text-classification) share: checking that the
source is a supported encoder folder, loading the PyTorch reference once, exporting it with
the Optimum ONNX exporter, tokenising the shipped sentences the way the server will (the fast
tokenizer's tokenizer.json), calibration feeds for int8-static, and latency inputs.

torch and transformers are imported inside methods only, so importing this module stays cheap.
"""

from __future__ import annotations

import abc
import functools
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from appliance.errors import ExportError
from appliance.export import onnx_tools
from appliance.export.tasks.base import (
    LATENCY_BATCH_SIZES,
    LATENCY_RUNS,
    Artifact,
    Measurement,
    TaskExporter,
    median_ms,
)
from appliance.repository import TokenizerSpec

#: transformers model types the encoder tasks export, with their base-model class names.
SUPPORTED_ENCODERS: dict[str, str] = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "distilbert": "DistilBertModel",
    "mpnet": "MPNetModel",
    "electra": "ElectraModel",
    "camembert": "CamembertModel",
    "albert": "AlbertModel",
}
#: Encoders only the feature-extraction task exports (proven by tests/test_export_encoders.py,
#: not yet as cross-encoders).
EMBEDDING_ONLY_ENCODERS: dict[str, str] = {
    "modernbert": "ModernBertModel",
}
#: Rows per session run / reference forward pass while evaluating.
EVAL_BATCH_SIZE = 32
#: Rows per calibration feed for int8-static.
CALIBRATION_BATCH_SIZE = 8
#: Fallback sequence limit when neither the tokenizer nor sentence-transformers declares one.
DEFAULT_MAX_LENGTH = 512


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """The tracer's warnings (constants registered in the trace, deprecations) are expected for
    these graphs and would bury the progress display; hold them back while exporting."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(previous)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class EncoderExporter(TaskExporter):
    """Base of the encoder tasks; subclasses set `optimum_task` and the quality parts."""

    optimum_task: ClassVar[str]
    variants = ("fp32", "fp16", "int8", "int8-static")
    #: model type -> base-model class name of the encoders this task exports.
    encoders: ClassVar[dict[str, str]] = SUPPORTED_ENCODERS

    @classmethod
    def supported_architectures(cls) -> tuple[str, ...]:
        return tuple(cls.encoders.values())

    def check_source(self) -> None:
        if self.source.format != "hf-folder":
            raise ExportError(
                f"task {self.task} needs a Hugging Face folder, not a {self.source.format} source", field="task"
            )
        model_type = self.source.model_type
        if model_type not in self.encoders:
            found = ", ".join(self.source.architectures) or model_type or "unknown"
            raise ExportError(
                f"source: architecture {found} is not supported for {self.task}; supported: "
                f"{', '.join(sorted(self.encoders.values()))}",
                field="source",
            )

    def auto_variant(self, provider: str) -> str:
        return "fp16" if provider in ("cuda", "tensorrt") else "int8"

    def optimise(self, reference: Artifact) -> Artifact:
        """No offline optimiser pass: ONNX Runtime's transformer optimiser (bert) measured no clear
        gain on these encoders (fp32 -7%..+1%, int8 per-channel -5%..+12%, inside the noise),
        because the load-time ORT_ENABLE_ALL fusions already cover most of it; those are listed
        in the report's `fusions`."""
        reference.notes.append(
            "offline transformer optimiser skipped: no measured gain over ONNX Runtime's load-time fusions"
        )
        return reference

    # -- reference ------------------------------------------------------------------------
    @abc.abstractmethod
    def load_torch_model(self) -> Any:
        """The PyTorch model for this task (AutoModel, AutoModelForSequenceClassification)."""

    @functools.cached_property
    def torch_model(self) -> Any:
        self.ctx.progress.step("loading the PyTorch reference")
        try:
            with quiet_exporter():
                model = self.load_torch_model()
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad folders
            raise ExportError(f"source: cannot load {self.source.path.name}: {first_line(exc)}", field="source") from None
        model.eval()
        return model

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "local_files_only": True,
            "use_safetensors": not self.source.details.get("pickle_weights", False),
        }

    @functools.cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.source.path), local_files_only=True, use_fast=True)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"source: cannot load the tokenizer: {first_line(exc)}", field="source") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ExportError("source: the tokenizer has no fast (tokenizer.json) form the server can use", field="source")
        return tokenizer

    def torch_reference(self, sentences: list[str], outputs_of: Any, *, pairs: list[str] | None = None) -> np.ndarray:
        """Run the PyTorch model over `sentences` (with their `pairs`, for sentence-pair models)
        in evaluation batches, tokenised exactly as the exported graph will be fed;
        `outputs_of(model_output, batch)` picks the rows to keep."""
        import torch

        self.ctx.progress.step(f"PyTorch reference over {len(sentences)} {'pairs' if pairs else 'sentences'}")
        rows = []
        with torch.inference_mode():
            for start in range(0, len(sentences), EVAL_BATCH_SIZE):
                batch = self.tokenizer(
                    sentences[start : start + EVAL_BATCH_SIZE],
                    pairs[start : start + EVAL_BATCH_SIZE] if pairs is not None else None,
                    padding=True,
                    truncation="only_second" if pairs is not None else True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                rows.append(outputs_of(self.torch_model(**batch), batch).float().numpy())
        return np.concatenate(rows)

    @functools.cached_property
    def max_length(self) -> int:
        limits = [DEFAULT_MAX_LENGTH]
        declared = self.sentence_transformers_config().get("max_seq_length")
        if isinstance(declared, int) and declared > 0:
            limits.append(declared)
        model_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(model_max, int) and 0 < model_max < 1_000_000:
            limits.append(model_max)
        positions = (self.source.config or {}).get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        return min(limits)

    def sentence_transformers_config(self) -> dict[str, Any]:
        import json

        path = self.source.path / "sentence_bert_config.json"
        if not path.is_file():
            return {}
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ExportError(f"source: {path.name} is not valid JSON", field="source") from None
        return value if isinstance(value, dict) else {}

    def read_lines(self, name: str) -> list[str]:
        path = self.ctx.data_dir / name
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def encode(self, texts: list[str], names: list[str] | None = None, *, pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Tokenise like the server: padded to the longest, truncated at max_length (for
        sentence pairs, the second sentence only), int64."""
        batch = self.tokenizer(
            texts, pairs, padding=True, truncation="only_second" if pairs is not None else True,
            max_length=self.max_length, return_tensors="np",
        )
        feeds = {key: np.asarray(value, dtype=np.int64) for key, value in batch.items()}
        if names is not None:
            feeds = {key: value for key, value in feeds.items() if key in names}
            for name in names:
                if name not in feeds:
                    raise ExportError(f"model input {name!r} is not produced by the tokenizer", field="source")
        return feeds

    # -- export ---------------------------------------------------------------------------
    def export_optimum(self) -> Path:
        """Optimum's ONNX export of the loaded model; returns the model file path."""
        from optimum.exporters.onnx import onnx_export_from_model

        out = self.ctx.subdir("optimum")
        self.ctx.progress.step("exporting with the Optimum ONNX exporter")
        try:
            with quiet_exporter():
                onnx_export_from_model(self.torch_model, out, task=self.optimum_task, do_validation=False)
        except ExportError:
            raise
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"export: the ONNX exporter failed: {first_line(exc)}", field="source") from None
        path = out / "model.onnx"
        if not path.is_file():
            raise ExportError("export: the ONNX exporter wrote no model.onnx", field="source")
        return path

    @functools.cached_property
    def input_names(self) -> list[str]:
        inputs, _ = onnx_tools.signature(self.reference_path)
        return [spec.name for spec in inputs]

    @property
    def reference_path(self) -> Path:
        return self.ctx.work_dir / "reference" / "model.onnx"

    def calibration_reader(self) -> list[dict[str, np.ndarray]]:
        sentences = self.read_lines("calibration.txt")
        return [
            self.encode(sentences[start : start + CALIBRATION_BATCH_SIZE], self.input_names)
            for start in range(0, len(sentences), CALIBRATION_BATCH_SIZE)
        ]

    def measure(self, candidate: Artifact) -> Measurement:
        """Session load time and median latency at batch 1 and 32 on the CPU provider."""
        started = time.perf_counter()
        session = onnx_tools.open_session(candidate.model_path, threads=self.ctx.threads)
        load_s = time.perf_counter() - started
        latency: dict[str, Any] = {}
        for batch in LATENCY_BATCH_SIZES:
            feeds = self.sample_inputs(batch)
            latency[f"batch_{batch}_ms"] = round(median_ms(lambda: session.run(None, feeds)), 3)
        latency["runs"] = LATENCY_RUNS
        latency["provider"] = "cpu"
        return Measurement(load_s=round(load_s, 4), latency=latency)

    def sample_inputs(self, batch_size: int) -> dict[str, np.ndarray]:
        sentences = self.read_lines("sentences.txt")
        rows = [sentences[i % len(sentences)] for i in range(batch_size)]
        return self.encode(rows, self.input_names)

    def run_onnx(self, candidate: Artifact, texts: list[str], *, pairs: list[str] | None = None) -> list[np.ndarray]:
        """Run the candidate over `texts` (with their `pairs`) in batches; returns the first
        output per batch."""
        session = onnx_tools.open_session(candidate.model_path, threads=self.ctx.threads)
        results = []
        for start in range(0, len(texts), EVAL_BATCH_SIZE):
            second = pairs[start : start + EVAL_BATCH_SIZE] if pairs is not None else None
            feeds = self.encode(texts[start : start + EVAL_BATCH_SIZE], self.input_names, pairs=second)
            results.append(session.run(None, feeds)[0])
            self.ctx.progress.advance(min(start + EVAL_BATCH_SIZE, len(texts)), len(texts))
        return results

    def tokenizer_spec(self) -> TokenizerSpec:
        tokenizer = self.tokenizer
        return TokenizerSpec(
            file="tokenizer.json",
            max_length=self.max_length,
            add_bos_token=False,
            add_eos_token=False,
            # The tokenizer.json post-processor adds [CLS]/[SEP] (or <s></s>) itself; no
            # BOS/EOS handling is left to the server.
            bos_token=None,
            eos_token=None,
            pad_token=tokenizer.pad_token,
            pad_token_id=tokenizer.pad_token_id,
            truncation_side=getattr(tokenizer, "truncation_side", "right"),
        )

    def files_to_copy(self) -> list[tuple[Path, str]]:
        """tokenizer.json (written from the fast tokenizer when the folder lacks one)."""
        folder = self.ctx.work_dir / "tokenizer"
        if not (folder / "tokenizer.json").is_file():
            folder.mkdir(exist_ok=True)
            self.tokenizer.save_pretrained(str(folder))
        files = [(folder / "tokenizer.json", "tokenizer.json")]
        config = folder / "tokenizer_config.json"
        if config.is_file():
            files.append((config, "tokenizer_config.json"))
        return files
