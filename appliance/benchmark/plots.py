"""PNG plots of a benchmark result: throughput vs latency across the sweep, cost per 1k units
per variant, and the cost vs quality-loss frontier with the recommended variant marked.

Drawn from the `BenchResult` alone (so a plot can always be re-made from results.json), with
matplotlib's object API on the Agg canvas: no display, no global pyplot state. Each PNG
carries a JSON description of what it plots (series and point counts) in its `Description`
text chunk, so tests and tools can check a picture against the data. Never measures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from appliance.benchmark.compare import frontier
from appliance.benchmark.results import BenchResult

THROUGHPUT_PLOT = "throughput_latency.png"
COST_PLOT = "cost_per_variant.png"
FRONTIER_PLOT = "cost_quality_frontier.png"
FIGURE_SIZE_IN = (7.0, 4.5)
FIGURE_DPI = 110

_UNIT_LABEL = {"output_tokens": "generated tokens", "inputs": "inputs"}


def _save(figure: Figure, path: Path, description: dict[str, Any]) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=FIGURE_DPI, metadata={"Description": json.dumps(description)})
    return path


def throughput_latency(result: BenchResult, path: Path) -> Path:
    """One curve per variant: throughput (x) against p50 and p99 end-to-end latency (y)."""
    unit = result.cost_unit
    figure = Figure(figsize=FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    series: list[dict[str, Any]] = []
    for variant in result.variants:
        points = [p for p in variant.points if p.stats["latency"]["p50_s"] is not None]
        if not points:
            continue
        xs = [p.throughput(unit) for p in points]
        p50 = [p.stats["latency"]["p50_s"] for p in points]
        p99 = [p.stats["latency"]["p99_s"] for p in points]
        line = axes.plot(xs, p50, marker="o", label=f"{variant.label} p50")[0]
        axes.plot(xs, p99, marker="^", linestyle="--", color=line.get_color(), label=f"{variant.label} p99")
        for x, y, point in zip(xs, p50, points, strict=True):
            axes.annotate(f"{point.level:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        series.append({"label": variant.label, "points": len(points), "x": xs, "p50_s": p50, "p99_s": p99})
    mode = result.settings.get("mode", "closed")
    axes.set_xlabel(f"throughput ({_UNIT_LABEL.get(unit, unit)}/s)")
    axes.set_ylabel("end-to-end latency (s)")
    level = "concurrent clients" if mode == "closed" else "arrivals/s"
    axes.set_title(f"Throughput vs latency (labels: {level})")
    axes.grid(True, alpha=0.3)
    if series:
        axes.legend(fontsize=8)
    return _save(figure, path, {"plot": "throughput_latency", "unit": unit, "series": series})


def cost_per_variant(result: BenchResult, path: Path) -> Path:
    """Bars: each variant's cost per 1k units at its best point, with the cloud price beside."""
    unit = result.cost_unit
    currency = result.cost_model.get("currency", "")
    figure = Figure(figsize=FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    labels: list[str] = []
    costs: list[float] = []
    for variant in result.variants:
        cost = variant.best_cost_per_1k(unit)
        if cost is not None:
            labels.append(variant.label)
            costs.append(cost)
    bars = axes.bar(labels, costs, color="#3b7dd8")
    axes.bar_label(bars, labels=[f"{c:.3g}" for c in costs], fontsize=8)
    cloud = _cloud_price(result)
    if cloud is not None:
        axes.axhline(cloud, color="#d84b3b", linestyle="--", label=f"cloud API {cloud:.3g}")
        axes.legend(fontsize=8)
    axes.set_ylabel(f"{currency} per 1k {_UNIT_LABEL.get(unit, unit)}")
    axes.set_title("Cost per 1k at each variant's best sweep point")
    axes.grid(True, axis="y", alpha=0.3)
    return _save(figure, path, {"plot": "cost_per_variant", "unit": unit, "labels": labels, "costs": costs, "cloud": cloud})


def _cloud_price(result: BenchResult) -> float | None:
    key = "cloud_per_1k_output_tokens" if result.cost_unit == "output_tokens" else "cloud_per_1k_inputs"
    values = [p.cost.get(key) for v in result.variants for p in v.points if p.cost.get(key) is not None]
    return float(values[0]) if values else None


def cost_quality_frontier(result: BenchResult, path: Path) -> Path:
    """Scatter of quality loss (x) against cost per 1k (y); the frontier joined, the pick starred."""
    unit = result.cost_unit
    currency = result.cost_model.get("currency", "")
    figure = Figure(figsize=FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    plotted = [
        (v, cost) for v in result.variants if v.quality_loss is not None and (cost := v.best_cost_per_1k(unit)) is not None
    ]
    axes.scatter([v.quality_loss for v, _ in plotted], [c for _, c in plotted], color="#3b7dd8", zorder=3)
    for variant, cost in plotted:
        axes.annotate(variant.label, (variant.quality_loss, cost), textcoords="offset points", xytext=(5, 5), fontsize=8)
    edge = frontier(result.variants, unit)
    axes.plot([p.quality_loss for p in edge], [p.cost_per_1k for p in edge], color="#888888", linestyle="-", zorder=2, label="frontier")
    recommended = None
    pick = result.recommendation
    if pick is not None:
        axes.axvline(pick.max_quality_loss, color="#d84b3b", linestyle=":", label=f"budget {pick.max_quality_loss:g}")
        if pick.version is not None and pick.cost_per_1k is not None and pick.quality_loss is not None:
            axes.scatter([pick.quality_loss], [pick.cost_per_1k], marker="*", s=320, color="#f2b01e", edgecolors="black", zorder=4, label="recommended")
            recommended = {"version": pick.version, "quality_loss": pick.quality_loss, "cost_per_1k": pick.cost_per_1k}
    axes.set_xlabel("quality loss vs reference (0 = unchanged)")
    axes.set_ylabel(f"{currency} per 1k {_UNIT_LABEL.get(unit, unit)}")
    axes.set_title("Cost vs quality loss")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    description = {
        "plot": "cost_quality_frontier",
        "unit": unit,
        "points": len(plotted),
        "frontier": len(edge),
        "recommended": recommended,
    }
    return _save(figure, path, description)


def write_plots(result: BenchResult, folder: Path) -> list[Path]:
    """All plots that make sense for `result`; the frontier only when a variant has quality."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [throughput_latency(result, folder / THROUGHPUT_PLOT), cost_per_variant(result, folder / COST_PLOT)]
    if any(v.quality_loss is not None for v in result.variants) and len(result.variants) > 1:
        written.append(cost_quality_frontier(result, folder / FRONTIER_PLOT))
    return written
