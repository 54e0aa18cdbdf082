"""The serving engine itself on a GPU: placement, greedy agreement, TTFT and decode speed.

Where scripts/gpu_decoder.py times a plain loop, this runs `GenerationEngine` (continuous
batching, the KV cache in GPU memory, the scheduler, sampling) in-process on a model version
from a state directory, as `appliance serve` would load it, without HTTP. The version must be
in the CUDA layout (`appliance export --quant fp16`) or the engine stays on the CPU and says so.

    # here: the CPU record of the greedy tokens (slow on the CPU; once)
    python scripts/gpu_engine.py record STATE_DIR MODEL
    # on the GPU box (after scripts/gpu_bundle.sh has installed the appliance there):
    python scripts/gpu_engine.py run STATE_DIR MODEL [--streams 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from appliance.benchmark.stats import StreamTiming, concurrent_stream_figures
from appliance.config import GenerationSettings
from appliance.generation.engine import GenerationEngine
from appliance.generation.params import GenerationRequest
from appliance.repository.store import ModelRepository

RECORD_FILE = "gpu-engine-record.json"
PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short note to a colleague about moving Monday's meeting to Tuesday.",
    "List three ways a small clinic can keep patient records safe.",
    "What is the difference between a virus and a bacterium?",
    "Summarise the rules of chess for a child.",
    "Give two tips for writing clear emails.",
    "Why do leaves change colour in autumn?",
    "Describe a good morning routine for a student.",
]
RECORD_TOKENS = 32
NEW_TOKENS = 128


def _engine(state_dir: Path, model: str, slots: int, providers: str, *, prefix_cache: bool = True) -> GenerationEngine:
    version = ModelRepository(state_dir / "models").serving_version(model)
    if version is None:
        raise SystemExit(f"no deployable version of {model} in {state_dir}")
    settings = GenerationSettings(max_running_sequences=slots, speculative="off", prefix_cache=prefix_cache)
    engine = GenerationEngine.from_version(version, settings, providers=providers)  # type: ignore[arg-type]
    engine.start()
    return engine


def _prompt_ids(engine: GenerationEngine, text: str) -> list[int]:
    assert engine.chat_template is not None
    rendered = engine.chat_template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    return engine.tokenizer.encode(rendered, special_text=True)


def _greedy(tokens: int) -> GenerationRequest:
    return GenerationRequest(max_tokens=tokens, temperature=0.0, ignore_eos=True)


async def _stream(engine: GenerationEngine, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
    """(first token time, last token time, the tokens) from the moment of submission."""
    first, last, out, _ = await _stream_cached(engine, prompt, tokens)
    return first, last, out


async def _stream_cached(engine: GenerationEngine, prompt: list[int], tokens: int) -> tuple[float, float, list[int], int]:
    """`_stream`, and how many prompt tokens came from the prefix cache."""
    started = time.perf_counter()
    first = last = 0.0
    out: list[int] = []
    cached = 0
    async for event in engine.generate(prompt, _greedy(tokens)):
        if event.token_ids:
            last = time.perf_counter() - started
            first = first or last
            out.extend(event.token_ids)
        if event.finish_reason is not None:
            cached = event.cached_prompt_tokens
    return first, last, out, cached


def _same(a: list[int], b: list[int]) -> str:
    """'identical' or where two token lists part."""
    if a == b:
        return "identical"
    return f"part at token {next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))}"


def _consistency(engine: GenerationEngine, state_dir: Path, model: str) -> None:
    """Batched vs alone (sequences leave at different steps, so the survivors' KV is moved on
    the device), and a prefix-cache hit (KV saved to the host and restored) vs no cache."""
    prompts = [_prompt_ids(engine, PROMPTS[i]) for i in range(4)]
    budgets = [16, 24, 32, 40]
    alone = [asyncio.run(_stream(engine, prompt, budget))[2] for prompt, budget in zip(prompts, budgets, strict=True)]

    async def together() -> list[list[int]]:
        results = await asyncio.gather(*[_stream(engine, prompt, budget) for prompt, budget in zip(prompts, budgets, strict=True)])
        return [tokens for _, _, tokens in results]

    batched = asyncio.run(together())
    verdicts = [_same(a, b) for a, b in zip(batched, alone, strict=True)]
    print(f"OK   engine batched vs alone (4 sequences, 16-40 tokens): {', '.join(verdicts)}", flush=True)
    system = "You are the assistant of a small town library. " * 4
    first = _prompt_ids(engine, system + "When does the library open on Saturdays?")
    second = _prompt_ids(engine, system + "How many books may a member borrow?")
    asyncio.run(_stream(engine, first, 16))
    _, _, hit, cached = asyncio.run(_stream_cached(engine, second, 24))
    fresh_engine = _engine(state_dir, model, 1, "auto", prefix_cache=False)
    try:
        fresh = asyncio.run(_stream(fresh_engine, second, 24))[2]
    finally:
        fresh_engine.stop()
    print(f"OK   engine prefix cache: {cached} of {len(second)} prompt tokens restored; answer vs no cache: {_same(hit, fresh)}", flush=True)


def record(state_dir: Path, model: str) -> None:
    engine = _engine(state_dir, model, 1, "cpu")
    try:
        prompt = _prompt_ids(engine, PROMPTS[0])
        _, _, tokens = asyncio.run(_stream(engine, prompt, RECORD_TOKENS))
    finally:
        engine.stop()
    (state_dir / RECORD_FILE).write_text(json.dumps({"model": model, "prompt": prompt, "greedy_cpu": tokens}))
    print(f"recorded {len(tokens)} greedy tokens on the CPU: {engine.tokenizer.decode(tokens)!r}")


def run(state_dir: Path, model: str, streams: list[int]) -> int:
    engine = _engine(state_dir, model, max(streams), "auto")
    try:
        session = engine.runner.session  # type: ignore[attr-defined]
        print(
            f"OK   engine placement: {engine.placement.device} (session providers {session.get_providers()}, "
            f"KV store {type(engine.kv_store).__name__}, {engine.kv_store.nbytes / 2**30:.2f} GiB for "
            f"{max(streams)} x {engine.context_length} tokens){'; ' + engine.placement.note if engine.placement.note else ''}",
            flush=True,
        )
        record_file = state_dir / RECORD_FILE
        if record_file.exists():
            saved = json.loads(record_file.read_text())
            _, _, tokens = asyncio.run(_stream(engine, saved["prompt"], RECORD_TOKENS))
            agree = next((i for i, (a, b) in enumerate(zip(tokens, saved["greedy_cpu"], strict=False)) if a != b), len(tokens))
            print(f"OK   engine greedy: agrees with the CPU record for {agree}/{len(tokens)} tokens: {engine.tokenizer.decode(tokens)!r}", flush=True)
        _consistency(engine, state_dir, model)
        prompts = [_prompt_ids(engine, PROMPTS[i % len(PROMPTS)]) for i in range(max(streams))]
        asyncio.run(_stream(engine, prompts[0], 8))  # warm-up
        for count in streams:
            runs = [asyncio.run(_together(engine, prompts[:count])) for _ in range(3)]
            ttft, total, decode = (statistics.median(run[key] for run in runs) for key in ("ttft_s", "aggregate_tok_s", "decode_tok_s"))
            print(
                f"OK   engine {count} stream(s) x {NEW_TOKENS} tokens: TTFT median {ttft * 1e3:.1f} ms, "
                f"{total:.0f} tokens/s over the run, {decode:.0f} tokens/s after every first token",
                flush=True,
            )
    finally:
        engine.stop()
    return 0


async def _together(engine: GenerationEngine, prompts: list[list[int]]) -> dict[str, float]:
    """TTFT, aggregate and decode-phase tokens/s of the prompts streamed at once."""
    results = await asyncio.gather(*[_stream(engine, prompt, NEW_TOKENS) for prompt in prompts])
    return concurrent_stream_figures([StreamTiming(first, last, len(tokens)) for first, last, tokens in results])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("record", "run"):
        command = sub.add_parser(name)
        command.add_argument("state_dir", type=Path)
        command.add_argument("model")
        if name == "run":
            command.add_argument("--streams", default="1,8,32", help="comma-separated counts of concurrent streams")
    args = parser.parse_args()
    if args.command == "record":
        record(args.state_dir, args.model)
        return 0
    return run(args.state_dir, args.model, [int(n) for n in args.streams.split(",")])


if __name__ == "__main__":
    raise SystemExit(main())
