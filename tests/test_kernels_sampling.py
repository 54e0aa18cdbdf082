"""The batched sampling kernel against its one-row-at-a-time numpy reference, and speculative acceptance."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.generation.speculative import (
    PROBE_INTERVAL,
    PromptLookupDrafter,
    SpeculationGate,
    VerificationCost,
    accept_greedy,
    accept_sampled,
    expected_emitted,
)
from appliance.kernels.sampling import (
    CANDIDATES,
    SamplingArrays,
    filtered_probs,
    log_softmax,
    reference_sample_row,
    sample,
)

VOCAB = 1000


def _arrays(rows: int, rng: np.random.Generator, **fixed: object) -> SamplingArrays:
    arrays = SamplingArrays(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.5], rows),
        top_k=rng.choice([0, 1, 5, 50], rows).astype(np.int64),
        top_p=rng.choice([1.0, 0.9, 0.5], rows),
        min_p=rng.choice([0.0, 0.05], rows),
        repetition_penalty=rng.choice([1.0, 1.3], rows).astype(np.float32),
        presence_penalty=rng.choice([0.0, 0.5, -0.5], rows).astype(np.float32),
        frequency_penalty=rng.choice([0.0, 0.3], rows).astype(np.float32),
        uniform=rng.random(rows),
    )
    for name, value in fixed.items():
        setattr(arrays, name, np.full(rows, value, dtype=getattr(arrays, name).dtype))
    return arrays


def _reference(logits: np.ndarray, arrays: SamplingArrays, prompts: list[list[int]], outputs: list[list[int]]) -> list[int]:
    return [
        reference_sample_row(
            logits[row],
            temperature=float(arrays.temperature[row]),
            top_k=int(arrays.top_k[row]),
            top_p=float(arrays.top_p[row]),
            min_p=float(arrays.min_p[row]),
            repetition_penalty=float(arrays.repetition_penalty[row]),
            presence_penalty=float(arrays.presence_penalty[row]),
            frequency_penalty=float(arrays.frequency_penalty[row]),
            uniform=float(arrays.uniform[row]),
            prompt_tokens=prompts[row],
            output_tokens=outputs[row],
        )
        for row in range(len(logits))
    ]


@pytest.mark.parametrize("seed", range(6))
def test_batched_kernel_picks_the_same_tokens_as_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = 16
    logits = (rng.standard_normal((rows, VOCAB)) * 3).astype(np.float32)
    prompts = [list(rng.integers(0, VOCAB, rng.integers(1, 30))) for _ in range(rows)]
    outputs = [list(rng.integers(0, VOCAB, rng.integers(0, 20))) for _ in range(rows)]
    arrays = _arrays(rows, rng)
    assert list(sample(logits, arrays, prompts, outputs).tokens) == _reference(logits, arrays, prompts, outputs)


def test_greedy_rows_take_the_argmax() -> None:
    logits = np.random.default_rng(1).standard_normal((4, VOCAB)).astype(np.float32)
    result = sample(logits, SamplingArrays.greedy(4), [[]] * 4, [[]] * 4)
    assert list(result.tokens) == list(logits.argmax(axis=1))


def test_flat_distribution_with_top_p_falls_back_to_an_exact_full_sort() -> None:
    # Nearly uniform logits: the top CANDIDATES tokens hold far less than top_p of the mass.
    rng = np.random.default_rng(3)
    vocab = CANDIDATES * 8
    logits = (rng.standard_normal((3, vocab)) * 0.01).astype(np.float32)
    arrays = _arrays(3, rng, temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    assert list(sample(logits, arrays, [[]] * 3, [[]] * 3).tokens) == _reference(logits, arrays, [[]] * 3, [[]] * 3)
    kept = (filtered_probs(logits, arrays) > 0).sum(axis=1)
    assert (kept > CANDIDATES).all()


def test_top_k_one_is_greedy_and_min_p_drops_unlikely_tokens() -> None:
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((5, VOCAB)) * 4).astype(np.float32)
    arrays = _arrays(5, rng, temperature=1.0, top_k=1, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    assert list(sample(logits, arrays, [[]] * 5, [[]] * 5).tokens) == list(logits.argmax(axis=1))
    arrays.top_k[:] = 0
    arrays.min_p[:] = 0.5
    probs = filtered_probs(logits, arrays)
    softmax = np.exp(log_softmax(logits.astype(np.float64)))
    assert ((probs > 0) == (softmax >= 0.5 * softmax.max(axis=1, keepdims=True))).all()


def test_penalties_push_seen_tokens_down() -> None:
    logits = np.zeros((1, 10), np.float32)
    logits[0, 3] = 1.0
    arrays = SamplingArrays.greedy(1)
    arrays.frequency_penalty[:] = 2.0
    assert sample(logits, arrays, [[3]], [[3]]).tokens[0] != 3
    arrays = SamplingArrays.greedy(1)
    arrays.repetition_penalty[:] = 5.0
    logits[0, 4] = 0.5
    assert sample(logits, arrays, [[3]], [[]]).tokens[0] == 4


def test_logprobs_are_the_models_log_softmax_with_the_top_alternatives() -> None:
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, VOCAB)).astype(np.float32)
    result = sample(logits, SamplingArrays.greedy(3), [[]] * 3, [[]] * 3, top_logprobs=4)
    expected = log_softmax(logits)
    assert result.logprobs is not None and result.top_ids is not None and result.top_logprobs is not None
    np.testing.assert_allclose(result.logprobs, expected[np.arange(3), result.tokens], rtol=1e-5)
    for row in range(3):
        best = np.argsort(-expected[row])[:4]
        assert list(result.top_ids[row]) == list(best)


def test_same_uniform_draws_reproduce_the_same_tokens() -> None:
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((8, VOCAB)).astype(np.float32)
    arrays = _arrays(8, np.random.default_rng(0), temperature=1.0)
    first = sample(logits, arrays, [[]] * 8, [[]] * 8).tokens
    assert list(sample(logits, arrays, [[]] * 8, [[]] * 8).tokens) == list(first)


def test_greedy_acceptance_keeps_the_prefix_where_the_target_agrees() -> None:
    assert accept_greedy(np.array([5, 6, 9, 1]), [5, 6, 7]) == [5, 6, 9]
    assert accept_greedy(np.array([5, 6, 7, 1]), [5, 6, 7]) == [5, 6, 7, 1]
    assert accept_greedy(np.array([4, 6, 7, 1]), [5, 6, 7]) == [4]


def test_rejection_sampling_follows_the_target_distribution() -> None:
    target = np.array([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]])
    rng = np.random.default_rng(7)
    draws = 20000
    counts = np.zeros(3)
    for _ in range(draws):
        counts[accept_sampled(target, [1], None, rng)[0]] += 1
    np.testing.assert_allclose(counts / draws, target[0], atol=0.015)
    # With a draft model that samples its token from its own distribution q.
    draft_probs = np.array([[0.1, 0.8, 0.1]])
    counts[:] = 0
    for _ in range(draws):
        drafted = int(rng.choice(3, p=draft_probs[0]))
        counts[accept_sampled(target, [drafted], draft_probs, rng)[0]] += 1
    np.testing.assert_allclose(counts / draws, target[0], atol=0.015)


def test_prompt_lookup_proposes_what_followed_the_latest_ngram() -> None:
    drafter = PromptLookupDrafter()
    tokens = [1, 2, 3, 4, 5, 6, 9, 9, 2, 3, 4]
    assert drafter.propose(tokens, 3) == [5, 6, 9]
    assert drafter.propose([1, 2, 3], 3) == []


def test_speculation_switches_itself_off_when_acceptance_stays_low() -> None:
    cost = VerificationCost()
    gate = SpeculationGate()
    for _ in range(10):
        gate.record(4, 0)
    lengths = [gate.choose_length(8, cost, model_drafted=False) for _ in range(PROBE_INTERVAL)]
    # Plain decoding, except one single-token probe per interval so acceptance can recover.
    assert lengths == [0] * (PROBE_INTERVAL - 1) + [1]
    assert gate.enabled
    # A draft model would have to catch up on every skipped token to probe: it stops instead.
    assert gate.choose_length(8, cost, model_drafted=True) == 0 and not gate.enabled
    assert gate.choose_length(8, cost, model_drafted=False) == 0
    good = SpeculationGate()
    for _ in range(10):
        good.record(8, 8)
    assert good.choose_length(8, cost, model_drafted=False) == 8
    assert good.choose_length(3, cost, model_drafted=False) == 3


def test_draft_length_follows_what_verification_costs_on_this_box() -> None:
    gate = SpeculationGate()
    for _ in range(10):
        gate.record(4, 2)  # acceptance about 2/3 per token
    cpu = VerificationCost()
    cpu.observe_step(0.010)
    for _ in range(60):
        cpu.observe_verification(9, 0.034)  # each extra token a third of a step
    gpu = VerificationCost()
    gpu.observe_step(0.010)
    for _ in range(60):
        gpu.observe_verification(9, 0.011)  # extra tokens nearly free
    assert cpu.extra_token == pytest.approx(0.3, abs=0.02) and gpu.extra_token < 0.03
    on_cpu = gate.choose_length(8, cpu, model_drafted=False)
    on_gpu = gate.choose_length(8, gpu, model_drafted=False)
    assert 1 <= on_cpu < on_gpu
    # A draft model's own steps make each drafted token dearer still.
    assert gate.choose_length(8, cpu, model_drafted=True) <= on_cpu


def test_expected_emitted_tokens_match_a_simulation() -> None:
    rng = np.random.default_rng(3)
    for acceptance, length in ((0.5, 4), (0.8, 8), (1.0, 3)):
        emitted = []
        for _ in range(20_000):
            accepted = 0
            while accepted < length and rng.random() < acceptance:
                accepted += 1
            emitted.append(accepted + 1)
        assert expected_emitted(acceptance, length) == pytest.approx(float(np.mean(emitted)), rel=0.02)


def test_onnx_greedy_kernel_agrees_with_the_numpy_kernel() -> None:
    from appliance.kernels.sampling_onnx import GreedyLogprobsKernel

    logits = (np.random.default_rng(8).standard_normal((6, VOCAB)) * 3).astype(np.float32)
    expected = sample(logits, SamplingArrays.greedy(6), [[]] * 6, [[]] * 6, top_logprobs=3)
    kernel = GreedyLogprobsKernel(3)
    token, logprob, top_ids, top_logprobs = kernel(logits)
    assert list(token) == list(expected.tokens)
    np.testing.assert_allclose(logprob, expected.logprobs, rtol=1e-5, atol=1e-5)
    assert (top_ids == expected.top_ids).all()
    np.testing.assert_allclose(top_logprobs, expected.top_logprobs, rtol=1e-5, atol=1e-5)
    # Sampled rows: the chosen (not the greedy) token's log-probability, through `sample`.
    arrays = _arrays(6, np.random.default_rng(2), temperature=1.0)
    with_numpy = sample(logits, arrays, [[]] * 6, [[]] * 6, top_logprobs=2)
    with_onnx = sample(logits, arrays, [[]] * 6, [[]] * 6, top_logprobs=2, logprob_kernel=kernel)
    assert list(with_onnx.tokens) == list(with_numpy.tokens)
    np.testing.assert_allclose(with_onnx.logprobs, with_numpy.logprobs, rtol=1e-5, atol=1e-5)
    assert (with_onnx.top_ids == with_numpy.top_ids).all()
