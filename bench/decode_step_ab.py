"""Benchmark: the single-stream decode step of two or more exported versions, side by side in
one process, their timed runs alternating.

Why: a change to how weights are stored (bits, block size, zero points) shows up first as the
time of one decode step, and on the shared 2-core boxes the drift between two runs of a
benchmark is as large as the change itself. Here every version's session stays open and their
greedy runs alternate (A, B, A, B, ...), so drift hits them alike; each figure is the median
over `--repeats` runs of the median step time within a run.

What runs: the export's own decoder loop (export/llm/onnx_decoder.py: one ONNX Runtime session,
batch 1, the KV cache copied from present to past each step, as the export's evaluation runs
it), a `--prompt-tokens` prompt of seeded token ids, then `--new-tokens` greedy steps. The
serving engine's IO binding is not in the loop, so compare ratios, not absolute tokens/s, with
the HTTP figures of llm_sizes_vs_llamacpp.py. Each version's weight bytes (the model's external
data) are printed beside its step time, with the bytes a step reads per second.

    .venv/bin/python bench/decode_step_ab.py --model STATE/models/NAME/1 --model STATE/models/NAME/2
    # options: --repeats 7, --new-tokens 48, --prompt-tokens 100, --threads 2, --json FILE

Needs a quiet machine (it does not gate itself). Never imported by the appliance.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.offline import enforce_offline  # noqa: E402

enforce_offline()

from appliance.export.llm.onnx_decoder import OnnxDecoder  # noqa: E402
from appliance.repository.store import read_version  # noqa: E402

#: Token ids below this are left out of prompts (control and byte tokens in most vocabularies).
FIRST_PROMPT_ID = 3


def weight_bytes(version_dir: Path) -> int:
    """Bytes of the model's files: the graph and its external data."""
    return sum(p.stat().st_size for p in version_dir.iterdir() if p.name.startswith("model.onnx"))


def median_step_s(decoder: OnnxDecoder, prompt: list[int], new_tokens: int) -> float:
    _, timing = decoder.greedy_timed(prompt, new_tokens)
    return statistics.median(timing.decode_step_s)


def compare(models: list[Path], *, repeats: int, new_tokens: int, prompt_tokens: int, threads: int, seed: int = 0) -> list[dict[str, Any]]:
    versions = [read_version(path) for path in models]
    specs = [version.manifest.generation for version in versions]
    if any(spec is None for spec in specs):
        raise SystemExit("every --model must be a text-generation version folder")
    vocab = min(spec.vocab_size for spec in specs if spec is not None)
    prompt = np.random.default_rng(seed).integers(FIRST_PROMPT_ID, vocab, prompt_tokens).tolist()
    decoders = [OnnxDecoder(version.model_path, spec, threads) for version, spec in zip(versions, specs, strict=True) if spec]
    for decoder in decoders:  # warm-up: allocations, thread pools, page cache
        median_step_s(decoder, prompt, new_tokens)
    steps: list[list[float]] = [[] for _ in decoders]
    for _ in range(repeats):
        for index, decoder in enumerate(decoders):
            steps[index].append(median_step_s(decoder, prompt, new_tokens))
    rows = []
    for version, runs in zip(versions, steps, strict=True):
        step = statistics.median(runs)
        size = weight_bytes(version.path)
        rows.append(
            {
                "model": str(version.path),
                "variant": version.variant,
                "weight_bytes": size,
                "step_ms": round(step * 1e3, 3),
                "tok_s": round(1 / step, 2),
                "weight_gb_s": round(size / step / 1e9, 2),
                "runs_ms": [round(run * 1e3, 3) for run in runs],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", required=True, help="version folder (give two or more)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if len(args.model) < 2:
        parser.error("give --model at least twice")
    print(f"load before: {os.getloadavg()}", flush=True)
    rows = compare(args.model, repeats=args.repeats, new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, threads=args.threads)
    print(f"load after: {os.getloadavg()}")
    base = rows[0]["step_ms"]
    print("| model | variant | weights MB | step ms | tok/s | weights GB/s | vs first |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['model']} | {row['variant']} | {row['weight_bytes'] / 1e6:,.0f} | {row['step_ms']:.1f} | "
            f"{row['tok_s']:.1f} | {row['weight_gb_s']:.1f} | {base / row['step_ms']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
