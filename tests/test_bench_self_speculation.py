"""bench/self_speculation_sizes.py: the draft's acceptance is read from the speculative
server's Prometheus counters, summed over their label sets."""

from __future__ import annotations

import pytest

from tests.helpers.bench_modules import load_bench_module

speculation = load_bench_module("self_speculation_sizes")

METRICS = """\
# HELP appliance_spec_decode_num_draft_tokens_total Draft tokens proposed.
# TYPE appliance_spec_decode_num_draft_tokens_total counter
appliance_spec_decode_num_draft_tokens_total{model="bench-tiny-q4_0"} 120.0
appliance_spec_decode_num_draft_tokens_total{model="other"} 4.0
appliance_spec_decode_num_draft_tokens_created{model="bench-tiny-q4_0"} 1.7e+09
appliance_spec_decode_num_accepted_tokens_total{model="bench-tiny-q4_0"} 96.0
"""


@pytest.mark.parametrize(
    ("name", "expected"),
    [(speculation.DRAFT_TOKENS, 124.0), (speculation.ACCEPTED_TOKENS, 96.0), ("appliance_absent_total", 0.0)],
)
def test_counters_are_summed_over_label_sets_and_absent_ones_are_zero(name: str, expected: float) -> None:
    assert speculation.counter(METRICS, name) == expected
