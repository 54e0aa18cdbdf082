"""The generation engine against a plain reference loop, on tiny models exported by the export stage."""

from __future__ import annotations

import asyncio
import time

import pytest

from appliance.errors import CapacityExceeded, DeadlineExceeded, InvalidInput
from appliance.generation.params import GenerationRequest
from appliance.generation.prefix_cache import BLOCK_TOKENS
from appliance.generation.speculative import VerificationCost
from tests.helpers.generation import (  # noqa: F401 - tiny_decoders is a fixture
    Generated,
    PROMPTS,
    TinyDecoders,
    generate,
    greedy,
    make_engine,
    reference_greedy,
    tiny_decoders,
)


def test_greedy_output_equals_the_reference_loop_token_for_token(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32)
    try:
        for prompt in PROMPTS:
            result = asyncio.run(generate(engine, prompt, greedy(24)))
            assert result.tokens == reference_greedy(tiny_decoders.llama_fp32, prompt, 24)
            assert result.finish_reason == "length"
    finally:
        engine.stop()


def test_int4_variant_greedy_equals_its_reference_loop(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_int4)
    try:
        prompt = PROMPTS[1]
        assert asyncio.run(generate(engine, prompt, greedy(20))).tokens == reference_greedy(tiny_decoders.llama_int4, prompt, 20)
    finally:
        engine.stop()


def test_optimum_graph_kind_greedy_equals_its_reference_loop(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.gpt2_fp32)
    try:
        for prompt in PROMPTS[:2]:
            assert asyncio.run(generate(engine, prompt, greedy(16))).tokens == reference_greedy(tiny_decoders.gpt2_fp32, prompt, 16)
    finally:
        engine.stop()


@pytest.mark.parametrize("version", ["llama_fp32", "gpt2_fp32", "llama_int4_kv8"])
def test_concurrent_sequences_batched_equal_each_run_alone(tiny_decoders: TinyDecoders, version: str) -> None:
    model = getattr(tiny_decoders, version)
    engine = make_engine(model)
    try:
        async def together() -> list[list[int]]:
            # Different lengths and budgets: sequences join and leave the batch at different steps.
            results = await asyncio.gather(*[generate(engine, prompt, greedy(10 + 5 * i)) for i, prompt in enumerate(PROMPTS)])
            return [result.tokens for result in results]

        batched = asyncio.run(together())
        alone = [reference_greedy(model, prompt, 10 + 5 * i) for i, prompt in enumerate(PROMPTS)]
        assert batched == alone
        assert engine.stats()["steps"] < sum(10 + 5 * i for i in range(len(PROMPTS)))
    finally:
        engine.stop()


#: The int8 KV cache (`--kv-cache int8`) goes through the same engine paths as fp32.
WITH_INT8_KV = pytest.mark.parametrize("version", ["llama_fp32", "llama_int4_kv8"])


@WITH_INT8_KV
def test_chunked_prefill_gives_the_same_tokens_as_one_prefill(tiny_decoders: TinyDecoders, version: str) -> None:
    model = getattr(tiny_decoders, version)
    prompt = [(7 * i + 3) % 300 + 3 for i in range(70)]
    engine = make_engine(model, prefill_chunk_tokens=16)
    try:
        # fp32 cache: the chunks change nothing. int8 cache: each chunk reads the earlier ones
        # through the cache's rounding (its own tokens unrounded), so the reference is cut alike.
        chunk = 16 if model.manifest.generation.fp32_attention_input else None  # type: ignore[union-attr]
        assert asyncio.run(generate(engine, prompt, greedy(12))).tokens == reference_greedy(model, prompt, 12, prompt_chunk=chunk)
    finally:
        engine.stop()


def test_long_prompt_prefill_does_not_stall_a_running_stream(tiny_decoders: TinyDecoders) -> None:
    long_prompt = [(5 * i + 1) % 300 + 3 for i in range(200)]
    engine = make_engine(tiny_decoders.llama_fp32, prefill_chunk_tokens=16)
    try:
        async def scenario() -> tuple[int, int]:
            short = engine.generate(PROMPTS[0], greedy(40))
            first = await short.__anext__()
            assert first.token_ids
            long_stream = engine.generate(long_prompt, greedy(2))
            tokens_before_long_first = 0
            long_task = asyncio.ensure_future(long_stream.__anext__())
            async for event in short:
                if not long_task.done():
                    tokens_before_long_first += len(event.token_ids)
            await long_task
            async for _ in long_stream:
                pass
            return tokens_before_long_first, 200 // 16

        interleaved, chunks = asyncio.run(scenario())
        # The short stream kept getting tokens while the long prompt was prefilled chunk by chunk.
        assert interleaved >= chunks - 1
    finally:
        engine.stop()


@WITH_INT8_KV
def test_repeated_system_prompt_is_served_from_the_prefix_cache(tiny_decoders: TinyDecoders, version: str) -> None:
    model = getattr(tiny_decoders, version)
    system = [(3 * i + 2) % 300 + 3 for i in range(3 * BLOCK_TOKENS)]
    engine = make_engine(model)
    try:
        first = system + [40, 41, 42]
        second = system + [50, 51]
        assert asyncio.run(generate(engine, first, greedy(8))).tokens == reference_greedy(model, first, 8)
        result = asyncio.run(generate(engine, second, greedy(8)))
        assert result.tokens == reference_greedy(model, second, 8)
        assert result.events[-1].cached_prompt_tokens == 3 * BLOCK_TOKENS
        assert engine.stats()["prefix_cache_hit_rate"] > 0.4
    finally:
        engine.stop()


def test_prompt_lookup_speculation_gives_identical_greedy_output(tiny_decoders: TinyDecoders) -> None:
    model = tiny_decoders.llama_fp32
    # A prompt that repeats itself, so n-gram drafts exist and some are accepted.
    base = reference_greedy(model, PROMPTS[3], 30)
    prompt = PROMPTS[3] + base + PROMPTS[3]
    plain = make_engine(model)
    speculative = make_engine(model, speculative="prompt-lookup")
    try:
        expected = asyncio.run(generate(plain, prompt, greedy(30))).tokens
        assert asyncio.run(generate(speculative, prompt, greedy(30))).tokens == expected
        assert speculative.counters["draft_tokens"] > 0
    finally:
        plain.stop()
        speculative.stop()


class CheapDrafts(VerificationCost):
    """A box where drafting and verifying cost next to nothing (a GPU with a small draft
    model), held fixed: the test below checks acceptance bookkeeping, not this machine's
    timings, which would rightly tell the engine that a model drafting for itself never pays."""

    def __init__(self) -> None:
        super().__init__()
        self.extra_token = self.draft_step = 0.02

    def seed(self, step_s: float, verification_width: int, verification_s: float, draft_step_s: float | None) -> None:
        del step_s, verification_width, verification_s, draft_step_s

    def observe_step(self, seconds: float) -> None:
        del seconds

    def observe_verification(self, width: int, seconds: float) -> None:
        del width, seconds

    def observe_draft_step(self, seconds: float) -> None:
        del seconds


@WITH_INT8_KV
def test_accepted_drafts_save_steps_and_keep_the_output(tiny_decoders: TinyDecoders, version: str) -> None:
    model = getattr(tiny_decoders, version)
    # The model drafting for itself: every draft token is accepted.
    plain = make_engine(model)
    engine = make_engine(model, speculative="draft", draft=model)
    engine.cost = CheapDrafts()
    try:
        expected = asyncio.run(generate(plain, PROMPTS[0], greedy(40))).tokens
        assert asyncio.run(generate(engine, PROMPTS[0], greedy(40))).tokens == expected
        assert engine.stats()["spec_acceptance_rate"] == 1.0
        assert engine.stats()["steps"] * 4 < plain.stats()["steps"]
    finally:
        plain.stop()
        engine.stop()


@pytest.mark.parametrize(
    ("target", "draft"), [("llama_fp32", "llama_int4"), ("llama_fp32", "llama_int4_kv8"), ("llama_int4_kv8", "llama_fp32")]
)
def test_draft_model_speculation_gives_the_target_greedy_output(tiny_decoders: TinyDecoders, target: str, draft: str) -> None:
    """Drafts rejected part-way leave positions in the target's (and the draft's) cache that
    the next run overwrites: the same for an int8 cache as for fp32."""
    model = getattr(tiny_decoders, target)
    engine = make_engine(model, speculative="draft", draft=getattr(tiny_decoders, draft))
    engine.cost = CheapDrafts()  # a tiny draft costs what its tiny target does: it would never draft
    try:
        # The two sessions take turns on the same cores: both park their pools after each run.
        assert engine.draft is not None
        for runner in (engine.runner, engine.draft.runner):
            options = runner.session.get_session_options()  # type: ignore[attr-defined]
            assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        plain = make_engine(model)
        plain_options = plain.runner.session.get_session_options()  # type: ignore[attr-defined]
        plain.stop()
        with pytest.raises(RuntimeError, match="force_spinning_stop"):  # not set: a lone model keeps spinning
            plain_options.get_session_config_entry("session.force_spinning_stop")
        for prompt in PROMPTS[:2]:
            assert asyncio.run(generate(engine, prompt, greedy(25))).tokens == reference_greedy(model, prompt, 25)
        assert engine.counters["draft_tokens"] > 0
    finally:
        engine.stop()


def test_kv_budget_queues_sequences_instead_of_failing(tiny_decoders: TinyDecoders) -> None:
    spec = tiny_decoders.llama_fp32.manifest.generation
    assert spec is not None
    per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
    # Room for one sequence of 40 positions at a time.
    engine = make_engine(tiny_decoders.llama_fp32, kv_budget_bytes=max(per_token * 40, 1 << 20))
    engine.kv.budget_tokens = 40
    try:
        async def three() -> list[list[int]]:
            results = await asyncio.gather(*[generate(engine, prompt, greedy(20)) for prompt in PROMPTS[:3]])
            return [result.tokens for result in results]

        outputs = asyncio.run(three())
        assert outputs == [reference_greedy(tiny_decoders.llama_fp32, prompt, 20) for prompt in PROMPTS[:3]]
        assert engine.kv.reserved_tokens == 0
    finally:
        engine.stop()


def test_prompt_plus_max_tokens_that_can_never_fit_is_refused_naming_the_limit(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32)
    try:
        async def submit() -> None:
            engine.generate([5, 6, 7], greedy(engine.context_length))

        with pytest.raises(InvalidInput) as caught:
            asyncio.run(submit())
        assert caught.value.field == "max_tokens"
        assert str(engine.context_length) in caught.value.message
    finally:
        engine.stop()


def test_closing_a_stream_frees_its_slot_and_reservation_within_a_step(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32)
    forward = engine.runner.forward

    def slow_forward(*args: object, **kwargs: object) -> object:
        time.sleep(0.01)  # the tiny model would otherwise finish all 200 tokens at once
        return forward(*args, **kwargs)

    engine.runner.forward = slow_forward  # type: ignore[method-assign]
    try:
        async def scenario() -> None:
            stream = engine.generate(PROMPTS[0], greedy(200))
            await stream.__anext__()
            assert engine.kv.reserved_tokens > 0
            await stream.aclose()
            deadline = time.monotonic() + 5
            while engine.kv.reserved_tokens and time.monotonic() < deadline:
                await asyncio.sleep(0.005)

        asyncio.run(scenario())
        assert engine.kv.reserved_tokens == 0
        assert not engine.scheduler.running
    finally:
        engine.stop()


def test_stop_strings_end_the_sequence_without_leaking_the_stop_text(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32)
    try:
        full = asyncio.run(generate(engine, PROMPTS[1], greedy(30)))
        assert len(full.text) > 6
        stop = full.text[4:7]
        cut = asyncio.run(generate(engine, PROMPTS[1], greedy(30, stop=(stop,))))
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.find(stop)]
        stop_id = full.tokens[5]
        by_id = asyncio.run(generate(engine, PROMPTS[1], greedy(30, stop_token_ids=(stop_id,))))
        assert by_id.finish_reason == "stop"
        assert by_id.tokens == full.tokens[: full.tokens.index(stop_id)]
    finally:
        engine.stop()


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32)
    try:
        def sampled(seed: int) -> list[int]:
            params = GenerationRequest(max_tokens=24, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
            return asyncio.run(generate(engine, PROMPTS[0], params)).tokens

        assert sampled(1) == sampled(1)
        assert sampled(1) != sampled(2)
    finally:
        engine.stop()


def test_logprobs_come_with_each_token_when_asked(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32)
    try:
        result = asyncio.run(generate(engine, PROMPTS[0], greedy(5, logprobs=3)))
        entries = [entry for event in result.events for entry in (event.logprobs or [])]
        assert [entry.token_id for entry in entries] == result.tokens
        for entry in entries:
            assert len(entry.top) == 3
            assert entry.top[0][0] == entry.token_id  # greedy picks the most likely
            assert entry.logprob <= 0
    finally:
        engine.stop()


def test_sequence_past_its_deadline_is_stopped_and_freed(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32)
    try:
        async def scenario() -> str | None:
            reason = None
            async for event in engine.generate(PROMPTS[0], greedy(200), timeout_s=1e-6):
                reason = event.finish_reason
            return reason

        assert asyncio.run(scenario()) == "timeout"
        assert engine.kv.reserved_tokens == 0
    finally:
        engine.stop()


def _slowed(engine: object, seconds: float) -> None:
    """Make every forward pass take a while: the tiny model would otherwise free its slot at once."""
    forward = engine.runner.forward  # type: ignore[attr-defined]

    def slow_forward(*args: object, **kwargs: object) -> object:
        time.sleep(seconds)
        return forward(*args, **kwargs)

    engine.runner.forward = slow_forward  # type: ignore[attr-defined]


def test_a_sequence_waiting_past_its_queue_limit_is_refused_before_it_runs(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32, max_running_sequences=1, max_queue_wait_s=0.1)
    _slowed(engine, 0.01)
    try:
        async def scenario() -> tuple[CapacityExceeded, list[int], str | None]:
            first = engine.generate(PROMPTS[0], greedy(150))  # holds the only slot for over a second
            await first.started()
            second = engine.generate(PROMPTS[1], greedy(5))
            with pytest.raises(CapacityExceeded) as caught:
                await second.started()
            tokens: list[int] = []
            reason = None
            async for event in first:
                tokens.extend(event.token_ids)
                reason = event.finish_reason
            return caught.value, tokens, reason

        refusal, tokens, reason = asyncio.run(scenario())
        assert refusal.status_code == 429 and refusal.retry_after_s > 0
        assert "waited" in refusal.message and "slot" in refusal.message
        assert (len(tokens), reason) == (150, "length")  # the refusal did not disturb the running one
        assert engine.kv.reserved_tokens == 0 and not engine.scheduler.waiting
        assert engine.counters["steps"] > 0
    finally:
        engine.stop()


def test_without_a_set_queue_limit_a_quarter_of_the_deadline_applies(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32, max_running_sequences=1)
    _slowed(engine, 0.01)
    try:
        async def scenario() -> tuple[BaseException | None, Generated]:
            first = engine.generate(PROMPTS[0], greedy(150))
            await first.started()
            # A 4 s deadline: refused after about 1 s of waiting (the first needs ~1.5 s), not
            # admitted late and cut at 4 s.
            second = engine.generate(PROMPTS[1], greedy(5), timeout_s=4.0)
            error: BaseException | None = None
            try:
                await second.started()
            except CapacityExceeded as exc:
                error = exc
            async for _ in first:
                pass
            # A queued sequence that gets its slot in time runs normally.
            third = await generate(engine, PROMPTS[2], greedy(5), timeout_s=4.0)
            return error, third

        error, third = asyncio.run(scenario())
        assert isinstance(error, CapacityExceeded)
        assert third.tokens == reference_greedy(tiny_decoders.llama_fp32, PROMPTS[2], 5)
    finally:
        engine.stop()


def test_a_deadline_that_passes_while_queued_is_a_deadline_error_before_any_output(tiny_decoders: TinyDecoders) -> None:
    engine = make_engine(tiny_decoders.llama_fp32, max_running_sequences=1, max_queue_wait_s=600)
    _slowed(engine, 0.01)
    try:
        async def scenario() -> None:
            first = engine.generate(PROMPTS[0], greedy(100))
            await first.started()
            second = engine.generate(PROMPTS[1], greedy(5), timeout_s=0.2)
            with pytest.raises(DeadlineExceeded):
                await second.started()
            async for _ in first:
                pass

        asyncio.run(scenario())
        assert engine.kv.reserved_tokens == 0
    finally:
        engine.stop()
