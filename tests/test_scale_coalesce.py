"""The ingress' merging of concurrent tensor calls into few Ray calls (appliance/scale/coalesce.py),
without a cluster: a lone call leaves at once, concurrent ones share merged calls within the
in-flight limit and the size bound, each gets its own answer or error, a merged call's failure
is each of its calls', and a caller that gives up drops only its own call."""

from __future__ import annotations

import asyncio

import pytest

from appliance.errors import InvalidInput
from appliance.scale.coalesce import CallCoalescer, MergedCallFailed, TensorCall
from appliance.scale.wire import ReplicaIdentity, Reply, WireError

REPLICA = ReplicaIdentity(replica_id="r1", node_id="n1", node_ip="127.0.0.1", pid=1)


class FakeReplica:
    """Answers each call with its argument doubled (a negative one with InvalidInput), after
    `delay_s`; records the merged calls it received."""

    def __init__(self, delay_s: float = 0.01, fail: BaseException | None = None) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.merged: list[int] = []

    async def send(self, calls: list[TensorCall], timeout_s: float) -> list[Reply]:
        self.merged.append(len(calls))
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [
            Reply(REPLICA, error=WireError("InvalidInput", "negative", "input")) if call.args[0] < 0 else Reply(REPLICA, call.args[0] * 2)
            for call in calls
        ]


def call(value: int, timeout_s: float = 5.0) -> TensorCall:
    return TensorCall("embed", (value,), timeout_s)


def test_a_lone_call_leaves_at_once_and_gets_its_answer() -> None:
    replica = FakeReplica()

    async def scenario() -> object:
        coalescer = CallCoalescer(replica.send, limit=lambda: 2, max_items=64)
        return (await coalescer.call(call(21))).unwrap()

    assert asyncio.run(scenario()) == 42
    assert replica.merged == [1]


def test_concurrent_calls_share_few_merged_calls_each_with_its_own_answer_or_error() -> None:
    replica = FakeReplica()

    async def scenario() -> list[object]:
        coalescer = CallCoalescer(replica.send, limit=lambda: 2, max_items=64)
        replies = await asyncio.gather(*(coalescer.call(call(value)) for value in [*range(31), -1]))
        return [reply.error.kind if reply.error else reply.unwrap() for reply in replies]

    answers = asyncio.run(scenario())
    assert answers == [value * 2 for value in range(31)] + ["InvalidInput"]
    # The first two leave alone (the in-flight limit), the other 30 wait and leave together.
    assert replica.merged == [1, 1, 30]
    with pytest.raises(InvalidInput):
        Reply(REPLICA, error=WireError("InvalidInput", "negative", "input")).unwrap()


def test_a_merged_call_carries_at_most_max_items() -> None:
    replica = FakeReplica()

    async def scenario() -> None:
        coalescer = CallCoalescer(replica.send, limit=lambda: 1, max_items=8)
        await asyncio.gather(*(coalescer.call(call(value)) for value in range(20)))

    asyncio.run(scenario())
    assert replica.merged == [1, 8, 8, 3]


def test_a_merged_calls_failure_is_each_of_its_calls_and_the_next_ones_go_on() -> None:
    replica = FakeReplica(fail=ConnectionError("the replica died"))

    async def scenario() -> list[BaseException | Reply]:
        coalescer = CallCoalescer(replica.send, limit=lambda: 1, max_items=64)
        return await asyncio.gather(*(coalescer.call(call(value)) for value in range(5)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(result, ConnectionError) for result in results)
    assert replica.merged == [1, 4]


def test_an_answer_of_the_wrong_length_fails_its_calls_rather_than_hang() -> None:
    async def short(calls: list[TensorCall], timeout_s: float) -> list[Reply]:
        return [Reply(REPLICA, 0)]

    async def scenario() -> list[BaseException | Reply]:
        coalescer = CallCoalescer(short, limit=lambda: 1, max_items=64)
        return await asyncio.gather(*(coalescer.call(call(value)) for value in range(3)), return_exceptions=True)

    results = asyncio.run(scenario())
    assert isinstance(results[0], Reply) and all(isinstance(result, MergedCallFailed) for result in results[1:])


def test_a_caller_that_gives_up_drops_only_its_own_call() -> None:
    replica = FakeReplica(delay_s=0.05)

    async def scenario() -> tuple[list[object], int]:
        coalescer = CallCoalescer(replica.send, limit=lambda: 1, max_items=64)
        first = asyncio.ensure_future(coalescer.call(call(1)))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(coalescer.call(call(value))) for value in (2, 3, 4)]
        await asyncio.sleep(0)
        waiting[1].cancel()  # gives up before its merged call leaves
        answers = [(await first).unwrap(), (await waiting[0]).unwrap(), (await waiting[2]).unwrap()]
        return answers, coalescer.in_flight

    answers, in_flight = asyncio.run(scenario())
    assert answers == [2, 4, 8] and in_flight == 0
    assert replica.merged == [1, 2]
