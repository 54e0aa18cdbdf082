"""The task-exporter contract: how one task (feature-extraction, text-classification, tensor,
text-generation) turns a resolved source into evaluated ONNX variants.

The pipeline (`appliance.export.pipeline.run_export`) drives every task the same way:

    resolve source -> detect task -> exporter = EXPORTERS[task](source, ctx)
    variant = exporter.resolve_variant(options.quant)          # "auto" -> concrete name
    reference = exporter.export_reference()                   # fp32 ONNX in ctx.work_dir
    reference = exporter.optimise(reference)                  # graph optimisation, if it helps
    candidate = exporter.make_variant(variant, reference)     # quantise / convert
    evaluation = exporter.evaluate(candidate)                 # quality vs the unquantised reference
    measurement = exporter.measure(candidate)                 # load time, latency
    fields = exporter.manifest_fields(candidate)              # signature, tokenizer, specs
    files = exporter.files_to_copy()                          # tokenizer.json, ...
    -> verdict from evaluation.loss vs budget -> report.json -> atomic publish

What an implementation must do (e.g. `tasks/text_generation.py`):

* Class attributes: `task` (manifest task), `variants` (concrete variant names it supports, in
  the order a user should read them), `default_max_quality_loss` (the budget when
  `--max-quality-loss` is not given) and `quality_metric` (how `Evaluation.loss` is computed,
  in words, e.g. "1 - cosine_min" or "perplexity / reference_perplexity - 1").
* `claims(source)`: whether this task is the natural one for the source (used when --task is
  not given); `supported_architectures()`: names for the "unsupported architecture" error.
* `export_reference()`: write the fp32 ONNX model into a folder under `ctx.work_dir` and return
  it as an `Artifact` (quantization "fp32"). Keep the PyTorch reference (or its outputs) on the
  instance for `evaluate`; load it lazily, once.
* `make_variant(name, reference)`: returns a new `Artifact` in its own folder. The default
  looks the name up in the variant registry (`appliance.export.variants`); a task overrides it
  for task-specific recipes (decoders: int8 = weight-only MatMulNBits, not dynamic int8).
* `evaluate(candidate)`: quality against the unquantised PyTorch reference on the data the
  project ships (`ctx.data_dir`), keys as INTERFACES.md names them, plus `loss` (>= 0, 0 is
  perfect) computed as `quality_metric` says. The pipeline compares `loss` to the budget.
* `manifest_fields(candidate)`: inputs/outputs as the graph declares them (KServe datatypes,
  -1 for dynamic dims), tokenizer/embedding/generation specs, labels, chat template.
* `files_to_copy()`: (source file, name in the version folder) pairs, e.g. tokenizer.json.
* `sample_inputs(batch_size)`: inputs for the latency measurement; or override `measure` (LLMs
  measure one decode step).
* Errors a user can cause are `ExportError` with `field` set; never let a library traceback
  escape for a bad input (catch and re-raise with one readable line).
* Report progress of long loops through `ctx.progress` (sub-steps show under the stage bar).

Registering is one decorator, `@register_task`, on the class, in a module listed in
`BUILTIN_TASK_MODULES`. Only the export stage imports this (torch is imported lazily inside
task modules, never at import of this file).
"""

from __future__ import annotations

import shutil
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from appliance.errors import ExportError
from appliance.export.sources.base import ResolvedSource, load_builtin_modules
from appliance.repository import EmbeddingSpec, GenerationSpec, TensorSpec, TokenizerSpec
from appliance.repository.kv_cache import kv_cache_mismatch
from appliance.repository.manifest import ProviderHints, Quantization, ScoringSpec, Task

if TYPE_CHECKING:
    from appliance.export.variants.base import VariantContext

#: Latency is the median of this many timed runs (after one warm-up run).
LATENCY_RUNS = 5
#: Batch sizes the report's latency covers (INTERFACES.md: batch 1 and batch 32).
LATENCY_BATCH_SIZES: tuple[int, ...] = (1, 32)

#: Where the shipped evaluation data lives (sentences.txt, ...).
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


class ProgressReporter:
    """What an exporter may tell the user while a stage runs. The pipeline passes a
    rich-backed one; tests and library callers get this silent default."""

    def step(self, message: str) -> None:
        """A sub-step started ("loading PyTorch reference")."""

    def advance(self, completed: int, total: int) -> None:
        """Progress inside the current stage (e.g. sentences evaluated)."""


@dataclass
class ExportContext:
    """Everything an exporter needs besides the source."""

    #: Private scratch folder (inside the repository's staging area: removed on success,
    #: failure and by `clean_staging` after a crash).
    work_dir: Path
    #: Target execution provider the variant is chosen for: "cpu", "cuda" or "tensorrt".
    provider: str = "cpu"
    #: Intra-op threads for sessions the exporter opens (None: ONNX Runtime's default).
    threads: int | None = None
    #: A user-given .npz with calibration inputs (tensor models, int8-static).
    calibration: Path | None = None
    data_dir: Path = DATA_DIR
    progress: ProgressReporter = field(default_factory=ProgressReporter)
    #: Weight-only quantisation block size (MatMulNBits); None: the task's default.
    block_size: int | None = None
    #: KV cache of decoder variants: "fp32", or "int8" (where its perplexity budget allows).
    kv_cache: str = "fp32"

    def subdir(self, name: str) -> Path:
        path = self.work_dir / name
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


@dataclass
class Artifact:
    """One ONNX model folder produced during an export (the reference or a variant).

    Everything in `directory` is published into the version folder (model file, external
    data, a genai_config.json, ...), so write nothing else there.
    """

    directory: Path
    variant: str
    quantization: Quantization
    model_file: str = "model.onnx"
    #: What the transformation did, for report.json (fusions, nodes quantised, block size...).
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        return self.directory / self.model_file

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())


@dataclass
class Evaluation:
    """Quality of a candidate against the unquantised reference."""

    #: INTERFACES.md keys by task (cosine_mean, cosine_min, nn_agreement; label_agreement;
    #: perplexity, reference_perplexity, greedy_agreement), more are welcome.
    quality: dict[str, Any]
    #: >= 0; 0 is identical to the reference. Compared with the budget's max_loss.
    loss: float
    notes: list[str] = field(default_factory=list)
    #: Why the conversion itself is wrong (the fp32 graph does not compute what the PyTorch
    #: model does): the version is rejected whatever the budget says.
    failure: str | None = None


@dataclass
class Measurement:
    """Speed figures for report.json."""

    load_s: float
    #: e.g. {"batch_1_ms": 3.1, "batch_32_ms": 40.2} or {"decode_step_ms": 12.9}.
    latency: dict[str, Any]


@dataclass
class ManifestFields:
    """The task-specific part of manifest.json."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 32
    tokenizer: TokenizerSpec | None = None
    embedding: EmbeddingSpec | None = None
    generation: GenerationSpec | None = None
    labels: list[str] | None = None
    scoring: ScoringSpec | None = None
    chat_template: str | None = None
    providers: ProviderHints = field(default_factory=ProviderHints)
    #: Extra manifest keys (the manifest keeps unknown keys).
    extra: dict[str, Any] = field(default_factory=dict)


class TaskExporter(ABC):
    """One task's export recipe; see the module docstring for the contract."""

    task: ClassVar[Task]
    variants: ClassVar[tuple[str, ...]]
    default_max_quality_loss: ClassVar[float]
    quality_metric: ClassVar[str]

    def __init__(self, source: ResolvedSource, ctx: ExportContext) -> None:
        self.source = source
        self.ctx = ctx

    # -- detection ------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def claims(cls, source: ResolvedSource) -> bool:
        """True when this task is the natural one for `source` (no --task given)."""

    @classmethod
    def supported_architectures(cls) -> tuple[str, ...]:
        """Architecture names this task exports, for the 'unsupported architecture' error."""
        return ()

    def check_source(self) -> None:
        """Refuse a source this task cannot export (called before any heavy work)."""

    # -- variants -------------------------------------------------------------------------
    def auto_variant(self, provider: str) -> str:
        """The variant `--quant auto` means for this task on `provider`."""
        return "fp16" if provider in ("cuda", "tensorrt") and "fp16" in self.variants else "fp32"

    #: Variants that can carry an int8 KV cache (`--kv-cache int8`); none for most tasks.
    int8_kv_variants: ClassVar[tuple[str, ...]] = ()

    def resolve_variant(self, requested: str) -> str:
        """Map a --quant value to a concrete variant name this task supports."""
        name = self.auto_variant(self.ctx.provider) if requested == "auto" else requested
        if name not in self.variants:
            raise ExportError(
                f"quant: {requested!r} does not fit task {self.task}; choose one of "
                f"{', '.join((*self.variants, 'auto'))}",
                field="quant",
            )
        mismatch = kv_cache_mismatch(self.ctx.kv_cache, self.task, name, self.int8_kv_variants)
        if mismatch is not None:
            raise ExportError(f"kv-cache: {mismatch}", field="kv_cache")
        return name

    # -- stages ---------------------------------------------------------------------------
    @abstractmethod
    def export_reference(self) -> Artifact:
        """Write the fp32 ONNX reference into a folder under ctx.work_dir."""

    def optimise(self, reference: Artifact) -> Artifact:
        """Graph optimisation that measurably helps; default: none (ONNX Runtime's own
        load-time optimisation still runs in the server, and the report lists its fusions)."""
        return reference

    def make_variant(self, name: str, reference: Artifact) -> Artifact:
        """Produce variant `name` from the reference, through the variant registry."""
        from appliance.export.variants import get_variant

        if name == reference.variant:
            return reference
        out_dir = self.ctx.subdir(f"variant-{name}")
        return get_variant(name).apply(reference, out_dir, self.variant_context())

    def variant_context(self) -> VariantContext:
        """What variants need from the task (calibration data for int8-static)."""
        from appliance.export.variants import VariantContext

        return VariantContext(task=self.task, provider=self.ctx.provider, calibration=self.calibration_reader)

    def calibration_reader(self) -> list[dict[str, np.ndarray]]:
        """Calibration batches for static quantisation (int8-static). Default: none."""
        raise ExportError(f"quant: int8-static needs calibration data, which task {self.task} lacks", field="quant")

    @abstractmethod
    def evaluate(self, candidate: Artifact) -> Evaluation:
        """Quality against the unquantised reference; `loss` as `quality_metric` says."""

    @abstractmethod
    def manifest_fields(self, candidate: Artifact) -> ManifestFields:
        """Signature and task specs for manifest.json."""

    def files_to_copy(self) -> list[tuple[Path, str]]:
        """(source file, name in the version folder) pairs copied next to the model."""
        return []

    @abstractmethod
    def measure(self, candidate: Artifact) -> Measurement:
        """Session load time and latency (batch 1 and 32, or one decode step) on the CPU provider."""


def median_ms(call: Callable[[], object], runs: int = LATENCY_RUNS) -> float:
    """Median wall time of `runs` calls after one warm-up, in milliseconds."""
    call()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(samples)


_TASKS: dict[str, type[TaskExporter]] = {}

#: Modules that register the built-in task exporters; a missing one is skipped.
BUILTIN_TASK_MODULES: tuple[str, ...] = (
    "appliance.export.tasks.text_generation",
    "appliance.export.tasks.text_classification",
    "appliance.export.tasks.feature_extraction",
    "appliance.export.tasks.tensor",
)


def register_task(cls: type[TaskExporter]) -> type[TaskExporter]:
    """Class decorator: add a task exporter to the registry under its `task`."""
    _TASKS[cls.task] = cls
    return cls


def registered_tasks() -> dict[str, type[TaskExporter]]:
    load_builtin_modules(BUILTIN_TASK_MODULES)
    return dict(_TASKS)


def get_task(task: str) -> type[TaskExporter]:
    tasks = registered_tasks()
    try:
        return tasks[task]
    except KeyError:
        raise ExportError(
            f"task: {task!r} is not supported; choose one of {', '.join(sorted(tasks))}", field="task"
        ) from None


def detect_task(source: ResolvedSource) -> str:
    """The task a source naturally has (first registered exporter that claims it, in
    BUILTIN_TASK_MODULES order), or ExportError naming the supported architectures."""
    tasks = registered_tasks()
    for task, exporter in tasks.items():
        if exporter.claims(source):
            return task
    supported = sorted({arch for exporter in tasks.values() for arch in exporter.supported_architectures()})
    found = ", ".join(source.architectures) or source.model_type or "unknown"
    raise ExportError(
        f"source: architecture {found} is not supported; supported: {', '.join(supported)} "
        "(or pass --task)",
        field="source",
    )

