"""Benchmark: time to first token and decode over an int8 KV cache, prompt chunks through the
int8 attention kernel against prompt chunks in fp32 (export/llm/kv_prefill.py), beside the
fp32 cache, on the same weights, in one process, through the engine's own runner.

Why: ONNX Runtime 1.32's CPU GroupQueryAttention runs a multi-token query over an int8 cache
3-4x slower than over fp32, so `--kv-cache int8` cost a long prompt's first token what it
saved in memory. The int8 export now branches: prompt chunks attend in fp32 over the
dequantised past, decode steps keep the int8 kernel. The same int8 graph runs both ways here
(its `fp32_attention` input false reproduces the previous export exactly), so the comparison
needs one version with an fp32 cache:

    .venv/bin/python bench/kv_int8_prompts.py STATE/models/NAME/VERSION --prompt 2000 --chunk 256

Three sides, alternating, `--repeats` quiet-gated passes after a warm-up each: "fp32 cache",
"int8, prompt via int8 kernel", "int8, prompt in fp32". Per side: the prompt's chunks (time to
first token without HTTP), then `--decode` greedy steps (median step). The int8 scales are the
export's own calibration (kv_quant.calibrate) over seeded random prompts of the version's
vocabulary. Also reported: whether each side's greedy continuation matches the fp32 cache's,
and the largest logit difference after the prompt. Never imported by the appliance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llm_sizes_vs_llamacpp as sizes  # noqa: E402
from llm_vs_llamacpp import machine  # noqa: E402

SIDES = ("fp32 cache", "int8, prompt via int8 kernel", "int8, prompt in fp32")
#: Seeded calibration prompts: this many, of this many tokens each.
CALIBRATION_PROMPTS = 4
CALIBRATION_TOKENS = 256


class Side:
    """One graph with its own KV store and runner, as the engine drives it."""

    def __init__(self, model_path: Path, spec: Any, threads: int, max_len: int, chunk: int, prompt_in_fp32: bool) -> None:  # noqa: ANN401
        from appliance.generation.model_runner import KvGeometry, KvStore, make_runner, open_decoder_session

        session = open_decoder_session(model_path, threads=threads, takes_turns=True)
        self.kv = KvStore(KvGeometry.from_spec(spec), max_slots=1, max_len=max_len)
        self.runner = make_runner(session, spec, self.kv, max_rows_x_width=chunk)
        self.prompt_in_fp32 = prompt_in_fp32
        self.chunk = chunk

    def prefill(self, ids: list[int]) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        logits = np.empty(0)
        for start in range(0, len(ids), self.chunk):
            part = ids[start : start + self.chunk]
            logits = self.runner.forward(
                0, np.asarray([part], np.int64), np.asarray([start]), np.asarray([len(part)]), all_logits=False, prompt=self.prompt_in_fp32
            )
        return time.perf_counter() - started, logits[0].copy()

    def decode(self, first: int, past: int, steps: int) -> tuple[list[float], list[int]]:
        token, times, tokens = first, [], []
        for step in range(steps):
            started = time.perf_counter()
            logits = self.runner.forward(
                0, np.asarray([[token]], np.int64), np.asarray([past + step]), np.ones(1, np.int64), all_logits=False
            )
            times.append(time.perf_counter() - started)
            token = int(logits[0].argmax())
            tokens.append(token)
        return times, tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.export.llm import kv_quant
    from appliance.export.llm.onnx_decoder import OnnxDecoder
    from appliance.repository.manifest import Manifest

    manifest = Manifest.model_validate_json((args.version / "manifest.json").read_text())
    spec = manifest.generation
    if spec is None or spec.graph != "genai" or spec.kv_datatype != "FP32":
        raise SystemExit(f"{args.version}: give a model-builder ('genai') decoder version with an fp32 KV cache")
    rng = np.random.default_rng(args.seed)
    vocab = spec.vocab_size
    calibration = [rng.integers(3, vocab, CALIBRATION_TOKENS).tolist() for _ in range(CALIBRATION_PROMPTS)]
    prompt = rng.integers(3, vocab, args.prompt).tolist()
    gate = sizes.Gate(args.max_foreign, args.quiet_wait_s, args.max_tries, enabled=not args.no_gate)
    with tempfile.TemporaryDirectory(dir=args.version.parent) as folder:
        fp32_path = args.version / manifest.model_file
        started = time.perf_counter()
        scales = kv_quant.calibrate(OnnxDecoder(fp32_path, spec, args.threads), calibration)
        int8_path = Path(folder) / manifest.model_file
        int8_spec = kv_quant.write_int8_kv(fp32_path, int8_path, spec, scales)
        prepare_s = time.perf_counter() - started
        max_len = args.prompt + args.decode + args.chunk
        sides = {
            SIDES[0]: Side(fp32_path, spec, args.threads, max_len, args.chunk, True),
            SIDES[1]: Side(int8_path, int8_spec, args.threads, max_len, args.chunk, False),
            SIDES[2]: Side(int8_path, int8_spec, args.threads, max_len, args.chunk, True),
        }
        raw: dict[str, list[dict[str, Any]]] = {name: [] for name in SIDES}
        answers: dict[str, tuple[np.ndarray, list[int]]] = {}

        def one_pass(side: Side) -> dict[str, Any]:
            ttft, logits = side.prefill(prompt)
            times, tokens = side.decode(int(logits.argmax()), len(prompt), args.decode)
            return {"ttft_s": ttft, "decode_step_ms": statistics.median(times) * 1000, "_logits": logits, "_tokens": tokens}

        for name, side in sides.items():  # warm-up, and the answers compared below
            figures = one_pass(side)
            answers[name] = (figures["_logits"], figures["_tokens"])
        for _ in range(args.repeats):
            for name, side in sides.items():
                figures = gate.run({os.getpid()}, lambda side=side: one_pass(side))
                raw[name].append({key: value for key, value in figures.items() if not key.startswith("_")})
    reference_logits, reference_tokens = answers[SIDES[0]]
    result: dict[str, Any] = {
        "machine": machine(),
        "version": str(args.version),
        "model": manifest.name,
        "quantization": manifest.quantization,
        "prompt_tokens": args.prompt,
        "chunk_tokens": args.chunk,
        "decode_steps": args.decode,
        "threads": args.threads,
        "calibrate_and_write_s": round(prepare_s, 1),
        "sides": {},
    }
    for name in SIDES:
        logits, tokens = answers[name]
        agree = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens, strict=True)) if a != b), len(tokens))
        result["sides"][name] = {
            **sizes.medians(raw[name]),
            "max_logit_difference_after_prompt": round(float(np.abs(logits - reference_logits).max()), 5),
            "greedy_tokens_matching_fp32_cache": f"{agree}/{len(tokens)}",
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", type=Path, help="a published decoder version folder with an fp32 KV cache")
    parser.add_argument("--prompt", type=int, default=2000, help="prompt tokens")
    parser.add_argument("--chunk", type=int, default=256, help="prefill chunk (the engine's default)")
    parser.add_argument("--decode", type=int, default=32, help="greedy decode steps after the prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    sizes.add_gate_arguments(parser)
    args = parser.parse_args()
    result = run(args)
    reference = result["sides"][SIDES[0]]
    print(f"{result['model']} ({result['quantization']}), {args.prompt}-token prompt in chunks of {args.chunk}, {args.threads} threads")
    print("| side | TTFT s | vs fp32 cache | decode step ms | vs fp32 cache | max logit diff | greedy matching | foreign CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, figures in result["sides"].items():
        print(
            f"| {name} | {figures['ttft_s']:.2f} | {figures['ttft_s'] / reference['ttft_s']:.2f}x | {figures['decode_step_ms']:.1f} | "
            f"{figures['decode_step_ms'] / reference['decode_step_ms']:.2f}x | {figures['max_logit_difference_after_prompt']} | "
            f"{figures['greedy_tokens_matching_fp32_cache']} | {max(figures['foreign_cpu_shares']):.0%} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
