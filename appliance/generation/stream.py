"""The event-loop side of one submitted sequence: its events as an async iterator.

The engine thread never touches a stream directly: the sink it calls only schedules delivery on
the stream's own event loop (`loop.call_soon_threadsafe`), so the queue and the flags below are
read and written by that loop alone. A stream must never block its loop, and never outlives its
sequence silently: closing it early aborts the sequence at the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from appliance.errors import ApplianceError, DeadlineExceeded
from appliance.generation.events import TokenEvent
from appliance.generation.params import GenerationRequest


class SequenceSubmitter(Protocol):
    """What a stream needs of its engine: queue its sequence, and abort it when closed early."""

    def submit(
        self,
        prompt_ids: list[int],
        request: GenerationRequest,
        sink: Callable[[TokenEvent], None],
        *,
        timeout_s: float | None = None,
        on_admitted: Callable[[], None] | None = None,
        queue_limit: bool = True,
    ) -> str: ...

    def abort(self, seq_id: str) -> None: ...


class SequenceStream:
    """The events of one submitted sequence, as an async iterator.

    Closing it before the final event (client disconnect, cancelled task) aborts the sequence,
    which frees its slot and KV at the engine's next step.
    """

    def __init__(
        self,
        engine: SequenceSubmitter,
        prompt_ids: list[int],
        request: GenerationRequest,
        timeout_s: float | None,
        *,
        queue_limit: bool = True,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._engine = engine
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._done = False
        #: Set once the engine gave the sequence a slot or sent its first event.
        self._started = asyncio.Event()
        #: The error that ended the sequence before it got a slot (refused, deadline, engine
        #: stopping).
        self._refused: ApplianceError | None = None
        self.seq_id = engine.submit(
            prompt_ids,
            request,
            lambda event: loop.call_soon_threadsafe(self._deliver, event),
            timeout_s=timeout_s,
            on_admitted=lambda: loop.call_soon_threadsafe(self._started.set),
            queue_limit=queue_limit,
        )

    def _deliver(self, event: TokenEvent) -> None:
        if not self._started.is_set() and event.finish_reason is not None:
            self._refused = event.error or DeadlineExceeded(
                "the request's deadline passed while it waited for a free sequence slot"
            )
        self._queue.put_nowait(event)
        self._started.set()

    async def started(self) -> None:
        """Wait until the sequence has a slot. A sequence refused or failed before that raises
        its error here, so a streaming response can still answer with the right status."""
        try:
            await self._started.wait()
        except BaseException:
            self.close()
            raise
        if self._refused is not None:
            self._done = True
            raise self._refused

    def __aiter__(self) -> SequenceStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:
            self.close()
            raise
        if event.finish_reason is not None:
            self._done = True
        if event.error is not None:
            raise event.error
        return event

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.seq_id)

    async def aclose(self) -> None:
        self.close()
