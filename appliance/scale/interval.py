"""The adaptive stream interval: how a model replica groups one sequence's token events for
the trip to the ingress (`scale.stream_interval_tokens`, `scale.stream_interval_s`).

Every Ray streaming item costs CPU in both processes (serialising it, the object's
bookkeeping, waking the ingress), paid per item, not per token. While a replica runs several
sequences, each of them has about one token per engine step, so sending every event as its own
item pays that cost once per token, out of the cores that run the model. So, while the replica
is busy, a sequence's events wait until `tokens` tokens are buffered or the oldest has waited
`seconds`, whichever is first, and cross as one item; the ingress still hands the client every
event, in order. Sent at once, never held: every event of a replica's only sequence (nothing
to save CPU for, no added latency), a sequence's first token (time to first token), its last
event and its error. vLLM's `--stream-interval N` (vllm-project/vllm#27869) groups the same
way by a token count alone, also with the first token sent at once.

Never imports Ray: tested without a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from appliance.errors import ApplianceError
from appliance.serving.protocols import TokenEvent

#: A replica is busy (its sequences' events are grouped) from this many sequences streaming.
BUSY_SEQUENCES = 2

#: What a sequence's queue holds: its events, then the error that ended it (if any), then None.
_Item = TokenEvent | ApplianceError | None


@dataclass(frozen=True)
class StreamInterval:
    """When a busy replica sends a sequence's buffered events: once they hold `tokens` tokens,
    or `seconds` after the oldest of them was made, whichever comes first."""

    tokens: int
    seconds: float

    @property
    def groups(self) -> bool:
        """False when every event goes at once anyway (`tokens` 1 or `seconds` 0)."""
        return self.tokens > 1 and self.seconds > 0


async def event_groups(
    stream: AsyncIterator[TokenEvent], interval: StreamInterval, busy: Callable[[], bool]
) -> AsyncGenerator[list[TokenEvent], None]:
    """`stream`'s events in groups, in order, grouped by `interval` while `busy()`; the error
    that ended `stream` is raised after the events made before it. Reads `stream` in a task of
    its own, so a group's deadline never cancels a read of the engine's stream (which would
    abort the sequence); closing this generator stops that task (the caller closes `stream`)."""
    pending: asyncio.Queue[_Item] = asyncio.Queue()
    pump = asyncio.get_running_loop().create_task(_pump(stream, pending))
    first = True
    try:
        while True:
            group = [await pending.get()]
            _drain(pending, group)
            if not first and interval.groups and busy() and _open(group, interval.tokens):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval.seconds):
                        while _open(group, interval.tokens):
                            group.append(await pending.get())
                            _drain(pending, group)
            events = [item for item in group if isinstance(item, TokenEvent)]
            if events:
                first = False
                yield events
            for item in group:
                if isinstance(item, ApplianceError):
                    raise item
                if item is None:
                    return
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump


async def _pump(stream: AsyncIterator[TokenEvent], pending: asyncio.Queue[_Item]) -> None:
    """Move a local stream's events into `pending`; its error, then None, at the end."""
    try:
        async for event in stream:
            pending.put_nowait(event)
    except ApplianceError as exc:
        pending.put_nowait(exc)
    pending.put_nowait(None)


def _drain(pending: asyncio.Queue[_Item], group: list[_Item]) -> None:
    """Add to `group` whatever `pending` holds already."""
    while not pending.empty():
        group.append(pending.get_nowait())


def _open(group: list[_Item], tokens: int) -> bool:
    """Whether `group` may wait for more: the sequence goes on and it holds under `tokens`."""
    held = 0
    for item in group:
        if not isinstance(item, TokenEvent) or item.finish_reason is not None:
            return False
        held += len(item.token_ids)
    return held < tokens
