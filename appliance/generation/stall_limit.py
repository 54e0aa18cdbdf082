"""How many prompt tokens a step may prefill while other streams are decoding (the stall limit).

Why: a step runs one prefill chunk, then the decode batch, so every stream decoding beside the
chunk waits for it. At 0.5 B on the 2-core box a 100-token chunk takes ~200 ms and a 32-row
decode step ~95 ms, so whenever streams start beside running ones the running ones' gaps
triple (32 streams: inter-token p99 8.1x a lone stream's, docs/BENCHMARKS.md). Holding a step
that carries a chunk to `factor` x a lone sequence's decode step bounds those gaps; the prompt
then takes more, smaller chunks, so its own time to first token grows: the trade is measured
in docs/BENCHMARKS.md.

The limit is in units of this box's own single-sequence decode step, measured while serving,
so one setting means the same for a 135 M model and a 1.5 B one. The cost of a chunk is
estimated per prompt token from the chunks run so far (a run also has a fixed cost, so the
per-token figure of small chunks is higher; the estimate settles where chunks take their
allowance). Without a stream decoding beside it, or with factor 0, a chunk is the full
`prefill_chunk_tokens`; a limited chunk never drops under MIN_CHUNK_TOKENS, so a prompt always
advances. Used on the engine thread only.
"""

from __future__ import annotations

#: Smallest chunk the limit cuts a prompt into: below it a run's fixed cost (reading every
#: weight once) dominates and the prompt would crawl.
MIN_CHUNK_TOKENS = 16
#: Weight of a new timing in the running averages: a few steps follow a change of batch size.
TIMING_EMA_WEIGHT = 0.25


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - TIMING_EMA_WEIGHT) * old + TIMING_EMA_WEIGHT * new


class StallLimit:
    """Chunk sizes that keep a step with a prefill chunk within `factor` lone decode steps."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self._single_step_s: float | None = None
        #: Until a lone sequence has decoded, the fastest decode step seen stands in for it
        #: (never faster than a lone step, so the limit errs towards larger chunks).
        self._fastest_step_s: float | None = None
        self._batch_step_s: float | None = None
        self._prefill_token_s: float | None = None

    def observe_decode(self, rows: int, seconds: float) -> None:
        """A plain decode run of `rows` sequences took `seconds`."""
        self._batch_step_s = _ema(self._batch_step_s, seconds)
        if rows == 1:
            self._single_step_s = _ema(self._single_step_s, seconds)
        self._fastest_step_s = seconds if self._fastest_step_s is None else min(self._fastest_step_s, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill run of `tokens` prompt tokens took `seconds`."""
        if tokens > 0:
            self._prefill_token_s = _ema(self._prefill_token_s, seconds / tokens)

    def chunk_tokens(self, full: int) -> int:
        """Prompt tokens for a chunk that runs beside decoding streams (`full` without a limit)."""
        single = self._single_step_s if self._single_step_s is not None else self._fastest_step_s
        if self.factor <= 0 or single is None or self._batch_step_s is None or self._prefill_token_s is None:
            return full
        allowance_s = self.factor * single - self._batch_step_s
        return max(min(MIN_CHUNK_TOKENS, full), min(full, int(allowance_s / self._prefill_token_s)))
