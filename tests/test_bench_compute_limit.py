"""bench/compute_limit.py: every weight matrix of an exported tiny decoder found by form (the LM
head apart), each form timed alone through ONNX Runtime, the ceiling's arithmetic, and a sizes
run's figures read beside it. Seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.helpers.bench_modules import load_bench_module
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture

compute_limit = load_bench_module("compute_limit")


def test_the_matrices_of_an_int4_export_are_found_by_form(tiny_decoders: TinyDecoders) -> None:  # noqa: F811
    version = tiny_decoders.llama_int4
    spec = version.manifest.generation
    assert spec is not None
    found = compute_limit.weight_matrices(version.model_path)
    heads = [m for m in found if m.lm_head]
    assert len(heads) == 1 and found[heads[0]] == 1
    assert all(m.bits in (4, 8) and m.block in (32, 64, 128) for m in found)
    # q, k, v, o, gate, up and down in every layer (fused or not, at least one matrix each).
    assert sum(count for m, count in found.items() if not m.lm_head) >= spec.num_layers


def test_the_limits_of_a_tiny_export_add_up(tiny_decoders: TinyDecoders, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    result = compute_limit.limits(
        tiny_decoders.llama_int4.model_path, streams=(1, 4), chunk_rows=8, prompt_tokens=10, new_tokens=5, long_prompt=50, threads=1, runs=1
    )
    assert result["prompt_token_ms"] > 0
    assert result["long_prompt_s"] == pytest.approx(50 * result["prompt_token_ms"] / 1e3)
    for count in ("1", "4"):
        figures = result["streams"][count]
        assert figures["generated_token_ms"] > 0
        assert figures["decode_ceiling_tok_s"] == pytest.approx(1e3 / figures["generated_token_ms"])
        # Prompt tokens cost something, so the workload's ceiling sits under decoding alone.
        assert 0 < figures["ceiling_tok_s"] < figures["decode_ceiling_tok_s"]
    assert all(set(entry["gops"]) == {"1", "4", "8"} for entry in result["matrices"])
    ceiling = result["streams"]["4"]["ceiling_tok_s"]
    step_s = 4 * result["streams"]["4"]["generated_token_ms"] / 1e3
    run = compute_limit.SizesRun(
        llama_single_tok_s=ceiling / 2, single_step_s=step_s / 2, llama_long_ttft_s=result["long_prompt_s"] * 2,
        long_ttft_s=result["long_prompt_s"] * 4, streams={"4": {"aggregate_tok_s": ceiling / 4}},
    )
    compute_limit.print_report(result, run)
    printed = capsys.readouterr().out
    assert "(measured" in printed and "25% of it there" in printed and "at best 0.50x" in printed
    assert f"| {ceiling / 4:.1f} tok/s | 25% | 2.00x |  |" in printed
    assert f"| {step_s * 1e3:.0f} ms | 2.0x |" in printed


def test_a_prompt_token_skips_the_lm_head() -> None:
    head = compute_limit.Matrix(k_dim=8, n_dim=32, bits=8, block=32, accuracy_level=4, zero_points=False, lm_head=True)
    layer = compute_limit.Matrix(k_dim=8, n_dim=8, bits=4, block=32, accuracy_level=4, zero_points=False, lm_head=False)
    timings = {head: {1: 0.004}, layer: {1: 0.001}}
    counts = compute_limit.Counter({head: 1, layer: 3})
    assert compute_limit.token_seconds(timings, counts, 1, prompt=True) == pytest.approx(0.003)
    assert compute_limit.token_seconds(timings, counts, 1, prompt=False) == pytest.approx(0.007)
    # 128 new tokens at 20 ms after 100 prompt tokens at 10 ms: 128 / 3.56 s.
    assert compute_limit.ceiling_tok_s(0.010, 0.020, 100, 128) == pytest.approx(128 / 3.56)


@pytest.mark.parametrize(
    "matrix",
    [
        compute_limit.Matrix(k_dim=64, n_dim=48, bits=4, block=32, accuracy_level=4, zero_points=True, lm_head=False),
        compute_limit.Matrix(k_dim=128, n_dim=16, bits=8, block=128, accuracy_level=4, zero_points=False, lm_head=False),
        compute_limit.Matrix(k_dim=24, n_dim=40, bits=32, block=0, accuracy_level=0, zero_points=False, lm_head=True),
    ],
    ids=["4-bit with zero points", "8-bit/128", "fp32"],
)
def test_each_form_builds_a_graph_onnx_runtime_runs(matrix: object) -> None:
    session = ort.InferenceSession(compute_limit._matrix_graph(matrix, 0).SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.ones((3, matrix.k_dim), np.float32)})
    assert out.shape == (3, matrix.n_dim) and np.isfinite(out).all()
    per_row = compute_limit.seconds_per_row(matrix, [1, 3], threads=1, runs=1)
    assert set(per_row) == {1, 3} and all(value > 0 for value in per_row.values())


def test_a_sizes_run_is_read_beside_the_ceilings(tmp_path: Path) -> None:
    run = {
        "pairs": {
            "Q4_0:int4-exact": {
                "appliance": {
                    "decode_after_100": {"decode_tok_s": 21.3, "itl_p50_s": 0.047},
                    "decode_after_2000": {"ttft_s": 23.1},
                    "streams_8": {"aggregate_tok_s": 36.4},
                    "streams_32": {"aggregate_tok_s": 39.8},
                },
                "llama.cpp": {"decode_after_100": {"decode_tok_s": 28.8}, "decode_after_2000": {"ttft_s": 24.6}},
            }
        }
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    run = compute_limit.measured(path)
    assert (run.llama_single_tok_s, run.single_step_s, run.llama_long_ttft_s, run.long_ttft_s) == (28.8, 0.047, 24.6, 23.1)
    assert run.streams == {"8": {"aggregate_tok_s": 36.4}, "32": {"aggregate_tok_s": 39.8}}


def test_the_fastest_probe_counts_per_matrix_and_rows() -> None:
    a = compute_limit.Matrix(k_dim=8, n_dim=8, bits=4, block=32, accuracy_level=4, zero_points=False, lm_head=False)
    b = compute_limit.Matrix(k_dim=8, n_dim=32, bits=8, block=32, accuracy_level=4, zero_points=False, lm_head=True)
    slow_spell = {a: {8: 0.002, 256: 0.001}, b: {8: 0.004, 256: 0.003}}
    quiet = {a: {8: 0.001, 256: 0.0015}, b: {8: 0.005, 256: 0.002}}
    assert compute_limit.fastest(slow_spell, quiet) == {a: {8: 0.001, 256: 0.001}, b: {8: 0.004, 256: 0.002}}
