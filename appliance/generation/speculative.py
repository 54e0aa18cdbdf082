"""Speculative decoding: cheap drafts, verified by one run of the target model over all of them.

Drafters propose up to K next tokens for a sequence:
* `PromptLookupDrafter` (n-gram): finds the sequence's latest n-gram earlier in its own prompt
  or output and proposes what followed it there. Free, and strong when the answer copies from
  the input (rewrite, extract, code edits).
* a draft model (`DraftModel`, driven by `Speculator`): a smaller or more quantised model with
  the same tokenizer (the int4 variant drafting for fp32) decodes K tokens greedily in its own
  KV buffers.

Verification (`accept_greedy`, `accept_sampled`) keeps the target's output distribution: greedy
accepts the longest prefix equal to the target's argmax, so output is token-for-token what plain
greedy decoding gives (exactly so where the graph computes a row the same whatever the run's
width: fp32 does; CPU MatMulNBits takes another kernel for M > 1 and can flip near-ties);
sampling uses rejection sampling (accept a draft token d with
probability min(1, p(d)/q(d)); on rejection draw from the normalised residual max(p - q, 0)).
Rejected positions are rewound by resetting the sequence's cached length: the KV rows past it
are simply overwritten later. `SpeculationGate` picks each sequence's draft length from its
acceptance and what verification costs on this box (`VerificationCost`), down to none when
drafts do not pay. `Speculator` is the engine thread's speculative step: draft, verify, emit
what was accepted, and time the runs that feed the cost model.

Never imports onnxruntime directly. The scheduler imports this module (a `Sequence` carries its
`SpeculationGate`), so what `Speculator` takes from the scheduler, the emitter and the runners is
imported for type hints only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from appliance.generation.grammar import constrain_draft
from appliance.generation.sampling import sampling_arrays
from appliance.kernels.sampling import filtered_probs

if TYPE_CHECKING:
    from appliance.generation.emission import Emitter
    from appliance.generation.metrics import LabelledMetrics
    from appliance.generation.model_runner import DecoderRunner, KvBuffers
    from appliance.generation.scheduler import Sequence

log = logging.getLogger(__name__)

#: Longest draft verified in one run.
MAX_DRAFT_TOKENS = 8
#: n-gram sizes tried by prompt lookup, longest first.
NGRAM_MAX = 4
NGRAM_MIN = 2
#: Until the engine has timed verification runs, assume each extra verified token costs this
#: share of a plain one-token step. Measured on the 2-core AVX2 box (SmolLM2 int4): a 9-token
#: run took 3.4x a 1-token run, i.e. about 0.3 per extra token, because int8-activation
#: MatMulNBits is compute-bound once M > 1. On a GPU the share is near 0.
PRIOR_EXTRA_TOKEN_COST = 0.3
#: Until a draft-model step has been timed, assume it costs this share of a target step.
PRIOR_DRAFT_STEP_COST = 0.3
#: How far each new timing moves the running cost estimates.
COST_EMA_WEIGHT = 0.1
#: Acceptance evidence decays by this factor per verification, so a sequence that moves from
#: copying its input to free text stops drafting long within a few steps.
ACCEPTANCE_DECAY = 0.8
#: Pseudo-counts a new sequence starts with (acceptance 2/3): worth a first short draft.
PRIOR_ACCEPTED = 2.0
PRIOR_REJECTED = 1.0
#: Verify a draft only when the expected tokens per unit of cost beat plain decoding by this.
MIN_EXPECTED_GAIN = 1.05
#: With prompt lookup, a sequence whose drafts do not pay still tries a one-token draft after
#: this many steps, so its acceptance estimate can recover when the text starts copying again;
#: the interval doubles after every probe that does not bring drafting back.
PROBE_INTERVAL = 16
PROBE_INTERVAL_MAX = 512
#: Timing runs before serving when speculation is on: what a plain step, a full-width
#: verification and a draft step cost here (also warms the sessions up).
CALIBRATION_PAST_TOKENS = 32
CALIBRATION_RUNS = 3


class PromptLookupDrafter:
    """N-gram lookup in the sequence's own tokens."""

    def propose(self, tokens: Seq[int], k: int) -> list[int]:
        count = len(tokens)
        if k <= 0 or count < NGRAM_MIN + 1:
            return []
        array = np.asarray(tokens, np.int64)
        for size in range(min(NGRAM_MAX, count - 1), NGRAM_MIN - 1, -1):
            tail = array[count - size :]
            windows = np.lib.stride_tricks.sliding_window_view(array[: count - 1], size)
            matches = np.flatnonzero((windows == tail).all(axis=1))
            # The latest earlier occurrence that has continuation tokens.
            matches = matches[matches + size < count]
            if matches.size:
                start = int(matches[-1]) + size
                return [int(token) for token in array[start : start + k]]
        return []


class VerificationCost:
    """What speculation costs on this box, in units of one plain one-token decode step.

    Learned online from the engine's own timings, because the answer differs by an order of
    magnitude between machines: on a GPU (or a memory-bound fp32 model) verifying 8 tokens
    costs about one step, so long drafts pay; on a CPU without VNNI every extra token costs a
    third of a step, so only well-accepted drafts do.
    """

    def __init__(self) -> None:
        self.step_s: float | None = None
        self.extra_token = PRIOR_EXTRA_TOKEN_COST
        self.draft_step = PRIOR_DRAFT_STEP_COST

    @staticmethod
    def _blend(old: float, new: float) -> float:
        return (1 - COST_EMA_WEIGHT) * old + COST_EMA_WEIGHT * new

    def observe_step(self, seconds: float) -> None:
        """A plain decode step of one sequence took `seconds`."""
        self.step_s = seconds if self.step_s is None else self._blend(self.step_s, seconds)

    def observe_verification(self, width: int, seconds: float) -> None:
        """A verification run over `width` tokens (last token + draft) took `seconds`."""
        if self.step_s is None or width < 2:
            return
        self.extra_token = self._blend(self.extra_token, _extra_token_share(seconds, self.step_s, width))

    def observe_draft_step(self, seconds: float) -> None:
        """One draft-model step took `seconds`."""
        if self.step_s is not None:
            self.draft_step = self._blend(self.draft_step, min(seconds / self.step_s, 2.0))

    def seed(self, step_s: float, verification_width: int, verification_s: float, draft_step_s: float | None) -> None:
        """Replace the priors with timings taken on this box before serving."""
        self.step_s = step_s
        self.extra_token = _extra_token_share(verification_s, step_s, verification_width)
        if draft_step_s is not None:
            self.draft_step = min(draft_step_s / step_s, 2.0)

    def relative(self, draft_length: int, *, model_drafted: bool) -> float:
        """Cost of drafting (if a model drafts) and verifying `draft_length` tokens."""
        drafting = self.draft_step * draft_length if model_drafted else 0.0
        return 1.0 + self.extra_token * draft_length + drafting


def _extra_token_share(seconds: float, step_s: float, width: int) -> float:
    """What each token beyond the first of a `width`-token run costs, as a share of a plain
    step; clamped, so one run disturbed by the machine cannot swing the estimate wildly."""
    return min(max((seconds / step_s - 1.0) / (width - 1), 0.0), 2.0)


def expected_emitted(acceptance: float, draft_length: int) -> float:
    """Tokens one verification emits when each draft token is accepted with `acceptance`
    until the first rejection: the accepted prefix plus the target's own next token."""
    if acceptance >= 1.0:
        return 1.0 + draft_length
    return 1.0 + acceptance * (1.0 - acceptance**draft_length) / (1.0 - acceptance)


@dataclass
class SpeculationGate:
    """Per-sequence acceptance record that picks the draft length worth verifying, or none.

    Acceptance is estimated as accepted / (accepted + rejections), the per-token rate of a
    draft that runs until its first rejection, with old evidence decaying. The length chosen
    maximises expected emitted tokens per unit of cost; when no length beats plain decoding
    the sequence decodes plainly: with prompt lookup it probes now and then (free), with a
    draft model it stops for good.
    """

    accepted_weight: float = PRIOR_ACCEPTED
    rejected_weight: float = PRIOR_REJECTED
    proposed: int = 0
    accepted: int = 0
    idle_steps: int = 0
    probe_interval: int = PROBE_INTERVAL
    #: False once a draft model stopped paying: it could only come back by catching up on
    #: every skipped token, which costs about what the skipped steps would have saved.
    enabled: bool = True

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.accepted_weight = ACCEPTANCE_DECAY * self.accepted_weight + accepted
        self.rejected_weight = ACCEPTANCE_DECAY * self.rejected_weight + (1.0 if accepted < proposed else 0.0)

    @property
    def estimate(self) -> float:
        """Current per-token acceptance estimate."""
        return self.accepted_weight / (self.accepted_weight + self.rejected_weight)

    @property
    def acceptance(self) -> float:
        """Share of all drafted tokens accepted so far (what the metrics report)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    def choose_length(self, available: int, cost: VerificationCost, *, model_drafted: bool) -> int:
        """How many of `available` draft tokens to verify now; 0 means decode plainly."""
        if not self.enabled:
            return 0
        best_length, best_gain = 0, MIN_EXPECTED_GAIN
        for length in range(1, min(available, MAX_DRAFT_TOKENS) + 1):
            gain = expected_emitted(self.estimate, length) / cost.relative(length, model_drafted=model_drafted)
            if gain > best_gain:
                best_length, best_gain = length, gain
        if best_length:
            self.idle_steps = 0
            self.probe_interval = PROBE_INTERVAL
            return best_length
        if available <= 0:
            return 0
        if model_drafted:
            self.enabled = False
            return 0
        self.idle_steps += 1
        if self.idle_steps < self.probe_interval:
            return 0
        self.idle_steps = 0
        self.probe_interval = min(2 * self.probe_interval, PROBE_INTERVAL_MAX)
        return 1


def accept_greedy(target_argmax: np.ndarray, draft: Seq[int]) -> list[int]:
    """Tokens to emit: the accepted draft prefix plus the target's own next token.

    `target_argmax[j]` is the target's choice after the last accepted token and draft[:j];
    len(target_argmax) == len(draft) + 1.
    """
    emitted: list[int] = []
    for position, token in enumerate(draft):
        choice = int(target_argmax[position])
        emitted.append(choice)
        if choice != token:
            return emitted
    emitted.append(int(target_argmax[len(draft)]))
    return emitted


def accept_sampled(
    target_probs: np.ndarray,
    draft: Seq[int],
    draft_probs: np.ndarray | None,
    rng: np.random.Generator,
) -> list[int]:
    """Rejection sampling over a draft. `target_probs` [len(draft)+1, vocab] is the target's
    (filtered) distribution at each position; `draft_probs` [len(draft), vocab] the drafter's,
    or None for a deterministic drafter (prompt lookup: q is one-hot on the draft token)."""
    emitted: list[int] = []
    for position, token in enumerate(draft):
        p = target_probs[position]
        q_token = 1.0 if draft_probs is None else float(draft_probs[position, token])
        if q_token > 0 and rng.random() < min(1.0, float(p[token]) / q_token):
            emitted.append(int(token))
            continue
        if draft_probs is None:
            residual = p.copy()
            residual[token] = 0.0
        else:
            residual = np.maximum(p - draft_probs[position], 0.0)
        total = residual.sum()
        if total <= 0:
            residual, total = p, p.sum()
        emitted.append(int(np.searchsorted(np.cumsum(residual), rng.random() * total, side="right")))
        return emitted
    last = target_probs[len(draft)]
    emitted.append(int(np.searchsorted(np.cumsum(last), rng.random() * last.sum(), side="right")))
    return emitted


@dataclass
class DraftModel:
    """A draft model's runner and its own KV buffers, slot for slot beside the target's."""

    runner: DecoderRunner
    store: KvBuffers


class Speculator:
    """The speculative step of one engine: for a lone running sequence, draft, verify with one
    run of the target, emit what was accepted.

    `mode` and `cost` are read at every step, so they may be replaced on a live engine (tests
    hold the costs fixed or switch speculation off).
    """

    def __init__(
        self,
        *,
        name: str,
        mode: str,
        runner: DecoderRunner,
        draft: DraftModel | None,
        context_length: int,
        prefill_chunk_tokens: int,
        prompt_lookup: PromptLookupDrafter,
        cost: VerificationCost,
        emitter: Emitter,
        metrics: LabelledMetrics,
        counters: dict[str, int],
        skip_forced_tokens: bool = True,
    ) -> None:
        """`mode` is the engine's `speculative` setting ("off", "prompt-lookup", "draft");
        `counters` is the engine's own dict, where the drafted, accepted and forced tokens add
        up; `skip_forced_tokens`: verify a grammar's forced tokens in one run (setting
        generation.skip_forced_tokens)."""
        self.mode = mode
        self.skip_forced_tokens = skip_forced_tokens
        self.cost = cost
        self._name = name
        self._runner = runner
        self._draft = draft
        self._context_length = context_length
        self._prefill_chunk_tokens = prefill_chunk_tokens
        self._prompt_lookup = prompt_lookup
        self._emitter = emitter
        self._m = metrics
        self._counters = counters

    def calibrate(self) -> None:
        """Seed the cost model from this box's own timings before serving, so the first
        sequences do not pay for optimistic priors; not when speculation is off or the context
        is too short for the timing runs."""
        if self.mode == "off" or self._context_length <= CALIBRATION_PAST_TOKENS + MAX_DRAFT_TOKENS + 1:
            return
        try:
            self._time_runs()
        except Exception:  # noqa: BLE001 - serving without timings beats not serving
            log.warning("%s: could not time speculation; using the default cost figures", self._name, exc_info=True)

    def observe_plain_step(self, seconds: float) -> None:
        """A plain decode step of one sequence took `seconds`: the unit every speculation cost
        is measured in."""
        self.cost.observe_step(seconds)

    def speculate(self, seq: Sequence) -> bool:
        """One speculative step for a lone sequence; False when no draft was worth verifying.

        A constrained sequence first takes the tokens its grammar forces as the draft (certain
        to be accepted, so no gate decides); otherwise its drafts are cut to what the grammar
        accepts before they are verified, and each verified row gets the grammar's mask."""
        p = seq.params
        if p.logprobs >= 0 or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
            return False
        room = min(p.max_tokens - len(seq.output), self._context_length - seq.total_tokens) - 1
        k = min(MAX_DRAFT_TOKENS, room)
        if k <= 0:
            return False
        grammar = seq.grammar
        forced = grammar.forced(k) if grammar is not None and self.skip_forced_tokens else []
        if forced:
            draft = forced
        elif self.mode == "off" or not p.speculate:
            return False
        elif self.mode == "draft" and self._draft is not None:
            length = seq.gate.choose_length(k, self.cost, model_drafted=True)
            draft = self._draft_model_propose(seq, length) if length else []
        else:
            proposal = self._prompt_lookup.propose(seq.tokens, k)
            draft = proposal[: seq.gate.choose_length(len(proposal), self.cost, model_drafted=False)]
        if grammar is not None and not forced:
            draft = draft[: grammar.valid_prefix(draft)]
        if not draft:
            return False
        ids = np.asarray([[seq.output[-1], *draft]], np.int64)
        started = time.perf_counter()
        logits = self._runner.forward(seq.slot, ids, np.asarray([seq.num_cached]), np.asarray([len(draft) + 1]), all_logits=True)[0]
        self.cost.observe_verification(len(draft) + 1, time.perf_counter() - started)
        if grammar is not None:
            constrain_draft(logits, grammar, draft)
        if p.greedy:
            emitted = accept_greedy(logits.argmax(axis=1), draft)
        else:
            rows = len(draft) + 1
            arrays = sampling_arrays([seq] * rows)
            emitted = accept_sampled(filtered_probs(logits, arrays), draft, None, seq.rng)
        accepted = len(emitted) - 1
        if forced:
            self._counters["forced_tokens"] += accepted
            self._m.forced_tokens.inc(accepted)
        else:
            seq.gate.record(len(draft), accepted)
            self._counters["draft_tokens"] += len(draft)
            self._counters["accepted_tokens"] += accepted
            self._m.spec_draft_tokens.inc(len(draft))
            self._m.spec_accepted_tokens.inc(accepted)
            self._m.spec_emitted_tokens.inc(len(emitted))
        old_total = seq.total_tokens
        seq.num_cached += len(emitted)
        seq.draft_cached = min(seq.draft_cached, old_total + accepted)
        self._emitter.emit(seq, emitted, None)
        return True

    def _draft_model_propose(self, seq: Sequence, k: int) -> list[int]:
        """Greedy draft of `k` tokens. The draft catches up on the prompt in the target's own
        chunks (prompt runs: an int8-cache draft attends them in fp32, as the target did), and
        what it has not seen of the output (the target's correction or bonus token) goes in
        with the first draft run, so catching up on the output costs no run of its own."""
        assert self._draft is not None
        runner = self._draft.runner
        tokens = seq.tokens
        chunk = self._prefill_chunk_tokens
        prompt_end = len(seq.prompt)
        while seq.draft_cached < prompt_end:
            width = min(chunk, prompt_end - seq.draft_cached)
            runner.forward(
                seq.slot,
                np.asarray([tokens[seq.draft_cached : seq.draft_cached + width]], np.int64),
                np.asarray([seq.draft_cached]),
                np.asarray([width]),
                all_logits=False,
                prompt=True,
            )
            seq.draft_cached += width
        pending = tokens[seq.draft_cached :]
        draft: list[int] = []
        for _ in range(k):
            started = time.perf_counter()
            logits = runner.forward(
                seq.slot,
                np.asarray([pending], np.int64),
                np.asarray([seq.draft_cached]),
                np.asarray([len(pending)]),
                all_logits=False,
            )
            if len(pending) == 1:
                self.cost.observe_draft_step(time.perf_counter() - started)
            seq.draft_cached += len(pending)
            pending = [int(logits[0].argmax())]
            draft.append(pending[0])
        return draft

    def _time_runs(self) -> None:
        """Time a plain step, a full-width verification and a draft step on slot 0 (which the
        next prefill overwrites) and seed the cost model with the medians."""

        def timed(runner: DecoderRunner, width: int) -> float:
            ids = np.ones((1, width), np.int64)
            times: list[float] = []
            for _ in range(CALIBRATION_RUNS):
                started = time.perf_counter()
                runner.forward(0, ids, np.asarray([CALIBRATION_PAST_TOKENS]), np.asarray([width]), all_logits=True)
                times.append(time.perf_counter() - started)
            return float(np.median(times))

        runners = [self._runner] + ([self._draft.runner] if self._draft is not None else [])
        for runner in runners:
            past = np.ones((1, CALIBRATION_PAST_TOKENS), np.int64)
            runner.forward(0, past, np.zeros(1, np.int64), np.asarray([CALIBRATION_PAST_TOKENS]), all_logits=False)
        step = timed(self._runner, 1)
        verification = timed(self._runner, MAX_DRAFT_TOKENS + 1)
        draft_step = timed(self._draft.runner, 1) if self._draft is not None else None
        self.cost.seed(step, MAX_DRAFT_TOKENS + 1, verification, draft_step)
        log.info(
            "%s: speculation costs here: verifying %d tokens %.2fx a step%s",
            self._name,
            MAX_DRAFT_TOKENS + 1,
            verification / step,
            f", a draft step {draft_step / step:.2f}x" if draft_step is not None else "",
        )
