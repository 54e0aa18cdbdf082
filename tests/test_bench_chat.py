"""`appliance bench` on streamed chat against the real generation engine (tiny decoders exported
by the real export stage): token counting, TTFT and inter-token latency from the SSE stream,
cost per 1k generated tokens, and `--compare` over the fp32 and int4 variants with the quality
figures of their own export reports."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from appliance.benchmark.runner import BenchOptions, run_bench
from appliance.cli import app
from appliance.config import CostSettings
from tests.helpers.generation import TinyDecoders, tiny_decoders  # noqa: F401 - fixture
from tests.helpers.server import RunningServer, running_server

MODEL = "tiny-llama"
OUTPUT_TOKENS = 6


@pytest.fixture
def chat_state(tiny_decoders: TinyDecoders, tmp_path: Path) -> Path:  # noqa: F811 - fixture
    state = tmp_path / "state"
    shutil.copytree(tiny_decoders.state_dir / "models", state / "models", ignore=shutil.ignore_patterns(".staging", ".lock"))
    shutil.rmtree(state / "models" / "tiny-gpt2")
    return state


@pytest.fixture
def chat_server(chat_state: Path) -> Iterator[RunningServer]:
    with running_server(chat_state, generation={"kv_budget_bytes": 64 << 20}) as server:
        yield server


def test_chat_sweep_counts_tokens_and_measures_ttft_and_inter_token_latency(chat_server: RunningServer) -> None:
    options = BenchOptions(
        model=MODEL, workload="chat", url=chat_server.base_url, api_key=chat_server.key,
        concurrency=[1, 2], duration_s=1.0, max_requests=6, warmup_requests=1,
        output_tokens=(OUTPUT_TOKENS, OUTPUT_TOKENS), ignore_eos=True, temperature=0.8,
    )
    result = run_bench(options, CostSettings())
    assert result.cost_unit == "output_tokens"
    for point in result.variants[0].points:
        stats = point.stats
        assert stats["ok"] == stats["requests"] > 0, point.error_samples
        # the server's own usage count: exactly max_tokens per request with ignore_eos
        assert stats["output_tokens"] == OUTPUT_TOKENS * stats["ok"]
        assert stats["ttft"]["count"] == stats["ok"]
        assert 0 < stats["ttft"]["p50_s"] <= stats["latency"]["p50_s"]
        # one gap between each pair of output chunks: at most tokens - 1 per request
        assert 0 < stats["itl"]["count"] <= (OUTPUT_TOKENS - 1) * stats["ok"]
        assert stats["itl"]["p50_s"] <= stats["itl"]["p90_s"] <= stats["itl"]["p99_s"]
        # a chunk whose tokens decode to no text yet (a partial UTF-8 piece) carries no output
        assert 0 < stats["tpot"]["count"] <= stats["ok"]
        assert point.cost["per_1k_output_tokens"] > 0
        assert point.cost["cloud_ratio"] == pytest.approx(point.cost["cloud_per_1k_output_tokens"] / point.cost["per_1k_output_tokens"])


def test_compare_chat_variants_joins_export_quality_and_recommends_within_budget(chat_state: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["bench", "--compare", MODEL, "--concurrency", "1", "--duration", "0.5", "--max-requests", "3", "--warmup", "1",
         "--max-tokens", str(OUTPUT_TOKENS), "--ignore-eos", "--max-quality-loss", "1000", "--out", str(out),
         "--state-dir", str(chat_state)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    document = json.loads((out / "results.json").read_text())
    assert document["workload"]["kind"] == "chat"
    quantizations = [v["quantization"] for v in document["variants"]]
    assert sorted(quantizations) == ["fp32", "int4"]
    for variant in document["variants"]:
        assert variant["error"] is None
        assert variant["quality_loss"] is not None and variant["quality_metric"]
        (point,) = variant["points"]
        assert point["stats"]["output_tokens"] == OUTPUT_TOKENS * point["stats"]["ok"] > 0
    cheapest = min(document["variants"], key=lambda v: v["points"][0]["cost"]["per_1k_output_tokens"])
    assert document["recommendation"]["version"] == cheapest["version"]
    frontier = json.loads(Image.open(out / "cost_quality_frontier.png").info["Description"])
    assert frontier["points"] == 2 and frontier["recommended"]["version"] == cheapest["version"]
