"""Benchmark: fp32-exact output through 4-bit self-speculation at the sizes users run (issue 18):
plain fp32 decoding against fp32 verifying drafts from the same model's 4-bit version.

Why at these sizes: at 135M a 4-bit draft step costs ~0.45 of an fp32 step on two cores (per-
node overhead), so speculation paid 1.15-1.32x. At 0.5B-1.5B a decode step is bound by the
bytes it reads, and an int4-exact draft reads about a sixth of fp32's, so the same acceptance
should pay more. From a Q4_0 file the fp32 export is the dequantised Q4_0 weights and the
int4-exact draft the same weights in 4 bits, so they disagree only where MatMulNBits' int8
activations flip a near-tie.

What runs, in one invocation on one box: the shape's GGUF (bench/gguf_shapes.py, seeded random
weights), exported twice under one name (`--quant fp32` and `--quant DRAFT`, reused when a
version from the same file is there); two private servers of the fp32 version, alive at once,
one with `generation.speculative = "off"`, one with `"draft"` (the 4-bit version linked beside
it); single-stream greedy decoding of `--new-tokens` after a seeded `--prompt-tokens` prompt
(token ids through /v1/completions, EOS ignored), the servers' passes alternating, each the
median of `--repeats` quiet-gated passes after a warm-up. Also: whether both answers are the
same text (non-streamed, same request), and the draft's acceptance from the speculative
server's /metrics (accepted / proposed draft tokens over the timed passes).

    .venv/bin/python bench/self_speculation_sizes.py --shape qwen2.5-0.5b --repeats 3 \\
        --json bench/.work/sizes/self-speculation-0.5b.json
    # smoke test (a minute, tiny random model):
    .venv/bin/python bench/self_speculation_sizes.py --shape tiny --repeats 1 --no-gate

Reuses bench/llm_sizes_vs_llamacpp.py's files, exports, prompts, gate and HTTP client. Never
imported by the appliance.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gguf_shapes  # noqa: E402
import llm_sizes_vs_llamacpp as sizes  # noqa: E402
from llm_vs_llamacpp import machine  # noqa: E402

SIDES = ("off", "draft")
#: Counters the speculative server exports (appliance/generation/metrics.py), summed over models.
DRAFT_TOKENS = "appliance_spec_decode_num_draft_tokens_total"
ACCEPTED_TOKENS = "appliance_spec_decode_num_accepted_tokens_total"
#: KV bytes each server reserves: one stream of prompt + new tokens needs far less (Qwen2.5-1.5B
#: in fp32: 57 kB per token).
KV_BUDGET_BYTES = 512 << 20


def counter(metrics_text: str, name: str) -> float:
    """The sum of a Prometheus counter's samples in an exposition text (0 when absent)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(metrics_text))


def draft_counts(side: Any) -> tuple[float, float]:  # noqa: ANN401 - sizes.ApplianceSide
    text = httpx.get(side.server.url + "/metrics", timeout=30).text
    return counter(text, DRAFT_TOKENS), counter(text, ACCEPTED_TOKENS)


def answer_text(side: Any, ids: list[int], new_tokens: int) -> str:  # noqa: ANN401 - sizes.ApplianceSide
    body = {"model": side.model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    response = httpx.post(side.server.url + "/v1/completions", json=body, timeout=3600)
    if response.status_code != 200:
        raise RuntimeError(f"appliance answered {response.status_code}: {response.text[:500]}")
    return str(response.json()["choices"][0]["text"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    from appliance.offline import enforce_offline

    enforce_offline()
    gate = sizes.Gate(args.max_foreign, args.quiet_wait_s, args.max_tries, enabled=not args.no_gate)
    args.pair = [f"{args.type}:fp32", f"{args.type}:{args.draft}"]
    target_pair, draft_pair = sizes.resolve_pairs(args)
    target, target_facts = sizes.ensure_export(target_pair, args)
    draft, draft_facts = sizes.ensure_export(draft_pair, args)
    ids = sizes.prompt_ids(target_pair.gguf_file, args.seed).decode[args.prompt_tokens]
    raw: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    texts: dict[str, str] = {}
    drafted = [0.0, 0.0]  # proposed, accepted over the timed passes

    def open_side(side: str) -> Any:  # noqa: ANN401 - sizes.ApplianceSide
        return sizes.ApplianceSide(
            target, args.work, args.threads, 1, args.prefill_chunk_tokens,
            extra_env={
                "APPLIANCE_GENERATION__SPECULATIVE": side,
                # One stream needs little KV memory; the default reservation would count
                # against each server's memory budget.
                "APPLIANCE_GENERATION__KV_BUDGET_BYTES": str(KV_BUDGET_BYTES),
                **({"APPLIANCE_SERVING__MEMORY_BUDGET_BYTES": str(args.memory_budget_gib << 30)} if args.memory_budget_gib else {}),
            },
            companions=(draft,) if side == "draft" else (),
        )

    def measure(servers: dict[str, Any]) -> None:
        for side, server in servers.items():
            texts[side] = answer_text(server, ids, args.new_tokens)  # also the warm-up
        before = draft_counts(servers["draft"]) if "draft" in servers else (0.0, 0.0)
        for repeat in range(args.repeats):
            for side, server in servers.items():
                figures = gate.run({os.getpid(), server.pid}, lambda server=server: server.single(ids, args.new_tokens))
                raw[side].append(figures)
                print(f"speculative {side} pass {repeat + 1}: {sizes._brief(figures)}", flush=True)
        if "draft" in servers:
            after = draft_counts(servers["draft"])
            drafted[:] = [after[0] - before[0], after[1] - before[1]]

    if args.one_at_a_time:  # an fp32 model too large for two servers at once
        for side in SIDES:
            with open_side(side) as server:
                measure({side: server})
    else:
        with ExitStack() as stack:
            measure({side: stack.enter_context(open_side(side)) for side in SIDES})
    proposed, accepted = drafted
    summary = {side: sizes.medians(passes) for side, passes in raw.items()}
    speedup = (summary["draft"]["decode_tok_s"] / summary["off"]["decode_tok_s"]) if summary["off"].get("decode_tok_s") else None
    return {
        "command": " ".join(sys.argv),
        "box": {"machine": machine(), "cpu_flags": sizes.cpu_flags()},
        "shape": args.shape, "file": target_pair.gguf_file.name, "draft": args.draft, "threads": args.threads,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats, "gated": not args.no_gate,
        "side_by_side": not args.one_at_a_time,
        "weights_read_per_token": {"fp32": sizes.appliance_weight_bytes(target), args.draft: sizes.appliance_weight_bytes(draft)},
        "exports": {"fp32": target_facts, args.draft: draft_facts},
        "sides": summary,
        "speedup": speedup,
        "identical_output": texts["off"] == texts["draft"],
        "draft_tokens_proposed": proposed,
        "draft_acceptance": accepted / proposed if proposed else None,
        "passes": {side: [sizes._strip(p) for p in passes] for side, passes in raw.items()},
    }


def print_report(report: dict[str, Any]) -> None:
    box = report["box"]
    weights = report["weights_read_per_token"]
    print(f"\nmachine: {box['machine']}; flags {' '.join(box['cpu_flags']) or '-'}; {report['shape']} from {report['file']}, {report['threads']} threads")
    print(f"weights read per token: fp32 {weights['fp32'] / 1e6:,.0f} MB, {report['draft']} draft {weights[report['draft']] / 1e6:,.0f} MB")
    for side in SIDES:
        figures = report["sides"][side]
        print(
            f"fp32, speculation {side:5s}: {figures.get('decode_tok_s', 0):6.1f} tok/s decode, "
            f"TTFT {figures.get('ttft_s', 0):.2f} s, ITL p50 {figures.get('itl_p50_s', 0) * 1000:.0f} ms "
            f"(foreign CPU max {max(figures['foreign_cpu_shares']):.0%})"
        )
    acceptance = report["draft_acceptance"]
    speedup = f"{report['speedup']:.2f}x" if report["speedup"] is not None else "-"
    drafted = (
        f"acceptance {acceptance:.2f} over {report['draft_tokens_proposed']:.0f} proposed draft tokens"
        if acceptance is not None
        else "no draft tokens proposed (the engine's cost model found no draft length that pays)"
    )
    print(f"speed-up {speedup} (target >= 2x), identical output: {report['identical_output']}, {drafted}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(gguf_shapes.SHAPES), required=True)
    parser.add_argument("--type", default="Q4_0", help="the GGUF file type both exports read (default Q4_0)")
    parser.add_argument("--draft", choices=("int4-exact", "int4"), default="int4-exact")
    parser.add_argument("--prompt-tokens", type=int, choices=sizes.DECODE_PROMPTS, default=sizes.DECODE_PROMPTS[0])
    parser.add_argument("--work", type=Path, default=sizes.DEFAULT_WORK)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=sizes.NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=gguf_shapes.DEFAULT_SEED)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256)
    parser.add_argument(
        "--memory-budget-gib", type=int,
        help="serving.memory_budget_bytes of each server (default: the appliance's, whose estimate before a first load, 2x the files, keeps two fp32 1.5B servers from starting; 20 lets them: 7.0 and 8.6 GiB resident)",
    )
    parser.add_argument(
        "--one-at-a-time", action="store_true",
        help="serve the two sides in turn, not side by side (an fp32 model whose two servers do not fit in memory at once)",
    )
    parser.add_argument("--fresh-export", action="store_true", help="export new versions even when ones from the same file are there")
    sizes.add_gate_arguments(parser)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.kv_cache = "fp32"
    report = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)


if __name__ == "__main__":
    main()
