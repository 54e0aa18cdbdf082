"""Speculative decoding: cheap drafts, verified by one run of the target model over all of them.

Drafters propose up to K next tokens for a sequence:
* `PromptLookupDrafter` (n-gram): finds the sequence's latest n-gram earlier in its own prompt
  or output and proposes what followed it there. Free, and strong when the answer copies from
  the input (rewrite, extract, code edits).
* `DraftModelDrafter`: a smaller or more quantised model with the same tokenizer (the int4
  variant drafting for fp32) decodes K tokens greedily in its own KV buffers.

Verification (`accept_greedy`, `accept_sampled`) keeps the target's output distribution: greedy
accepts the longest prefix equal to the target's argmax, so output is token-for-token what plain
greedy decoding gives; sampling uses rejection sampling (accept a draft token d with
probability min(1, p(d)/q(d)); on rejection draw from the normalised residual max(p - q, 0)).
Rejected positions are rewound by resetting the sequence's cached length: the KV rows past it
are simply overwritten later. `SpeculationGate` turns speculation off for a sequence whose
acceptance stays low. Never imports onnxruntime directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Longest draft verified in one run.
MAX_DRAFT_TOKENS = 8
#: n-gram sizes tried by prompt lookup, longest first.
NGRAM_MAX = 4
NGRAM_MIN = 2
#: After this many proposed tokens, a sequence whose acceptance is below the floor stops.
GATE_MIN_PROPOSED = 24
GATE_MIN_ACCEPTANCE = 0.3
#: Draft-model drafts start at this length and adapt between the bounds: each drafted token
#: costs a draft-model step, so the length follows how far drafts tend to be accepted.
DRAFT_LENGTH_START = 4
DRAFT_LENGTH_MIN = 2


class PromptLookupDrafter:
    """N-gram lookup in the sequence's own tokens."""

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
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


@dataclass
class SpeculationGate:
    """Per-sequence acceptance bookkeeping that switches speculation off when it does not pay."""

    proposed: int = 0
    accepted: int = 0
    enabled: bool = True
    draft_length: int = DRAFT_LENGTH_START

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        if self.proposed >= GATE_MIN_PROPOSED and self.accepted < GATE_MIN_ACCEPTANCE * self.proposed:
            self.enabled = False

    def adapt(self, proposed: int, accepted: int) -> None:
        """Longer drafts after a fully accepted one, shorter after an early rejection."""
        if accepted == proposed:
            self.draft_length = min(self.draft_length + 2, MAX_DRAFT_TOKENS)
        else:
            self.draft_length = max(DRAFT_LENGTH_MIN, accepted + 1)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def accept_greedy(target_argmax: np.ndarray, draft: Sequence[int]) -> list[int]:
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
    draft: Sequence[int],
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
