"""The serving protocols over Ray deployment handles: what the ingress' ModelService leases to
the doors in Ray mode, in place of the in-process clients (serving/protocols.py is the
contract; routes, auth and privacy logging do not change).

- `RayOpener` is the ModelService's opener: "loading" a model connects to its deployment
  (asks a replica to describe the model; at start this waits for the first replica).
- `RayTensorClient` and `RayGenerationClient` call the model's replicas; Ray's router picks
  the replica (the least busy of two chosen at random). Generation streams come back as Ray
  streaming calls (`RemoteSequenceStream`), so SSE passes through the ingress token by token.
- Failures are typed here, once: a replica that dies under a request (kill -9, node lost) or
  cannot be reached, and a model whose replicas are all being restarted, are a 503 with
  Retry-After (`ReplicaUnavailable`) naming the replica; Ray's back-pressure is a 429; no call
  waits past its deadline (plus `DEADLINE_SLACK_S`), so nothing hangs on a lost replica.
- Each reply names its replica: `appliance_replica_requests_total{model,replica}` counts them.
- Concurrent tensor calls (embeddings, V2 infer, rerank) to one model leave as few merged Ray
  calls (coalesce.py), unless the model autoscales: Ray's autoscaler counts the calls in flight
  per replica, which merging would hide.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from appliance.errors import ApplianceError, CapacityExceeded, DeadlineExceeded, ModelNotReady, ReplicaUnavailable
from appliance.generation.grammar import CompiledGrammar
from appliance.repository.store import ModelVersion
from appliance.scale.cluster import ClusterWatch
from appliance.scale.coalesce import CallCoalescer, TensorCall
from appliance.scale.wire import Events, Failed, ReplicaDescription, ReplicaIdentity, Reply, Started
from appliance.serving.loaders import LoadedModel
from appliance.generation.tool_calls import tool_format
from appliance.serving.protocols import (
    Constraint,
    EmbeddingResult,
    FunctionSpec,
    GenerationModelInfo,
    GenerationRequest,
    RerankResult,
    TensorModelInfo,
    TensorResult,
    TokenEvent,
    ToolCallFormat,
)

log = logging.getLogger("appliance.scale")

#: A call may run this long past its own deadline (the replica enforces the deadline; this
#: only bounds how long the ingress waits for a replica that stopped answering).
DEADLINE_SLACK_S = 10.0
#: Longest the ingress waits for a model's first replica when it connects (a replica answers
#: only once its model is loaded: a large model takes a while).
OPEN_TIMEOUT_S = 900.0
#: Deadline of small calls (describe, stats, prompt rendering) that carry none of their own.
SMALL_CALL_TIMEOUT_S = 60.0
#: Merged tensor calls in flight per running replica of a model: one computing while the next
#: travels (coalesce.py).
MERGED_CALLS_PER_REPLICA = 2
#: Most tensor calls one merged call carries (the replica's own batcher splits them into its
#: batches of `batching.max_batch_size` rows).
MAX_MERGED_CALLS = 64

_PID = re.compile(r"\bpid: (\d+)")
_IP = re.compile(r"\bip: ([0-9a-fA-F.:]+)")
_REPLICA = re.compile(r"SERVE_REPLICA::[^#\s]+#[^#\s]+#(\S+)")


class ReplicaCounter:
    """`appliance_replica_requests_total{model,replica}`: calls answered, per replica."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.answered = Counter(
            "appliance_replica_requests",
            "Calls answered by each Ray replica of a model (scale-out), by replica id",
            ["model", "replica"],
            registry=registry,
        )

    def count(self, model: str, replica: ReplicaIdentity) -> None:
        self.answered.labels(model=model, replica=replica.replica_id).inc()


class RayCalls:
    """Calls to one model's deployment, with Ray's failures turned into typed errors."""

    def __init__(
        self, model: str, handle: DeploymentHandle, *, cluster: ClusterWatch | None, counter: ReplicaCounter, retry_after_s: float
    ) -> None:
        self.model = model
        self.handle = handle
        #: The same handle for streaming calls (generation).
        self.streaming = handle.options(stream=True)
        self.cluster = cluster
        self.counter = counter
        self.retry_after_s = retry_after_s
        self.coalescer = CallCoalescer(self._send_merged, limit=self._merged_limit, max_items=MAX_MERGED_CALLS)

    def refuse_without_replica(self) -> None:
        """503 at once while every replica is being restarted (rather than wait in Ray's router)."""
        problem = self.cluster.model_problem(self.model) if self.cluster is not None else None
        if problem is not None:
            raise ReplicaUnavailable(f"model {self.model!r}: {problem}", retry_after_s=self.retry_after_s, field="model")

    async def unary(self, method: str, *args: Any, timeout_s: float, fast_fail: bool = True, **kwargs: Any) -> Any:
        """Call `method` on one replica; its value, or the typed error it (or Ray) raised."""
        if fast_fail:
            self.refuse_without_replica()
        response: DeploymentResponse = getattr(self.handle, method).remote(*args, **kwargs)
        try:
            reply: Reply = await asyncio.wait_for(_awaited(response), timeout_s + DEADLINE_SLACK_S)
        except TimeoutError:
            response.cancel()
            raise DeadlineExceeded(f"model {self.model!r}: no replica answered within {timeout_s + DEADLINE_SLACK_S:g} s") from None
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every Ray failure becomes a typed error here
            raise self.translate(exc) from None
        self.counter.count(self.model, reply.replica)
        return reply.unwrap()

    async def tensor(self, method: str, *args: Any, timeout_s: float) -> Any:
        """A tensor model's call, merged with concurrent ones unless the model autoscales."""
        self.refuse_without_replica()
        if self.cluster is not None and self.cluster.autoscaling(self.model):
            return await self.unary(method, *args, timeout_s=timeout_s, fast_fail=False)
        try:
            reply: Reply = await asyncio.wait_for(self.coalescer.call(TensorCall(method, args, timeout_s)), timeout_s + DEADLINE_SLACK_S)
        except TimeoutError:
            raise DeadlineExceeded(f"model {self.model!r}: no replica answered within {timeout_s + DEADLINE_SLACK_S:g} s") from None
        except Exception as exc:  # noqa: BLE001 - every Ray failure becomes a typed error here
            raise self.translate(exc) from None
        self.counter.count(self.model, reply.replica)
        return reply.unwrap()

    def _merged_limit(self) -> int:
        running = self.cluster.running(self.model) if self.cluster is not None else 1
        return MERGED_CALLS_PER_REPLICA * max(1, running)

    async def _send_merged(self, calls: list[TensorCall], timeout_s: float) -> list[Reply]:
        response: DeploymentResponse = self.handle.calls.remote(calls)
        try:
            return await asyncio.wait_for(_awaited(response), timeout_s + DEADLINE_SLACK_S)
        except BaseException:
            response.cancel()
            raise

    def translate(self, exc: BaseException) -> ApplianceError:
        """A Ray failure as the error the doors map (once, in api/errors.py)."""
        if isinstance(exc, ApplianceError):
            return exc
        if isinstance(exc, ray_errors.ActorUnavailableError):
            return ReplicaUnavailable(
                f"model {self.model!r}: {_which_replica(exc)} cannot be reached (its node may be down); retry",
                retry_after_s=self.retry_after_s,
                field="model",
            )
        if isinstance(exc, ray_errors.RayActorError):
            return ReplicaUnavailable(
                f"model {self.model!r}: {_which_replica(exc)} died while serving this request; Ray is restarting it, retry",
                retry_after_s=self.retry_after_s,
                field="model",
            )
        if isinstance(exc, serve_errors.BackPressureError):
            return CapacityExceeded(f"model {self.model!r}: every replica's queue is full", retry_after_s=1.0)
        if isinstance(exc, serve_errors.DeploymentUnavailableError):
            return ReplicaUnavailable(f"model {self.model!r}: its Ray deployment is unavailable", retry_after_s=self.retry_after_s, field="model")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        log.error("model %s: a replica call failed: %s: %s", self.model, type(exc).__name__, first)
        return ApplianceError(f"model {self.model!r}: the replica failed: {type(exc).__name__}")


async def _awaited(response: DeploymentResponse) -> Any:
    return await response


def _which_replica(exc: BaseException) -> str:
    """'replica ID (pid N on IP)' from Ray's error text, as much of it as is there."""
    text = str(exc)
    replica = _REPLICA.search(text)
    pid = _PID.search(text)
    ip = _IP.search(text)
    where = ", ".join(part for part in (f"pid {pid.group(1)}" if pid else "", f"node {ip.group(1)}" if ip else "") if part)
    name = f"replica {replica.group(1)}" if replica else "its replica"
    return f"{name} ({where})" if where else name


class RayTensorClient:
    """A TensorClient whose model runs in Ray replicas."""

    def __init__(self, info: TensorModelInfo, calls: RayCalls) -> None:
        self._info = info
        self.calls = calls

    def metadata(self) -> TensorModelInfo:
        return self._info

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, timeout_s: float, *, priority: int = 0
    ) -> TensorResult:
        return await self.calls.tensor("infer", inputs, outputs, timeout_s, priority, timeout_s=timeout_s)

    async def embed(
        self,
        texts: list[str] | None,
        token_ids: list[list[int]] | None,
        *,
        dimensions: int | None,
        timeout_s: float,
        priority: int = 0,
    ) -> EmbeddingResult:
        return await self.calls.tensor("embed", texts, token_ids, dimensions, timeout_s, priority, timeout_s=timeout_s)

    async def rerank(
        self, query: str, documents: list[str], *, max_tokens_per_doc: int | None, timeout_s: float, priority: int = 0
    ) -> RerankResult:
        return await self.calls.tensor("rerank", query, documents, max_tokens_per_doc, timeout_s, priority, timeout_s=timeout_s)


class RemoteGrammar(CompiledGrammar):
    """A constraint compiled on a replica (where the matcher stays: it does not cross the
    network). The request carries the constraint; the replica's compile cache has it ready."""

    def __init__(self, constraint: Constraint, compile_s: float) -> None:  # noqa: D107 - no matcher here
        self.constraint = constraint
        self.compile_s = compile_s

    def start(self) -> Any:
        raise RuntimeError("a remote grammar runs on its replica, never in the ingress")


class RayGenerationClient:
    """A GenerationClient whose engine runs in Ray replicas."""

    def __init__(self, info: GenerationModelInfo, special_tokens: dict[str, int], calls: RayCalls) -> None:
        self._info = info
        self._special_tokens = special_tokens
        self._tool_format = tool_format(info.tool_parser)
        self.calls = calls
        #: Token texts the replicas sent with logprobs (what `token_text` answers from).
        self._token_texts: dict[int, tuple[str, list[int]]] = {}
        self._streams: weakref.WeakValueDictionary[str, RemoteSequenceStream] = weakref.WeakValueDictionary()
        self._stats: dict[str, float] = {}

    def describe(self) -> GenerationModelInfo:
        return self._info

    async def chat_prompt(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> list[int]:
        return await self.calls.unary("chat_prompt", messages, tools, timeout_s=SMALL_CALL_TIMEOUT_S)

    async def text_prompts(self, texts: list[str]) -> list[list[int]]:
        return await self.calls.unary("text_prompts", texts, timeout_s=SMALL_CALL_TIMEOUT_S)

    async def compile(self, constraint: Constraint) -> CompiledGrammar:
        compile_s = await self.calls.unary("compile", constraint, timeout_s=SMALL_CALL_TIMEOUT_S)
        return RemoteGrammar(constraint, compile_s)

    def tool_format(self) -> ToolCallFormat:
        return self._tool_format

    def tool_grammar(self, functions: list[FunctionSpec], *, parallel: bool, auto: bool = False) -> str | None:
        if auto:
            return self._tool_format.auto_grammar(functions, parallel=parallel, special_tokens=self._special_tokens)
        return self._tool_format.grammar(functions, parallel=parallel, special_tokens=self._special_tokens)

    def submit(
        self, prompt_ids: list[int], request: GenerationRequest, *, timeout_s: float, queue_limit: bool = True
    ) -> RemoteSequenceStream:
        self.calls.refuse_without_replica()
        stream = RemoteSequenceStream(self, prompt_ids, request, timeout_s, queue_limit)
        self._streams[stream.seq_id] = stream
        return stream

    def abort(self, seq_id: str) -> None:
        stream = self._streams.get(seq_id)
        if stream is not None:
            stream.close()

    def stats(self) -> dict[str, float]:
        """The gauges one replica reported last (each replica has its own engine)."""
        return dict(self._stats)

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        return self._token_texts.get(token_id, ("", []))

    def _learn(self, texts: dict[int, tuple[str, list[int]]]) -> None:
        self._token_texts.update(texts)


class RemoteSequenceStream:
    """A SequenceStream whose sequence runs on a replica (the same contract: `started()` raises
    a refusal before any response is sent; iteration yields TokenEvents; `close()` aborts)."""

    def __init__(
        self, client: RayGenerationClient, prompt_ids: list[int], request: GenerationRequest, timeout_s: float, queue_limit: bool
    ) -> None:
        self.seq_id = f"ray-{uuid.uuid4().hex}"
        self._client = client
        grammar = request.grammar
        constraint = grammar.constraint if grammar is not None else None
        self._deadline = time.monotonic() + timeout_s + DEADLINE_SLACK_S
        self._response: DeploymentResponseGenerator = client.calls.streaming.generate.remote(
            prompt_ids, replace(request, grammar=None), constraint, timeout_s, queue_limit
        )
        self._buffer: deque[TokenEvent] = deque()
        self._started = False
        self._done = False
        self.replica: ReplicaIdentity | None = None

    async def _next(self) -> Started | Events | Failed:
        """The replica's next item; Ray's failures and a lost replica as typed errors. (A
        deadline on the caller's task, not `wait_for`, which costs a task per item.)"""
        try:
            async with asyncio.timeout(max(0.0, self._deadline - time.monotonic())):
                return await self._response.__anext__()
        except TimeoutError:
            self.close()
            raise DeadlineExceeded(f"model {self._client.calls.model!r}: the replica stopped answering") from None
        except StopAsyncIteration:
            self._done = True
            raise ApplianceError(f"model {self._client.calls.model!r}: the replica ended the stream early") from None
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - typed once, here
            self._done = True
            raise self._client.calls.translate(exc) from None

    async def started(self) -> None:
        if self._started:
            return
        try:
            item = await self._next()
        except BaseException:
            self.close()
            raise
        if isinstance(item, Failed):
            self._done = True
            raise item.error.rebuilt()
        if isinstance(item, Started):
            self.replica = item.replica
            self._client.calls.counter.count(self._client.calls.model, item.replica)
        self._started = True

    def __aiter__(self) -> RemoteSequenceStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if not self._started:
            await self.started()
        while not self._buffer:
            if self._done:
                raise StopAsyncIteration
            item = await self._next()
            if isinstance(item, Failed):
                self._done = True
                raise item.error.rebuilt()
            if isinstance(item, Events):
                self._client._learn(item.token_texts)
                self._buffer.extend(item.events)
        event = self._buffer.popleft()
        if event.finish_reason is not None:
            self._done = True
            self._buffer.clear()
        return event

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._response.cancel()

    async def aclose(self) -> None:
        self.close()


class RayOpener:
    """The ingress' ModelService opener (serving.loaders.ModelOpener): connects a model to its
    deployment instead of loading it here."""

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        *,
        cluster: ClusterWatch | None,
        counter: ReplicaCounter,
        retry_after_s: float,
    ) -> None:
        self.handles = handles
        self.cluster = cluster
        self.counter = counter
        self.retry_after_s = retry_after_s

    async def open(self, version: ModelVersion, on_poisoned: Callable[[str], None]) -> LoadedModel:
        del on_poisoned  # a replica reloads its own model; Ray replaces a replica that fails
        name = version.name
        handle = self.handles.get(name)
        if handle is None:
            raise ModelNotReady(
                f"model {name!r} has no deployment on the Ray cluster (scale.models.{name}.deploy is false, or it was "
                "published after the application was deployed: deploy it again)",
                field="model",
            )
        calls = RayCalls(name, handle, cluster=self.cluster, counter=self.counter, retry_after_s=self.retry_after_s)
        started = time.perf_counter()
        description: ReplicaDescription = await calls.unary("describe", timeout_s=OPEN_TIMEOUT_S, fast_fail=False)
        client: RayGenerationClient | RayTensorClient
        if description.family == "generation":
            assert description.generation is not None
            client = RayGenerationClient(description.generation, description.special_tokens, calls)
        else:
            assert description.tensor is not None
            client = RayTensorClient(description.tensor, calls)
        if description.version != version.version:
            log.info("model %s: the ingress serves version %d, a replica still serves %d (replicas follow the repository within repository_poll_s)",
                     name, version.version, description.version)

        async def close(grace_s: float) -> None:
            del grace_s  # the replicas stay: Ray owns their lifetime

        return LoadedModel(
            family="generation" if description.family == "generation" else "tensor",
            version=version,
            client=client,
            provider=description.provider,
            provider_note=description.provider_note,
            provider_report={**description.provider_report, "ray_deployment": True},
            device="cpu",
            kv_reservation_bytes=0,
            file_bytes=0,
            load_s=time.perf_counter() - started,
            close=close,
            queued=lambda: 0,
        )

