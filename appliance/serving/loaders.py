"""Opening one model version in the engine family that serves its task, as a `LoadedModel`:
the client the doors use, plus what the ModelService needs to account for and close it.

The slow part (sessions, tokenizer, warm-up, KV buffers) runs in a worker thread; starting
the batcher or the engine thread happens on the event loop. What is loaded when is the
ModelService's decision, not this module's. Never imports the API layer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import psutil

from appliance.config import Settings
from appliance.generation.drafts import draft_version_for
from appliance.generation.engine import DEFAULT_KV_SHARE_OF_FREE, GenerationEngine
from appliance.generation.metrics import GenerationMetrics
from appliance.generation.model_runner import KvGeometry
from appliance.repository.store import ModelRepository, ModelVersion
from appliance.runtime.batcher import BatchObserver, BatchPolicy
from appliance.runtime.providers import ProviderConfig
from appliance.runtime.tensor_model import TensorModel, open_tensor_model
from appliance.serving.generation_client import LocalGenerationClient
from appliance.serving.protocols import GenerationClient, TensorClient
from appliance.serving.tasks import Family, family_of
from appliance.serving.tensor_client import LocalTensorClient

ObserverFactory = Callable[[str, int], BatchObserver]


@dataclass
class LoadedModel:
    """One version in memory, with its client."""

    family: Family
    version: ModelVersion
    client: GenerationClient | TensorClient
    #: Execution provider of its sessions ("cpu", "cuda", "tensorrt").
    provider: str | None
    #: Why it is not on the GPU when the box has one (generation models), else None.
    provider_note: str | None
    #: The V2 metadata's provider block: active, session_providers, requested, fallbacks,
    #: intra_op_threads.
    provider_report: dict[str, object]
    #: Where its memory counts: "cpu" or "cuda".
    device: str
    #: KV cache it may fill beyond what was resident at load (host bytes on the CPU, device
    #: bytes on the GPU).
    kv_reservation_bytes: int
    #: Bytes of the files it was opened from (its draft's included).
    file_bytes: int
    load_s: float
    close: Callable[[float], Awaitable[None]]
    #: Requests or sequences waiting for it right now.
    queued: Callable[[], int]


class ModelOpener(Protocol):
    """What the ModelService needs to bring a version into service: `ModelLoader` opens it in
    this process; a scale-out opener (appliance.scale) connects to the Ray deployment serving it."""

    async def open(self, version: ModelVersion, on_poisoned: Callable[[str], None]) -> LoadedModel: ...


def version_file_bytes(version: ModelVersion) -> int:
    try:
        return version.size_bytes
    except OSError:
        return 0


def expected_kv_bytes(version: ModelVersion, settings: Settings) -> int:
    """The KV reservation a generation model will make on the CPU path, before loading it:
    the configured KV budget (default: a share of free memory), never more than every slot's
    full context could use."""
    spec = version.manifest.generation
    if spec is None:
        return 0
    geometry = KvGeometry.from_spec(spec)
    generation = settings.generation
    budget = generation.kv_budget_bytes or int(psutil.virtual_memory().available * DEFAULT_KV_SHARE_OF_FREE)
    return min(budget, generation.max_running_sequences * spec.context_length * geometry.bytes_per_token)


class ModelLoader:
    """Opens versions in the right engine family with the server's settings."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        provider_config: ProviderConfig,
        batch_policy: BatchPolicy,
        generation_metrics: GenerationMetrics,
        observer_factory: ObserverFactory | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.provider_config = provider_config
        self.batch_policy = batch_policy
        self.generation_metrics = generation_metrics
        self.observer_factory = observer_factory

    def draft_for(self, version: ModelVersion) -> ModelVersion | None:
        return draft_version_for(self.repository, version, self.settings.generation.speculative)

    async def open(self, version: ModelVersion, on_poisoned: Callable[[str], None]) -> LoadedModel:
        """Load `version`; raises ApplianceError (the reason) when it cannot be served."""
        if family_of(version.manifest.task) == "generation":
            return await self._open_generation(version)
        return await self._open_tensor(version, on_poisoned)

    async def _open_tensor(self, version: ModelVersion, on_poisoned: Callable[[str], None]) -> LoadedModel:
        started = time.perf_counter()
        opened = await asyncio.to_thread(open_tensor_model, version, self.provider_config)
        observer = self.observer_factory(version.name, version.version) if self.observer_factory else None
        load_s = time.perf_counter() - started
        model = TensorModel(opened, self.batch_policy, on_poisoned=on_poisoned, observer=observer, load_s=load_s)
        active = opened.provider.active
        return LoadedModel(
            family="tensor",
            version=version,
            client=LocalTensorClient(model),
            provider=active,
            provider_note=None,
            provider_report=opened.provider.as_json(),
            device="cuda" if active in ("cuda", "tensorrt") else "cpu",
            kv_reservation_bytes=0,
            file_bytes=version_file_bytes(version),
            load_s=load_s,
            close=model.close,
            queued=lambda: model.batcher.queued,
        )

    def _tool_parser(self, name: str) -> str | None:
        """The tool-call format the settings name for a model (None: recognise it from its template)."""
        policy = self.settings.serving.models.get(name)
        return policy.tool_parser if policy is not None else None

    async def _open_generation(self, version: ModelVersion) -> LoadedModel:
        settings = self.settings
        started = time.perf_counter()
        draft = await asyncio.to_thread(self.draft_for, version)
        engine = await asyncio.to_thread(
            GenerationEngine.from_version,
            version,
            settings.generation,
            threads=settings.cpu_threads,
            draft_version=draft,
            metrics=self.generation_metrics,
            providers=settings.providers,
            cuda_device_id=settings.cuda_device_id,
        )
        engine.start()
        load_s = time.perf_counter() - started
        session = getattr(engine.runner, "session", None)
        providers = session.get_providers() if session is not None else []
        on_device = engine.placement.device == "cuda" or engine.placement.device_store
        kv = engine.kv
        kv_bytes = min(kv.budget_tokens, kv.max_slots * kv.max_len) * kv.bytes_per_token

        async def close(grace_s: float) -> None:
            del grace_s  # the service waits for in-flight sequences before closing
            await asyncio.to_thread(engine.stop)

        active = providers[0].removesuffix("ExecutionProvider").lower() if providers else None
        report: dict[str, object] = {
            "active": active or "cpu",
            "session_providers": providers,
            "requested": [settings.providers],
            "fallbacks": {"cuda": engine.placement.note} if engine.placement.note else {},
            "intra_op_threads": settings.cpu_threads or os.cpu_count() or 1,
        }
        return LoadedModel(
            family="generation",
            version=version,
            client=LocalGenerationClient(engine, provider=active, tool_parser=self._tool_parser(version.name)),
            provider=active,
            provider_note=engine.placement.note,
            provider_report=report,
            device="cuda" if engine.placement.device == "cuda" else "cpu",
            kv_reservation_bytes=sum(store.nbytes for store in kv.stores) if on_device else kv_bytes,
            file_bytes=version_file_bytes(version) + (version_file_bytes(draft) if draft is not None else 0),
            load_s=load_s,
            close=close,
            queued=lambda: len(engine.scheduler.waiting),
        )
