"""Ollama's keep_alive as clients send it: seconds, durations, never, and what is refused."""

from __future__ import annotations

import pytest

from appliance.errors import InvalidInput
from appliance.serving.keep_alive import KEEP_FOREVER, parse_keep_alive


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(None, None), (0, 0.0), (30, 30.0), (2.5, 2.5), ("45", 45.0), ("10m", 600.0), ("1h30m", 5400.0), ("500ms", 0.5), ("2d", 172800.0)],
)
def test_seconds_and_durations(given: object, seconds: float | None) -> None:
    assert parse_keep_alive(given) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("given", [-1, -5, "-1", "-10m"])
def test_any_negative_value_keeps_the_model_loaded(given: object) -> None:
    assert parse_keep_alive(given) == KEEP_FOREVER  # type: ignore[arg-type]


@pytest.mark.parametrize("given", ["soon", "10 minutes", "m", "", True, "nan", 1e12])
def test_anything_else_is_a_400_naming_keep_alive(given: object) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_keep_alive(given)  # type: ignore[arg-type]
    assert refused.value.field == "keep_alive"
