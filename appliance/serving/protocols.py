"""The two contracts the doors (API routes, admin pages, batch jobs) use to reach a model.

A route gets a client from `ModelService.lease(...)`, which loads the model if needed and
keeps it from being evicted until the lease is released; it never sees a session, a
scheduler or a batcher. A Ray deployment handle can implement the same protocols later,
without a route changing.

The value types of the contracts are the engines' own (`GenerationRequest`, `TokenEvent`,
`TokenLogprob`, `SequenceStream`); this module names them so that the doors import them from
here and never from the engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from appliance.generation.events import TokenEvent, TokenLogprob
from appliance.generation.grammar import CompiledGrammar, Constraint
from appliance.generation.params import (
    PENALTY_ABS_MAX,
    PRIORITY_BY_NAME,
    REPETITION_PENALTY_MAX,
    STOP_STRINGS_MAX,
    TEMPERATURE_MAX,
    TOP_K_MAX,
    TOP_LOGPROBS_MAX,
    ClientFields,
    GenerationRequest,
)
from appliance.generation.stream import SequenceStream
from appliance.generation.tool_calls import (
    FunctionSpec,
    ParsedOutput,
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallStreamer,
    function_specs,
)
from appliance.repository.manifest import EmbeddingSpec, TensorSpec

__all__ = [
    "ClientFields",
    "CompiledGrammar",
    "Constraint",
    "FunctionSpec",
    "ParsedOutput",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallFormat",
    "ToolCallStreamer",
    "EmbeddingResult",
    "GenerationClient",
    "GenerationModelInfo",
    "GenerationRequest",
    "RerankResult",
    "PENALTY_ABS_MAX",
    "PRIORITY_BY_NAME",
    "REPETITION_PENALTY_MAX",
    "STOP_STRINGS_MAX",
    "SequenceStream",
    "TEMPERATURE_MAX",
    "TOP_K_MAX",
    "TOP_LOGPROBS_MAX",
    "TensorClient",
    "TensorModelInfo",
    "TensorResult",
    "TokenEvent",
    "TokenLogprob",
    "function_specs",
]


@dataclass(frozen=True)
class GenerationModelInfo:
    """What a door may know about a generation model before submitting to it."""

    name: str
    version: int
    context_length: int
    vocab_size: int
    max_tokens_limit: int
    has_chat_template: bool
    #: How the model writes tool calls (a format name of appliance/generation/tool_calls).
    tool_parser: str
    #: Execution provider of the decoder's session ("cpu", "cuda").
    provider: str | None


class GenerationClient(Protocol):
    """One text-generation model.

    Contract:
    - `describe()` is cheap and never blocks.
    - `chat_prompt(messages, tools=...)` / `text_prompts(texts)` render the model's chat
      template and tokenise, off the event loop when the text is large; a prompt whose byte
      length alone proves it cannot fit the context is refused before it is tokenised. Errors
      are InvalidInput naming `messages` / `prompt`. `tools` (OpenAI tool dicts) reach the
      template's own tools section, or, for a template without one, a system message in the
      model's tool-call format describes them.
    - `compile(constraint)` compiles a structured-output constraint for this model (cached,
      off the event loop, bounded in time); InvalidInput names `constraint.field`. The result
      goes into `GenerationRequest.grammar`.
    - `tool_format()` is the model's tool-call format: parse finished text or a stream into
      calls. `tool_grammar(functions, parallel=...)` is the grammar (for a "grammar"
      Constraint) that forces a valid call in that format with this model's tokenizer;
      `auto=True`: the grammar that allows text but holds a started call to the format (None
      where the format cannot tell).
    - `submit(prompt_ids, request, ...)` checks the request once (errors name the fields as the
      client sent them, see `ClientFields`) and queues one sequence, raising InvalidInput,
      CapacityExceeded or ShuttingDown at once, before any response is sent. It must be
      called on the event loop that consumes the stream. The returned `SequenceStream` is an
      async iterator of `TokenEvent`s ending with one whose `finish_reason` is set;
      `await stream.started()` waits for a slot (raising the refusal if there was one);
      `stream.close()` aborts the sequence, freeing its KV at the engine's next step.
    - `abort(seq_id)` does the same by id; `stats()` is a snapshot of the engine's gauges.
    - `token_text(token_id)` is one token's text and exact bytes (for logprobs).
    """

    def describe(self) -> GenerationModelInfo: ...

    async def chat_prompt(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None) -> list[int]: ...

    async def compile(self, constraint: Constraint) -> CompiledGrammar: ...

    def tool_format(self) -> ToolCallFormat: ...

    def tool_grammar(self, functions: list[FunctionSpec], *, parallel: bool, auto: bool = False) -> str | None: ...

    async def text_prompts(self, texts: list[str]) -> list[list[int]]: ...

    def submit(
        self, prompt_ids: list[int], request: GenerationRequest, *, timeout_s: float, queue_limit: bool = True
    ) -> SequenceStream: ...

    def abort(self, seq_id: str) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def token_text(self, token_id: int) -> tuple[str, list[int]]: ...


@dataclass(frozen=True)
class TensorModelInfo:
    """A tensor model's signature, for V2 metadata and input checking."""

    name: str
    version: int
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    embedding: EmbeddingSpec | None
    #: The provider report of the loaded sessions (`ProviderReport.as_json()`).
    provider: dict[str, Any]


@dataclass(frozen=True)
class TensorResult:
    outputs: dict[str, np.ndarray]
    queue_us: float
    compute_us: float


@dataclass(frozen=True)
class EmbeddingResult:
    #: One row per input, in input order (re-normalised after a `dimensions` cut).
    vectors: np.ndarray
    #: Tokens of every input after truncation (what the model read).
    prompt_tokens: int
    #: Indices of inputs cut to the model's max length.
    truncated: list[int]
    queue_us: float
    compute_us: float


@dataclass(frozen=True)
class RerankResult:
    #: One relevance score per document, in document order (the model's activation applied).
    scores: list[float]
    #: Tokens of every (query, document) pair after truncation.
    prompt_tokens: int
    #: Indices of documents cut to fit the model's max length (or `max_tokens_per_doc`).
    truncated: list[int]
    queue_us: float
    compute_us: float


class TensorClient(Protocol):
    """One tensor model (encoder, classifier, plain ONNX graph).

    Contract:
    - `metadata()` is cheap and never blocks.
    - `priority` (PRIORITY_BY_NAME, on every call): lower-priority jobs run after waiting
      interactive ones, until they have aged (runtime/batcher.py).
    - `infer(inputs, outputs, timeout_s)` queues one request on the model's dynamic batcher
      (it may share a session run with others); inputs must already match `metadata().inputs`
      (the caller checks names, datatypes and shapes). Errors: InvalidInput (400),
      CapacityExceeded (429, queue full), DeadlineExceeded (504), ModelNotReady (503).
      Cancelling the awaiting task drops the queued job.
    - `embed(texts | token ids, dimensions, timeout_s)` tokenises (off the event loop when the
      text is large), batches the rows by length with other requests' rows, and returns the
      model's pooled, normalised vectors; `dimensions` cuts and re-normalises. InvalidInput
      names `model` when the model has no embedding output, `dimensions` or `input` otherwise.
    - `rerank(query, documents, max_tokens_per_doc, timeout_s)` scores each (query, document)
      pair with a text classifier (a cross-encoder): the pairs are joined by the model's own
      template, documents (never the query) are cut to fit and counted, the pairs are batched
      by length like any text, and each score is the model's logit through the activation its
      manifest names. InvalidInput names `model` for a model that is no classifier, `query`
      for a query that leaves no room for a document.
    """

    def metadata(self) -> TensorModelInfo: ...

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None, timeout_s: float, *, priority: int = 0
    ) -> TensorResult: ...

    async def embed(
        self,
        texts: list[str] | None,
        token_ids: list[list[int]] | None,
        *,
        dimensions: int | None,
        timeout_s: float,
        priority: int = 0,
    ) -> EmbeddingResult: ...

    async def rerank(
        self, query: str, documents: list[str], *, max_tokens_per_doc: int | None, timeout_s: float, priority: int = 0
    ) -> RerankResult: ...
