"""The stall limit: prompt chunks that run beside decoding streams are cut so that a step stays
within `decode_stall_factor` lone decode steps; alone (or with the factor 0) a chunk is the
full prefill_chunk_tokens, and the tokens generated are the same either way."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from appliance.config import GenerationSettings
from appliance.generation import scheduler
from appliance.generation.kv_cache import KvCacheManager
from appliance.generation.model_runner import KvGeometry, KvStore
from appliance.generation.params import PRIORITY_BY_NAME, GenerationRequest, SamplingParams
from appliance.generation.stall_limit import MIN_CHUNK_TOKENS, StallLimit
from tests.helpers.generation import PROMPTS, make_engine, reference_greedy, tiny_decoders  # noqa: F401 - fixture


def _timed(factor: float, *, single_s: float = 0.02, batch_s: float = 0.05, token_s: float = 0.002) -> StallLimit:
    limit = StallLimit(factor)
    limit.observe_decode(1, single_s)
    for _ in range(30):  # the running average settles on the batch's step
        limit.observe_decode(8, batch_s)
    limit.observe_prefill(100, token_s * 100)
    return limit


def test_the_chunk_is_what_fits_in_the_allowance_and_stays_between_the_floor_and_the_full_chunk() -> None:
    # 6 x 20 ms lone steps = 120 ms; the batch takes ~50 ms: ~70 ms of prompt at 2 ms a token.
    assert 33 <= _timed(6).chunk_tokens(256) <= 35
    assert _timed(100).chunk_tokens(256) == 256, "never more than the full chunk"
    assert _timed(1).chunk_tokens(256) == MIN_CHUNK_TOKENS, "a batch slower than the allowance still lets the prompt advance"
    assert _timed(1).chunk_tokens(8) == 8, "the floor never exceeds a smaller configured chunk"


def test_no_limit_without_timings_or_with_factor_zero() -> None:
    assert StallLimit(6).chunk_tokens(256) == 256, "nothing timed yet"
    assert _timed(0).chunk_tokens(256) == 256, "factor 0 turns the limit off"
    untimed_prefill = StallLimit(6)
    untimed_prefill.observe_decode(1, 0.02)
    assert untimed_prefill.chunk_tokens(256) == 256


def test_without_a_lone_step_the_fastest_step_stands_in() -> None:
    """Only batches have decoded: their fastest step bounds a lone one from above, so the chunk
    errs large, and a later lone step tightens it."""
    limit = StallLimit(4)
    limit.observe_decode(8, 0.05)
    limit.observe_decode(4, 0.04)
    limit.observe_prefill(50, 0.1)
    loose = limit.chunk_tokens(256)  # 4 x 40 ms - the batch average
    limit.observe_decode(1, 0.02)
    assert limit.chunk_tokens(256) < loose


def test_the_per_token_estimate_follows_the_chunks_actually_run() -> None:
    limit = _timed(6, token_s=0.002)
    before = limit.chunk_tokens(256)
    for _ in range(20):  # small chunks cost more per token (a run's fixed cost): chunks shrink
        limit.observe_prefill(16, 16 * 0.004)
    assert limit.chunk_tokens(256) < before


def _sequence(name: str, prompt_len: int, priority: int = 0) -> scheduler.Sequence:
    return scheduler.Sequence(
        seq_id=name, prompt=list(range(1, prompt_len + 1)), params=SamplingParams(max_tokens=8, priority=priority),
        sink=lambda _event: None, detokenizer=None,  # type: ignore[arg-type] - the scheduler never detokenises
    )


def _scheduler(limit: StallLimit) -> scheduler.Scheduler:
    geometry = KvGeometry(num_layers=1, num_kv_heads=1, head_dim=2, dtype=np.dtype(np.float32))
    store = KvStore(geometry, max_slots=4, max_len=512)
    kv = KvCacheManager([store], budget_bytes=1 << 20, bytes_per_token=geometry.bytes_per_token)
    return scheduler.Scheduler(kv, max_waiting=8, prefill_chunk_tokens=256, prefix_cache=None, stall_limit=limit)


def _start(plan_of: scheduler.Scheduler, seq: scheduler.Sequence) -> None:
    plan_of.add(seq)
    step = plan_of.schedule()
    assert step.prefill is not None and step.prefill.seq is seq
    step.prefill.seq.num_cached = step.prefill.end
    plan_of.prefill_done(seq)


def test_the_scheduler_cuts_only_chunks_that_run_beside_decoding_streams() -> None:
    plan_of = _scheduler(_timed(1))
    first = _sequence("first", 200)
    _start(plan_of, first)  # alone: one chunk of 200
    plan_of.add(_sequence("second", 200))
    step = plan_of.schedule()
    assert step.decode == [first]
    assert step.prefill is not None and step.prefill.end - step.prefill.start == MIN_CHUNK_TOKENS


def test_an_interactive_chunk_that_runs_without_the_batch_rows_is_not_cut() -> None:
    plan_of = _scheduler(_timed(1))
    _start(plan_of, _sequence("batch", 20, PRIORITY_BY_NAME["batch"]))
    plan_of.add(_sequence("interactive", 200, PRIORITY_BY_NAME["interactive"]))
    step = plan_of.schedule()
    assert step.decode == [], "the batch rows sit this step out"
    assert step.prefill is not None and step.prefill.end - step.prefill.start == 200


def _chunk_counts(engine) -> tuple[float, float]:  # noqa: ANN001 - a GenerationEngine
    """(prefill runs of at most 16 tokens, all prefill runs) from the engine's own metric (the
    first prompt, 6 tokens, is one of the small ones)."""
    registry = engine.metrics.registry
    labels = {"model": engine.name}
    small = registry.get_sample_value("appliance_prefill_chunk_tokens_bucket", {**labels, "le": "16.0"})
    total = registry.get_sample_value("appliance_prefill_chunk_tokens_count", labels)
    return small or 0.0, total or 0.0


@pytest.mark.parametrize("factor", [0.0, 0.001])
def test_a_prompt_that_starts_beside_a_running_stream_is_cut_by_the_limit_and_its_tokens_do_not_change(
    tiny_decoders, factor: float  # noqa: ANN001, F811
) -> None:
    """Real engine, tiny Llama: one stream decodes; an 80-token prompt arrives. With the factor
    0 it is prefilled in one run; with a factor far under one batch step, in runs of 16 tokens
    beside the running stream. Both sequences' tokens equal the plain reference loop's."""
    version = tiny_decoders.llama_fp32
    long_prompt = [(7 * n) % 250 + 3 for n in range(80)]
    engine = make_engine(version, max_running_sequences=4, decode_stall_factor=factor)
    try:
        async def main() -> tuple[list[int], list[int]]:
            request = GenerationRequest(max_tokens=150, temperature=0.0, ignore_eos=True)
            running = engine.generate(PROMPTS[0], request)
            events = running.__aiter__()
            # Two events: the second comes from a decode run, so the limit has timed both kinds.
            first_tokens = [token for _ in range(2) for token in (await events.__anext__()).token_ids]
            late = engine.generate(long_prompt, GenerationRequest(max_tokens=8, temperature=0.0, ignore_eos=True))
            late_tokens = [token async for event in late for token in event.token_ids]
            rest = [token async for event in events for token in event.token_ids]
            return first_tokens + rest, late_tokens

        running_tokens, late_tokens = asyncio.run(main())
    finally:
        engine.stop()
    small, total = _chunk_counts(engine)
    if factor == 0:
        assert (small, total) == (1, 2), "the lone first prompt and the late one, each in one run"
    else:
        assert small == total == 6, "the first prompt's one run, then 80 tokens beside it in five runs of 16"
    assert running_tokens == reference_greedy(version, PROMPTS[0], 150)
    assert late_tokens == reference_greedy(version, long_prompt, 8)


def test_the_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="decode_stall_factor"):
        GenerationSettings(decode_stall_factor=-1)
