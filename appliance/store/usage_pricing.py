"""What usage costs on this box: the throughput `appliance bench` measured per model and
variant, priced with the box's cost model (hardware amortisation plus electricity).

price per 1k units = cost per hour / (measured units per second x 3600) x 1000, the same
arithmetic as the bench's own cost per 1k (appliance/benchmark/cost.py), at the sweep point
with the highest throughput (the cheapest point, the one an operator plans for). The cost
settings are the live ones (the dashboard's form overrides the configuration), so a change
of electricity price reprices past usage too. The unit depends on what the bench ran:

| bench workload | priced unit | throughput read |
| --- | --- | --- |
| chat | completion tokens | `output_tokens_per_s` |
| embeddings | embedding inputs | `inputs_per_s` |
| rerank | rerank documents | `inputs_per_s` |
| infer (KServe V2) | successful requests | `requests_per_s` |

The figures come from the result documents the bench writes (schema `appliance-bench/1`):
`<state>/bench/latest.json` and `<state>/bench/runs/*/results.json`; the newest figure per
(model, version) wins. A `--compare` run measures each version; a plain run measures
"whatever the server served", used for any version without its own figure. A model without
a figure gets no price, and the reason says which command would give it one. Reads files
only; never measures, never imports the benchmark package (it sits above the store).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from appliance.config import CostSettings
from appliance.store.usage_writes import Counters

log = logging.getLogger("appliance.store")

PricedUnit = Literal["completion_tokens", "embedding_inputs", "rerank_documents", "requests"]
#: The bench's result schema this module reads.
BENCH_SCHEMA = "appliance-bench/1"
#: Where the bench writes, under its folder (appliance/benchmark/results.py, cli/bench_cmd.py).
LATEST_FILE = "latest.json"
RUN_RESULTS_GLOB = "runs/*/results.json"
#: Newest run folders read (their names sort by time); older figures are superseded anyway.
RUNS_READ_MAX = 200
#: Result documents larger than this are not read (a result is a few kilobytes).
RESULT_MAX_BYTES = 4 << 20
SECONDS_PER_HOUR = 3600.0
UNITS_PER_QUOTE = 1000.0
#: Per bench workload kind: the usage counter it prices and the throughput that prices it.
_PRICING_BY_KIND: dict[str, tuple[PricedUnit, str]] = {
    "chat": ("completion_tokens", "output_tokens_per_s"),
    "embeddings": ("embedding_inputs", "inputs_per_s"),
    "rerank": ("rerank_documents", "inputs_per_s"),
    "infer": ("requests", "requests_per_s"),
}
UNIT_LABELS: dict[str, str] = {
    "completion_tokens": "completion tokens",
    "embedding_inputs": "embedding inputs",
    "rerank_documents": "rerank documents",
    "requests": "requests",
}


class _BenchPoint(BaseModel):
    stats: dict[str, Any]


class _BenchVariant(BaseModel):
    model: str
    version: int | None = None
    quantization: str | None = None
    points: list[_BenchPoint] = []
    error: str | None = None


class _BenchDocument(BaseModel):
    """The part of a bench result (`appliance.benchmark.results.BenchResult`) pricing needs."""

    created_at: str
    workload: dict[str, Any]
    variants: list[_BenchVariant]

    @classmethod
    def read(cls, path: Path) -> _BenchDocument | None:
        try:
            if path.stat().st_size > RESULT_MAX_BYTES:
                return None
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(raw, dict) or raw.get("schema") != BENCH_SCHEMA:
            return None
        try:
            return cls.model_validate(raw)
        except ValidationError:
            log.warning("usage pricing: %s is not a readable bench result; ignored", path)
            return None


@dataclass(frozen=True)
class MeasuredRate:
    """One model variant's best measured throughput in its priced unit."""

    model: str
    #: None: a plain bench run against whatever version the server served.
    version: int | None
    variant: str | None
    unit: PricedUnit
    units_per_s: float
    measured_at: str


@dataclass(frozen=True)
class UnitPrice:
    """The price of 1k units of one model's usage, and where it comes from."""

    unit: PricedUnit
    per_1k: float
    currency: str
    basis: str

    def cost(self, counters: Counters) -> float:
        return billable_units(counters, self.unit) / UNITS_PER_QUOTE * self.per_1k


def billable_units(counters: Counters, unit: PricedUnit) -> int:
    """How many units of `unit` the counters hold (requests: the successful ones only)."""
    if unit == "requests":
        return max(0, counters.requests - counters.errors_4xx - counters.errors_5xx)
    return int(getattr(counters, unit))


def rates_from(document: _BenchDocument) -> list[MeasuredRate]:
    """The priced throughput of every measured variant in one bench result."""
    pricing = _PRICING_BY_KIND.get(str(document.workload.get("kind")))
    if pricing is None:
        return []
    unit, field = pricing
    rates = []
    for variant in document.variants:
        measured = [float(point.stats.get(field) or 0.0) for point in variant.points]
        best = max(measured, default=0.0)
        if variant.error is None and best > 0:
            rates.append(MeasuredRate(variant.model, variant.version, variant.quantization, unit, best, document.created_at))
    return rates


class PriceList:
    """Prices per (model, version) from the measured rates and the cost settings."""

    def __init__(self, rates: list[MeasuredRate], cost: CostSettings) -> None:
        self.cost = cost
        self._rates: dict[tuple[str, int | None], MeasuredRate] = {}
        for rate in sorted(rates, key=lambda r: r.measured_at):
            self._rates[(rate.model, rate.version)] = rate  # newest wins

    @classmethod
    def from_bench_dir(cls, bench_dir: Path, cost: CostSettings) -> PriceList:
        """Read the bench's latest result and its newest runs under `bench_dir`."""
        paths = [bench_dir / LATEST_FILE, *sorted(bench_dir.glob(RUN_RESULTS_GLOB))[-RUNS_READ_MAX:]]
        rates: list[MeasuredRate] = []
        for path in paths:
            document = _BenchDocument.read(path) if path.is_file() else None
            if document is not None:
                rates.extend(rates_from(document))
        return cls(rates, cost)

    def _rate(self, model: str, version: str) -> MeasuredRate | None:
        exact = self._rates.get((model, int(version))) if version.isdigit() else None
        return exact or self._rates.get((model, None))

    def price(self, model: str, version: str) -> UnitPrice | None:
        """The price of `model` at `version` ('' when unknown), or None without a figure."""
        rate = self._rate(model, version)
        if rate is None:
            return None
        per_1k = self.cost.per_hour / (rate.units_per_s * SECONDS_PER_HOUR) * UNITS_PER_QUOTE
        measured = f"v{rate.version}" + (f" {rate.variant}" if rate.variant else "") if rate.version is not None else "the served version"
        basis = (
            f"{rate.units_per_s:.4g} {UNIT_LABELS[rate.unit]}/s measured by appliance bench on {measured} "
            f"({rate.measured_at}) at {self.cost.per_hour:.4g} {self.cost.currency}/h"
        )
        return UnitPrice(rate.unit, per_1k, self.cost.currency, basis)

    @staticmethod
    def why_unpriced(model: str) -> str:
        return f"no throughput measured for {model!r}: run `appliance bench --model {model}` (or --compare {model}) to price it"
