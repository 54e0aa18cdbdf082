"""Latency statistics of a benchmark point: percentiles, TTFT, inter-token latency, counts.

Pure arithmetic over finished requests, so it can be checked against hand-computed values.
Percentiles interpolate linearly between the two nearest ranks (numpy's default method), which
keeps p50 of an even-sized sample at the midpoint of the two middle values. Never measures
time itself and never does I/O.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Status of a request that never got an HTTP answer (refused, reset, timed out).
STATUS_NO_RESPONSE = 0
#: The percentiles every latency distribution reports.
REPORTED_PERCENTILES: tuple[int, ...] = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Raises ValueError on an empty sample or q outside 0..100: a percentile of nothing is a
    bug in the caller, not a number.
    """
    if not values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    weight = position - lower
    return ordered[lower] + (ordered[upper] - ordered[lower]) * weight


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency sample in seconds; all None when the sample is empty."""

    count: int
    mean_s: float | None
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None
    max_s: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None, None)
        return cls(
            count=len(values),
            mean_s=sum(values) / len(values),
            p50_s=percentile(values, 50),
            p90_s=percentile(values, 90),
            p99_s=percentile(values, 99),
            max_s=max(values),
        )


@dataclass
class RequestRecord:
    """What the load generator saw of one request; times are seconds on one monotonic clock.

    `chunk_times_s` holds the arrival time of every response chunk that carried output
    (streamed generation only). `output_tokens` is the server's own count when it sent one
    (usage), else the number of output-carrying chunks. `inputs` counts embedded inputs or
    inferred batch rows.
    """

    start_s: float
    end_s: float
    status: int
    output_tokens: int = 0
    prompt_tokens: int = 0
    inputs: int = 0
    chunk_times_s: list[float] = field(default_factory=list)
    error: str | None = None
    #: How an error is counted: the HTTP status, or "timeout", "connect", "stream", ... when
    #: there was no error status to count it under.
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300

    @property
    def error_key(self) -> str:
        return self.error_kind or str(self.status)

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: request sent until the first output-carrying chunk arrived."""
        return self.chunk_times_s[0] - self.start_s if self.chunk_times_s else None

    def inter_chunk_gaps_s(self) -> list[float]:
        """Gaps between consecutive output-carrying chunks (vLLM's ITL definition)."""
        times = self.chunk_times_s
        return [later - earlier for earlier, later in zip(times, times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (last - first chunk) / (tokens - 1)."""
        if len(self.chunk_times_s) < 2 or self.output_tokens < 2:
            return None
        return (self.chunk_times_s[-1] - self.chunk_times_s[0]) / (self.output_tokens - 1)


@dataclass(frozen=True)
class PointStats:
    """Everything measured at one sweep point (one concurrency or one arrival rate)."""

    requests: int
    ok: int
    errors_by_status: dict[str, int]
    wall_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens: int
    inputs: int
    inputs_per_s: float
    latency: Distribution
    ttft: Distribution
    itl: Distribution
    tpot: Distribution


def summarise(records: Sequence[RequestRecord], wall_s: float) -> PointStats:
    """Aggregate the measured (post-warm-up) requests of one point over `wall_s` seconds.

    Throughputs count successful requests only: an error is not work the box did for anyone.
    Errors are counted by HTTP status, or by the client-side kind ("timeout", "connect",
    "stream") when no error status came back.
    """
    if wall_s <= 0:
        raise ValueError(f"wall_s must be positive, got {wall_s}")
    good = [r for r in records if r.ok]
    errors = Counter(r.error_key for r in records if not r.ok)
    output_tokens = sum(r.output_tokens for r in good)
    inputs = sum(r.inputs for r in good)
    gaps = [gap for r in good for gap in r.inter_chunk_gaps_s()]
    return PointStats(
        requests=len(records),
        ok=len(good),
        errors_by_status=dict(sorted(errors.items())),
        wall_s=wall_s,
        requests_per_s=len(good) / wall_s,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_s,
        prompt_tokens=sum(r.prompt_tokens for r in good),
        inputs=inputs,
        inputs_per_s=inputs / wall_s,
        latency=Distribution.of([r.latency_s for r in good]),
        ttft=Distribution.of([t for r in good if (t := r.ttft_s) is not None]),
        itl=Distribution.of(gaps),
        tpot=Distribution.of([t for r in good if (t := r.tpot_s) is not None]),
    )


@dataclass(frozen=True)
class StreamTiming:
    """One of several streams started together: its first and last token, in seconds from the
    moment they were all sent, and how many tokens it produced."""

    first_s: float
    last_s: float
    tokens: int


def concurrent_stream_figures(streams: Sequence[StreamTiming]) -> dict[str, float]:
    """The figures the generation benchmarks compare: median time to first token; aggregate
    tokens/s from the first request sent to the last token received (prefill included); and
    tokens/s in the decode phase, after every stream has its first token (each stream's first
    token belongs to its prefill)."""
    total = sum(stream.tokens for stream in streams)
    end = max(stream.last_s for stream in streams)
    decode_start = max(stream.first_s for stream in streams)
    return {
        "ttft_s": statistics.median(stream.first_s for stream in streams),
        "aggregate_tok_s": total / end if end > 0 else 0.0,
        "decode_tok_s": (total - len(streams)) / (end - decode_start) if end > decode_start else 0.0,
    }
