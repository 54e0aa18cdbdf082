"""Running one request on a loaded model from a route: disconnect watch, timing, metrics.

Shared by the V2 and OpenAI routes so both cancel queued work when the client goes away and
count success/failure the same way. Never builds HTTP bodies (each route family does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from appliance.api.context import ServerContext
from appliance.errors import ApplianceError

T = TypeVar("T")

#: Status recorded for requests whose client went away (nginx's convention).
CLIENT_CLOSED_STATUS = 499


class ClientDisconnected(Exception):
    """The client closed the connection before its result was ready; its work was cancelled."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and its queued job) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    raise ClientDisconnected()


class RequestTimer:
    """Counts one model request into the metrics whatever way it ends.

        async with RequestTimer(ctx, name) as timer:
            ...  # an exception leaving the block is counted as a failure (and re-raised)
        timer.success(queue_us, compute_us)

    A ClientDisconnected leaving the block becomes a 499 (api/errors.py)."""

    def __init__(self, ctx: ServerContext, model: str) -> None:
        self.ctx = ctx
        self.model = model
        self.version: int | str | None = None
        self.started = time.perf_counter()

    async def __aenter__(self) -> RequestTimer:
        return self

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if exc is not None:
            self.failure(exc)

    def success(self, queue_us: float, compute_us: float) -> None:
        self.ctx.metrics.request_done(
            self.model, self.version or "", queue_us=queue_us, compute_us=compute_us, total_s=time.perf_counter() - self.started
        )

    def failure(self, exc: BaseException) -> None:
        if isinstance(exc, ApplianceError):
            status = exc.status_code
        elif isinstance(exc, ClientDisconnected):
            status = CLIENT_CLOSED_STATUS
        else:
            status = 500
        self.ctx.metrics.request_failed(self.model, self.version, status)
