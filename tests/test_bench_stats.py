"""Benchmark statistics against hand-computed values: percentiles, TTFT, inter-token latency,
throughput and error counts."""

from __future__ import annotations

import pytest

from appliance.benchmark.stats import Distribution, RequestRecord, StreamTiming, concurrent_stream_figures, percentile, summarise


def test_percentile_interpolates_linearly_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([7.5], 99) == 7.5


def test_percentile_refuses_an_empty_sample_and_q_out_of_range() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)


def test_distribution_of_nothing_is_all_none() -> None:
    empty = Distribution.of([])
    assert empty.count == 0 and empty.p50_s is None and empty.mean_s is None


def _streamed(start: float, end: float, chunks: list[float], tokens: int) -> RequestRecord:
    return RequestRecord(start_s=start, end_s=end, status=200, output_tokens=tokens, inputs=1, chunk_times_s=chunks)


def test_ttft_is_first_output_chunk_minus_request_start() -> None:
    record = _streamed(10.0, 11.0, [10.25, 10.5], 2)
    assert record.ttft_s == pytest.approx(0.25)


def test_tpot_spreads_the_time_after_the_first_token_over_the_remaining_tokens() -> None:
    # 4 tokens in 3 chunks (the last chunk carried 2): (1.0 - 0.2) / (4 - 1)
    record = _streamed(0.0, 1.0, [0.2, 0.6, 1.0], 4)
    assert record.tpot_s == pytest.approx(0.8 / 3)
    assert record.inter_chunk_gaps_s() == pytest.approx([0.4, 0.4])


def test_summary_counts_throughput_percentiles_and_errors_by_status() -> None:
    records = [
        _streamed(0.0, 1.0, [0.2, 0.4, 0.6, 1.0], 4),
        _streamed(0.5, 2.5, [1.0, 1.5, 2.5], 3),
        RequestRecord(start_s=0.1, end_s=0.2, status=429, error="queue full"),
        RequestRecord(start_s=0.3, end_s=2.0, status=0, error="timed out", error_kind="timeout"),
    ]
    stats = summarise(records, wall_s=2.5)
    assert stats.requests == 4 and stats.ok == 2
    assert stats.errors_by_status == {"429": 1, "timeout": 1}
    assert stats.requests_per_s == pytest.approx(0.8)
    assert stats.output_tokens == 7
    assert stats.output_tokens_per_s == pytest.approx(2.8)
    # end-to-end latency of the two successes: 1.0 and 2.0
    assert stats.latency.p50_s == pytest.approx(1.5)
    assert stats.latency.p90_s == pytest.approx(1.9)
    assert stats.latency.p99_s == pytest.approx(1.99)
    # TTFT 0.2 and 0.5
    assert stats.ttft.p50_s == pytest.approx(0.35)
    # gaps 0.2, 0.2, 0.4 | 0.5, 1.0 -> sorted 0.2 0.2 0.4 0.5 1.0
    assert stats.itl.count == 5
    assert stats.itl.mean_s == pytest.approx(0.46)
    assert stats.itl.p50_s == pytest.approx(0.4)
    assert stats.itl.p90_s == pytest.approx(0.8)
    assert stats.itl.p99_s == pytest.approx(0.98)
    # TPOT 0.8/3 and 1.5/2
    assert stats.tpot.p50_s == pytest.approx((0.8 / 3 + 0.75) / 2)


def test_failed_requests_do_not_count_as_throughput() -> None:
    records = [RequestRecord(start_s=0.0, end_s=0.1, status=503, error="not ready", inputs=8)]
    stats = summarise(records, wall_s=1.0)
    assert stats.ok == 0 and stats.inputs_per_s == 0.0 and stats.latency.count == 0


def test_summary_refuses_a_non_positive_wall_time() -> None:
    with pytest.raises(ValueError, match="wall_s"):
        summarise([], wall_s=0.0)


def test_concurrent_stream_figures_by_hand() -> None:
    # Two streams sent at 0: first tokens at 0.2 and 0.4 s, last at 1.2 and 2.4 s; 11 and 21 tokens.
    figures = concurrent_stream_figures([StreamTiming(0.2, 1.2, 11), StreamTiming(0.4, 2.4, 21)])
    assert figures["ttft_s"] == pytest.approx(0.3)
    assert figures["aggregate_tok_s"] == pytest.approx(32 / 2.4)
    # After both first tokens (0.4 s) to the end (2.4 s): 30 more tokens in 2.0 s.
    assert figures["decode_tok_s"] == pytest.approx(15.0)
