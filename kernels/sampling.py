"""Next-token sampling for a whole running batch at once, with the numpy reference it must match.

One call takes the logits of every running sequence [rows, vocab] and per-row parameter
arrays, and returns one token per row (plus log-probabilities when asked). Penalties,
temperature, top-k, top-p, min-p and the draw are vectorised over the batch: Python loops run
over rows only to gather parameters, never over the vocabulary.

The draw is an inverse-CDF lookup with one uniform number per row, taken from each sequence's
own seeded generator, over the kept tokens in vocabulary order. Fixing that order (rather than
"sorted by probability") lets the common cases (no top-k/top-p) skip sorting the vocabulary,
and makes `sample` and `reference_sample` pick the same token for the same uniform.

Order of operations, as in the usual serving engines: repetition penalty (prompt and output
tokens), presence and frequency penalties (output tokens), then greedy argmax or temperature ->
top-k -> top-p -> min-p -> draw. Log-probabilities are those of the model's own distribution
(log-softmax of the raw logits), as OpenAI's `logprobs` reports them.

Pure numpy: runs wherever the logits are on the host. Never imports onnxruntime, torch or
anything from the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: Candidates kept by the partial sort before top-k/top-p; a row whose top-p mass is not
#: reached inside them falls back to a full sort, so the result stays exact.
CANDIDATES = 256


@dataclass
class SamplingArrays:
    """Per-row sampling parameters for one batch (row i belongs to the i-th running sequence)."""

    temperature: np.ndarray  # float, 0 means greedy
    top_k: np.ndarray  # int, 0 means off
    top_p: np.ndarray  # float in (0, 1], 1 means off
    min_p: np.ndarray  # float in [0, 1), 0 means off
    repetition_penalty: np.ndarray  # float > 0, 1 means off
    presence_penalty: np.ndarray  # float, 0 means off
    frequency_penalty: np.ndarray  # float, 0 means off
    uniform: np.ndarray  # float64 in [0, 1): the row's draw for this step

    @classmethod
    def greedy(cls, rows: int) -> SamplingArrays:
        return cls(
            temperature=np.zeros(rows),
            top_k=np.zeros(rows, np.int64),
            top_p=np.ones(rows),
            min_p=np.zeros(rows),
            repetition_penalty=np.ones(rows),
            presence_penalty=np.zeros(rows),
            frequency_penalty=np.zeros(rows),
            uniform=np.zeros(rows),
        )


@dataclass
class SampleResult:
    tokens: np.ndarray  # [rows] int64
    logprobs: np.ndarray | None  # [rows] float32, logprob of the chosen token
    top_ids: np.ndarray | None  # [rows, n] int64, most likely tokens, best first
    top_logprobs: np.ndarray | None  # [rows, n] float32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def apply_penalties(
    logits: np.ndarray,
    arrays: SamplingArrays,
    prompt_tokens: Sequence[Sequence[int]],
    output_tokens: Sequence[Sequence[int]],
) -> np.ndarray:
    """Penalised copy of `logits` (or `logits` itself when no row has a penalty).

    Sparse: only the (row, token) pairs that occurred are touched, found with one np.unique
    over row * vocab + token, so the cost follows the number of tokens seen, not the vocabulary.
    """
    rep = arrays.repetition_penalty != 1.0
    pres_freq = (arrays.presence_penalty != 0.0) | (arrays.frequency_penalty != 0.0)
    if not rep.any() and not pres_freq.any():
        return logits
    logits = logits.copy()
    vocab = logits.shape[1]
    if rep.any():
        keys = _occurrence_keys([r for r in np.flatnonzero(rep)], vocab, prompt_tokens, output_tokens, with_prompt=True)
        if keys.size:
            unique = np.unique(keys)
            rows, cols = np.divmod(unique, vocab)
            values = logits[rows, cols]
            penalty = arrays.repetition_penalty[rows]
            logits[rows, cols] = np.where(values > 0, values / penalty, values * penalty)
    if pres_freq.any():
        keys = _occurrence_keys([r for r in np.flatnonzero(pres_freq)], vocab, prompt_tokens, output_tokens, with_prompt=False)
        if keys.size:
            unique, counts = np.unique(keys, return_counts=True)
            rows, cols = np.divmod(unique, vocab)
            logits[rows, cols] -= arrays.frequency_penalty[rows] * counts + arrays.presence_penalty[rows]
    return logits


def _occurrence_keys(
    rows: list[int],
    vocab: int,
    prompt_tokens: Sequence[Sequence[int]],
    output_tokens: Sequence[Sequence[int]],
    *,
    with_prompt: bool,
) -> np.ndarray:
    parts: list[np.ndarray] = []
    for row in rows:
        seen = np.asarray(output_tokens[row], np.int64)
        if with_prompt:
            seen = np.concatenate([np.asarray(prompt_tokens[row], np.int64), seen])
        parts.append(seen + row * vocab)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def filtered_probs(logits: np.ndarray, arrays: SamplingArrays) -> np.ndarray:
    """The distribution sampled rows draw from [rows, vocab] (float64): temperature, top-k,
    top-p and min-p applied, renormalised. Speculative rejection sampling needs it whole."""
    temperature = np.where(arrays.temperature > 0, arrays.temperature, 1.0)[:, None]
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=1, keepdims=True)
    keep = _kept_mask(probs, arrays)
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum(axis=1, keepdims=True)


def _kept_mask(probs: np.ndarray, arrays: SamplingArrays) -> np.ndarray:
    """Which tokens survive top-k, top-p and min-p, per row (exact)."""
    rows, vocab = probs.shape
    keep = np.ones_like(probs, dtype=bool)
    needs_sort = (arrays.top_k > 0) | (arrays.top_p < 1.0)
    if needs_sort.any():
        sorted_rows = np.flatnonzero(needs_sort)
        sub = probs[sorted_rows]
        width = min(vocab, max(CANDIDATES, int(arrays.top_k[sorted_rows].max())))
        if width < vocab:
            candidates = np.argpartition(-sub, width - 1, axis=1)[:, :width]
        else:
            candidates = np.broadcast_to(np.arange(vocab), (len(sorted_rows), vocab))
        cand_probs = np.take_along_axis(sub, candidates, axis=1)
        # Descending by probability, ties by lower token id (stable on the negated values
        # after ordering candidates by id).
        by_id = np.argsort(candidates, axis=1, kind="stable")
        candidates = np.take_along_axis(candidates, by_id, axis=1)
        cand_probs = np.take_along_axis(cand_probs, by_id, axis=1)
        order = np.argsort(-cand_probs, axis=1, kind="stable")
        ranked_ids = np.take_along_axis(candidates, order, axis=1)
        ranked = np.take_along_axis(cand_probs, order, axis=1)
        cumulative = np.cumsum(ranked, axis=1)
        top_k = arrays.top_k[sorted_rows]
        top_p = arrays.top_p[sorted_rows]
        positions = np.arange(width)[None, :]
        kept_rank = np.ones_like(ranked, dtype=bool)
        kept_rank &= (top_k[:, None] <= 0) | (positions < top_k[:, None])
        # Keep a token while the mass before it is still below top_p (the first always stays).
        kept_rank &= (cumulative - ranked) < top_p[:, None]
        inexact = (width < vocab) & (top_k <= 0) & (top_p < 1.0) & (cumulative[:, -1] < top_p)
        sub_keep = np.zeros((len(sorted_rows), vocab), dtype=bool)
        np.put_along_axis(sub_keep, ranked_ids, kept_rank, axis=1)
        if inexact.any():
            for local in np.flatnonzero(inexact):
                sub_keep[local] = _reference_top_k_top_p(sub[local], 0, float(top_p[local]))
        keep[sorted_rows] = sub_keep
    min_p = arrays.min_p
    if (min_p > 0).any():
        keep &= probs >= (min_p[:, None] * probs.max(axis=1, keepdims=True))
    return keep


def sample(
    logits: np.ndarray,
    arrays: SamplingArrays,
    prompt_tokens: Sequence[Sequence[int]],
    output_tokens: Sequence[Sequence[int]],
    *,
    top_logprobs: int = -1,
    logprob_kernel: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> SampleResult:
    """One token per row. `top_logprobs` < 0: no log-probabilities; 0: the chosen token's only;
    n > 0: also the n most likely tokens per row. `logprob_kernel` (sampling_onnx's) computes
    the log-probabilities instead of numpy when given; it must return at least n alternatives."""
    penalised = apply_penalties(logits, arrays, prompt_tokens, output_tokens)
    tokens = penalised.argmax(axis=1).astype(np.int64)
    sampled = np.flatnonzero(arrays.temperature > 0)
    if sampled.size:
        sub_arrays = _take(arrays, sampled)
        probs = filtered_probs(penalised[sampled], sub_arrays)
        tokens[sampled] = _draw(probs, sub_arrays.uniform)
    if top_logprobs >= 0 and logprob_kernel is not None:
        _, chosen, top_ids, top_values = logprob_kernel(logits, tokens)
        if top_logprobs == 0:
            return SampleResult(tokens, chosen, None, None)
        return SampleResult(tokens, chosen, top_ids[:, :top_logprobs], top_values[:, :top_logprobs])
    return _with_logprobs(logits, tokens, top_logprobs)


def _draw(probs: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Inverse CDF over vocabulary order; zero-probability tokens can never be chosen."""
    cumulative = np.cumsum(probs, axis=1)
    targets = uniform * cumulative[:, -1]
    chosen = (cumulative <= targets[:, None]).sum(axis=1)
    chosen = np.minimum(chosen, probs.shape[1] - 1)
    # Guard against float round-off landing on a zero-probability token at the very end.
    bad = probs[np.arange(len(chosen)), chosen] == 0
    if bad.any():
        chosen[bad] = probs[bad].argmax(axis=1)
    return chosen.astype(np.int64)


def _with_logprobs(logits: np.ndarray, tokens: np.ndarray, top_n: int) -> SampleResult:
    if top_n < 0:
        return SampleResult(tokens, None, None, None)
    logp = log_softmax(logits.astype(np.float32))
    rows = np.arange(len(tokens))
    chosen = logp[rows, tokens]
    if top_n == 0:
        return SampleResult(tokens, chosen, None, None)
    top_n = min(top_n, logp.shape[1])
    part = np.argpartition(-logp, top_n - 1, axis=1)[:, :top_n]
    part_values = np.take_along_axis(logp, part, axis=1)
    order = np.argsort(-part_values, axis=1, kind="stable")
    return SampleResult(
        tokens, chosen, np.take_along_axis(part, order, axis=1).astype(np.int64), np.take_along_axis(part_values, order, axis=1)
    )


def _take(arrays: SamplingArrays, rows: np.ndarray) -> SamplingArrays:
    return SamplingArrays(
        temperature=arrays.temperature[rows],
        top_k=arrays.top_k[rows],
        top_p=arrays.top_p[rows],
        min_p=arrays.min_p[rows],
        repetition_penalty=arrays.repetition_penalty[rows],
        presence_penalty=arrays.presence_penalty[rows],
        frequency_penalty=arrays.frequency_penalty[rows],
        uniform=arrays.uniform[rows],
    )


# --- numpy reference: one row at a time, full sorts, written for clarity not speed -----------


def _reference_top_k_top_p(probs: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    order = sorted(range(len(probs)), key=lambda token: (-probs[token], token))
    keep = np.zeros(len(probs), dtype=bool)
    mass = 0.0
    for rank, token in enumerate(order):
        if top_k > 0 and rank >= top_k:
            break
        if mass >= top_p:
            break
        keep[token] = True
        mass += probs[token]
    return keep


def reference_sample_row(
    logits: np.ndarray,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    presence_penalty: float,
    frequency_penalty: float,
    uniform: float,
    prompt_tokens: Sequence[int],
    output_tokens: Sequence[int],
) -> int:
    """The specification of `sample` for one row."""
    values = logits.astype(np.float32).copy()
    for token in set(prompt_tokens) | set(output_tokens):
        if repetition_penalty != 1.0:
            penalty = np.float32(repetition_penalty)
            values[token] = values[token] / penalty if values[token] > 0 else values[token] * penalty
    for token in set(output_tokens):
        count = list(output_tokens).count(token)
        values[token] -= np.float32(frequency_penalty) * count + np.float32(presence_penalty)
    if temperature <= 0:
        return int(np.argmax(values))
    scaled = values.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    keep = _reference_top_k_top_p(probs, top_k, top_p) if (top_k > 0 or top_p < 1.0) else np.ones(len(probs), bool)
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    kept = np.where(keep, probs, 0.0)
    kept /= kept.sum()
    target = uniform * float(np.cumsum(kept)[-1])
    cumulative = 0.0
    last = 0
    for token in range(len(kept)):
        if kept[token] == 0:
            continue
        last = token
        cumulative += kept[token]
        if cumulative > target:
            return token
    return last
