"""The adaptive stream interval (appliance/scale/interval.py), without a cluster: a replica's
only sequence sends every event at once; on a busy replica a sequence's events after its first
token cross in groups of at most the interval's tokens, or after the interval's seconds, every
event kept, in order; the last event and an error never wait; an interval of one token groups
nothing; closing the groups, or cancelling the call while a group waits, stops reading the
engine's stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest

from appliance.errors import ApplianceError, DeadlineExceeded
from appliance.scale.interval import StreamInterval, event_groups
from appliance.serving.protocols import TokenEvent

#: Long enough that a test never waits for it: a group that arrives sooner was not held by it.
NEVER_S = 30.0
#: How long a test gives a group that must come at once (a busy shared box answers late).
AT_ONCE_S = 2.0


def event(index: int, final: bool = False) -> TokenEvent:
    return TokenEvent(token_ids=[index], text=f"t{index} ", finish_reason="length" if final else None)


class FakeStream:
    """An engine stream the test feeds: `put` an event, `fail` with an error, `end` it."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[TokenEvent | ApplianceError | None] = asyncio.Queue()
        self.read = 0

    def put(self, *events: TokenEvent) -> None:
        for item in events:
            self.items.put_nowait(item)

    def fail(self, error: ApplianceError) -> None:
        self.items.put_nowait(error)

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> TokenEvent:
        item = await self.items.get()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, ApplianceError):
            raise item
        self.read += 1
        if item.finish_reason is not None:
            self.items.put_nowait(None)
        return item


async def next_group(groups: AsyncGenerator[list[TokenEvent], None], timeout_s: float = AT_ONCE_S) -> list[int]:
    async with asyncio.timeout(timeout_s):
        return [item.token_ids[0] for item in await anext(groups)]


async def collect(groups: AsyncGenerator[list[TokenEvent], None]) -> list[list[int]]:
    """Every group's token ids until the sequence ends."""
    return [[item.token_ids[0] for item in group] async for group in groups]


def test_a_lone_sequence_sends_every_event_at_once() -> None:
    async def scenario() -> None:
        stream = FakeStream()
        groups = event_groups(stream, StreamInterval(tokens=8, seconds=NEVER_S), busy=lambda: False)
        for index in range(4):
            stream.put(event(index, final=index == 3))
            assert await next_group(groups) == [index]
        with pytest.raises(StopAsyncIteration):
            await next_group(groups)

    asyncio.run(scenario())


def test_a_busy_replica_sends_the_first_token_at_once_then_groups_of_the_interval_tokens() -> None:
    async def scenario() -> None:
        stream = FakeStream()
        groups = event_groups(stream, StreamInterval(tokens=3, seconds=NEVER_S), busy=lambda: True)
        stream.put(event(0))
        assert await next_group(groups) == [0], "the first token waited"
        received = asyncio.get_running_loop().create_task(collect(groups))
        for index in range(1, 8):  # one token per engine step, each read as it comes
            stream.put(event(index, final=index == 7))
            await asyncio.sleep(0.001)
        assert await asyncio.wait_for(received, AT_ONCE_S) == [[1, 2, 3], [4, 5, 6], [7]], (
            "events lost, reordered, or grouped other than by the interval"
        )

    asyncio.run(scenario())


def test_a_busy_replica_holds_an_event_no_longer_than_the_interval_seconds() -> None:
    async def scenario() -> None:
        interval_s = 0.2
        stream = FakeStream()
        groups = event_groups(stream, StreamInterval(tokens=100, seconds=interval_s), busy=lambda: True)
        stream.put(event(0))
        assert await next_group(groups) == [0]
        stream.put(event(1))
        started = time.monotonic()
        assert await next_group(groups, NEVER_S / 2) == [1]
        waited_s = time.monotonic() - started
        assert interval_s * 0.9 <= waited_s < interval_s + AT_ONCE_S, f"held {waited_s:.3f} s, interval {interval_s} s"

    asyncio.run(scenario())


def test_the_last_event_and_an_error_are_sent_at_once_with_what_waited_before_them() -> None:
    async def scenario() -> None:
        interval = StreamInterval(tokens=100, seconds=NEVER_S)
        finished = FakeStream()
        groups = event_groups(finished, interval, busy=lambda: True)
        finished.put(event(0))
        assert await next_group(groups) == [0]
        waiting = asyncio.get_running_loop().create_task(next_group(groups))
        finished.put(event(1))
        await asyncio.sleep(0.01)
        assert not waiting.done(), "a busy replica sent an event without waiting for the interval"
        finished.put(event(2, final=True))
        assert await waiting == [1, 2]

        failing = FakeStream()
        groups = event_groups(failing, interval, busy=lambda: True)
        failing.put(event(0))
        assert await next_group(groups) == [0]
        waiting = asyncio.get_running_loop().create_task(next_group(groups))
        failing.put(event(1))
        await asyncio.sleep(0.01)
        failing.fail(DeadlineExceeded("the request's deadline passed"))
        assert await waiting == [1], "the events before the error were lost"
        with pytest.raises(DeadlineExceeded):
            await next_group(groups)

    asyncio.run(scenario())


def test_an_interval_of_one_token_groups_nothing() -> None:
    async def scenario() -> None:
        stream = FakeStream()
        interval = StreamInterval(tokens=1, seconds=NEVER_S)
        assert not interval.groups
        groups = event_groups(stream, interval, busy=lambda: True)
        for index in range(3):
            stream.put(event(index))
            assert await next_group(groups) == [index]

    asyncio.run(scenario())


def test_closing_the_groups_stops_reading_the_engines_stream() -> None:
    async def scenario() -> None:
        stream = FakeStream()
        groups = event_groups(stream, StreamInterval(tokens=4, seconds=NEVER_S), busy=lambda: True)
        stream.put(event(0))
        assert await next_group(groups) == [0]
        await groups.aclose()
        stream.put(event(1))
        await asyncio.sleep(0.05)
        assert stream.read == 1, "the stream was still read after the groups were closed"

    asyncio.run(scenario())


def test_cancelling_the_call_while_a_group_waits_stops_reading_the_engines_stream() -> None:
    """The ingress went away (Ray cancels the replica's generator) while a busy replica held a
    group: the cancellation reaches the caller, and the engine's stream is read no more (the
    caller then closes it, which frees the sequence)."""

    async def scenario() -> None:
        stream = FakeStream()
        groups = event_groups(stream, StreamInterval(tokens=100, seconds=NEVER_S), busy=lambda: True)
        stream.put(event(0))
        assert await next_group(groups) == [0]
        waiting = asyncio.get_running_loop().create_task(next_group(groups, NEVER_S))
        stream.put(event(1))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        stream.put(event(2))
        await asyncio.sleep(0.05)
        assert stream.read == 2, "the stream was still read after the call was cancelled"

    asyncio.run(scenario())
