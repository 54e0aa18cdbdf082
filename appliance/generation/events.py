"""What the generation engine tells a client about one sequence: the events its stream yields.

Plain data, made on the engine thread and read on the event loop after the hand-over, so an
event is never changed once sent. Never imports the engine, numpy or onnxruntime: the API layer
reads events without pulling in how they were made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from appliance.errors import ApplianceError


@dataclass
class TokenLogprob:
    """One emitted token's log-probability, and the alternatives a request asked to see
    (`top`, best first), as OpenAI's `logprobs` reports them."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    """New output of one sequence since its previous event."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    error: ApplianceError | None = None
