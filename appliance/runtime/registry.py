"""The model registry: which tensor models are loading, ready, failed or unloaded, and why.

At start the server loads the serving version of every deployable model in the repository
(text-generation models belong to the generation engine and are skipped here). A model that
fails to load is marked failed with a readable reason and the others keep serving. A session
poisoned at run time marks its model not ready and reloads it. Loading runs in a worker
thread; the event loop never waits on ONNX Runtime. Never imports the API layer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from appliance.errors import ApplianceError, ModelNotFound, ModelNotReady, ModelRejected
from appliance.repository.store import ModelRepository, ModelVersion
from appliance.runtime.batcher import BatchObserver, BatchPolicy, DynamicBatcher, JobResult
from appliance.runtime.loading import check_signature, check_version_files
from appliance.runtime.providers import ProviderConfig, ProviderReport, create_session
from appliance.runtime.runner import TensorRunner
from appliance.runtime.tokenizer import TextTokenizer

log = logging.getLogger("appliance.runtime")

ModelStatus = Literal["loading", "ready", "failed", "unloaded"]
#: Tasks this registry serves; text generation is the generation engine's.
TENSOR_TASKS = frozenset({"feature-extraction", "text-classification", "tensor"})


@dataclass
class LoadedModel:
    """A model version with its sessions, batcher and tokenizer, ready to take requests."""

    version: ModelVersion
    runner: TensorRunner
    batcher: DynamicBatcher
    provider: ProviderReport
    tokenizer: TextTokenizer | None
    load_s: float

    @property
    def manifest(self) -> Any:
        return self.version.manifest

    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, timeout_s: float) -> JobResult:
        job = self.runner.make_job(inputs, outputs)
        return await self.batcher.submit(job, timeout_s)


@dataclass
class ModelState:
    name: str
    status: ModelStatus
    version: int | None = None
    reason: str | None = None
    loaded: LoadedModel | None = None
    changed_at: float = field(default_factory=time.time)


def _open_version(version: ModelVersion, config: ProviderConfig) -> tuple[list[Any], ProviderReport, TextTokenizer | None]:
    """Check the files, create one session per instance and the tokenizer (worker thread)."""
    check_version_files(version)
    sessions: list[Any] = []
    report: ProviderReport | None = None
    for _ in range(max(1, config.instances)):
        session, created = create_session(version.model_path, version.manifest, config)
        sessions.append(session)
        report = report or created
    assert report is not None
    check_signature(version, sessions[0].get_inputs(), sessions[0].get_outputs())
    tokenizer = None
    spec = version.manifest.tokenizer
    if spec is not None:
        if "/" in spec.file or "\\" in spec.file or spec.file.startswith("."):
            raise ModelRejected(f"tokenizer.file {spec.file!r} must be a plain file name in the version folder")
        tokenizer = TextTokenizer(version.path / spec.file, max_length=spec.max_length, truncation_side=spec.truncation_side)
        _warm_up(version, sessions)
    return sessions, report, tokenizer


def _warm_up(version: ModelVersion, sessions: list[Any]) -> None:
    """Run one tiny text batch per session so the first client does not pay for ORT's
    first-run allocations (only for text models, whose inputs we know how to fill)."""
    from appliance.runtime.tensors import NUMPY_DTYPES

    feed = {}
    for spec in version.manifest.inputs:
        if spec.name not in ("input_ids", "attention_mask", "token_type_ids") or len(spec.shape) != 2:
            return
        value = 1 if spec.name == "attention_mask" else 0
        feed[spec.name] = np.full((1, 2), value, dtype=NUMPY_DTYPES[spec.datatype])
    for session in sessions:
        session.run(None, feed)


class ModelRegistry:
    """Loads, serves and unloads the repository's tensor models."""

    def __init__(
        self,
        repository: ModelRepository,
        provider_config: ProviderConfig,
        policy: BatchPolicy,
        *,
        observer_factory: Callable[[str, int], BatchObserver] | None = None,
    ) -> None:
        self.repository = repository
        self.provider_config = provider_config
        self.policy = policy
        self._observer_factory = observer_factory
        self._states: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._startup: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.grace_s = 0.0

    # -- queries ------------------------------------------------------------------------
    def states(self) -> list[ModelState]:
        return [self._states[name] for name in sorted(self._states)]

    def state(self, name: str) -> ModelState | None:
        return self._states.get(name)

    @property
    def starting(self) -> bool:
        return self._startup is not None and not self._startup.done()

    def all_settled(self) -> bool:
        """True when no model is loading (readiness: failed models do not block it)."""
        return not self.starting and all(state.status != "loading" for state in self._states.values())

    def busy_jobs(self) -> int:
        return sum(state.loaded.batcher.busy for state in self._states.values() if state.loaded)

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The loaded model to serve `name` (and `version` if given), or a typed error."""
        state = self._states.get(name)
        if state is None:
            if name in self.repository.names():
                self.repository.get(name, version)  # raises ModelNotFound for a bad version
                raise ModelNotReady(f"model {name!r} is not loaded", field="model")
            raise ModelNotFound(f"model {name!r} not found", field="model")
        if version is not None and version != state.version:
            self.repository.get(name, version)
            raise ModelNotReady(f"model {name!r} version {version} is not loaded (serving version {state.version})", field="version")
        if state.status != "ready" or state.loaded is None:
            why = f": {state.reason}" if state.reason else ""
            raise ModelNotReady(f"model {name!r} is {state.status}{why}", field="model")
        return state.loaded

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, exclude: Collection[str] = ()) -> None:
        """Begin loading every deployable tensor model in the background (sequentially: the
        box's cores are better spent finishing one model than thrashing between several).
        Models in `exclude` (undeployed by an admin) stay unloaded."""
        names = []
        for name in self.repository.names():
            chosen = self._serving(name)
            if chosen is None or chosen.manifest.task in TENSOR_TASKS:
                if name in exclude:
                    self._states[name] = ModelState(name=name, status="unloaded", reason="undeployed by an admin")
                    continue
                names.append(name)
                self._states[name] = ModelState(name=name, status="loading", version=chosen.version if chosen else None)
        self._startup = asyncio.get_running_loop().create_task(self._load_all(names), name="load-models")

    async def _load_all(self, names: list[str]) -> None:
        for name in names:
            await self.load(name)

    def _serving(self, name: str) -> ModelVersion | None:
        try:
            return self.repository.serving_version(name)
        except ApplianceError:
            return None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> ModelState:
        """(Re)load the serving version of `name`; the old version serves until the new is ready."""
        async with self._lock(name):
            previous = self._states.get(name)
            if name not in self.repository.names():
                if previous is not None:
                    # Its files were deleted while it was loaded: stop serving what no longer
                    # exists on disk, and say so where the index and the UI look.
                    self._states[name] = ModelState(
                        name=name, status="failed", version=previous.version,
                        reason="its files were removed from the model repository while it was loaded",
                    )
                    log.error("model %s failed: its files were removed from the repository", name)
                    if previous.loaded is not None:
                        await previous.loaded.batcher.close(grace_s=self.grace_s)
                raise ModelNotFound(f"model {name!r} not found", field="model")
            chosen = self._serving(name)
            if chosen is None:
                broken = self.repository.broken_versions(name)
                detail = "; ".join(f"version {v}: {why}" for v, why in broken.items())
                return self._fail(name, None, "no deployable version" + (f" ({detail})" if detail else ""))
            if chosen.manifest.task not in TENSOR_TASKS:
                raise ModelRejected(f"model {name!r} is a {chosen.manifest.task} model, served by the generation engine", field="model")
            if previous is None or previous.loaded is None:
                self._states[name] = ModelState(name=name, status="loading", version=chosen.version)
            started = time.perf_counter()
            try:
                sessions, report, tokenizer = await asyncio.to_thread(_open_version, chosen, self.provider_config)
            except ApplianceError as exc:
                return self._fail(name, chosen.version, exc.message)
            except Exception as exc:  # noqa: BLE001 - a broken model must not stop the server
                return self._fail(name, chosen.version, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            runner = TensorRunner(chosen.manifest, sessions)
            observer = self._observer_factory(name, chosen.version) if self._observer_factory else None
            batcher = DynamicBatcher(
                name,
                runner.execute,
                self._policy_for(chosen),
                on_poisoned=lambda why, model=name: self._poisoned(model, why),
                observer=observer,
            )
            batcher.start()
            loaded = LoadedModel(chosen, runner, batcher, report, tokenizer, time.perf_counter() - started)
            self._states[name] = ModelState(name=name, status="ready", version=chosen.version, loaded=loaded)
            log.info("model %s version %d ready on %s in %.2f s", name, chosen.version, report.active, loaded.load_s)
            if previous is not None and previous.loaded is not None:
                await previous.loaded.batcher.close(grace_s=self.grace_s)
            return self._states[name]

    def _policy_for(self, version: ModelVersion) -> BatchPolicy:
        model_max = version.manifest.max_batch_size
        size = 1 if model_max == 0 else min(self.policy.max_batch_size, model_max)
        preferred = tuple(s for s in self.policy.preferred_batch_sizes if s <= size)
        return BatchPolicy(
            max_batch_size=size,
            max_queue_delay_us=self.policy.max_queue_delay_us,
            max_queue_size=self.policy.max_queue_size,
            instances=self.policy.instances,
            preferred_batch_sizes=preferred,
            enabled=self.policy.enabled and model_max > 0,
        )

    def _fail(self, name: str, version: int | None, reason: str) -> ModelState:
        log.error("model %s failed to load: %s", name, reason)
        previous = self._states.get(name)
        state = ModelState(name=name, status="failed", version=version, reason=reason)
        if previous is not None and previous.loaded is not None:
            # Keep serving the old version; report the failed reload beside it.
            previous.reason = f"reload failed: {reason}"
            return previous
        self._states[name] = state
        return state

    def _poisoned(self, name: str, why: str) -> None:
        state = self._states.get(name)
        if state is None:
            return
        old = state.loaded
        self._states[name] = ModelState(name=name, status="loading", version=state.version, reason=f"reloading after: {why}")
        task = asyncio.get_running_loop().create_task(self._reload_after_poison(name, old))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_after_poison(self, name: str, old: LoadedModel | None) -> None:
        if old is not None:
            await old.batcher.close(grace_s=0.0)
        await self.load(name)

    async def unload(self, name: str) -> ModelState:
        async with self._lock(name):
            state = self._states.get(name)
            if state is None:
                if name not in self.repository.names():
                    raise ModelNotFound(f"model {name!r} not found", field="model")
                state = ModelState(name=name, status="unloaded")
                self._states[name] = state
                return state
            old = state.loaded
            self._states[name] = ModelState(name=name, status="unloaded", version=state.version)
            if old is not None:
                await old.batcher.close(grace_s=self.grace_s)
            return self._states[name]

    async def close(self, grace_s: float) -> None:
        """Finish queued work within `grace_s`, then drop every session."""
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            try:
                await self._startup
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        loaded = [state.loaded for state in self._states.values() if state.loaded is not None]
        await asyncio.gather(*(model.batcher.close(grace_s=grace_s) for model in loaded))
        for state in self._states.values():
            state.loaded = None
            state.status = "unloaded"
