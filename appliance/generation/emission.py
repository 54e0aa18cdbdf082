"""Tokens become events: stop conditions, finish reasons, and every event a sequence receives.

The one place that decides when a sequence ends (an eos or stop token, a stop string, a
completed grammar, max_tokens, the context) and with which reason, that refuses, fails or
drains sequences, and that counts what was emitted (time to first token, inter-token gaps,
generated tokens, end-to-end latency, finish reasons). Runs on the engine thread only. Never runs the model and never blocks: a sink
only schedules delivery on its stream's event loop.
"""

from __future__ import annotations

import logging
import time

from appliance.errors import ApplianceError, CapacityExceeded, ShuttingDown
from appliance.generation.events import TokenEvent, TokenLogprob
from appliance.generation.metrics import LabelledMetrics
from appliance.generation.scheduler import Scheduler, Sequence

log = logging.getLogger(__name__)

#: Retry-After of a sequence refused after waiting: about when a busy engine frees a slot.
QUEUE_REFUSAL_RETRY_AFTER_S = 1.0


class Emitter:
    """Sends one model's sequences their events and retires those that are done."""

    def __init__(
        self, *, name: str, eos_ids: frozenset[int], context_length: int, scheduler: Scheduler, metrics: LabelledMetrics
    ) -> None:
        self._name = name
        self._eos_ids = eos_ids
        self._context_length = context_length
        self._scheduler = scheduler
        self._m = metrics

    def emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None) -> None:
        """Append tokens, apply stop conditions, and send one event."""
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self._m.time_to_first_token.observe(now - seq.submitted_at)
        elif seq.last_token_at is not None:
            gap = (now - seq.last_token_at) / len(tokens)
            for _ in tokens:
                self._m.time_per_output_token.observe(gap)
        seq.last_token_at = now
        text_parts: list[str] = []
        kept: list[int] = []
        reason: str | None = None
        p = seq.params
        for token in tokens:
            if (token in self._eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
                seq.output.append(token)
                reason = "stop"
                break
            seq.output.append(token)
            kept.append(token)
            text, hit = seq.stops.push(seq.detokenizer.step(token))
            text_parts.append(text)
            if hit:
                reason = "stop"
                break
            if seq.grammar is not None and self._grammar_done(seq, token):
                reason = "stop"
                break
            if len(seq.output) >= p.max_tokens or seq.total_tokens >= self._context_length:
                reason = "length"
                break
        self._m.generation_tokens.inc(len(kept) + (1 if reason == "stop" and len(kept) < len(tokens) else 0))
        if reason is None:
            seq.sink(TokenEvent(kept, "".join(text_parts), logprobs=logprobs))
            return
        if reason == "length":
            text_parts.append(seq.stops.flush())
        seq.finish_reason = reason
        self._scheduler.finish(seq, reason)
        self.finished(seq, emit_text="".join(text_parts), tokens=kept, logprobs=logprobs)

    def _grammar_done(self, seq: Sequence, token: int) -> bool:
        """Advance the sequence's grammar; True once it is complete (the answer is whole, so the
        sequence stops without spending a step on end-of-sequence). A token the grammar refuses
        cannot come from the masked sampler; if one does, the sequence ends rather than
        continuing unconstrained."""
        assert seq.grammar is not None
        if not seq.grammar.consume(token):
            log.warning("%s: sequence %s: the grammar refused token %d; ending it", self._name, seq.seq_id, token)
            return True
        return seq.grammar.stopped

    def finished(
        self, seq: Sequence, *, emit_text: str, tokens: list[int] | None = None, logprobs: list[TokenLogprob] | None = None
    ) -> None:
        """The final event of a sequence the scheduler has already retired (a sequence it
        retired without a reason was aborted)."""
        reason = seq.finish_reason or "abort"
        self._m.e2e_request_latency.observe(time.monotonic() - seq.submitted_at)
        self._m.count_finished(reason)
        completion = len(seq.output)
        seq.sink(
            TokenEvent(
                tokens or [],
                emit_text,
                finish_reason=reason,
                logprobs=logprobs,
                prompt_tokens=len(seq.prompt),
                completion_tokens=completion,
                cached_prompt_tokens=seq.cached_prompt_tokens,
            )
        )

    def refuse(self, seq: Sequence, now: float) -> None:
        """A sequence that waited too long for a slot: 429, nothing of it was generated."""
        waited = now - seq.submitted_at
        self._m.request_queue_time.observe(waited)
        self._m.count_finished("rejected")
        error = CapacityExceeded(
            f"model {self._name!r} is at capacity: the request waited {waited:.1f} s for a free sequence slot",
            retry_after_s=QUEUE_REFUSAL_RETRY_AFTER_S,
        )
        seq.sink(TokenEvent([], "", finish_reason="rejected", prompt_tokens=len(seq.prompt), error=error))

    def fail(self, seq: Sequence, error: ApplianceError) -> None:
        """End a sequence the scheduler does not hold (or no longer holds) with `error`."""
        seq.sink(TokenEvent([], "", finish_reason="error", error=error))

    def fail_all(self, error: ApplianceError) -> None:
        """A step failed: every sequence it may have touched ends with `error`; those still
        waiting keep their turn."""
        for group in (self._scheduler.running, self._scheduler.prefilling):
            for seq in list(group):
                self._scheduler.finish(seq, "error")
                self.fail(seq, error)

    def drain_on_stop(self, inbox: list[Sequence]) -> None:
        """The engine is stopping: every sequence, from the not yet scheduled `inbox` to the
        running ones, ends as aborted with ShuttingDown."""
        error = ShuttingDown("the generation engine stopped")
        for seq in [*inbox, *self._scheduler.waiting, *self._scheduler.prefilling, *self._scheduler.running]:
            self._scheduler.finish(seq, "abort")
            seq.sink(TokenEvent([], "", finish_reason="abort", error=error))
