"""Constrained decoding in the engine, with tiny random decoders (which would otherwise print
noise): every answer must parse and validate, batched or alone, greedy or sampled, with
speculation and forced-token skipping on or off; unconstrained neighbours are untouched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import jsonschema
import numpy as np
import pytest

from appliance.errors import InvalidInput
from appliance.generation.engine import GenerationEngine
from appliance.generation.grammar import MAX_SOURCE_BYTES, Constraint
from appliance.generation.params import GenerationRequest
from tests.helpers.generation import PROMPTS, Generated, generate, make_engine, run, tiny_decoders  # noqa: F401
from tests.helpers.schemas import TEST_SCHEMAS

#: Requests per schema in the batched run: 31 schemas x 10 = 310 answers.
REQUESTS_PER_SCHEMA = 10
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def engine(tiny_decoders) -> Iterator[GenerationEngine]:  # noqa: ANN001, F811
    engine = make_engine(tiny_decoders.llama_fp32, max_running_sequences=16, max_waiting_sequences=512)
    yield engine
    engine.stop()


def _request(engine: GenerationEngine, schema: dict, index: int, **extra: object) -> GenerationRequest:
    grammar = engine.grammars.compile_now(Constraint("json_schema", json.dumps(schema), strict=True))
    sampled = index % 2 == 1
    return GenerationRequest(
        max_tokens=MAX_TOKENS, temperature=1.0 if sampled else 0.0, seed=index, grammar=grammar, **extra  # type: ignore[arg-type]
    )


def _check(result: Generated, schema: dict) -> None:
    assert result.finish_reason == "stop", (result.finish_reason, result.text)
    jsonschema.validate(json.loads(result.text), schema)


def test_every_answer_of_a_batched_run_parses_and_validates(engine: GenerationEngine) -> None:
    assert len(TEST_SCHEMAS) >= 30

    async def main() -> list[tuple[Generated, dict]]:
        jobs = []
        for number, schema in enumerate(TEST_SCHEMAS):
            for repeat in range(REQUESTS_PER_SCHEMA):
                index = number * REQUESTS_PER_SCHEMA + repeat
                prompt = PROMPTS[index % len(PROMPTS)]
                jobs.append((generate(engine, prompt, _request(engine, schema, index)), schema))
        results = await asyncio.gather(*(job for job, _ in jobs))
        return list(zip(results, (schema for _, schema in jobs), strict=True))

    results = run(main())
    assert len(results) >= 300
    for result, schema in results:  # type: ignore[union-attr]
        _check(result, schema)


def test_speculation_and_forced_tokens_keep_answers_valid_and_greedy_answers_unchanged(tiny_decoders) -> None:  # noqa: ANN001, F811
    """A lone sequence verifies forced tokens and grammar-checked drafts in one run; greedy
    output must be what one-token-per-step decoding gives."""
    fast = make_engine(tiny_decoders.llama_fp32, speculative="prompt-lookup", skip_forced_tokens=True)
    slow = make_engine(tiny_decoders.llama_fp32, speculative="off", skip_forced_tokens=False)
    try:
        for number, schema in enumerate(TEST_SCHEMAS):
            prompt = PROMPTS[number % len(PROMPTS)]
            greedy_fast = run(generate(fast, prompt, _request(fast, schema, 2 * number)))
            greedy_slow = run(generate(slow, prompt, _request(slow, schema, 2 * number)))
            _check(greedy_fast, schema)  # type: ignore[arg-type]
            assert greedy_fast.text == greedy_slow.text  # type: ignore[union-attr]
            _check(run(generate(fast, prompt, _request(fast, schema, 2 * number + 1))), schema)  # type: ignore[arg-type]
        assert fast.counters["forced_tokens"] > 0 and slow.counters["forced_tokens"] == 0
        assert fast.counters["steps"] < slow.counters["steps"]
    finally:
        fast.stop()
        slow.stop()


def test_constrained_and_unconstrained_sequences_share_a_batch(engine: GenerationEngine) -> None:
    schema = TEST_SCHEMAS[4]
    plain = GenerationRequest(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def main() -> tuple[list[Generated], list[Generated]]:
        alone = [await generate(engine, prompt, plain) for prompt in PROMPTS]
        mixed = await asyncio.gather(
            *(generate(engine, prompt, plain) for prompt in PROMPTS),
            *(generate(engine, prompt, _request(engine, schema, 0)) for prompt in PROMPTS),
        )
        return alone, list(mixed)

    alone, mixed = run(main())  # type: ignore[misc]
    assert [r.tokens for r in mixed[: len(PROMPTS)]] == [r.tokens for r in alone]
    for result in mixed[len(PROMPTS) :]:
        _check(result, schema)


def test_max_tokens_cuts_a_constrained_answer_with_length(engine: GenerationEngine) -> None:
    schema = TEST_SCHEMAS[29]
    grammar = engine.grammars.compile_now(Constraint("json_schema", json.dumps(schema), strict=True))
    result = run(generate(engine, PROMPTS[0], GenerationRequest(max_tokens=3, temperature=0.0, grammar=grammar)))
    assert result.finish_reason == "length"  # type: ignore[union-attr]
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        (Constraint("regex", "[a-c]{2}-[0-9]{3}"), lambda text: len(text) == 6 and text[2] == "-" and text[3:].isdigit()),
        (Constraint("choice", json.dumps(["alpha", "beta", "gamma"])), lambda text: text in ("alpha", "beta", "gamma")),
        (Constraint("json_object", ""), lambda text: isinstance(json.loads(text), dict)),
    ],
)
def test_regex_choice_and_json_object(engine: GenerationEngine, constraint: Constraint, check) -> None:  # noqa: ANN001
    grammar = engine.grammars.compile_now(constraint)
    for index, prompt in enumerate(PROMPTS):
        max_tokens = 200 if constraint.kind != "json_object" else 120
        result = run(generate(engine, prompt, GenerationRequest(max_tokens=max_tokens, temperature=0.0 if index % 2 == 0 else 1.0, seed=index, grammar=grammar)))
        if constraint.kind == "json_object" and result.finish_reason == "length":  # type: ignore[union-attr]
            continue  # any object may be endless for a random model; the shape is checked below
        assert result.finish_reason == "stop" and check(result.text), result.text  # type: ignore[union-attr]


def test_grammar_masks_the_whole_batch_only_where_constrained(engine: GenerationEngine) -> None:
    """Row masking leaves unconstrained rows' logits bit-identical."""
    from appliance.generation.grammar import constrain_rows

    grammar = engine.grammars.compile_now(Constraint("choice", json.dumps(["yes", "no"])))
    state = grammar.start()
    logits = np.random.default_rng(0).standard_normal((3, engine.spec.vocab_size)).astype(np.float32)
    before = logits.copy()
    constrain_rows(logits, [(1, state)])
    assert np.array_equal(logits[0], before[0]) and np.array_equal(logits[2], before[2])
    allowed = np.flatnonzero(np.isfinite(logits[1]))
    assert 0 < len(allowed) < 10
    texts = {engine.tokenizer.decode([int(token)]) for token in allowed}
    assert all("yes".startswith(text) or "no".startswith(text) for text in texts), texts


@pytest.mark.parametrize(
    ("constraint", "needle"),
    [
        (Constraint("json_schema", '{"type": "object", "properties": {"a": {"type": "strin"}}}', strict=True), "strin"),
        (Constraint("json_schema", '{"type": "string", "format": "hostname-ish"}', strict=True), "hostname-ish"),
        (Constraint("json_schema", '{"type": "array", "uniqueItems": true}', strict=True), "uniqueItems"),
        (Constraint("json_schema", "{not json", strict=True), "not valid"),
        (Constraint("regex", "(unclosed", field="structured_outputs.regex"), "regex"),
        (Constraint("json_schema", json.dumps({"enum": ["x" * 100] * (MAX_SOURCE_BYTES // 50)})), f"{MAX_SOURCE_BYTES} bytes"),
    ],
)
def test_bad_constraints_are_invalid_input_naming_the_field(engine: GenerationEngine, constraint: Constraint, needle: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        run(engine.compile(constraint))
    assert caught.value.field == constraint.field and needle in caught.value.message, caught.value.message


def test_compiled_grammars_are_cached_per_schema(engine: GenerationEngine) -> None:
    constraint = Constraint("json_schema", json.dumps(TEST_SCHEMAS[0]) + " ", strict=True)
    first = run(engine.compile(constraint))
    hits = engine.grammars.cache_hits
    assert run(engine.compile(constraint)) is first
    assert engine.grammars.cache_hits == hits + 1


def test_the_thread_pool_and_the_engine_thread_compute_the_same_masks(engine: GenerationEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big boxes hand many rows to llguidance's pool; the masks must be those computed inline."""
    from appliance.generation import grammar as grammar_module

    states = []
    for number, schema in enumerate(TEST_SCHEMAS[:6]):
        state = engine.grammars.compile_now(Constraint("json_schema", json.dumps(schema), strict=True)).start()
        for token in state.forced(3 + number):
            assert state.consume(token)
        states.append(state)
    logits = np.random.default_rng(1).standard_normal((len(states) + 2, engine.spec.vocab_size)).astype(np.float32)
    rows = [(row + 1, state) for row, state in enumerate(states)]
    inline, pooled = logits.copy(), logits.copy()
    monkeypatch.setattr(grammar_module, "PARALLEL_MASK_MIN_CPUS", 10**6)
    grammar_module.constrain_rows(inline, rows)
    monkeypatch.setattr(grammar_module, "PARALLEL_MASK_MIN_CPUS", 0)
    grammar_module.constrain_rows(pooled, rows)
    assert np.array_equal(inline, pooled) and not np.array_equal(inline, logits)
