"""Request and response models of `/v1/chat/completions` and `/v1/completions`.

Field names, shapes and bounds follow OpenAI's API so the official client works unchanged
(`response_format`, `tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and
`tool` messages included); fields OpenAI lacks but serving engines commonly accept (top_k,
min_p, repetition_penalty, stop_token_ids, ignore_eos, and vLLM's `structured_outputs` with
`regex` / `choice` / `json`) are additions. Unknown fields are refused with a 400 naming them,
rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from appliance.api.openai_schemas import KeepAlive
from appliance.serving.protocols import (
    PENALTY_ABS_MAX,
    REPETITION_PENALTY_MAX,
    STOP_STRINGS_MAX,
    TEMPERATURE_MAX,
    TOP_K_MAX,
    TOP_LOGPROBS_MAX,
)

#: Most choices one request may ask for.
MAX_CHOICES = 8
#: Most prompts one /v1/completions request may carry.
MAX_PROMPTS = 32
#: Most messages in one chat request.
MAX_MESSAGES = 1024
#: Longest message or prompt accepted before tokenisation, in characters.
MAX_TEXT_CHARS = 1_000_000
#: Most tools one request may offer.
MAX_TOOLS = 128
#: Most choices in a `structured_outputs.choice` list.
MAX_OUTPUT_CHOICES = 1024
#: OpenAI's rule for function and schema names.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=MAX_TEXT_CHARS, description="The arguments as JSON text.")


class ToolCallIn(BaseModel):
    """A tool call an earlier assistant turn made (sent back with the conversation)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(min_length=1, max_length=32)
    content: str | list[ContentPart] | None = Field(None, description="Text, or text parts (images are not supported).")
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS, description="Assistant turns: the calls it made.")
    tool_call_id: str | None = Field(None, max_length=256, description="Tool turns: the call this result answers.")
    refusal: str | None = Field(None, max_length=MAX_TEXT_CHARS)

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (OpenAI's shape, text joined)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the answer must validate against.")
    strict: bool | None = Field(None, description="Refuse schema keywords that cannot be enforced instead of ignoring them.")


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")]


class StructuredOutputs(BaseModel):
    """vLLM's extension: exactly one of a JSON schema, a regex or a list of choices."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = Field(None, min_length=1, description="A regular expression the whole answer matches.")
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_OUTPUT_CHOICES, description="The answer is one of these.")


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, description="Most tokens to generate (default: up to the context).")
    temperature: float | None = Field(None, ge=0.0, le=TEMPERATURE_MAX)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description=f"Up to {STOP_STRINGS_MAX} stop sequences, never returned.")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(None, ge=-PENALTY_ABS_MAX, le=PENALTY_ABS_MAX)
    frequency_penalty: float | None = Field(None, ge=-PENALTY_ABS_MAX, le=PENALTY_ABS_MAX)
    user: str | None = Field(None, max_length=256)
    # Additions commonly accepted by serving engines.
    top_k: int | None = Field(None, ge=0, le=TOP_K_MAX)
    min_p: float | None = Field(None, ge=0.0, lt=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=REPETITION_PENALTY_MAX)
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    keep_alive: KeepAlive = None
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema (constrained decoding).")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's extension: a regex or choice constraint.")
    # Accepted and ignored: they change nothing on a single box.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(None, max_length=16_384)
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments object.")
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(max_length=MAX_MESSAGES)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="Default: auto when tools are given, else none."
    )
    parallel_tool_calls: bool | None = Field(None, description="Allow several calls in one answer (default true).")
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of the n most likely tokens (0-5).")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(BaseModel):
    """One fragment of a streamed tool call: index, id and name first, then argument pieces."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
