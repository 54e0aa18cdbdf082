"""The benchmark result document: what `--json`, results.json and the dashboard's latest.json hold.

One `BenchResult` per run: the target, the workload, the cost model, and per variant (one
for a plain run, one per published version for `--compare`) its sweep points with their
statistics and cost, plus the recommendation. Declared as pydantic models so the admin UI
can validate what it reads. Never measures anything and never prints.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from appliance.benchmark.cost import PointCost
from appliance.benchmark.stats import PointStats

RESULT_SCHEMA = "appliance-bench/1"
#: Sub-folder of the state directory that holds benchmark runs and the dashboard's file.
BENCH_DIR = "bench"
LATEST_FILE = "latest.json"


class PointResult(BaseModel):
    """One sweep point: its load level, measured statistics and cost."""

    mode: str = Field(description="closed (level = concurrent clients) or open (level = arrivals/s).")
    level: float
    stats: dict[str, Any]
    cost: dict[str, Any]
    warmup_errors: int = 0
    error_samples: list[str] = Field(default_factory=list, description="A few distinct error messages.")

    @classmethod
    def build(cls, mode: str, level: float, stats: PointStats, cost: PointCost, warmup_errors: int, errors: list[str]) -> PointResult:
        cost_dict = dataclasses.asdict(cost)
        cost_dict["cloud_ratio"] = cost.cloud_ratio
        return cls(
            mode=mode,
            level=level,
            stats=dataclasses.asdict(stats),
            cost=cost_dict,
            warmup_errors=warmup_errors,
            error_samples=errors,
        )

    def cost_per_1k(self, unit: str) -> float | None:
        key = "per_1k_output_tokens" if unit == "output_tokens" else "per_1k_inputs"
        value = self.cost.get(key)
        return float(value) if value is not None else None

    def throughput(self, unit: str) -> float:
        key = "output_tokens_per_s" if unit == "output_tokens" else "inputs_per_s"
        return float(self.stats[key])


class VariantResult(BaseModel):
    """One served model version and its sweep."""

    model: str
    version: int | None = Field(None, description="None: whatever version the server chose to serve.")
    quantization: str | None = None
    size_bytes: int | None = None
    quality: dict[str, Any] = Field(default_factory=dict, description="From the version's report.json.")
    quality_metric: str | None = Field(None, description="How quality_loss was derived from `quality`.")
    quality_loss: float | None = None
    points: list[PointResult] = Field(default_factory=list)
    error: str | None = Field(None, description="Why this variant could not be measured.")

    @property
    def label(self) -> str:
        if self.version is None:
            return self.model
        return f"v{self.version} {self.quantization}" if self.quantization else f"v{self.version}"

    def best_cost_per_1k(self, unit: str) -> float | None:
        """Cheapest point of the sweep: the operating point an operator would choose."""
        costs = [c for p in self.points if (c := p.cost_per_1k(unit)) is not None]
        return min(costs) if costs else None


class Recommendation(BaseModel):
    max_quality_loss: float
    model: str | None = None
    version: int | None = None
    cost_per_1k: float | None = None
    quality_loss: float | None = None
    reason: str


class BenchResult(BaseModel):
    schema_: str = Field(RESULT_SCHEMA, alias="schema")
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    target: str
    started_servers: bool = Field(False, description="True when the bench ran its own private server per variant.")
    workload: dict[str, Any]
    cost_unit: str = Field(description="output_tokens (chat) or inputs (embeddings, infer rows).")
    settings: dict[str, Any]
    machine: dict[str, Any] = Field(default_factory=lambda: machine_facts())
    cost_model: dict[str, Any]
    variants: list[VariantResult]
    recommendation: Recommendation | None = None
    plots: list[str] = Field(default_factory=list, description="PNG files written beside the JSON.")

    model_config = {"populate_by_name": True}

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)


def _cpu_model() -> str:
    """The CPU's marketing name where Linux tells it, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    """What the figures ran on, so a reader can tell one box's numbers from another's.

    The load averages (1, 5, 15 min, taken when the result is assembled) say whether other
    work shared the cores during the run: on a busy box the figures are the box's, not the
    appliance's best.
    """
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = []
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": load,
    }


def write_result(result: BenchResult, folder: Path, state_dir: Path | None) -> Path:
    """Write results.json into `folder` and, when given a state dir, the dashboard's latest.json.

    latest.json is replaced atomically (written beside, then renamed), so the admin UI never
    reads half a file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "results.json"
    target.write_text(result.to_json())
    if state_dir is not None:
        bench_dir = state_dir / BENCH_DIR
        bench_dir.mkdir(parents=True, exist_ok=True)
        tmp = bench_dir / f".{LATEST_FILE}.{os.getpid()}.tmp"
        tmp.write_text(result.to_json())
        os.replace(tmp, bench_dir / LATEST_FILE)
    return target
