"""The export pipeline: resolve -> detect task -> export -> optimise -> quantise -> evaluate ->
measure -> report.json -> atomic publish, with one progress bar per stage.

It owns the order of stages, the quality verdict and the all-or-nothing publish; what each
stage does for a task lives in the task exporters (tasks/base.py has the contract). Whatever
fails, nothing is published and nothing is left in the repository: work happens in a locked
staging lease that is removed on exit, and a crash leaves only staging leftovers that the next
export removes. Never imports torch itself (task modules do, lazily).
"""

from __future__ import annotations

import errno
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn

from appliance.config import Settings
from appliance.errors import ApplianceError, ExportError
from appliance.export import onnx_tools
from appliance.export.sources.base import ResolvedSource, SourceOptions, resolve
from appliance.export.staging import StagingLease, clean_stale_staging
from appliance.export.tasks.base import (
    Artifact,
    Evaluation,
    ExportContext,
    ProgressReporter,
    TaskExporter,
    detect_task,
    get_task,
)
from appliance.export.variants import QUANT_CHOICES
from appliance.offline import enforce_offline
from appliance.repository import Manifest, ModelRepository, ModelVersion, Report
from appliance.repository.kv_cache import DEFAULT_KV_CACHE, KV_CACHE_CHOICES
from appliance.repository.manifest import check_model_name

#: Present when an NVIDIA kernel driver is loaded (the setup script reads the same file).
NVIDIA_DRIVER_FILE = "/proc/driver/nvidia/version"
STAGES: tuple[str, ...] = ("resolve", "export", "optimise", "quantise", "evaluate", "measure", "publish")


@dataclass(frozen=True)
class ExportRequest:
    """One `appliance export` invocation, validated by `validate()` before any work."""

    source: str
    name: str
    task: str | None = None
    quant: str = "auto"
    max_quality_loss: float | None = None
    force: bool = False
    trust_pickle: bool = False
    calibration: Path | None = None
    #: Target execution provider for `auto` ("cpu", "cuda", "tensorrt"); None: this box's.
    provider: str | None = None
    #: KV cache of a decoder's weight-quantised variant: one of KV_CACHE_CHOICES.
    kv_cache: str = DEFAULT_KV_CACHE

    def validate(self) -> None:
        try:
            check_model_name(self.name)
        except ValueError as exc:
            raise ExportError(f"name: {exc}", field="name") from None
        if self.quant not in QUANT_CHOICES:
            raise ExportError(f"quant: {self.quant!r} is not one of {', '.join(QUANT_CHOICES)}", field="quant")
        if self.kv_cache not in KV_CACHE_CHOICES:
            raise ExportError(f"kv-cache: {self.kv_cache!r} is not one of {', '.join(KV_CACHE_CHOICES)}", field="kv_cache")
        if self.max_quality_loss is not None and not 0 <= self.max_quality_loss <= 1:
            raise ExportError(
                f"max-quality-loss: {self.max_quality_loss} is outside 0..1", field="max_quality_loss"
            )
        if self.calibration is not None:
            if not self.calibration.is_file():
                raise ExportError(f"calibration: file not found: {self.calibration}", field="calibration")
            if self.calibration.suffix != ".npz":
                raise ExportError("calibration: expected a .npz file of named input arrays", field="calibration")


@dataclass
class ExportResult:
    """What a finished export published."""

    version: ModelVersion
    task: str
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def report(self) -> Report:
        assert self.version.report is not None
        return self.version.report


class RichProgress(ProgressReporter):
    """One bar per stage on a rich console; sub-steps update the current bar's text."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[stage]:<9}[/]"),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.current: TaskID | None = None

    def start_stage(self, stage: str, description: str) -> None:
        self.current = self.progress.add_task(description, total=None, stage=stage)

    def finish_stage(self, description: str | None = None) -> None:
        if self.current is None:
            return
        task = self.progress.tasks[self.progress.task_ids.index(self.current)]
        total = task.total or 1
        update: dict[str, Any] = {"total": total, "completed": total}
        if description:
            update["description"] = description
        self.progress.update(self.current, **update)
        self.current = None

    def step(self, message: str) -> None:
        if self.current is not None:
            self.progress.update(self.current, description=message)

    def advance(self, completed: int, total: int) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=completed, total=total)


class LineProgress(ProgressReporter):
    """One plain line per stage event, for consoles that are not terminals (a log file, the
    admin UI following an export child process), where live bars would only print at the end."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.stage: str | None = None
        self.started = 0.0

    def start_stage(self, stage: str, description: str) -> None:
        self.stage, self.started = stage, time.perf_counter()
        self.console.print(f"{stage}: {description}", highlight=False, soft_wrap=True)

    def finish_stage(self, description: str | None = None) -> None:
        if self.stage is not None:
            self.console.print(f"{self.stage}: done in {time.perf_counter() - self.started:.1f} s", highlight=False)
        self.stage = None

    def step(self, message: str) -> None:
        """The sub-step's line carries the seconds since its stage began, so a log shows where
        a long stage spends its time (an evaluation's reference, perplexity and greedy runs)."""
        if self.stage is not None:
            elapsed = time.perf_counter() - self.started
            self.console.print(f"{self.stage}: {message} (at {elapsed:.1f} s)", highlight=False, soft_wrap=True)


class _SilentStages(ProgressReporter):
    def start_stage(self, stage: str, description: str) -> None:
        pass

    def finish_stage(self, description: str | None = None) -> None:
        pass


def target_provider(settings: Settings) -> str:
    """The provider `--quant auto` optimises for: the configured one, or what this box has.

    GPU presence is read from the NVIDIA driver (as the setup script does), not from
    onnxruntime's provider list (the GPU build lists CUDA even on a box without a GPU)."""
    if settings.providers != "auto":
        return settings.providers
    return "cuda" if Path(NVIDIA_DRIVER_FILE).exists() else "cpu"


class ExportStopped(BaseException):
    """A stop was asked for (Ctrl-C, SIGTERM) and the export ended at a stage boundary. The
    signal handler's own exception normally ends it at once; this check covers the rare case
    where Python swallowed that exception (raised inside a finaliser or a callback, it is only
    printed), so an interrupted export still never publishes."""


def run_export(
    request: ExportRequest, settings: Settings, console: Console | None = None, *, stop_requested: Callable[[], bool] | None = None
) -> ExportResult:
    """Export one model version and publish it; ExportError (nothing published) on failure,
    ExportStopped when `stop_requested()` turned true (checked before every stage)."""
    enforce_offline()
    request.validate()
    repository = ModelRepository(settings.models_dir)
    settings.make_state_dir()
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(repository)
    stages: RichProgress | LineProgress | _SilentStages = _SilentStages()
    if console is not None:
        stages = RichProgress(console) if console.is_terminal else LineProgress(console)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with _progress_running(stages), _disk_errors_named(), StagingLease(repository) as lease:
        ctx = ExportContext(
            work_dir=lease.work_dir,
            provider=request.provider or target_provider(settings),
            threads=settings.cpu_threads,
            calibration=request.calibration,
            progress=stages,
            kv_cache=request.kv_cache,
        )
        steps = _Stoppable(stages, stop_requested or _never)
        with _stage(steps, timings, "resolve", f"resolving {request.source}"):
            source = resolve(request.source, SourceOptions(trust_pickle=request.trust_pickle))
            task = request.task or detect_task(source)
            exporter_cls = get_task(task)
            _check_name_task(repository, request.name, task)
            exporter = exporter_cls(source, ctx)
            exporter.check_source()
            variant = exporter.resolve_variant(request.quant)
            stages.step(f"{source.kind} -> {task}, variant {variant}")
        with _stage(steps, timings, "export", "making the fp32 ONNX reference"):
            reference = exporter.export_reference()
        with _stage(steps, timings, "optimise", "graph optimisation"):
            reference = exporter.optimise(reference)
        with _stage(steps, timings, "quantise", f"making {variant}"):
            candidate = exporter.make_variant(variant, reference)
        with _stage(steps, timings, "evaluate", "comparing with the unquantised reference"):
            evaluation = exporter.evaluate(candidate)
        with _stage(steps, timings, "measure", "load time and latency"):
            measurement = exporter.measure(candidate)
            fusions = candidate.details.get("fusions") or onnx_tools.runtime_fusions(candidate.model_path)
        with _stage(steps, timings, "publish", f"publishing {request.name}"):
            max_loss = request.max_quality_loss
            budget = _budget(exporter, evaluation, max_loss)
            accepted = budget["within"] and evaluation.failure is None
            manifest = _manifest(request, source, task, candidate, exporter, deployable=accepted or request.force)
            size_bytes = candidate.size_bytes
            _assemble(lease.version_dir, candidate, exporter.files_to_copy())
            timings["total"] = round(time.perf_counter() - started, 3)
            report = Report(
                variant=candidate.variant,
                size_bytes=size_bytes,
                load_s=measurement.load_s,
                latency=measurement.latency,
                quality=evaluation.quality,
                verdict="accepted" if accepted else "rejected",
                budget=budget,
                fusions=dict(fusions),
                notes=[*candidate.notes, *evaluation.notes],
                task=task,
                source=source.info().model_dump(),
                details=candidate.details,
                export_s=timings,
                forced=bool(request.force and not accepted),
            )
            published = repository.publish(lease.version_dir, manifest, report)
    return ExportResult(version=published, task=task, timings_s=timings)


@contextmanager
def _progress_running(stages: RichProgress | LineProgress | _SilentStages) -> Iterator[None]:
    if isinstance(stages, RichProgress):
        with stages.progress:
            yield
    else:
        yield


@contextmanager
def _stage(steps: _Stoppable, timings: dict[str, float], stage: str, description: str) -> Iterator[None]:
    steps.check()
    steps.start_stage(stage, description)
    started = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - started, 3)
    steps.finish_stage()


def _never() -> bool:
    return False


class _Stoppable:
    """The progress display, plus the stop check that `_stage` runs before each stage."""

    def __init__(self, inner: RichProgress | LineProgress | _SilentStages, stop_requested: Callable[[], bool]) -> None:
        self._inner = inner
        self._stop_requested = stop_requested

    def check(self) -> None:
        if self._stop_requested():
            raise ExportStopped()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


@contextmanager
def _disk_errors_named() -> Iterator[None]:
    """A full disk anywhere in the export becomes one line that says so."""
    try:
        yield
    except ApplianceError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # A failed copy names its source first and its destination second (filename2).
            written = exc.filename2 or exc.filename
            where = f" while writing {written}" if written else ""
            raise ExportError(f"disk full{where}: free some space and export again", field="state_dir") from None
        raise
    except RuntimeError as exc:
        # ONNX Runtime and protobuf report a failed write as RuntimeError text.
        text = str(exc)
        if "No space left on device" in text or "ENOSPC" in text:
            raise ExportError("disk full: free some space and export again", field="state_dir") from None
        raise


def _check_name_task(repository: ModelRepository, name: str, task: str) -> None:
    if name not in repository.names():
        return
    tasks = {version.manifest.task for version in repository.versions(name)}
    if tasks and task not in tasks:
        raise ExportError(
            f"name: model {name!r} already exists with task {', '.join(sorted(tasks))}, not {task}; "
            "choose another --name or delete it first",
            field="name",
        )


def _budget(exporter: TaskExporter, evaluation: Evaluation, max_loss: float | None) -> dict[str, Any]:
    limit = exporter.default_max_quality_loss if max_loss is None else max_loss
    loss = max(0.0, float(evaluation.loss))
    return {
        "metric": exporter.quality_metric,
        "max_loss": limit,
        "loss": round(loss, 6),
        "excess": round(max(0.0, loss - limit), 6),
        "within": loss <= limit,
        "from": "default" if max_loss is None else "--max-quality-loss",
        **({"conversion_failure": evaluation.failure} if evaluation.failure is not None else {}),
    }


def _assemble(version_dir: Path, candidate: Artifact, extra_files: list[tuple[Path, str]]) -> None:
    """Move the candidate's files into the version folder and copy the task's files beside."""
    for path in sorted(candidate.directory.iterdir()):
        if path.is_file() and not path.is_symlink():
            shutil.move(str(path), version_dir / path.name)
    for source_file, name in extra_files:
        if "/" in name or name.startswith("."):
            raise ExportError(f"internal: refusing to copy to {name!r}", field="name")
        shutil.copyfile(source_file, version_dir / name)


def _manifest(
    request: ExportRequest,
    source: ResolvedSource,
    task: str,
    candidate: Artifact,
    exporter: TaskExporter,
    *,
    deployable: bool,
) -> Manifest:
    model_path = candidate.directory / candidate.model_file
    fields = exporter.manifest_fields(candidate)
    opset = onnx_tools.opset_of(model_path) if model_path.exists() else 0
    return Manifest(
        name=request.name,
        version=1,
        task=task,  # type: ignore[arg-type]
        source=source.info(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        opset=opset or 1,
        quantization=candidate.quantization,
        model_file=candidate.model_file,
        inputs=fields.inputs,
        outputs=fields.outputs,
        max_batch_size=fields.max_batch_size,
        tokenizer=fields.tokenizer,
        embedding=fields.embedding,
        generation=fields.generation,
        labels=fields.labels,
        scoring=fields.scoring,
        chat_template=fields.chat_template,
        providers=fields.providers,
        deployable=deployable,
        **fields.extra,
    )
