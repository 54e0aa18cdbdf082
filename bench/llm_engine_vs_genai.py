"""Benchmark: our generation engine against onnxruntime-genai's own C++ loop, in-process.

The design question (issue 8): drive the model-builder graph ourselves (raw ONNX Runtime
session, IO binding, one preallocated KV buffer per layer shared between past and present,
continuous batching in Python) or hand the loop to onnxruntime-genai (og.Generator). Both run
the same exported version folder (the genai_config.json the export writes), same threads, no
HTTP. Alternating passes, median of `--repeats`, after a warm-up:

* single stream: ~106-token chat prompt, 128 new tokens, greedy, EOS ignored: prefill (time to
  the first token) and decode tokens/s (tokens 2..128);
* 8 streams: 8 different prompts submitted together; aggregate generated tokens/s over the
  whole run and during the decode phase.

    .venv/bin/python bench/llm_engine_vs_genai.py --model STATE_DIR/models/NAME/VERSION [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.offline import enforce_offline  # noqa: E402

enforce_offline()

from appliance.benchmark.stats import StreamTiming, concurrent_stream_figures  # noqa: E402
from appliance.config import GenerationSettings  # noqa: E402
from appliance.generation.engine import GenerationEngine  # noqa: E402
from appliance.generation.params import GenerationRequest  # noqa: E402
from appliance.repository.store import read_version  # noqa: E402

NEW_TOKENS = 128
USER_PROMPT = (
    "Explain to a new colleague, in plain words, how a small on-premises inference appliance turns a "
    "downloaded language model into a service: converting the weights, quantising them to four bits, "
    "checking the quality against the original, and serving answers over a local network with API keys, "
    "metrics and a web page for administrators. Keep it friendly and concrete."
)
TOPICS = ["rivers", "bread", "bicycles", "libraries", "volcanoes", "gardens", "trains", "music"]


def machine() -> str:
    name = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"{name}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"


def prompts(engine: GenerationEngine) -> tuple[list[int], list[list[int]]]:
    assert engine.chat_template is not None
    one = engine.tokenizer.encode(engine.chat_template.render([{"role": "user", "content": USER_PROMPT}]), special_text=True)
    many = [
        engine.tokenizer.encode(
            engine.chat_template.render([{"role": "user", "content": USER_PROMPT.replace("language model", f"model about {topic}")}]),
            special_text=True,
        )
        for topic in TOPICS
    ]
    return one, many


async def _stream(engine: GenerationEngine, ids: list[int], start: float) -> tuple[float, float, int]:
    first = last = 0.0
    count = 0
    async for event in engine.generate(ids, GenerationRequest(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, speculate=False)):
        now = time.perf_counter()
        if event.token_ids and not first:
            first = now
        count += len(event.token_ids)
        last = now
    return first - start, last - start, count


def engine_pass(engine: GenerationEngine, batch: list[list[int]]) -> dict[str, float]:
    async def run() -> list[tuple[float, float, int]]:
        start = time.perf_counter()
        return await asyncio.gather(*[_stream(engine, ids, start) for ids in batch])

    results = asyncio.run(run())
    return _figures(results)


def _figures(results: list[tuple[float, float, int]]) -> dict[str, float]:
    return concurrent_stream_figures([StreamTiming(first, last, count) for first, last, count in results])


def genai_pass(model_dir: Path, batch: list[list[int]], threads: int) -> dict[str, float]:
    import onnxruntime_genai as og

    og.disable_telemetry_events() if hasattr(og, "disable_telemetry_events") else None
    model = _genai_model(model_dir, threads)
    params = og.GeneratorParams(model)
    longest = max(len(ids) for ids in batch)
    params.set_search_options(max_length=longest + NEW_TOKENS, do_sample=False, batch_size=len(batch))
    generator = og.Generator(model, params)
    pad = 2
    tokens = np.full((len(batch), longest), pad, np.int32)
    for row, ids in enumerate(batch):
        tokens[row, longest - len(ids) :] = ids  # genai pads on the left
    start = time.perf_counter()
    generator.append_tokens(tokens)
    generator.generate_next_token()
    first = time.perf_counter() - start
    for _ in range(NEW_TOKENS - 1):
        generator.generate_next_token()
    last = time.perf_counter() - start
    return _figures([(first, last, NEW_TOKENS)] * len(batch))


_GENAI_MODELS: dict[Path, Any] = {}


def genai_folder(model_dir: Path, scratch: Path) -> Path:
    """The version folder as onnxruntime-genai can run it: the export adds a `logits_start`
    input (a Slice before the LM head) that genai does not feed. The copy drops the Slice;
    weights and the other files are hard links where the filesystem allows (ONNX Runtime
    refuses external data reached through a symlink out of the model's folder)."""
    import onnx

    from appliance.export.llm.logits_start import strip_logits_start

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    if not strip_logits_start(model):
        return model_dir
    scratch.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.name != "model.onnx" and not (scratch / path.name).exists():
            try:
                os.link(path, scratch / path.name)
            except OSError:
                shutil.copyfile(path, scratch / path.name)
    onnx.save(model, str(scratch / "model.onnx"))
    return scratch


def _genai_model(model_dir: Path, threads: int) -> Any:
    import onnxruntime_genai as og

    if model_dir not in _GENAI_MODELS:
        config = og.Config(str(model_dir))
        config.clear_providers()
        _GENAI_MODELS[model_dir] = og.Model(config)
    return _GENAI_MODELS[model_dir]


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a published text-generation version folder (genai graph)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    version = read_version(args.model)
    engine = GenerationEngine.from_version(
        version, GenerationSettings(kv_budget_bytes=2 << 30, speculative="off", prefix_cache=False), threads=args.threads, max_len=1024
    )
    engine.start()
    one, many = prompts(engine)
    results: dict[str, list[dict[str, float]]] = {"engine_1": [], "genai_1": [], "engine_8": [], "genai_8": []}
    with tempfile.TemporaryDirectory() as scratch:
        genai_dir = genai_folder(args.model, Path(scratch) / "genai")
        engine_pass(engine, [one])
        genai_pass(genai_dir, [one], args.threads)
        for _ in range(args.repeats):
            results["engine_1"].append(engine_pass(engine, [one]))
            results["genai_1"].append(genai_pass(genai_dir, [one], args.threads))
            results["engine_8"].append(engine_pass(engine, many))
            results["genai_8"].append(genai_pass(genai_dir, many, args.threads))
    engine.stop()
    figures = {name: median(runs) for name, runs in results.items()}
    print(f"machine: {machine()}; model {version.name} v{version.version} ({version.manifest.quantization}); prompt {len(one)} tokens; threads {args.threads}")
    print(f"{'run':<10}{'TTFT ms':>10}{'aggregate tok/s':>18}{'decode tok/s':>15}")
    for name, value in figures.items():
        print(f"{name:<10}{value['ttft_s'] * 1000:>10.0f}{value['aggregate_tok_s']:>18.1f}{value['decode_tok_s']:>15.1f}")
    print(
        f"ratios engine/genai: single decode {figures['engine_1']['decode_tok_s'] / figures['genai_1']['decode_tok_s']:.2f}x, "
        f"8-stream aggregate {figures['engine_8']['aggregate_tok_s'] / figures['genai_8']['aggregate_tok_s']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "figures": figures, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
