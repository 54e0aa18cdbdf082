"""The cost model and the variant recommendation, against hand-computed values."""

from __future__ import annotations

import pytest

from appliance.benchmark.compare import frontier, quality_loss, recommend
from appliance.benchmark.cost import HourlyCost, cost_per_1k, point_cost
from appliance.benchmark.results import PointResult, VariantResult
from appliance.config import HOURS_PER_YEAR, CostSettings
from appliance.errors import InvalidInput

# A box that costs exactly 1.0 per hour to own (price = hours in one year, 1 year) and 0.5 per
# hour to power (1000 W at 0.5 per kWh): 1.5 per hour in all.
ROUND = CostSettings(
    hardware_price=HOURS_PER_YEAR,
    lifetime_years=1.0,
    power_watts=1000.0,
    electricity_price_kwh=0.5,
    cloud_price_per_1k_tokens=0.01,
    cloud_price_per_1k_embedding_tokens=0.002,
)


def test_hourly_cost_is_amortisation_plus_power() -> None:
    hourly = HourlyCost.from_settings(ROUND)
    assert hourly.amortisation_per_h == pytest.approx(1.0)
    assert hourly.power_per_h == pytest.approx(0.5)
    assert hourly.total_per_h == pytest.approx(1.5)


def test_default_cost_model_figures() -> None:
    hourly = HourlyCost.from_settings(CostSettings())
    # 1500 over 3 years of 8766 h, plus 65 W at 0.30 per kWh
    assert hourly.amortisation_per_h == pytest.approx(1500 / (3 * 8766))
    assert hourly.power_per_h == pytest.approx(0.0195)
    # 100 tokens/s = 360k tokens/h
    assert cost_per_1k(100.0, hourly) == pytest.approx((1500 / 26298 + 0.0195) / 360)


def test_cost_per_1k_generated_tokens_and_the_cloud_ratio() -> None:
    # 50 tokens/s = 180k tokens/h -> 1.5 / 180 per 1k
    cost = point_cost(ROUND, output_tokens_per_s=50.0, inputs_per_s=0.0, prompt_tokens_per_input=None)
    assert cost.per_1k_output_tokens == pytest.approx(1.5 / 180)
    assert cost.cloud_per_1k_output_tokens == pytest.approx(0.01)
    assert cost.cloud_ratio == pytest.approx(0.01 / (1.5 / 180))
    assert cost.per_1k_inputs is None


def test_cost_per_1k_embedded_inputs_prices_the_cloud_by_tokens_per_input() -> None:
    # 10 inputs/s = 36k/h -> 1.5 / 36 per 1k; the cloud bills 20 tokens per input at 0.002 per 1k
    cost = point_cost(ROUND, output_tokens_per_s=0.0, inputs_per_s=10.0, prompt_tokens_per_input=20.0)
    assert cost.per_1k_inputs == pytest.approx(1.5 / 36)
    assert cost.cloud_per_1k_inputs == pytest.approx(0.04)
    assert cost.cloud_ratio == pytest.approx(0.04 / (1.5 / 36))
    assert cost.per_1k_output_tokens is None


def test_nothing_served_has_no_cost_per_token() -> None:
    assert cost_per_1k(0.0, HourlyCost.from_settings(ROUND)) is None


def test_quality_loss_by_task() -> None:
    assert quality_loss("text-generation", "int4", {"perplexity": 12.6, "reference_perplexity": 12.0})[0] == pytest.approx(0.05)
    assert quality_loss("text-generation", "int4", {"greedy_agreement": 0.9}) == (pytest.approx(0.1), "1 - greedy_agreement")
    assert quality_loss("feature-extraction", "int8", {"cosine_mean": 0.99})[0] == pytest.approx(0.01)
    assert quality_loss("text-classification", "int8", {"label_agreement": 0.97})[0] == pytest.approx(0.03)
    assert quality_loss("feature-extraction", "fp32", {}) == (0.0, "fp32 reference")
    assert quality_loss("feature-extraction", "int8", {}) == (None, None)


def _variant(version: int, quantization: str, cost: float, loss: float | None) -> VariantResult:
    point = PointResult(mode="closed", level=1, stats={}, cost={"per_1k_output_tokens": cost})
    return VariantResult(model="m", version=version, quantization=quantization, quality_loss=loss, points=[point])


VARIANTS = [
    _variant(1, "fp32", 0.010, 0.0),
    _variant(2, "int8", 0.006, 0.02),
    _variant(3, "int4", 0.004, 0.08),
    _variant(4, "fp16", 0.007, 0.05),  # dearer and worse than int8: off the frontier
    _variant(5, "int8-static", 0.003, None),  # no quality figures: never recommended
]


def test_frontier_keeps_only_variants_nothing_beats_on_both_axes() -> None:
    assert [p.variant.version for p in frontier(VARIANTS, "output_tokens")] == [3, 2, 1]


@pytest.mark.parametrize(("budget", "expected"), [(0.0, 1), (0.05, 2), (0.1, 3)])
def test_recommendation_is_the_cheapest_variant_within_the_quality_budget(budget: float, expected: int) -> None:
    pick = recommend(VARIANTS, "output_tokens", budget)
    assert pick.version == expected


def test_no_recommendation_when_nothing_fits_the_budget() -> None:
    pick = recommend([_variant(3, "int4", 0.004, 0.08)], "output_tokens", 0.01)
    assert pick.version is None and "0.01" in pick.reason


def test_a_negative_quality_budget_is_refused() -> None:
    with pytest.raises(InvalidInput, match="max-quality-loss"):
        recommend(VARIANTS, "output_tokens", -0.1)


def test_a_variants_cost_is_its_cheapest_sweep_point() -> None:
    points = [PointResult(mode="closed", level=c, stats={}, cost={"per_1k_output_tokens": v}) for c, v in ((1, 0.02), (4, 0.005), (8, 0.007))]
    assert VariantResult(model="m", points=points).best_cost_per_1k("output_tokens") == pytest.approx(0.005)
