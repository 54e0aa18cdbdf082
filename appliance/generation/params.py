"""What one generation request asks for, validated once at the edge of the engine.

The API layer translates OpenAI's fields into `SamplingParams`; the engine trusts these values.
Every bound is a named constant so the 400 that names the field also says the limit. Never
imports onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.errors import InvalidInput

TEMPERATURE_MAX = 2.0
PENALTY_ABS_MAX = 2.0
REPETITION_PENALTY_MAX = 10.0
TOP_LOGPROBS_MAX = 20
STOP_STRINGS_MAX = 8
STOP_STRING_CHARS_MAX = 256
TOP_K_MAX = 4096


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's decoding settings (a request with n > 1 submits n of these)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    #: -1: no log-probabilities; 0: the chosen token's; n: also the n most likely.
    logprobs: int = -1
    ignore_eos: bool = False
    #: Allow speculative decoding for this sequence (the engine still decides when it pays).
    speculate: bool = True
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, *, max_tokens_limit: int, vocab_size: int) -> SamplingParams:
        """Return self, or raise InvalidInput naming the first field out of range."""
        _check(1 <= self.max_tokens <= max_tokens_limit, "max_tokens", f"must be between 1 and {max_tokens_limit}")
        _check(0.0 <= self.temperature <= TEMPERATURE_MAX, "temperature", f"must be between 0 and {TEMPERATURE_MAX}")
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be greater than 0 and at most 1")
        _check(0 <= self.top_k <= TOP_K_MAX, "top_k", f"must be between 0 (off) and {TOP_K_MAX}")
        _check(0.0 <= self.min_p < 1.0, "min_p", "must be at least 0 and below 1")
        _check(
            0.0 < self.repetition_penalty <= REPETITION_PENALTY_MAX,
            "repetition_penalty",
            f"must be greater than 0 and at most {REPETITION_PENALTY_MAX}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-PENALTY_ABS_MAX <= value <= PENALTY_ABS_MAX, name, f"must be between -{PENALTY_ABS_MAX} and {PENALTY_ABS_MAX}")
        _check(-1 <= self.logprobs <= TOP_LOGPROBS_MAX, "top_logprobs", f"must be between 0 and {TOP_LOGPROBS_MAX}")
        _check(len(self.stop) <= STOP_STRINGS_MAX, "stop", f"at most {STOP_STRINGS_MAX} stop sequences")
        for text in self.stop:
            _check(0 < len(text) <= STOP_STRING_CHARS_MAX, "stop", f"each stop sequence must have 1 to {STOP_STRING_CHARS_MAX} characters")
        for token in self.stop_token_ids:
            _check(0 <= token < vocab_size, "stop_token_ids", f"token ids must be between 0 and {vocab_size - 1}")
        return self


def _check(ok: bool, field_name: str, rule: str) -> None:
    if not ok:
        raise InvalidInput(f"{field_name}: {rule}", field=field_name)
