"""Which generation engines run: one per text-generation model in the repository.

At start the serving version of every deployable text-generation model gets an engine (opened
in a worker thread, so the event loop never waits on ONNX Runtime). A model that fails to load
is reported by name and the others keep serving. With `speculative = "draft"`, a model served in
a non-int4 variant gets another version of the same model quantised to int4 as its draft.
Never imports the API layer, torch or transformers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
import logging
from datetime import datetime
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from appliance.config import Settings
from appliance.errors import ApplianceError, InvalidInput, ModelNotFound, ModelNotReady
from appliance.generation.engine import GenerationEngine
from appliance.generation.metrics import GenerationMetrics
from appliance.repository.store import ModelRepository, ModelVersion

log = logging.getLogger("appliance.generation")


@dataclass
class EngineState:
    name: str
    status: str  # loading | ready | failed
    engine: GenerationEngine | None = None
    reason: str | None = None
    created: int = 0
    #: The repository version this state is about (None: no deployable version).
    version: int | None = None


class GenerationRegistry:
    """Engines by model name, with the reason a model is not serving."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        *,
        listed: dict[str, object] | None = None,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.repository = repository
        self.metrics = GenerationMetrics(metrics_registry)
        self.settings = settings
        self._states: dict[str, EngineState] = {}
        #: Ready models by name -> created (unix seconds), for GET /v1/models.
        self.listed: dict[str, object] = listed if listed is not None else {}

    def generation_models(self) -> list[str]:
        names: list[str] = []
        for name in self.repository.names():
            try:
                version = self.repository.serving_version(name)
            except ApplianceError:
                continue
            if version is not None and version.manifest.task == "text-generation":
                names.append(name)
        return names

    async def start(self, exclude: Collection[str] = ()) -> None:
        """Open an engine for every generation model except those in `exclude` (undeployed by
        an admin)."""
        for name in self.generation_models():
            if name in exclude:
                continue
            self._states[name] = EngineState(name, "loading")
        for name in list(self._states):
            await self.load(name)

    async def load(self, name: str) -> EngineState:
        version = self.repository.serving_version(name)
        if version is None:
            state = EngineState(name, "failed", reason="no deployable version")
            self._states[name] = state
            return state
        draft = self._draft_for(name, version)
        try:
            engine = await asyncio.to_thread(
                GenerationEngine.from_version,
                version,
                self.settings.generation,
                threads=self.settings.cpu_threads,
                draft_version=draft,
                metrics=self.metrics,
                providers=self.settings.providers,
                cuda_device_id=self.settings.cuda_device_id,
            )
        except ApplianceError as exc:
            log.warning("generation model %s failed to load: %s", name, exc.message)
            state = EngineState(name, "failed", reason=exc.message, version=version.version)
            self._states[name] = state
            self.listed.pop(name, None)
            return state
        engine.start()
        old = self._states.get(name)
        self._states[name] = EngineState(name, "ready", engine, created=_created(version), version=version.version)
        self.listed[name] = _created(version)
        if old is not None and old.engine is not None:
            await asyncio.to_thread(old.engine.stop)
        log.info("generation model %s version %d ready", name, version.version)
        return self._states[name]

    def _draft_for(self, name: str, serving: ModelVersion) -> ModelVersion | None:
        if self.settings.generation.speculative != "draft" or serving.manifest.quantization == "int4":
            return None
        candidates = [
            version
            for version in self.repository.versions(name)
            if version.manifest.quantization == "int4" and version.manifest.generation is not None and version.version != serving.version
        ]
        # int4-exact (the source's own 4-bit weights) agrees with fp32 more often than the mixed
        # int4: measured as an fp32 draft, 1.15-1.32x against 1.02-1.36x (docs/BENCHMARKS.md).
        return max(candidates, key=lambda version: (version.variant == "int4-exact", version.version)) if candidates else None

    async def unload(self, name: str) -> None:
        """Stop serving `name` (an admin undeployed it); its engine finishes and is dropped."""
        state = self._states.pop(name, None)
        self.listed.pop(name, None)
        if state is not None and state.engine is not None:
            await asyncio.to_thread(state.engine.stop)

    def version_of(self, name: str) -> int | None:
        """The version `name`'s engine serves or failed to load; None when it has none."""
        state = self._states.get(name)
        return state.version if state is not None else None

    def loaded_names(self) -> list[str]:
        """Models with an engine (serving, or being replaced)."""
        return [name for name, state in self._states.items() if state.engine is not None]

    def status(self, name: str) -> tuple[str, str | None]:
        """(loading | ready | failed | unloaded, reason) for the admin UI."""
        state = self._states.get(name)
        return (state.status, state.reason) if state is not None else ("unloaded", None)

    async def stop(self) -> None:
        for state in self._states.values():
            if state.engine is not None:
                await asyncio.to_thread(state.engine.stop)

    def ready_models(self) -> dict[str, int]:
        return {name: state.created for name, state in self._states.items() if state.status == "ready"}

    def all_settled(self) -> bool:
        return all(state.status != "loading" for state in self._states.values())

    def engine(self, name: str) -> GenerationEngine:
        """The engine for `name`: 404 unknown, 400 not a generation model, 503 not ready."""
        state = self._states.get(name)
        if state is None:
            if name not in self.repository.names():
                raise ModelNotFound(f"model {name!r} not found", field="model")
            try:
                versions = self.repository.versions(name)
            except ApplianceError:
                versions = []
            if any(version.manifest.task == "text-generation" for version in versions):
                raise ModelNotReady(f"model {name!r} has no deployable version (see `appliance models show {name}`)", field="model")
            raise InvalidInput(f"model: {name!r} is not a text-generation model", field="model")
        if state.engine is None:
            raise ModelNotReady(f"model {name!r} is {state.status}" + (f": {state.reason}" if state.reason else ""), field="model")
        return state.engine


def _created(version: ModelVersion) -> int:
    try:
        return int(datetime.fromisoformat(version.manifest.created_at.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0
