"""The hardware cost model: what one hour of the box costs, and so what 1k tokens cost.

cost per hour = hardware price / (lifetime years x hours per year) + power draw (kW) x
electricity price per kWh. Cost per 1k units = cost per hour / (units per second x 3600) x 1000,
assuming the box is kept busy at the measured rate (the best case an operator can plan for;
an idle box costs the same per hour and serves nothing). The cloud comparison prices the same
units at `CostSettings`' per-token API prices. All figures are in `CostSettings.currency`.
Never measures anything: it is arithmetic over measured throughputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.config import CostSettings

SECONDS_PER_HOUR = 3600.0
#: Costs are quoted per this many units (tokens, embedded inputs).
UNITS_PER_QUOTE = 1000.0


@dataclass(frozen=True)
class HourlyCost:
    """The box's cost per hour of operation, split into its two parts."""

    amortisation_per_h: float
    power_per_h: float

    @property
    def total_per_h(self) -> float:
        return self.amortisation_per_h + self.power_per_h

    @classmethod
    def from_settings(cls, cost: CostSettings) -> HourlyCost:
        return cls(amortisation_per_h=cost.amortisation_per_h, power_per_h=cost.power_per_h)


def cost_per_1k(units_per_s: float, hourly: HourlyCost) -> float | None:
    """Cost of 1k units at a sustained `units_per_s`; None when nothing was served."""
    if units_per_s <= 0:
        return None
    return hourly.total_per_h / (units_per_s * SECONDS_PER_HOUR) * UNITS_PER_QUOTE


@dataclass(frozen=True)
class PointCost:
    """Cost figures of one sweep point; None where the workload produced no such unit."""

    currency: str
    cost_per_h: float
    per_1k_output_tokens: float | None
    cloud_per_1k_output_tokens: float | None
    per_1k_inputs: float | None
    cloud_per_1k_inputs: float | None

    @property
    def cloud_ratio(self) -> float | None:
        """How many times more the cloud API would charge for the same work (>1: box wins)."""
        pairs = (
            (self.per_1k_output_tokens, self.cloud_per_1k_output_tokens),
            (self.per_1k_inputs, self.cloud_per_1k_inputs),
        )
        for local, cloud in pairs:
            if local and cloud is not None:
                return cloud / local
        return None


def point_cost(
    cost: CostSettings,
    *,
    output_tokens_per_s: float,
    inputs_per_s: float,
    prompt_tokens_per_input: float | None,
) -> PointCost:
    """Local and cloud cost for the throughputs measured at one point.

    Generated tokens are priced at `cloud_price_per_1k_tokens`; embedded inputs at
    `cloud_price_per_1k_embedding_tokens` times their mean token count (cloud embedding APIs
    bill input tokens, so an input of 20 tokens costs 20 tokens there).
    """
    hourly = HourlyCost.from_settings(cost)
    per_token = cost_per_1k(output_tokens_per_s, hourly)
    per_input = cost_per_1k(inputs_per_s, hourly)
    cloud_inputs = None
    if per_input is not None and prompt_tokens_per_input is not None:
        cloud_inputs = cost.cloud_price_per_1k_embedding_tokens * prompt_tokens_per_input
    return PointCost(
        currency=cost.currency,
        cost_per_h=hourly.total_per_h,
        per_1k_output_tokens=per_token,
        cloud_per_1k_output_tokens=cost.cloud_price_per_1k_tokens if per_token is not None else None,
        per_1k_inputs=per_input,
        cloud_per_1k_inputs=cloud_inputs,
    )
