"""Concurrent tensor calls to one model merged into few Ray calls: the ingress' half of
batching across the network (the replica's dynamic batcher does the other half).

Why: on the Ray path each call to a model's deployment costs a fixed ~2-4 ms of CPU in the
ingress (Ray's router, serialisation, the actor call) and as much again in the replica,
whatever the call carries. 32 clients each embedding one sentence paid it 32 times for what
the replica's batcher then ran as one ONNX Runtime batch. Here they pay it a few times.

How (no timer, so an idle model answers as fast as before): a call is sent at once while fewer
than `limit()` merged calls are in flight to the model; otherwise it waits, and when a merged
call returns, everything that waited meanwhile (up to `max_items`) leaves as the next one.
Under load the batches form by themselves; at one request at a time nothing waits.

Each item keeps its own answer (a `wire.Reply` with its own value or typed error, Triton's
one-response-per-request rule); a failure of the merged call itself (the replica died, Ray's
back-pressure) is every item's failure, as it would have been for each call on that replica.
A caller that gives up (deadline, client gone) only drops its own item. Never imports Ray.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from appliance.scale.wire import Reply


class MergedCallFailed(Exception):
    """A merged call's answer does not fit its calls (a replica of another code version)."""


@dataclass(frozen=True)
class TensorCall:
    """One call as the replica's `calls` method runs it: `method(*args)`."""

    method: str
    args: tuple[Any, ...]
    #: The call's own deadline; a merged call waits for the longest of its items'.
    timeout_s: float


#: Sends one merged call; answers one Reply per call, in order.
SendFn = Callable[[list[TensorCall], float], Awaitable[list[Reply]]]


@dataclass(eq=False)
class _Waiting:
    call: TensorCall
    future: asyncio.Future[Reply]


class CallCoalescer:
    """Merges one model's concurrent tensor calls (see the module's doc)."""

    def __init__(self, send: SendFn, *, limit: Callable[[], int], max_items: int) -> None:
        """`limit`: merged calls allowed in flight now (e.g. two per running replica, so each
        replica computes one while the next travels)."""
        self._send = send
        self._limit = limit
        self.max_items = max_items
        self._waiting: list[_Waiting] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def call(self, call: TensorCall) -> Reply:
        """The call's Reply; the merged call's exception when that failed as a whole."""
        waiting = _Waiting(call, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        self._dispatch()
        try:
            return await waiting.future
        except asyncio.CancelledError:
            if waiting in self._waiting:
                self._waiting.remove(waiting)
            raise

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < max(1, self._limit()):
            batch, self._waiting = self._waiting[: self.max_items], self._waiting[self.max_items :]
            self._in_flight += 1
            # A fresh context: the merged call belongs to no one request, so Ray must not
            # cancel it with the request that happened to start it (direct ingress cancels a
            # request's handle calls when its client goes away).
            task = asyncio.get_running_loop().create_task(self._run(batch), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        try:
            replies = await self._send([waiting.call for waiting in batch], max(waiting.call.timeout_s for waiting in batch))
            if len(replies) != len(batch):
                raise MergedCallFailed(f"the replica answered {len(replies)} of {len(batch)} merged calls")
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the merged call's failure is each item's
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
        else:
            for waiting, reply in zip(batch, replies):
                if not waiting.future.done():
                    waiting.future.set_result(reply)
        finally:
            self._in_flight -= 1
            self._dispatch()
