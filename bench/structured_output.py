"""Benchmark: what constrained decoding (JSON schemas, llguidance masks) costs, and what it saves.

One run, same machine, SmolLM2-135M-Instruct int4 served by `appliance serve` processes on
loopback:

1. Tokens/s, constrained (a realistic extraction schema) against unconstrained, from 1
   and from 8 concurrent streams, on a server that masks only (`skip_forced_tokens` off, no
   speculation): the per-token price of the masks. Target: cost <= 10% (moonshot <= 3%).
   Unconstrained answers run the same number of tokens as the constrained ones averaged; a
   round's tokens over its wall time (same prompt, so the same prefill on both sides).
2. Forced tokens: a schema with long fixed keys, one stream, answer tokens/s with the grammar's
   forced tokens verified in one run (`skip_forced_tokens` on, the default) against one step
   per token.
3. Time to first token with a new schema (compiled on the request) against a cached one
   (median of `--repeats`), and the very first constrained request of a model (which also
   builds llguidance's index of the vocabulary).
4. In-process: compile time of each test schema (tests/helpers/schemas.py) for SmolLM2's
   tokenizer (p50/p99/max), and the time to mask one and eight 49,152-token logits rows.
5. Part 1's comparison inside one engine, without HTTP (the mask's own price, with less noise
   from the server and the clients).

    .venv/bin/python bench/structured_output.py [--state-dir DIR] [--repeats 5] [--passes 3]

Without `--state-dir` the model is exported into a temporary folder first (needs the export
extra). Passes alternate between the sides compared; the medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from serving_layer import Server, machine  # noqa: E402

MODEL = "smollm2-135m-instruct"
#: What an application extracts from a support e-mail.
EXTRACTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer_name": {"type": "string", "maxLength": 40},
        "order_number": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{6}$"},
        "product": {"type": "string", "maxLength": 40},
        "issue": {"enum": ["damaged", "late", "wrong_item", "refund", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "wants_callback": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 160},
    },
    "required": ["customer_name", "order_number", "product", "issue", "urgency", "wants_callback", "summary"],
    "additionalProperties": False,
}
EMAIL = (
    "Extract the fields from this e-mail as JSON.\n\n"
    "Hello, my name is Maria Keller. My order AB-204381, a standing desk, arrived with a cracked leg "
    "and one missing screw bag. I need it for work next week, so this is fairly urgent. Please call me "
    "back at your earliest convenience so we can arrange a replacement. Thanks, Maria"
)
#: A form whose keys are long and fixed: most of the answer is forced by the grammar.
FORM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "patient_identification_number_as_printed_on_the_card": {"type": "integer", "minimum": 0, "maximum": 99999},
        "attending_physician_department_code_from_the_referral": {"enum": ["CARD", "NEUR", "ORTH"]},
        "insurance_coverage_confirmed_by_the_front_desk_staff": {"type": "boolean"},
        "number_of_previous_visits_recorded_in_the_last_twelve_months": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": [
        "patient_identification_number_as_printed_on_the_card",
        "attending_physician_department_code_from_the_referral",
        "insurance_coverage_confirmed_by_the_front_desk_staff",
        "number_of_previous_visits_recorded_in_the_last_twelve_months",
    ],
    "additionalProperties": False,
}
FORM_PROMPT = "Patient 4821, cardiology referral, insurance confirmed, 3 visits this year. Fill in the form as JSON."
MAX_TOKENS = 200
ROUNDS = {1: 2, 8: 1}


def _response_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def _stream(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[float, float, float, int, str]:
    """(sent, first token, last token) as monotonic times, completion tokens, text."""
    sent = time.monotonic()
    first = last = 0.0
    tokens, parts = 0, []
    async with http.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    now = time.monotonic()
                    first = first or now
                    last = now
                    parts.append(choice["delta"]["content"])
    return sent, first, last, tokens, "".join(parts)


async def _decode_rate(url: str, body: dict[str, Any], streams: int) -> tuple[float, float]:
    """Tokens/s of `ROUNDS[streams]` rounds of `streams` concurrent answers (all tokens of a
    round over its wall time, prefill included: both sides prefill the same prompt), and the
    mean completion length."""
    tokens, seconds, lengths = 0, 0.0, []
    async with httpx.AsyncClient(timeout=300) as http:
        for _ in range(ROUNDS[streams]):
            results = await asyncio.gather(*(_stream(http, url, {**body, "seed": n}) for n in range(streams)))
            seconds += max(last for _, _, last, _, _ in results) - min(sent for sent, _, _, _, _ in results)
            tokens += sum(count for _, _, _, count, _ in results)
            lengths.extend(count for _, _, _, count, _ in results)
    return tokens / seconds, statistics.mean(lengths)


def _chat(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}


def mask_cost(url: str, passes: int) -> dict[str, Any]:
    """Part 1: masks only, constrained against unconstrained answers of the same length, rounds
    alternating so that the shared machine's drift hits both sides alike."""
    constrained = _chat(EMAIL, max_tokens=MAX_TOKENS, response_format=_response_format(EXTRACTION_SCHEMA))
    _, length = asyncio.run(_decode_rate(url, constrained, 1))
    plain = _chat(EMAIL, max_tokens=max(2, round(length)), ignore_eos=True)
    figures: dict[str, Any] = {}
    for streams in (1, 8):
        on, off = [], []
        for _ in range(passes):
            on.append(asyncio.run(_decode_rate(url, constrained, streams))[0])
            off.append(asyncio.run(_decode_rate(url, plain, streams))[0])
        figures[f"{streams}_streams"] = {
            "constrained_tok_s": statistics.median(on),
            "unconstrained_tok_s": statistics.median(off),
            "cost": 1 - statistics.median(on) / statistics.median(off),
            "answer_tokens": length,
        }
    return figures


def forced_gain(url_skip: str, url_steps: str, passes: int) -> dict[str, float]:
    """Part 2: one stream, answer tokens/s with forced tokens verified in one run or stepped."""
    body = _chat(FORM_PROMPT, max_tokens=MAX_TOKENS, response_format=_response_format(FORM_SCHEMA))

    async def answer_rate(url: str) -> float:
        async with httpx.AsyncClient(timeout=300) as http:
            rates = []
            for _ in range(ROUNDS[1]):
                sent, _, last, tokens, _ = await _stream(http, url, body)
                rates.append(tokens / (last - sent))
            return statistics.median(rates)

    skip, steps = [], []
    for _ in range(passes):
        skip.append(asyncio.run(answer_rate(url_skip)))
        steps.append(asyncio.run(answer_rate(url_steps)))
    return {"skip_tok_s": statistics.median(skip), "step_tok_s": statistics.median(steps), "gain": statistics.median(skip) / statistics.median(steps)}


def first_token_times(url: str, repeats: int) -> dict[str, float]:
    """Part 3: TTFT of the first constrained request, of new schemas, of a cached schema."""

    async def ttft(schema: dict[str, Any]) -> float:
        async with httpx.AsyncClient(timeout=300) as http:
            sent, first, _, _, _ = await _stream(http, url, _chat(EMAIL, max_tokens=4, response_format=_response_format(schema)))
            return first - sent

    def variant(number: int) -> dict[str, Any]:
        return {**EXTRACTION_SCHEMA, "description": f"variant {number}"}

    first_ever = asyncio.run(ttft(variant(-1)))
    new = [asyncio.run(ttft(variant(number))) for number in range(repeats)]
    cached = [asyncio.run(ttft(variant(0))) for _ in range(repeats)]
    plain = []
    for _ in range(repeats):
        async def plain_ttft() -> float:
            async with httpx.AsyncClient(timeout=300) as http:
                sent, first, _, _, _ = await _stream(http, url, _chat(EMAIL, max_tokens=4))
                return first - sent
        plain.append(asyncio.run(plain_ttft()))
    return {
        "first_constrained_ms": first_ever * 1e3,
        "new_schema_ms": statistics.median(new) * 1e3,
        "cached_schema_ms": statistics.median(cached) * 1e3,
        "unconstrained_ms": statistics.median(plain) * 1e3,
    }


def in_process(state_dir: Path) -> dict[str, Any]:
    """Part 4: compile times over the test schemas, mask application at SmolLM2's vocabulary."""
    import llguidance.numpy as llnp

    from appliance.generation.grammar import Constraint, GrammarCompiler, constrain_rows
    from appliance.repository.store import ModelRepository
    from tests.helpers.schemas import TEST_SCHEMAS

    version = ModelRepository(state_dir / "models").get(MODEL)
    spec = version.manifest.generation
    assert spec is not None
    compiler = GrammarCompiler(version.path / "tokenizer.json", vocab_size=spec.vocab_size, eos_ids=spec.eos_token_ids)
    started = time.perf_counter()
    compiler.tokenizer()
    index_s = time.perf_counter() - started
    times = []
    for schema in [*TEST_SCHEMAS, EXTRACTION_SCHEMA, FORM_SCHEMA]:
        started = time.perf_counter()
        compiled = compiler.compile_now(Constraint("json_schema", json.dumps(schema), strict=True))
        times.append(time.perf_counter() - started)
        compiled.start()
    ours, theirs = {}, {}
    grammar = compiler.compile_now(Constraint("json_schema", json.dumps(EXTRACTION_SCHEMA), strict=True))
    for rows in (1, 8):
        states = [grammar.start() for _ in range(rows)]
        logits = np.random.default_rng(0).standard_normal((rows, spec.vocab_size)).astype(np.float32)
        samples = []
        for _ in range(200):
            block = logits.copy()
            started = time.perf_counter()
            constrain_rows(block, list(enumerate(states)))
            samples.append(time.perf_counter() - started)
        ours[rows] = statistics.median(samples) * 1e6
        mask = llnp.allocate_token_bitmask(rows, spec.vocab_size)
        samples = []
        for _ in range(200):
            block = logits.copy()
            started = time.perf_counter()
            for index, state in enumerate(states):
                llnp.fill_next_token_bitmask(state.matcher, mask, index)
            llnp.apply_token_bitmask_inplace(block, mask)
            samples.append(time.perf_counter() - started)
        theirs[rows] = statistics.median(samples) * 1e6
    ordered = sorted(times)
    return {
        "vocabulary_index_ms": index_s * 1e3,
        "schemas": len(times),
        "compile_ms_p50": statistics.median(ordered) * 1e3,
        "compile_ms_p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1e3,
        "compile_ms_max": ordered[-1] * 1e3,
        "mask_us_1_row": ours[1],
        "mask_us_8_rows": ours[8],
        "llguidance_numpy_us_1_row": theirs[1],
        "llguidance_numpy_us_8_rows": theirs[8],
    }


def engine_cost(state_dir: Path, passes: int) -> dict[str, Any]:
    """Part 5: the same comparison inside one engine, without HTTP: greedy answers of the same
    length, constrained and not, 1 and 8 at once, alternating; all tokens over wall time."""
    from appliance.config import GenerationSettings
    from appliance.generation.engine import GenerationEngine
    from appliance.generation.grammar import Constraint
    from appliance.generation.params import GenerationRequest
    from appliance.repository.store import ModelRepository

    version = ModelRepository(state_dir / "models").get(MODEL)
    engine = GenerationEngine.from_version(version, GenerationSettings(speculative="off", skip_forced_tokens=False))
    engine.start()
    assert engine.chat_template is not None
    prompt = engine.tokenizer.encode(engine.chat_template.render([{"role": "user", "content": EMAIL}]), special_text=True)
    grammar = engine.grammars.compile_now(Constraint("json_schema", json.dumps(EXTRACTION_SCHEMA), strict=True))

    async def rate(request: GenerationRequest, streams: int) -> tuple[float, int]:
        async def one() -> int:
            return sum(len(event.token_ids) for event in [event async for event in engine.generate(list(prompt), request)])

        started = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        return sum(counts) / (time.perf_counter() - started), counts[0]

    try:
        _, length = asyncio.run(rate(GenerationRequest(max_tokens=MAX_TOKENS, temperature=0.0, grammar=grammar), 1))
        constrained = GenerationRequest(max_tokens=MAX_TOKENS, temperature=0.0, grammar=grammar)
        plain = GenerationRequest(max_tokens=length, temperature=0.0, ignore_eos=True)
        figures: dict[str, Any] = {"answer_tokens": length}
        for streams in (1, 8):
            on: list[float] = []
            off: list[float] = []
            for _ in range(passes):
                on.append(asyncio.run(rate(constrained, streams))[0])
                off.append(asyncio.run(rate(plain, streams))[0])
            figures[f"{streams}_streams"] = {
                "constrained_tok_s": statistics.median(on),
                "unconstrained_tok_s": statistics.median(off),
                "cost": 1 - statistics.median(on) / statistics.median(off),
            }
        return figures
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, help="A state directory with SmolLM2 int4 exported (default: export one).")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    state_dir = args.state_dir
    if state_dir is None:
        from appliance.repository.store import ModelRepository
        from tests.helpers.decoders import export_smollm2_variant

        state_dir = Path(tempfile.mkdtemp(prefix="structured-bench-"))
        export_smollm2_variant(ModelRepository(state_dir / "models"), "int4")
    print(f"machine: {machine()}")
    print(json.dumps({"in_process": in_process(state_dir)}, indent=2), flush=True)
    print(json.dumps({"engine_cost": engine_cost(state_dir, args.passes)}, indent=2), flush=True)
    plain_steps = {"APPLIANCE_GENERATION__SPECULATIVE": "off", "APPLIANCE_GENERATION__SKIP_FORCED_TOKENS": "false"}
    with Server(state_dir, extra_env=plain_steps) as masks_only:
        print(json.dumps({"mask_cost": mask_cost(masks_only.url, args.passes)}, indent=2), flush=True)
        with Server(state_dir, extra_env={"APPLIANCE_GENERATION__SPECULATIVE": "off"}) as skipping:
            print(json.dumps({"time_to_first_token": first_token_times(skipping.url, args.repeats)}, indent=2), flush=True)
            print(json.dumps({"forced_tokens": forced_gain(skipping.url, masks_only.url, args.passes)}, indent=2), flush=True)


if __name__ == "__main__":
    main()
