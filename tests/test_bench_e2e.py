"""`appliance bench` end to end against a real server (real uvicorn, real ONNX Runtime sessions,
tiny models): a short sweep produces the JSON, the dashboard's latest.json and PNG plots whose
contents match the JSON; `--compare` measures each published variant on its own private
server and marks the recommended one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from appliance.benchmark.plots import COST_PLOT, FIGURE_DPI, FIGURE_SIZE_IN, FRONTIER_PLOT, THROUGHPUT_PLOT
from appliance.benchmark.runner import BenchOptions, run_bench
from appliance.cli import app
from appliance.config import CostSettings
from appliance.repository import ModelRepository
from appliance.repository.manifest import MANIFEST_FILE, REPORT_FILE, Manifest, Report
from tests.helpers.server import running_server
from tests.helpers.tiny_models import publish_adder, publish_embedder

RECOMMENDED_STAR_RGB = (0xF2, 0xB0, 0x1E)
SHORT_SWEEP = ["--duration", "0.5", "--max-requests", "12", "--warmup", "1"]


def _bench(*args: str) -> Any:
    return CliRunner().invoke(app, ["bench", *args], catch_exceptions=False)


def _png(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixels (RGB) and the plotted-data description of a PNG, after checking it is a real picture."""
    image = Image.open(path)
    assert image.format == "PNG"
    expected = (round(FIGURE_SIZE_IN[0] * FIGURE_DPI), round(FIGURE_SIZE_IN[1] * FIGURE_DPI))
    assert image.size == expected
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10.0, "the plot is blank"
    non_white = (pixels.min(axis=2) < 240).mean()
    assert 0.02 < non_white < 0.9, f"{non_white:.3f} of the pixels are drawn"
    return pixels, json.loads(image.info["Description"])


def _colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: float = 12.0) -> int:
    return int((np.abs(pixels - np.array(rgb)).max(axis=2) <= tolerance).sum())


def test_short_sweep_writes_json_latest_json_and_plots_that_match_it(state_dir: Path, tmp_path: Path) -> None:
    publish_embedder(ModelRepository(state_dir / "models"))
    out = tmp_path / "run"
    with running_server(state_dir) as server:
        result = _bench(
            "--model", "tiny-embed", "--workload", "embeddings", "--sentences", "4",
            "--url", server.base_url, "--api-key", server.key or "", "--concurrency", "1,3",
            *SHORT_SWEEP, "--out", str(out), "--json", "--state-dir", str(state_dir),
        )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert json.loads((out / "results.json").read_text()) == printed
    assert json.loads((state_dir / "bench" / "latest.json").read_text()) == printed

    assert printed["cost_unit"] == "inputs"
    (variant,) = printed["variants"]
    assert [p["level"] for p in variant["points"]] == [1.0, 3.0]
    for point in variant["points"]:
        stats = point["stats"]
        assert stats["ok"] == stats["requests"] > 0 and stats["errors_by_status"] == {}
        assert stats["inputs"] == 4 * stats["ok"]
        assert stats["latency"]["p50_s"] <= stats["latency"]["p99_s"]
        assert point["cost"]["per_1k_inputs"] > 0 and point["cost"]["cloud_per_1k_inputs"] > 0

    _pixels, curve = _png(out / THROUGHPUT_PLOT)
    (series,) = curve["series"]
    assert series["points"] == len(variant["points"])
    assert series["x"] == pytest.approx([p["stats"]["inputs_per_s"] for p in variant["points"]])
    assert series["p99_s"] == pytest.approx([p["stats"]["latency"]["p99_s"] for p in variant["points"]])

    _pixels, bars = _png(out / COST_PLOT)
    cheapest = min(p["cost"]["per_1k_inputs"] for p in variant["points"])
    assert bars["costs"] == pytest.approx([cheapest])
    assert sorted(Path(p).name for p in printed["plots"]) == [COST_PLOT, THROUGHPUT_PLOT]


def test_open_loop_poisson_arrivals_against_a_v2_model_version(state_dir: Path) -> None:
    publish_adder(ModelRepository(state_dir / "models"))
    with running_server(state_dir) as server:
        options = BenchOptions(
            model="adder", workload="infer", version=1, url=server.base_url, api_key=server.key,
            rates=[40.0], duration_s=0.5, max_requests=10, warmup_requests=1, sentences=2,
        )
        result = run_bench(options, CostSettings())
    (point,) = result.variants[0].points
    assert point.mode == "open" and point.level == 40.0
    assert point.stats["ok"] == point.stats["requests"] > 0
    assert point.stats["inputs"] == 2 * point.stats["ok"]
    assert result.workload["inputs"][0]["shape"] == [2, 4]


def _make_variant(repository: ModelRepository, version: int, quantization: str, cosine_mean: float) -> None:
    """Give a published tiny embedder version the identity and quality of an export variant."""
    folder = repository.root / "tiny-embed" / str(version)
    manifest = Manifest.model_validate_json((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(manifest.model_copy(update={"quantization": quantization}).model_dump_json())
    report = Report(variant=quantization, size_bytes=1000 * version, load_s=0.1, verdict="accepted",
                    quality={"cosine_mean": cosine_mean, "cosine_min": cosine_mean - 0.01})
    (folder / REPORT_FILE).write_text(report.model_dump_json())


def test_compare_measures_every_variant_and_marks_the_cheapest_within_budget(state_dir: Path, tmp_path: Path) -> None:
    repository = ModelRepository(state_dir / "models")
    publish_embedder(repository)
    publish_embedder(repository)
    _make_variant(repository, 1, "fp32", 1.0)
    _make_variant(repository, 2, "int8", 0.95)
    out = tmp_path / "compare"
    result = _bench(
        "--compare", "tiny-embed", "--concurrency", "1,2", *SHORT_SWEEP,
        "--max-quality-loss", "0.01", "--out", str(out), "--state-dir", str(state_dir),
    )
    assert result.exit_code == 0, result.output
    assert "recommended: tiny-embed version 1" in result.stdout
    document = json.loads((out / "results.json").read_text())
    assert document["started_servers"] is True and document["workload"]["kind"] == "embeddings"
    assert [(v["version"], v["quantization"]) for v in document["variants"]] == [(1, "fp32"), (2, "int8")]
    assert [v["quality_loss"] for v in document["variants"]] == pytest.approx([0.0, 0.05])
    for variant in document["variants"]:
        assert variant["error"] is None
        assert [p["level"] for p in variant["points"]] == [1.0, 2.0]
        assert all(p["stats"]["ok"] > 0 for p in variant["points"])
    assert document["recommendation"]["version"] == 1

    pixels, frontier = _png(out / FRONTIER_PLOT)
    assert frontier["points"] == 2
    assert frontier["recommended"]["version"] == 1
    assert _colour_pixels(pixels, RECOMMENDED_STAR_RGB) > 50, "the recommended variant's star is missing"
    _pixels, bars = _png(out / COST_PLOT)
    assert len(bars["labels"]) == 2
    # the private servers are gone with their folders
    assert not any((state_dir / "bench" / ".servers").iterdir())
