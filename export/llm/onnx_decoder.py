"""A minimal numpy loop over an exported decoder graph: greedy decoding and perplexity.

The export stage needs to run its own graphs to evaluate them (perplexity, greedy agreement,
one decode step's latency) but must not import the server's generation engine. This is the
smallest loop that drives both graph kinds the export writes: the model builder's ("genai":
input_ids, attention_mask, past_key_values.N.key/value -> logits, present.N.key/value) and
Optimum's (the same plus position_ids, with a possibly different KV naming), with the KV cache
fed back each step. Batch 1 only; speed is not its job.

Never imports torch, transformers or appliance.generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.export.onnx_tools import open_session
from appliance.repository import GenerationSpec

#: Perplexity is computed over independent windows of this many tokens.
PERPLEXITY_WINDOW_TOKENS = 512
#: The cache's numpy type per manifest datatype (an int8 cache carries its scales in the graph).
_KV_DTYPES: dict[str, type[np.generic]] = {"FP32": np.float32, "FP16": np.float16, "INT8": np.int8}


@dataclass
class DecodeTiming:
    """How long the prefill and the decode steps of one greedy run took."""

    prefill_s: float
    decode_step_s: list[float]


class OnnxDecoder:
    """One ONNX Runtime session over a decoder graph and the facts to feed it."""

    def __init__(self, model_path: Path, spec: GenerationSpec, threads: int | None = None) -> None:
        self.spec = spec
        self.session = open_session(model_path, threads=threads)
        self.input_names = {value.name for value in self.session.get_inputs()}
        self.output_names = [value.name for value in self.session.get_outputs()]
        self._kv_dtype = _KV_DTYPES.get(spec.kv_datatype, np.float32)

    def _empty_past(self) -> dict[str, np.ndarray]:
        shape = (1, self.spec.num_kv_heads, 0, self.spec.head_dim)
        feeds: dict[str, np.ndarray] = {}
        for layer in range(self.spec.num_layers):
            feeds[self.spec.past_key_name.format(layer=layer)] = np.zeros(shape, dtype=self._kv_dtype)
            feeds[self.spec.past_value_name.format(layer=layer)] = np.zeros(shape, dtype=self._kv_dtype)
        return feeds

    def _run(
        self, ids: list[int], past: dict[str, np.ndarray], past_length: int, *, through_cache: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        total = past_length + len(ids)
        feeds: dict[str, np.ndarray] = dict(past)
        # An int8-cache graph attends a prompt in fp32 and returns its new positions only
        # (kv_prefill.py), as the engine runs it; decode steps read through the cache.
        fp32_attention = self.spec.fp32_attention_input is not None and len(ids) > 1 and not through_cache
        if self.spec.fp32_attention_input is not None:
            feeds[self.spec.fp32_attention_input] = np.asarray([fp32_attention])
        feeds["input_ids"] = np.asarray([ids], dtype=np.int64)
        feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.arange(past_length, total, dtype=np.int64)[None, :]
        if self.spec.logits_start_input:
            feeds[self.spec.logits_start_input] = np.zeros(1, dtype=np.int64)  # every position
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))
        present: dict[str, np.ndarray] = {}
        for layer in range(self.spec.num_layers):
            for past_name, present_name in (
                (self.spec.past_key_name.format(layer=layer), self.spec.present_key_name.format(layer=layer)),
                (self.spec.past_value_name.format(layer=layer), self.spec.present_value_name.format(layer=layer)),
            ):
                value = outputs[present_name]
                present[past_name] = np.concatenate([past[past_name], value], axis=2) if fp32_attention else value
        return outputs["logits"][0].astype(np.float32), present

    def cache_after(self, ids: list[int]) -> dict[str, np.ndarray]:
        """The KV cache the graph writes for one prefill of `ids`, keyed by the past names."""
        _, present = self._run(ids, self._empty_past(), 0)
        return present

    def logits(self, ids: list[int], *, through_cache: bool = False) -> np.ndarray:
        """Logits for every position of `ids` in one prefill, shape (len(ids), vocab).
        `through_cache`: an int8-cache graph reads every position, the prompt's own included,
        as its cache stores them (what a decode step sees) instead of attending in fp32."""
        logits, _ = self._run(ids, self._empty_past(), 0, through_cache=through_cache)
        return logits

    def greedy(self, prompt_ids: list[int], new_tokens: int, stop_ids: set[int] | None = None) -> list[int]:
        """The first `new_tokens` greedy tokens after the prompt (stopping early on stop_ids)."""
        tokens, _ = self.greedy_timed(prompt_ids, new_tokens, stop_ids)
        return tokens

    def greedy_timed(
        self, prompt_ids: list[int], new_tokens: int, stop_ids: set[int] | None = None
    ) -> tuple[list[int], DecodeTiming]:
        started = time.perf_counter()
        logits, past = self._run(prompt_ids, self._empty_past(), 0)
        timing = DecodeTiming(prefill_s=time.perf_counter() - started, decode_step_s=[])
        generated: list[int] = []
        length = len(prompt_ids)
        for _ in range(new_tokens):
            token = int(np.argmax(logits[-1]))
            generated.append(token)
            if stop_ids and token in stop_ids:
                break
            if len(generated) == new_tokens:
                break
            step_started = time.perf_counter()
            logits, past = self._run([token], past, length)
            timing.decode_step_s.append(time.perf_counter() - step_started)
            length += 1
        return generated, timing

    def perplexity(self, ids: list[int], window_tokens: int = PERPLEXITY_WINDOW_TOKENS) -> float:
        """exp(mean NLL) of `ids`, scored in independent windows (see `window_spans`)."""
        total_nll = 0.0
        count = 0
        window_tokens = min(window_tokens, self.spec.context_length)
        for start, end in window_spans(len(ids), window_tokens):
            logits = self.logits(ids[start:end]).astype(np.float64)
            nll, scored = negative_log_likelihood(logits, ids[start:end])
            total_nll += nll
            count += scored
        return float(np.exp(total_nll / max(count, 1)))


def window_spans(length: int, window_tokens: int) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) windows; a last window shorter than 2 tokens is dropped.

    The PyTorch reference uses the same spans, so both perplexities score the same tokens.
    """
    return [(start, min(start + window_tokens, length)) for start in range(0, length, window_tokens) if min(start + window_tokens, length) - start >= 2]


def negative_log_likelihood(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    """Summed NLL of ids[1:] under logits[:-1] (float64 log-softmax), and how many tokens."""
    shifted = logits[:-1]
    peak = shifted.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(shifted - peak).sum(axis=-1)) + peak[:, 0]
    targets = np.asarray(ids[1:], dtype=np.int64)
    picked = shifted[np.arange(len(targets)), targets]
    return float((log_norm - picked).sum()), len(targets)
