"""One model in one Ray Serve replica: the replica side of the serving protocols.

Each replica runs the single-box serving layer for exactly one model: a ModelService over a
view of the repository that shows only that model (so loading, a newly published version
replacing the old one, reloading after a session ran out of memory and the memory budget all
behave as on one box), with keep-alive off (a replica exists to serve its model). The
constructor returns only once the model is loaded, so Ray routes nothing to a replica before it
can answer. Every method answers a `wire.Reply` (or, for generation, yields stream items,
grouped by the adaptive stream interval while the replica is busy: interval.py), and never
lets an ApplianceError travel through Ray as an exception (wire.py says why). `calls`
takes the tensor calls the ingress merged (coalesce.py) and runs them side by side, so the
dynamic batcher batches them as it would requests on one box.

Where the model's files come from (`scale.model_files`): the shared repository every node
mounts, or, in copy mode on a node other than the head, this node's verified copy of what the
repository names (mirror.py), brought up to date before the model loads and at every
repository poll, so a newly published version is copied, then served.

Requests reach a replica only from the ingress, which has already authenticated, checked,
logged (by the privacy mode) and counted them. A replica therefore writes nothing about a
request anywhere: no request log, no text in its own log lines. It never touches the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from prometheus_client import CollectorRegistry
from ray import serve
from ray.serve.handle import DeploymentHandle

from appliance.app import batch_policy, provider_config
from appliance.config import Settings
from appliance.errors import ApplianceError, ModelNotFound
from appliance.generation.metrics import GenerationMetrics
from appliance.generation.tool_calls import special_token_ids
from appliance.repository.store import ModelRepository
from appliance.scale.coalesce import TensorCall
from appliance.scale.interval import BUSY_SEQUENCES, StreamInterval, event_groups
from appliance.scale.mirror import MirroredWatch, NodeMirror, copy_root
from appliance.scale.source import HandleSource
from appliance.scale.wire import (
    Events,
    Failed,
    ReplicaDescription,
    ReplicaIdentity,
    Reply,
    Started,
    WireError,
)
from appliance.serving.lease import Lease
from appliance.serving.loaders import ModelLoader
from appliance.serving.metrics import ServingMetrics
from appliance.serving.protocols import Constraint, GenerationRequest, TokenEvent
from appliance.serving.service import ModelService
from appliance.serving.states import ServingState
from appliance.serving.tasks import Route
from appliance.serving.watch import RepositoryWatch

log = logging.getLogger("appliance.scale.replica")

#: The route a replica leases its model for, per kind of call (the ingress checked the real one).
_GENERATION = Route.COMPLETIONS
_TENSOR = Route.V2_INFER
#: The methods a merged call (`calls`, coalesce.py) may run.
MERGEABLE = frozenset({"infer", "embed", "rerank"})


class _OneModel:
    """A ModelRepository that lists only one model (the ModelService serves what it lists)."""

    def __init__(self, repository: ModelRepository, name: str) -> None:
        self._repository = repository
        self._name = name

    def names(self) -> list[str]:
        return [name for name in self._repository.names() if name == self._name]

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._repository, attribute)


def replica_settings(settings: Settings, num_cpus: float) -> Settings:
    """The settings a replica serves with: never unloads for idleness, loads explicitly at
    start, and (unless configured) as many ONNX Runtime threads as CPUs it reserved."""
    serving = settings.serving.model_copy(update={"keep_alive_s": -1.0, "load_at_start": False})
    threads = settings.cpu_threads or max(1, round(num_cpus))
    return settings.model_copy(update={"serving": serving, "cpu_threads": threads})


class ModelReplica:
    """The deployment class of every model (one deployment per model, `application.py`)."""

    async def __init__(self, settings: Settings, name: str, num_cpus: float, source: DeploymentHandle | None = None) -> None:
        """`source`: the `repository` deployment in copy mode (source.py), None when every node
        shares the repository."""
        context = serve.get_replica_context()
        runtime = ray.get_runtime_context()
        self.identity = ReplicaIdentity(
            replica_id=context.replica_id.unique_id,
            node_id=runtime.get_node_id(),
            node_ip=ray.util.get_node_ip_address(),
            pid=os.getpid(),
        )
        self.name = name
        self.settings = replica_settings(settings, num_cpus)
        self._interval = StreamInterval(settings.scale.stream_interval_tokens, settings.scale.stream_interval_s)
        #: Sequences streaming from this replica now (the stream interval applies from BUSY_SEQUENCES).
        self._streaming = 0
        self._mirror: NodeMirror | None = None
        try:
            models_dir = await self._model_files(source)
        except ApplianceError as exc:
            raise RuntimeError(f"model {name} cannot be served on node {self.identity.node_ip}: {exc.message}") from None
        repository = ModelRepository(models_dir)
        registry = CollectorRegistry()
        loader = ModelLoader(
            repository, self.settings, provider_config(self.settings), batch_policy(self.settings), GenerationMetrics(registry)
        )
        self.service = ModelService(_OneModel(repository, name), self.settings, loader, metrics=ServingMetrics(registry))  # type: ignore[arg-type]
        await self.service.start()
        try:
            async with self._mirror.reading() if self._mirror is not None else contextlib.nullcontext():
                status = await self.service.load(name)
        except ApplianceError as exc:
            await self.service.close(0.0)
            raise RuntimeError(f"model {name} cannot be served on node {self.identity.node_ip}: {exc.message}") from None
        self.family = status.family or "tensor"
        self._watch: asyncio.Task[None] | None = None
        if self.settings.repository_poll_s:
            poll_s = self.settings.repository_poll_s
            watch = RepositoryWatch(self.service, poll_s) if self._mirror is None else MirroredWatch(self.service, poll_s, self._mirror)
            self._watch = asyncio.get_running_loop().create_task(watch.run(), name=f"repository-watch-{name}")
        self._special_tokens: dict[str, int] | None = None
        log.info(
            "model %s version %s ready in replica %s on %s, from %s", name, status.loaded_version, self.identity.replica_id,
            self.identity.node_ip, models_dir if self._mirror is None else f"the node-local copy in {models_dir}",
        )

    async def _model_files(self, source: DeploymentHandle | None) -> Path:
        """The repository this replica reads: the shared one, or (copy mode, another node than
        the repository's) this node's copy, verified and completed first."""
        if source is None:
            if not self.settings.models_dir.is_dir():
                raise ModelNotFound(
                    f"the model repository {self.settings.models_dir} does not exist on this node; every node must see "
                    "the state directory's models at the same path (an NFS mount), or set scale.model_files = \"copy\" "
                    "(docs/SCALE.md)"
                )
            return self.settings.models_dir
        files = HandleSource(source)
        wanted = await files.wanted(self.name)
        if wanted.source_node == self.identity.node_id:
            return self.settings.models_dir
        self._mirror = NodeMirror(copy_root(self.settings), self.name, files)
        await self._mirror.sync(wanted)
        return self._mirror.root

    async def _lease(self, route: Route) -> Lease[Any]:
        return await self.service.lease(self.name, route)

    async def _unary(self, route: Route, work: Any) -> Reply:
        """Run `work(client)` under a lease; its value or its typed error as a Reply."""
        try:
            async with await self._lease(route) as lease:
                return Reply(self.identity, await work(lease.client))
        except ApplianceError as exc:
            return Reply(self.identity, error=WireError.of(exc))

    # -- both families ----------------------------------------------------------------------------
    async def describe(self) -> Reply:
        """What the ingress needs to build its client (cheap after the first call)."""

        async def work(client: Any) -> ReplicaDescription:
            status = self.service.status(self.name)
            report = self.service.provider_report(self.name) or {}
            if self.family == "generation":
                if self._special_tokens is None:
                    text = await asyncio.to_thread(client.engine.tokenizer.json_text)
                    self._special_tokens = special_token_ids(text)
                return ReplicaDescription(
                    family="generation", version=status.loaded_version or 0, generation=client.describe(), tensor=None,
                    special_tokens=self._special_tokens, provider=status.provider, provider_note=status.reason,
                    provider_report=dict(report),
                )
            return ReplicaDescription(
                family="tensor", version=status.loaded_version or 0, generation=None, tensor=client.metadata(),
                special_tokens={}, provider=status.provider, provider_note=status.reason, provider_report=dict(report),
            )

        return await self._unary(_GENERATION if self.family == "generation" else _TENSOR, work)

    def check_health(self) -> None:
        """Ray's periodic probe: a replica whose model became unavailable (its new version failed
        and nothing serves, its files were removed) is replaced."""
        status = self.service.status(self.name)
        if status.state is ServingState.UNAVAILABLE:
            raise RuntimeError(f"model {self.name} is unavailable: {status.reason}")

    async def __del__(self) -> None:
        """Graceful stop (Ray waited for requests in flight): free the model."""
        if self._watch is not None:
            self._watch.cancel()
        await self.service.close(self.settings.drain_grace_s)

    # -- generation ----------------------------------------------------------------------------------
    async def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Reply:
        return await self._unary(_GENERATION, lambda client: client.chat_prompt(messages, tools=tools))

    async def text_prompts(self, texts: list[str]) -> Reply:
        return await self._unary(_GENERATION, lambda client: client.text_prompts(texts))

    async def compile(self, constraint: Constraint) -> Reply:
        """Compile (and cache) a constraint; the ingress gets its compile time, the grammar stays
        here (an llguidance matcher does not cross the network; `generate` reuses the cache)."""

        async def work(client: Any) -> float:
            return float((await client.compile(constraint)).compile_s)

        return await self._unary(_GENERATION, work)

    async def stats(self) -> Reply:
        return await self._unary(_GENERATION, lambda client: _ready(client.stats()))

    async def generate(
        self,
        prompt_ids: list[int],
        request: GenerationRequest,
        constraint: Constraint | None,
        timeout_s: float,
        queue_limit: bool,
    ) -> AsyncIterator[Started | Events | Failed]:
        """One sequence: `Started` once it has a slot, then its events (several to an item when
        they queued up, or by the stream interval while other sequences stream too), or `Failed`
        with the refusal. Cancelling the call (the client went away) closes the sequence, which
        frees its KV at the engine's next step."""
        try:
            lease = await self._lease(_GENERATION)
        except ApplianceError as exc:
            yield Failed(WireError.of(exc))
            return
        stream = None
        streaming = False
        try:
            client = lease.client
            try:
                grammar = await client.compile(constraint) if constraint is not None else None
                stream = client.submit(prompt_ids, replace(request, grammar=grammar), timeout_s=timeout_s, queue_limit=queue_limit)
                await stream.started()
            except ApplianceError as exc:
                yield Failed(WireError.of(exc))
                return
            yield Started(self.identity)
            self._streaming += 1
            streaming = True
            async with contextlib.aclosing(event_groups(stream, self._interval, self._busy)) as groups:
                try:
                    async for events in groups:
                        yield Events(events, _token_texts(client, events))
                except ApplianceError as exc:
                    yield Failed(WireError.of(exc))
        finally:
            if streaming:
                self._streaming -= 1
            if stream is not None:
                stream.close()
            lease.release()

    def _busy(self) -> bool:
        """Whether other sequences stream from this replica too (their events are grouped)."""
        return self._streaming >= BUSY_SEQUENCES

    # -- tensor models ---------------------------------------------------------------------------------
    async def calls(self, calls: list[TensorCall]) -> list[Reply]:
        """Several tensor calls merged by the ingress (coalesce.py), run at once so the dynamic
        batcher batches them as it would on one box; one Reply per call, in order."""
        return list(await asyncio.gather(*(self._merged(call) for call in calls)))

    async def _merged(self, call: TensorCall) -> Reply:
        if call.method not in MERGEABLE:
            return Reply(self.identity, error=WireError("InvalidInput", f"{call.method!r} cannot be merged"))
        try:
            reply: Reply = await getattr(self, call.method)(*call.args)
        except Exception as exc:  # noqa: BLE001 - one call's failure must not fail its batch-mates
            log.error("model %s: a merged %s call failed: %s", self.name, call.method, type(exc).__name__)
            return Reply(self.identity, error=WireError("ApplianceError", f"model {self.name!r}: the replica failed: {type(exc).__name__}"))
        return reply

    async def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, timeout_s: float, priority: int) -> Reply:
        return await self._unary(_TENSOR, lambda client: client.infer(inputs, outputs, timeout_s, priority=priority))

    async def embed(
        self, texts: list[str] | None, token_ids: list[list[int]] | None, dimensions: int | None, timeout_s: float, priority: int
    ) -> Reply:
        return await self._unary(
            Route.EMBEDDINGS,
            lambda client: client.embed(texts, token_ids, dimensions=dimensions, timeout_s=timeout_s, priority=priority),
        )

    async def rerank(
        self, query: str, documents: list[str], max_tokens_per_doc: int | None, timeout_s: float, priority: int
    ) -> Reply:
        return await self._unary(
            Route.RERANK,
            lambda client: client.rerank(
                query, documents, max_tokens_per_doc=max_tokens_per_doc, timeout_s=timeout_s, priority=priority
            ),
        )


async def _ready(value: Any) -> Any:
    return value


def _token_texts(client: Any, events: list[TokenEvent]) -> dict[int, tuple[str, list[int]]]:
    """The text of every token id the events' logprobs name (what the ingress' `token_text` reads)."""
    texts: dict[int, tuple[str, list[int]]] = {}
    for event in events:
        for entry in event.logprobs or ():
            for token_id in (entry.token_id, *(token for token, _ in entry.top)):
                if token_id not in texts:
                    texts[token_id] = client.token_text(token_id)
    return texts
