"""The usage report: who used what over a period and what it cost, for the admin page, its CSV
and `appliance usage` (table, --json, --csv).

One `UsageLine` per (key, group, model, version), priced by `usage_pricing`; summaries per
key, group or model add lines up. A line of failed requests only costs nothing (errors carry
no version, so no figure could price them anyway). A line without a measured figure has no
cost and says why; a summary's cost covers its priced lines and counts the others, so a
partial sum never looks complete. Declared as pydantic models: the JSON the CLI prints is
their dump. Never imports the runtime or the APIs.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from datetime import datetime

from pydantic import BaseModel, Field

from appliance.store.db import Database
from appliance.store.keys import KeyStore
from appliance.store.usage_pricing import PriceList
from appliance.store.usage_queries import Dimension, UsageFilter, usage_totals
from appliance.store.usage_tables import COUNTER_COLUMNS
from appliance.store.usage_writes import Counters

#: How a line without a key is named: requests served while auth was off.
NO_KEY_LABEL = "(no key)"
NO_GROUP_LABEL = "(no group)"
ERRORS_ONLY_BASIS = "failed requests only: no work done, nothing to price"
#: Costs are shown to this many decimals; smaller non-zero costs read "< 0.000001".
COST_DECIMALS = 6
CSV_COLUMNS = (
    "since", "until", "key", "key_id", "group", "model", "version", "variant",
    *COUNTER_COLUMNS, "cost", "currency", "cost_basis",
)


class UsageCounts(BaseModel):
    """The counted quantities (the `usage_counts` counters)."""

    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_inputs: int = 0
    rerank_documents: int = 0

    def counters(self) -> Counters:
        return Counters(**{name: getattr(self, name) for name in COUNTER_COLUMNS})


class UsageLine(UsageCounts):
    """One key's use of one model version over the period."""

    key: str = Field(description="The key's name; its id when no such key exists any more; '(no key)' while auth was off.")
    key_id: str = Field(description="The key's public prefix ('' while auth was off).")
    group: str = Field(description="The key's group when the counts were written ('' for none).")
    model: str
    version: str = Field(description="The version that served ('' when not known).")
    variant: str | None = Field(None, description="The version's quantisation, when it is still in the repository.")
    cost: float | None = Field(None, description="In the report's currency; None without a measured figure.")
    priced_unit: str | None = None
    cost_basis: str = Field(description="How the cost was computed, or why there is none.")


class UsageSummary(UsageCounts):
    """Lines added up for one key, group or model (or all of them)."""

    name: str
    cost: float | None = Field(None, description="Sum over the priced lines; None when no line is priced.")
    unpriced_lines: int = Field(0, description="Lines without a measured figure, not in `cost`.")


class UsageReport(BaseModel):
    since: datetime
    until: datetime
    currency: str
    lines: list[UsageLine]

    def summary(self, by: Dimension) -> list[UsageSummary]:
        """One summary per key, group or model, largest cost (then requests) first."""
        names: dict[str, list[UsageLine]] = {}
        for line in self.lines:
            name = {"key": line.key, "group": line.group or NO_GROUP_LABEL, "model": line.model}[by]
            names.setdefault(name, []).append(line)
        summaries = [_summarise(name, lines) for name, lines in names.items()]
        return sorted(summaries, key=lambda s: (-(s.cost or 0.0), -s.requests, s.name))

    def total(self) -> UsageSummary:
        return _summarise("total", self.lines)

    def unpriced(self) -> dict[str, str]:
        """Model -> why its usage has no cost."""
        return {line.model: line.cost_basis for line in self.lines if line.cost is None}

    def cost_notes(self) -> dict[str, str]:
        """Per model version used: how its cost was computed, or why it has none."""
        return {f"{line.model} v{line.version}" if line.version else line.model: line.cost_basis for line in self.lines}

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for line in self.lines:
            writer.writerow(
                [
                    self.since.isoformat(), self.until.isoformat(), line.key, line.key_id, line.group, line.model,
                    line.version, line.variant or "", *(getattr(line, name) for name in COUNTER_COLUMNS),
                    "" if line.cost is None else repr(line.cost), self.currency, line.cost_basis,
                ]
            )
        return out.getvalue()


def format_cost(value: float | None, currency: str) -> str:
    """A cost for people: fixed decimals, never a misleading 0 for a small non-zero cost, "—"
    for none."""
    if value is None:
        return "—"
    smallest = 10.0**-COST_DECIMALS
    if 0 < value < smallest:
        return f"< {smallest:.{COST_DECIMALS}f} {currency}"
    return f"{value:.{COST_DECIMALS}f} {currency}"


def _summarise(name: str, lines: list[UsageLine]) -> UsageSummary:
    counters = Counters()
    for line in lines:
        counters.add(line.counters())
    priced = [line.cost for line in lines if line.cost is not None]
    return UsageSummary(
        name=name, **counters.as_dict(), cost=sum(priced) if priced else None, unpriced_lines=len(lines) - len(priced)
    )


def build_report(
    database: Database, where: UsageFilter, prices: PriceList, variants: Mapping[tuple[str, str], str] | None = None
) -> UsageReport:
    """Read the period's totals and price them. `variants` maps (model, version) to the
    version's quantisation, for display (the store does not read the model repository)."""
    key_names = {info.prefix: info.name for info in KeyStore(database).list()}
    lines = []
    for total in usage_totals(database, where):
        counters = total.counters
        price = prices.price(total.model, total.version)
        if counters.errors_4xx + counters.errors_5xx == counters.requests:
            cost, basis = 0.0, ERRORS_ONLY_BASIS  # refused work costs nothing, priced or not
        elif price is not None:
            cost, basis = price.cost(counters), price.basis
        else:
            cost, basis = None, prices.why_unpriced(total.model)
        lines.append(
            UsageLine(
                key=key_names.get(total.key_id, total.key_id) if total.key_id else NO_KEY_LABEL,
                key_id=total.key_id,
                group=total.key_group,
                model=total.model,
                version=total.version,
                variant=(variants or {}).get((total.model, total.version)),
                **total.counters.as_dict(),
                cost=cost,
                priced_unit=price.unit if price is not None else None,
                cost_basis=basis,
            )
        )
    return UsageReport(since=where.since, until=where.until, currency=prices.cost.currency, lines=lines)
