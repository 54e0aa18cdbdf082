"""What a batch cost, for the admin's Batches page: its counters priced with the same figures
as the Usage page (`appliance bench` throughputs and the cost model, usage_pricing.py).

A batch row does not record the model version that ran its lines: the batch is priced with the
figure of the version the repository serves now (the one its lines ran on unless a new version
was published meanwhile), else the bench's plain-run figure, and the basis says so. The units
are counted exactly: completion tokens, successful lines, and the embedding inputs or rerank
documents of the successful lines.

A batch none of whose lines completed did no billable work and costs 0, priced or not.
Reads no files and never measures.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.store.batch_store import BatchInfo
from appliance.store.usage_pricing import UNIT_LABELS, UNITS_PER_QUOTE, PriceList

NOTHING_RAN_BASIS = "no line completed: no work to price"


@dataclass(frozen=True)
class BatchCost:
    """A batch's cost (None when it cannot be priced) and how it was computed, or why not."""

    cost: float | None
    currency: str
    basis: str


def batch_cost(batch: BatchInfo, prices: PriceList, serving_version: int | None) -> BatchCost:
    """Price `batch`; `serving_version` is the version of its model served now (None when the
    model has none, or is gone)."""
    currency = prices.cost.currency
    if batch.completed == 0:
        return BatchCost(0.0, currency, NOTHING_RAN_BASIS)
    price = prices.price(batch.model, str(serving_version) if serving_version is not None else "")
    if price is None:
        return BatchCost(None, currency, prices.why_unpriced(batch.model))
    if price.unit == "completion_tokens":
        units = batch.completion_tokens
    elif price.unit == "requests":
        units = batch.completed
    else:  # embedding inputs or rerank documents: a batch runs one endpoint, so one of them
        units = batch.inputs
    version = (
        f"priced as v{serving_version}, the version served now (a batch does not record which version ran its lines)"
        if serving_version is not None
        else "no version of the model is served now"
    )
    return BatchCost(units / UNITS_PER_QUOTE * price.per_1k, currency, f"{units} {UNIT_LABELS[price.unit]}; {price.basis}; {version}")
