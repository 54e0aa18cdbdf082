"""The asynchronous HTTP load generator: one sweep point, closed or open loop, always bounded.

Closed loop: N clients, each sending its next request when the previous one finished. Open
loop: requests start at Poisson arrival times (exponential gaps at the given rate) whether or
not earlier ones finished, so queueing at the server shows up as latency, not as a slower
client. Each point first sends `warmup_requests` that are not measured, then measures until
`duration_s` has passed or `max_requests` were sent, whichever comes first; requests still in
flight get `request_timeout_s` to finish and are then cancelled, so a point always ends by
itself. Never decides what to send (workloads do) and never summarises (stats does).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from appliance.benchmark.safety import MAX_CONCURRENCY_CAP, check_bounds
from appliance.benchmark.sse import SseDecoder, StreamError, StreamTally
from appliance.benchmark.stats import STATUS_NO_RESPONSE, RequestRecord
from appliance.benchmark.workloads import HttpCall, Workload

LoadMode = Literal["closed", "open"]
#: Most requests an open-loop point keeps in flight; arrivals beyond wait (a safety cap).
MAX_IN_FLIGHT_OPEN_LOOP = MAX_CONCURRENCY_CAP
#: Most warm-up requests sent at once in an open-loop point.
OPEN_LOOP_WARMUP_CONCURRENCY = 4
#: Longest error body kept per request, in characters.
MAX_ERROR_CHARS = 200

#: Called with (fraction of the point done, measured requests finished).
ProgressCallback = Callable[[float, int], None]


@dataclass(frozen=True)
class PointPlan:
    """How one sweep point runs."""

    mode: LoadMode
    level: float
    duration_s: float
    max_requests: int
    warmup_requests: int
    request_timeout_s: float

    def __post_init__(self) -> None:
        check_bounds(duration_s=self.duration_s, max_requests=self.max_requests, warmup_requests=self.warmup_requests)


@dataclass
class PointRun:
    """The raw outcome of one point: measured records and the measured wall time."""

    plan: PointPlan
    records: list[RequestRecord]
    wall_s: float
    warmup_errors: int


def _error_text(response: httpx.Response) -> str:
    """The server's error message: OpenAI's error.message, V2's error, else the body start."""
    try:
        payload = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:MAX_ERROR_CHARS]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"][:MAX_ERROR_CHARS]
        if isinstance(error, str):
            return error[:MAX_ERROR_CHARS]
        if "detail" in payload:
            return str(payload["detail"])[:MAX_ERROR_CHARS]
    return response.text[:MAX_ERROR_CHARS]


async def send(
    client: httpx.AsyncClient, workload: Workload, call: HttpCall, sink: list[RequestRecord] | None = None
) -> RequestRecord:
    """Send one call and record what happened; never raises for a failed request.

    The record joins `sink` when the request starts, so a request still in flight when its
    point runs out of time is counted (as "cancelled"), not silently dropped.
    """
    clock = time.perf_counter
    start = clock()
    record = RequestRecord(start_s=start, end_s=start, status=STATUS_NO_RESPONSE)
    if sink is not None:
        sink.append(record)
    try:
        if call.stream:
            await _send_streamed(client, call, record, clock)
        else:
            response = await client.post(call.path, json=call.body)
            record.status = response.status_code
            if response.is_success:
                try:
                    accounting = workload.account(call, response.json())
                except (ValueError, AttributeError) as exc:
                    record.error, record.error_kind = f"malformed response: {exc}", "malformed"
                else:
                    record.prompt_tokens, record.inputs = accounting.prompt_tokens, accounting.inputs
            else:
                record.error = _error_text(response)
    except httpx.TimeoutException:
        record.error, record.error_kind = "timed out", "timeout"
    except httpx.ConnectError as exc:
        record.error, record.error_kind = f"connect failed: {exc}", "connect"
    except httpx.TransportError as exc:
        record.error, record.error_kind = f"{exc.__class__.__name__}: {exc}", "transport"
    except asyncio.CancelledError:
        record.error, record.error_kind = "still running when the point's time ran out", "cancelled"
        record.end_s = clock()
        raise
    record.end_s = clock()
    return record


async def _send_streamed(
    client: httpx.AsyncClient, call: HttpCall, record: RequestRecord, clock: Callable[[], float]
) -> None:
    async with client.stream("POST", call.path, json=call.body) as response:
        record.status = response.status_code
        if not response.is_success:
            await response.aread()
            record.error = _error_text(response)
            return
        decoder, tally = SseDecoder(), StreamTally()
        try:
            async for piece in response.aiter_text():
                now = clock()
                for payload in decoder.feed(piece):
                    tally.add(payload, now)
            for payload in decoder.close():
                tally.add(payload, clock())
        except StreamError as exc:
            record.error, record.error_kind = str(exc)[:MAX_ERROR_CHARS], "stream"
        else:
            if not tally.done:
                record.error, record.error_kind = "stream ended without [DONE]", "stream"
        record.chunk_times_s = tally.chunk_times_s
        record.output_tokens = tally.output_tokens
        record.prompt_tokens = tally.usage_prompt_tokens or 0
        record.inputs = call.inputs


async def _closed_loop(
    client: httpx.AsyncClient,
    workload: Workload,
    rng: random.Random,
    clients: int,
    count: int,
    deadline: float,
    records: list[RequestRecord],
    on_done: Callable[[RequestRecord], None],
) -> None:
    """`clients` workers send until `count` requests were started or `deadline` passed."""
    started = 0

    async def worker() -> None:
        nonlocal started
        while started < count and time.perf_counter() < deadline:
            started += 1
            on_done(await send(client, workload, workload.next_call(rng), records))

    await asyncio.gather(*(worker() for _ in range(max(1, min(clients, count)))))


async def _open_loop(
    client: httpx.AsyncClient,
    workload: Workload,
    rng: random.Random,
    rate_per_s: float,
    count: int,
    deadline: float,
    records: list[RequestRecord],
    on_done: Callable[[RequestRecord], None],
) -> None:
    """Start requests at Poisson arrival times until `count` started or `deadline` passed."""
    in_flight = asyncio.Semaphore(MAX_IN_FLIGHT_OPEN_LOOP)
    tasks: list[asyncio.Task[None]] = []

    async def one(call: HttpCall) -> None:
        async with in_flight:
            record = await send(client, workload, call, records)
        on_done(record)

    next_arrival = time.perf_counter()
    for _ in range(count):
        next_arrival += rng.expovariate(rate_per_s)
        if next_arrival >= deadline:
            break
        delay = next_arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(workload.next_call(rng))))
    try:
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _bounded(work: Coroutine[Any, Any, None], limit_s: float) -> None:
    """Run `work` for at most `limit_s`; on expiry cancel what is left and keep what finished.

    Requests carry their own timeout, so this bound only matters for streams that keep
    trickling or a wedged client: the point still ends.
    """
    try:
        await asyncio.wait_for(work, timeout=limit_s)
    except TimeoutError:
        return


async def run_point(
    client: httpx.AsyncClient,
    workload: Workload,
    plan: PointPlan,
    *,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> PointRun:
    """Warm up, then measure one point; returns within duration + 2 x request timeout."""
    rng = random.Random(seed)
    warm_clients = (
        max(1, math.ceil(plan.level)) if plan.mode == "closed" else OPEN_LOOP_WARMUP_CONCURRENCY
    )
    warm_deadline = time.perf_counter() + plan.request_timeout_s
    warm: list[RequestRecord] = []
    if plan.warmup_requests:
        await _bounded(
            _closed_loop(client, workload, rng, warm_clients, plan.warmup_requests, warm_deadline, warm, lambda _r: None),
            2 * plan.request_timeout_s,
        )

    measured_start = time.perf_counter()
    deadline = measured_start + plan.duration_s
    finished = 0

    def on_done(_record: RequestRecord) -> None:
        nonlocal finished
        finished += 1
        if progress is not None:
            elapsed = (time.perf_counter() - measured_start) / plan.duration_s
            progress(min(1.0, max(elapsed, finished / plan.max_requests)), finished)

    records: list[RequestRecord] = []
    if plan.mode == "closed":
        work = _closed_loop(client, workload, rng, int(plan.level), plan.max_requests, deadline, records, on_done)
    else:
        work = _open_loop(client, workload, rng, plan.level, plan.max_requests, deadline, records, on_done)
    await _bounded(work, plan.duration_s + 2 * plan.request_timeout_s)
    ends = [r.end_s for r in records]
    wall_s = (max(ends) - measured_start) if ends else plan.duration_s
    if progress is not None:
        progress(1.0, finished)
    return PointRun(
        plan=plan,
        records=records,
        wall_s=max(wall_s, 1e-9),
        warmup_errors=sum(1 for r in warm if not r.ok),
    )
