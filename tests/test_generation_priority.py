"""Priorities in the generation engine: interactive work is admitted before batch work that
waits, a full queue displaces batch work for interactive work (429 for the batch sequence),
aging admits a batch sequence that has waited long enough in arrival order, an interactive
prompt is prefilled first and without the batch decode rows (never two steps in a row), and
its arrival stops a decode run of batch rows only."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from appliance.errors import CapacityExceeded
from appliance.generation import scheduler
from appliance.generation.engine import GenerationEngine
from appliance.generation.kv_cache import KvCacheManager
from appliance.generation.model_runner import KvGeometry, KvStore
from appliance.generation.params import PRIORITY_BY_NAME, GenerationRequest, SamplingParams
from tests.helpers.generation import PROMPTS, make_engine, reference_greedy, tiny_decoders  # noqa: F401 - fixture

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


def _sequence(name: str, priority: int, prompt_len: int) -> scheduler.Sequence:
    return scheduler.Sequence(
        seq_id=name, prompt=list(range(1, prompt_len + 1)), params=SamplingParams(max_tokens=8, priority=priority),
        sink=lambda _event: None, detokenizer=None,  # type: ignore[arg-type] - the scheduler never detokenises
    )


def test_an_interactive_prompt_is_prefilled_first_and_alone_but_batch_decode_never_sits_out_twice() -> None:
    """Scheduler only: two batch sequences decode; an interactive prompt arrives behind a batch
    prompt. Its prefill goes first and runs without the batch decode rows; the next step
    decodes the batch rows again even though more interactive prompt is left."""
    geometry = KvGeometry(num_layers=1, num_kv_heads=1, head_dim=2, dtype=np.dtype(np.float32))
    store = KvStore(geometry, max_slots=4, max_len=64)
    kv = KvCacheManager([store], budget_bytes=1 << 20, bytes_per_token=geometry.bytes_per_token)
    plan_of = scheduler.Scheduler(kv, max_waiting=8, prefill_chunk_tokens=4, prefix_cache=None)
    running = [_sequence(f"batch-{n}", BATCH, 4) for n in range(2)]
    for seq in running:
        plan_of.add(seq)
    for _ in range(2):
        step = plan_of.schedule()
        plan_of.prefill_done(step.prefill.seq)
        step.prefill.seq.num_cached = 4
    plan_of.add(_sequence("batch-late", BATCH, 4))
    plan_of.add(_sequence("interactive", INTERACTIVE, 8))  # two chunks of 4

    first = plan_of.schedule()
    assert first.prefill is not None and first.prefill.seq.seq_id == "interactive"
    assert first.decode == [], "the batch rows sit this step out"
    first.prefill.seq.num_cached = first.prefill.end

    second = plan_of.schedule()
    assert second.prefill is not None and second.prefill.seq.seq_id == "interactive"
    assert {seq.seq_id for seq in second.decode} == {"batch-0", "batch-1"}, "never two steps in a row"


def test_an_interactive_arrival_stops_a_batch_only_decode_run_and_no_batch_token_is_lost(tiny_decoders) -> None:  # noqa: ANN001, F811
    """Two batch sequences decode; an interactive request arrives while their decode run is in
    ONNX Runtime. The run is stopped through its terminate flag (the real ORT run, held at its
    start by the test so the arrival lands inside it), the interactive prompt goes first, and
    every sequence's tokens still equal the plain reference loop's: none lost, none repeated."""
    engine = make_engine(tiny_decoders.llama_int4, max_running_sequences=4)
    real = engine._steps._runner  # noqa: SLF001 - the test holds the engine thread's runner
    arrived = threading.Event()

    class HeldRunner:
        """The engine's own runner; the first preemptible run waits until the arrival."""

        kv = real.kv
        vocab_size = real.vocab_size

        def forward(self, *args: object, run_options: ort.RunOptions | None = None, **kwargs: object) -> np.ndarray:
            if run_options is not None and not arrived.is_set():
                assert arrived.wait(10), "the interactive request never arrived"
            return real.forward(*args, run_options=run_options, **kwargs)

    engine._steps._runner = HeldRunner()  # noqa: SLF001
    try:
        async def main() -> dict[str, list[int]]:
            batch = [engine.generate(PROMPTS[n], _request(BATCH, 12)) for n in range(2)]
            tokens: dict[str, list[int]] = {}

            async def consume(name: str, stream) -> None:  # noqa: ANN001 - a SequenceStream
                tokens[name] = [token async for event in stream for token in event.token_ids]

            tasks = [asyncio.ensure_future(consume(f"batch-{n}", stream)) for n, stream in enumerate(batch)]
            while engine._steps._preemptible is None:  # noqa: SLF001 - wait for the held batch-only run
                await asyncio.sleep(0.001)
            interactive = engine.generate(PROMPTS[2], _request(INTERACTIVE, 6))
            arrived.set()
            tasks.append(asyncio.ensure_future(consume("interactive", interactive)))
            await asyncio.gather(*tasks)
            return tokens

        tokens = asyncio.run(main())
        assert engine.counters["preempted_steps"] >= 1
        assert tokens["batch-0"] == reference_greedy(tiny_decoders.llama_int4, PROMPTS[0], 12)
        assert tokens["batch-1"] == reference_greedy(tiny_decoders.llama_int4, PROMPTS[1], 12)
        assert tokens["interactive"] == reference_greedy(tiny_decoders.llama_int4, PROMPTS[2], 6)
    finally:
        engine.stop()
