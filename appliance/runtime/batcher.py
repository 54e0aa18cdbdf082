"""Dynamic batching: one bounded queue per model, batches formed by size, delay and length.

Contract with the runner (Triton's `execute(requests)` idea): the batcher hands `execute` a
list of jobs and gets back a list of the same length, each entry the job's outputs or its own
error, so a bad request never fails its batch-mates. `execute` runs in a worker thread; the
event loop only queues, waits and wakes. The batcher never imports onnxruntime.

Batch formation, per model:
- a batch starts when an execution instance is free and a job waits;
- it takes jobs of one bucket (same priority and trailing shapes; for text, the same length
  bucket, which limits padding): the bucket whose oldest job ranks best, interactive before
  batch (a batch job that has waited `PRIORITY_AGING_S` ranks as interactive), then oldest
  first; until `max_batch_size` rows or a preferred size is reached, or until that job has
  waited `max_queue_delay_us`;
- jobs whose deadline passed or whose client went away are dropped before running.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from appliance.errors import ApplianceError, CapacityExceeded, DeadlineExceeded, ModelNotReady, ShuttingDown

log = logging.getLogger("appliance.runtime")

#: Smallest Retry-After a full queue answers with, in seconds.
MIN_RETRY_AFTER_S = 1.0
#: Shortest wait for running batches when a batcher closes, in seconds.
MIN_CLOSE_WAIT_S = 0.05
#: A lower-priority job that has waited this long ranks as interactive (aging), in seconds.
PRIORITY_AGING_S = 10.0


class SessionPoisoned(Exception):
    """A session failed to allocate memory at run time; it must be reloaded."""


@dataclass(eq=False)
class InferenceJob:
    """One unit of queued work: `rows` rows of every input, all from one request.

    A text job (`token_rows` set, `inputs` empty) carries unpadded token ids; the runner pads
    the whole batch once, to its longest row, in the model's own datatypes."""

    inputs: dict[str, np.ndarray]
    rows: int
    bucket: Hashable
    #: Real sequence length of padded text inputs (None for plain tensors).
    length: int | None = None
    token_rows: list[list[int]] | None = None
    #: Token types of each row (sentence pairs); None: all zeros.
    type_rows: list[list[int]] | None = None
    outputs: Sequence[str] | None = None
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    deadline_s: float = math.inf
    future: asyncio.Future[JobResult] | None = None
    queue_ns: int = 0
    #: Scheduling priority (0 interactive, 1 batch): lower runs first.
    priority: int = 0


@dataclass(frozen=True)
class JobResult:
    outputs: dict[str, np.ndarray]
    queue_us: float
    compute_us: float
    batch_rows: int


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    max_queue_size: int = 256
    instances: int = 1
    preferred_batch_sizes: tuple[int, ...] = ()
    enabled: bool = True


class BatchObserver(Protocol):
    """Receives one call per executed batch (metrics live in the API layer)."""

    def batch_executed(self, rows: int, jobs: int, compute_s: float) -> None: ...


ExecuteFn = Callable[[list[InferenceJob]], list["dict[str, np.ndarray] | ApplianceError"]]


class DynamicBatcher:
    """Queue, batch and run jobs for one model version."""

    def __init__(
        self,
        name: str,
        execute: ExecuteFn,
        policy: BatchPolicy,
        *,
        on_poisoned: Callable[[str], None] | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._execute = execute
        self._on_poisoned = on_poisoned
        self._observer = observer
        self._buckets: dict[Hashable, deque[InferenceJob]] = {}
        self._queued = 0
        self._running_jobs = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.instances)
        self._executor = ThreadPoolExecutor(max_workers=policy.instances, thread_name_prefix=f"ort-{name}")
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._recent_batch_s = 0.01

    # -- public ------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return self._queued

    @property
    def busy(self) -> int:
        """Jobs waiting plus jobs running (what a drain waits for)."""
        return self._queued + self._running_jobs

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._schedule(), name=f"batcher-{self.name}")

    async def submit(self, job: InferenceJob, timeout_s: float, *, priority: int = 0) -> JobResult:
        """Queue `job` at `priority` and wait for its result; DeadlineExceeded drops it when
        time runs out.

        Cancelling the awaiting task (client disconnect) cancels the job too: a cancelled
        job is skipped when its batch is formed.
        """
        if self._closing:
            raise ShuttingDown(f"model {self.name!r} is shutting down")
        if self._queued >= self.policy.max_queue_size:
            raise CapacityExceeded(
                f"model {self.name!r}: queue is full ({self.policy.max_queue_size} waiting requests)",
                retry_after_s=self.retry_after_s(),
            )
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        job.deadline_s = time.monotonic() + timeout_s
        job.enqueued_ns = time.perf_counter_ns()
        job.priority = priority
        self._buckets.setdefault((priority, job.bucket), deque()).append(job)
        self._queued += 1
        self._wakeup.set()
        try:
            return await asyncio.wait_for(job.future, timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {self.name!r}: no result within {timeout_s:g} s; the request was dropped"
            ) from None

    def retry_after_s(self) -> float:
        """How long until the queue has room, judging by recent batch times."""
        batches = self._queued / max(1, self.policy.max_batch_size * self.policy.instances)
        return max(MIN_RETRY_AFTER_S, math.ceil(batches * self._recent_batch_s))

    async def close(self, *, grace_s: float = 0.0) -> None:
        """Stop taking jobs; let queued and running ones finish within `grace_s`, fail the rest."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for bucket in self._buckets.values():
            while bucket:
                job = bucket.popleft()
                self._queued -= 1
                if job.future is not None and not job.future.done():
                    job.future.set_exception(ShuttingDown(f"model {self.name!r} was unloaded"))
        if self._inflight:
            # A running batch cannot be interrupted without failing its batch-mates; give it
            # what is left of the grace (at least a moment to hand back its results).
            await asyncio.wait(self._inflight, timeout=max(MIN_CLOSE_WAIT_S, deadline - time.monotonic()))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- scheduling ----------------------------------------------------------------------
    def _drop_dead(self, now: float) -> None:
        for bucket in self._buckets.values():
            while bucket:
                head = bucket[0]
                if head.future is not None and head.future.done():
                    bucket.popleft()
                    self._queued -= 1
                elif head.deadline_s <= now:
                    bucket.popleft()
                    self._queued -= 1
                    if head.future is not None:
                        head.future.set_exception(
                            DeadlineExceeded(f"model {self.name!r}: deadline passed while queued; dropped")
                        )
                else:
                    break

    def _oldest_bucket(self) -> Hashable | None:
        """The bucket whose head ranks best: (priority, or 0 once aged), then the oldest."""
        now_ns = time.perf_counter_ns()
        aging_ns = PRIORITY_AGING_S * 1e9
        best: tuple[int, int, Hashable] | None = None
        for key, bucket in self._buckets.items():
            if not bucket:
                continue
            head = bucket[0]
            rank = 0 if now_ns - head.enqueued_ns >= aging_ns else head.priority
            if best is None or (rank, head.enqueued_ns) < best[:2]:
                best = (rank, head.enqueued_ns, key)
        return None if best is None else best[2]

    def _rows_in(self, key: Hashable) -> int:
        return sum(job.rows for job in self._buckets.get(key, ()) if not (job.future and job.future.done()))

    def _target_reached(self, rows: int) -> bool:
        if not self.policy.enabled or rows >= self.policy.max_batch_size:
            return True
        return rows in self.policy.preferred_batch_sizes

    async def _schedule(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                key = await self._next_bucket()
                jobs = self._take(key)
            except BaseException:
                self._slots.release()
                raise
            if not jobs:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(jobs))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _next_bucket(self) -> Hashable:
        """Wait for work, then give the oldest bucket up to the queue delay to fill."""
        while True:
            self._drop_dead(time.monotonic())
            key = self._oldest_bucket()
            if key is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            head = self._buckets[key][0]
            delay_end_ns = head.enqueued_ns + self.policy.max_queue_delay_us * 1000
            while not self._target_reached(self._rows_in(key)):
                remaining_s = (delay_end_ns - time.perf_counter_ns()) / 1e9
                if remaining_s <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining_s)
                except TimeoutError:
                    break
            return key

    def _take(self, key: Hashable) -> list[InferenceJob]:
        bucket = self._buckets.get(key)
        jobs: list[InferenceJob] = []
        rows = 0
        limit = self.policy.max_batch_size if self.policy.enabled else 1
        while bucket:
            job = bucket[0]
            if job.future is not None and job.future.done():
                bucket.popleft()
                self._queued -= 1
                continue
            if jobs and (rows + job.rows > limit or not self.policy.enabled):
                break
            bucket.popleft()
            self._queued -= 1
            jobs.append(job)
            rows += job.rows
            if rows >= limit:
                break
        if bucket is not None and not bucket:
            del self._buckets[key]
        return jobs

    async def _run(self, jobs: list[InferenceJob]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter_ns()
        for job in jobs:
            job.queue_ns = started - job.enqueued_ns
        self._running_jobs += len(jobs)
        try:
            results = await loop.run_in_executor(self._executor, self._execute, jobs)
            compute_ns = time.perf_counter_ns() - started
        except SessionPoisoned as exc:
            log.error("model %s: session poisoned (%s); marking not ready and reloading", self.name, exc)
            if self._on_poisoned is not None:
                self._on_poisoned(str(exc))
            results = [ModelNotReady(f"model {self.name!r} ran out of memory and is reloading") for _ in jobs]
            compute_ns = time.perf_counter_ns() - started
        except BaseException as exc:  # noqa: BLE001 - no job may be left waiting forever
            log.error("model %s: batch failed: %s", self.name, exc.__class__.__name__)
            results = [ApplianceError(f"model {self.name!r}: inference failed") for _ in jobs]
            compute_ns = time.perf_counter_ns() - started
        finally:
            self._running_jobs -= len(jobs)
            self._slots.release()
        rows = sum(job.rows for job in jobs)
        self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * compute_ns / 1e9
        if self._observer is not None:
            self._observer.batch_executed(rows, len(jobs), compute_ns / 1e9)
        for job, result in zip(jobs, results, strict=True):
            if job.future is None or job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(
                    JobResult(outputs=result, queue_us=job.queue_ns / 1e3, compute_us=compute_ns / 1e3, batch_rows=rows)
                )
