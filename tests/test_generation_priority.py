"""Priorities in the generation engine: interactive work is admitted before batch work that
waits, a full queue displaces batch work for interactive work (429 for the batch sequence),
and aging admits a batch sequence that has waited long enough in arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from appliance.errors import CapacityExceeded
from appliance.generation import scheduler
from appliance.generation.engine import GenerationEngine
from appliance.generation.params import PRIORITY_BY_NAME, GenerationRequest
from tests.helpers.generation import PROMPTS, make_engine, tiny_decoders  # noqa: F401 - fixture

BATCH = PRIORITY_BY_NAME["batch"]
INTERACTIVE = PRIORITY_BY_NAME["interactive"]


@pytest.fixture
def engine(tiny_decoders) -> Iterator[GenerationEngine]:  # noqa: ANN001, F811
    """One sequence at a time, so everything else waits and the admission order shows."""
    engine = make_engine(tiny_decoders.llama_fp32, max_running_sequences=1, max_waiting_sequences=2)
    yield engine
    engine.stop()


def _request(priority: int, max_tokens: int = 24) -> GenerationRequest:
    return GenerationRequest(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, priority=priority)


async def _run(engine: GenerationEngine, plan: list[tuple[str, int, int]]) -> tuple[list[str], dict[str, BaseException | None]]:
    """Start the first (name, priority, max_tokens) of `plan` and wait until it runs, then
    submit the others back to back (they wait behind it); the admission order and each
    sequence's outcome."""
    order: list[str] = []
    outcomes: dict[str, BaseException | None] = {}

    async def consume(name: str, stream) -> None:  # noqa: ANN001 - a SequenceStream
        try:
            await stream.started()
            order.append(name)
            async for _ in stream:
                pass
            outcomes[name] = None
        except CapacityExceeded as exc:
            outcomes[name] = exc

    (first, priority, max_tokens), rest = plan[0], plan[1:]
    running = asyncio.ensure_future(consume(first, engine.generate(PROMPTS[0], _request(priority, max_tokens))))
    while not order:
        await asyncio.sleep(0.005)
    waiting = []
    for name, priority, max_tokens in rest:
        try:
            waiting.append(asyncio.ensure_future(consume(name, engine.generate(PROMPTS[0], _request(priority, max_tokens)))))
        except CapacityExceeded as exc:
            outcomes[name] = exc
    await asyncio.gather(running, *waiting)
    return order, outcomes


def test_interactive_work_is_admitted_before_batch_work_that_waited_longer(engine: GenerationEngine) -> None:
    order, outcomes = asyncio.run(
        _run(engine, [("running", BATCH, 200), ("batch", BATCH, 8), ("interactive", INTERACTIVE, 8)])
    )
    assert order == ["running", "interactive", "batch"]
    assert all(outcome is None for outcome in outcomes.values())


def test_a_full_queue_refuses_batch_work_first(engine: GenerationEngine) -> None:
    order, outcomes = asyncio.run(
        _run(
            engine,
            [("running", INTERACTIVE, 200), ("batch-1", BATCH, 8), ("batch-2", BATCH, 8), ("interactive", INTERACTIVE, 8)],
        )
    )
    assert isinstance(outcomes["batch-2"], CapacityExceeded), "the newest batch sequence made room"
    assert outcomes["interactive"] is None and outcomes["batch-1"] is None
    assert order == ["running", "interactive", "batch-1"]


def test_a_full_queue_of_interactive_work_still_refuses_more(engine: GenerationEngine) -> None:
    order, outcomes = asyncio.run(
        _run(engine, [("running", INTERACTIVE, 200), ("a", INTERACTIVE, 8), ("b", INTERACTIVE, 8), ("c", INTERACTIVE, 8)])
    )
    assert isinstance(outcomes["c"], CapacityExceeded) and order == ["running", "a", "b"]


def test_aged_batch_work_is_admitted_in_arrival_order(engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler, "PRIORITY_AGING_S", 0.0)
    order, _ = asyncio.run(_run(engine, [("running", BATCH, 200), ("batch", BATCH, 8), ("interactive", INTERACTIVE, 8)]))
    assert order == ["running", "batch", "interactive"]


def test_batch_work_leaves_a_reserved_slot_for_interactive_work(tiny_decoders) -> None:  # noqa: ANN001, F811
    """Eight slots, one kept for interactive work: of eight batch sequences only seven may run
    at once, so an interactive one submitted right behind them starts before the eighth."""
    engine = make_engine(tiny_decoders.llama_fp32, max_running_sequences=8)
    try:
        assert engine.scheduler.reserved_slots == 1

        async def main() -> list[str]:
            order: list[str] = []

            async def consume(name: str, stream) -> None:  # noqa: ANN001 - a SequenceStream
                await stream.started()
                order.append(name)
                async for _ in stream:
                    pass

            streams = [(f"batch-{n}", engine.generate(PROMPTS[0], _request(BATCH, 200))) for n in range(8)]
            streams.append(("interactive", engine.generate(PROMPTS[1], _request(INTERACTIVE, 4))))
            await asyncio.gather(*(consume(name, stream) for name, stream in streams))
            return order

        order = asyncio.run(main())
        assert order.index("interactive") < order.index("batch-7"), order
        assert order.index("batch-7") == 8, "the eighth batch sequence waited for a batch slot"
    finally:
        engine.stop()
