"""bench/decode_step_ab.py: two exported versions of one tiny decoder, timed alternately, each
row naming its version, variant and weight bytes. Seconds."""

from __future__ import annotations

from tests.helpers.bench_modules import load_bench_module
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture

ab = load_bench_module("decode_step_ab")


def test_two_versions_are_timed_alternately_with_their_weight_bytes(tiny_decoders: TinyDecoders) -> None:  # noqa: F811
    models = [tiny_decoders.llama_fp32.path, tiny_decoders.llama_int4.path]
    rows = ab.compare(models, repeats=2, new_tokens=4, prompt_tokens=6, threads=1)
    assert [row["variant"] for row in rows] == ["fp32", "int4"]
    assert all(len(row["runs_ms"]) == 2 and row["step_ms"] > 0 for row in rows)
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"] == ab.weight_bytes(models[0])
