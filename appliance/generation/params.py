"""What one generation request asks for, and the one place it is checked.

A door (the OpenAI routes, a batch job) translates its fields into a `GenerationRequest`: values
as the client sent them, None where the client left the choice to the model, and the names the
client used (`ClientFields`: `max_completion_tokens` or `max_tokens`, `messages` or `prompt`).
`resolve()` applies the model's defaults and checks everything against the model's limits
(context, vocabulary, KV budget, per-request caps) exactly once, at the engine's edge, and
returns the concrete `SamplingParams` the engine trusts from then on. Every error names the
field the client sent and the limit it broke. Never imports onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.errors import InvalidInput

if TYPE_CHECKING:
    from appliance.generation.grammar import CompiledGrammar

TEMPERATURE_MAX = 2.0
PENALTY_ABS_MAX = 2.0
REPETITION_PENALTY_MAX = 10.0
TOP_LOGPROBS_MAX = 20
STOP_STRINGS_MAX = 8
STOP_STRING_CHARS_MAX = 256
TOP_K_MAX = 4096
#: Scheduling priorities (lower is served first): an API key's "interactive" or "batch".
PRIORITY_BY_NAME: Mapping[str, int] = {"interactive": 0, "batch": 1}
#: Sampling defaults when neither the request nor the model's manifest names one.
FALLBACK_DEFAULTS: Mapping[str, float | int] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class ClientFields:
    """The request's own names for the fields an error may be about."""

    #: Where the prompt came from: "messages" (chat) or "prompt" (completions).
    prompt: str = "prompt"
    #: How the message names this prompt when a request has several ("prompt[2]").
    prompt_label: str | None = None
    #: "max_tokens" or "max_completion_tokens", whichever the client sent.
    max_tokens: str = "max_tokens"
    #: "top_logprobs" (chat) or "logprobs" (completions).
    logprobs: str = "top_logprobs"

    @property
    def prompt_name(self) -> str:
        return self.prompt_label or self.prompt


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence's decoding settings as asked (None: the model's default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
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
    #: What the output must match, compiled for this model (`GenerationClient.compile`).
    grammar: CompiledGrammar | None = None
    #: False keeps special tokens' text (tool-call markers) in the output, for parsing.
    skip_special_tokens: bool = True
    #: Scheduling priority (PRIORITY_BY_NAME): lower is admitted first.
    priority: int = 0
    fields: ClientFields = field(default_factory=ClientFields)


@dataclass(frozen=True)
class ModelLimits:
    """What one served model allows, as the engine knows it."""

    context_length: int
    vocab_size: int
    max_tokens_limit: int
    #: Most positions (prompt + answer) one sequence may reserve: min(context, KV budget).
    kv_limit_tokens: int
    #: How the KV limit came about, for the error message.
    kv_detail: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's resolved, checked decoding settings (only `resolve` makes these)."""

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
    logprobs: int = -1
    ignore_eos: bool = False
    speculate: bool = True
    grammar: CompiledGrammar | None = None
    skip_special_tokens: bool = True
    priority: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def resolve(request: GenerationRequest, prompt_ids: Sequence[int], limits: ModelLimits) -> SamplingParams:
    """The request checked against the prompt and the model, with the model's defaults applied;
    InvalidInput names the first field (as the client called it) that is out of range."""
    names = request.fields
    max_tokens = _checked_length(request, prompt_ids, limits)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_default(request.temperature, "temperature", limits, float),
        top_p=_default(request.top_p, "top_p", limits, float),
        top_k=_default(request.top_k, "top_k", limits, int),
        min_p=_default(request.min_p, "min_p", limits, float),
        repetition_penalty=_default(request.repetition_penalty, "repetition_penalty", limits, float),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        seed=request.seed,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        logprobs=request.logprobs,
        ignore_eos=request.ignore_eos,
        speculate=request.speculate,
        grammar=request.grammar,
        skip_special_tokens=request.skip_special_tokens,
        priority=request.priority,
    )
    _check(0.0 <= params.temperature <= TEMPERATURE_MAX, "temperature", f"must be between 0 and {TEMPERATURE_MAX}")
    _check(0.0 < params.top_p <= 1.0, "top_p", "must be greater than 0 and at most 1")
    _check(0 <= params.top_k <= TOP_K_MAX, "top_k", f"must be between 0 (off) and {TOP_K_MAX}")
    _check(0.0 <= params.min_p < 1.0, "min_p", "must be at least 0 and below 1")
    _check(
        0.0 < params.repetition_penalty <= REPETITION_PENALTY_MAX,
        "repetition_penalty",
        f"must be greater than 0 and at most {REPETITION_PENALTY_MAX}",
    )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        _check(-PENALTY_ABS_MAX <= value <= PENALTY_ABS_MAX, name, f"must be between -{PENALTY_ABS_MAX} and {PENALTY_ABS_MAX}")
    _check(-1 <= params.logprobs <= TOP_LOGPROBS_MAX, names.logprobs, f"must be between 0 and {TOP_LOGPROBS_MAX}")
    _check(len(params.stop) <= STOP_STRINGS_MAX, "stop", f"at most {STOP_STRINGS_MAX} stop sequences")
    for text in params.stop:
        _check(0 < len(text) <= STOP_STRING_CHARS_MAX, "stop", f"each stop sequence must have 1 to {STOP_STRING_CHARS_MAX} characters")
    for token in params.stop_token_ids:
        _check(0 <= token < limits.vocab_size, "stop_token_ids", f"token ids must be between 0 and {limits.vocab_size - 1}")
    return params


def _checked_length(request: GenerationRequest, prompt_ids: Sequence[int], limits: ModelLimits) -> int:
    """The prompt's ids and length, and max_tokens: the asked value if it fits, else a 400;
    without one, as many tokens as the context, the KV budget and the per-request cap allow."""
    names = request.fields
    prompt = names.prompt_name
    if not prompt_ids:
        raise InvalidInput(f"{prompt}: must contain at least one token", field=names.prompt)
    if min(prompt_ids) < 0 or max(prompt_ids) >= limits.vocab_size:
        raise InvalidInput(f"{prompt}: token ids must be between 0 and {limits.vocab_size - 1}", field=names.prompt)
    length = len(prompt_ids)
    room = min(limits.context_length, limits.kv_limit_tokens) - length
    if length >= limits.context_length:
        raise InvalidInput(
            f"{prompt}: the prompt is {length} tokens; this model's context is {limits.context_length}", field=names.prompt
        )
    if room < 1:
        raise InvalidInput(
            f"{prompt}: the prompt is {length} tokens; this model can hold {limits.kv_limit_tokens} per sequence {limits.kv_detail}".rstrip(),
            field=names.prompt,
        )
    asked = request.max_tokens
    if asked is None:
        return min(limits.max_tokens_limit, room)
    if asked < 1:
        raise InvalidInput(f"{names.max_tokens}: must be at least 1", field=names.max_tokens)
    if asked > limits.max_tokens_limit:
        raise InvalidInput(
            f"{names.max_tokens}: at most {limits.max_tokens_limit} tokens may be generated per request", field=names.max_tokens
        )
    if length + asked > limits.context_length:
        raise InvalidInput(
            f"{names.max_tokens}: the prompt ({length} tokens) plus {asked} exceeds this model's context of "
            f"{limits.context_length} tokens",
            field=names.max_tokens,
        )
    if length + asked > limits.kv_limit_tokens:
        raise InvalidInput(
            f"{names.max_tokens}: the prompt ({length} tokens) plus {asked} is {length + asked} tokens; this model can "
            f"hold {limits.kv_limit_tokens} per sequence {limits.kv_detail}".rstrip(),
            field=names.max_tokens,
        )
    return asked


def _default(value: Any, name: str, limits: ModelLimits, kind: type) -> Any:
    """The asked value, else the manifest's default (when it is a number), else ours."""
    if value is not None:
        return value
    try:
        return kind(limits.defaults.get(name, FALLBACK_DEFAULTS[name]))
    except (TypeError, ValueError):
        return kind(FALLBACK_DEFAULTS[name])


def _check(ok: bool, field_name: str, rule: str) -> None:
    if not ok:
        raise InvalidInput(f"{field_name}: {rule}", field=field_name)
