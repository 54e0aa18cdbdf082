"""The terminal view of a benchmark result: one rich table row per variant and sweep point.

Rendering only: every number comes from the `BenchResult`, so the table, the JSON and the
plots can never disagree. Never measures and never writes files.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from appliance.benchmark.results import BenchResult


def _ms(distribution: dict[str, Any], key: str) -> str:
    value = distribution.get(key)
    return "-" if value is None else f"{value * 1000:.0f}"


def _triple(distribution: dict[str, Any]) -> str:
    return "/".join(_ms(distribution, key) for key in ("p50_s", "p90_s", "p99_s"))


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def render(result: BenchResult) -> Group:
    """The table plus the recommendation line (when there is one)."""
    chat = result.cost_unit == "output_tokens"
    currency = result.cost_model.get("currency", "")
    level = "clients" if result.settings.get("mode") == "closed" else "req/s"
    table = Table(title=f"appliance bench: {result.workload.get('kind')} on {result.target}", title_justify="left")
    columns = ["variant", level, "req/s", "tok/s" if chat else "inputs/s"]
    if chat:
        columns += ["TTFT ms p50/90/99", "ITL ms p50/90/99"]
    columns += ["e2e ms p50/90/99", "errors", f"{currency}/1k {'tok' if chat else 'inputs'}", "cloud/1k", "cloud ×"]
    for name in columns:
        table.add_column(name, justify="left" if name == "variant" else "right", no_wrap=True)
    for variant in result.variants:
        if variant.error:
            table.add_row(variant.label, *["-"] * (len(columns) - 2), Text(variant.error[:60], style="red"))
            continue
        for point in variant.points:
            stats, cost = point.stats, point.cost
            errors = ", ".join(f"{k}×{v}" for k, v in stats["errors_by_status"].items()) or "0"
            row = [variant.label, f"{point.level:g}", f"{stats['requests_per_s']:.2f}"]
            row.append(f"{stats['output_tokens_per_s']:.1f}" if chat else f"{stats['inputs_per_s']:.1f}")
            if chat:
                row += [_triple(stats["ttft"]), _triple(stats["itl"])]
            local = cost["per_1k_output_tokens"] if chat else cost["per_1k_inputs"]
            cloud = cost["cloud_per_1k_output_tokens"] if chat else cost["cloud_per_1k_inputs"]
            ratio = cost.get("cloud_ratio")
            row += [_triple(stats["latency"]), errors, _money(local), _money(cloud), "-" if ratio is None else f"{ratio:.2f}"]
            table.add_row(*row)
    machine = result.machine
    load = machine.get("load_average") or []
    table.caption = (
        f"{machine.get('processor', '?')}, {machine.get('cpu_count', '?')} cores"
        + (f", load average {load[0]:g}/{load[1]:g}/{load[2]:g}" if len(load) == 3 else "")
        + f"; box {result.cost_model.get('cost_per_h', 0):.4g} {currency}/h"
    )
    table.caption_justify = "left"
    parts: list[Any] = [table]
    pick = result.recommendation
    if pick is not None:
        if pick.version is not None:
            line = (
                f"recommended: {pick.model} version {pick.version} — {_money(pick.cost_per_1k)} {currency}/1k, "
                f"quality loss {pick.quality_loss:.4g} (budget {pick.max_quality_loss:g})"
            )
            parts.append(Text(line, style="bold green"))
        else:
            parts.append(Text(f"no recommendation: {pick.reason}", style="yellow"))
    return Group(*parts)
