"""bench/export_llm_tradeoffs.py's recipe rows are built when the script loads: a row that
combines recipe fields the recipe refuses (zero points searched without the scale search)
stopped every run of the script before it measured anything. Seconds."""

from __future__ import annotations

from appliance.export.llm.quantize import WeightOnlyRecipe
from tests.helpers.bench_modules import load_bench_module


def test_every_recipe_row_builds_and_the_optimum_rows_name_rows_that_exist() -> None:
    tradeoffs = load_bench_module("export_llm_tradeoffs")
    rows = tradeoffs.RECIPES
    assert rows["fp32"] is None
    assert all(isinstance(recipe, WeightOnlyRecipe) for name, recipe in rows.items() if name != "fp32")
    assert set(tradeoffs.OPTIMUM_RECIPES) <= set(rows)
    blocks = {recipe.block_size for recipe in rows.values() if recipe is not None and recipe.bits == 4}
    assert {32, 64, 128} <= blocks
