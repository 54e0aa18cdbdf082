"""bench/kv_int8_prompts.py on an exported tiny decoder with an fp32 cache: the three sides
run through the engine's runner, the fp32 cache agrees with itself, the int8 sides stay close,
and the temporary int8 graph is gone afterwards. Seconds."""

from __future__ import annotations

import argparse

from tests.helpers.bench_modules import load_bench_module
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture

kv_int8_prompts = load_bench_module("kv_int8_prompts")


def test_three_sides_over_one_version(tiny_decoders: TinyDecoders) -> None:  # noqa: F811
    version_dir = tiny_decoders.llama_int4.path
    before = set(version_dir.parent.iterdir())
    args = argparse.Namespace(
        version=version_dir, prompt=40, chunk=16, decode=4, repeats=1, threads=1, seed=0,
        max_foreign=1.0, quiet_wait_s=0.0, max_tries=1, no_gate=True, json=None,
    )
    result = kv_int8_prompts.run(args)
    assert set(result["sides"]) == set(kv_int8_prompts.SIDES)
    fp32 = result["sides"]["fp32 cache"]
    assert fp32["greedy_tokens_matching_fp32_cache"] == "4/4" and fp32["max_logit_difference_after_prompt"] == 0.0
    for name in kv_int8_prompts.SIDES[1:]:
        side = result["sides"][name]
        assert side["ttft_s"] > 0 and side["decode_step_ms"] > 0 and side["passes"] == 1
        # Rounded keys and values move the logits a little, not wholesale.
        assert 0 < side["max_logit_difference_after_prompt"] < 1.0
    assert set(version_dir.parent.iterdir()) == before
