"""The contract every tool-call format meets, and the registry of formats by name.

The value types (`FunctionSpec`, `ToolCall`, `ParsedOutput`, `ToolCallDelta`), the two
abstract classes a format implements (`ToolCallFormat`, `ToolCallStreamer`), the registry
(`FORMATS`, `register`, `tool_format`), how a chat template reveals its format
(`detect_format`), and the request-side helpers (`function_specs`, `special_token_ids`).
The package docstring states the contract.
"""

from __future__ import annotations

import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from appliance.errors import InvalidInput

#: The format of templates without a tools section.
DEFAULT_FORMAT = "generic"
#: Prefix of the ids made for parsed calls (OpenAI's shape), followed by random hex.
CALL_ID_PREFIX = "call_"
#: Random bytes behind a call id: 12 bytes are 24 hex characters.
CALL_ID_BYTES = 12
#: Separators of normalised JSON: `json.dumps`' defaults, which is how chat models write JSON.
ITEM_SEPARATOR = ", "
KEY_SEPARATOR = ": "
#: The JSON a grammar forces, laid out as above: free whitespace lets a small model pad a call
#: with blank lines until max_tokens cuts it, and one fixed spacing costs no quality.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR, "key_separator": KEY_SEPARATOR}
#: Keys a call object may hold its arguments under; the first that appears wins.
ARGUMENT_KEYS = ("arguments", "parameters")
#: Parameters of a function that declares none.
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

#: A tokenizer's special tokens as llguidance sees them: text -> token id.
SpecialTokens = Mapping[str, int]
NO_SPECIAL_TOKENS: SpecialTokens = {}


@dataclass(frozen=True)
class FunctionSpec:
    """One OpenAI function tool."""

    name: str
    description: str | None
    #: JSON schema of the arguments object ({"type": "object", "properties": {}} when absent).
    parameters: dict[str, Any]
    #: The client asked for exact schema adherence: keywords llguidance cannot enforce are an
    #: error instead of being ignored.
    strict: bool = False


@dataclass(frozen=True)
class ToolCall:
    """One call the model made."""

    name: str
    #: JSON text of the arguments object (see the module docstring for its layout).
    arguments: str
    #: "call_" + 24 hex characters, made when the call was read.
    id: str


@dataclass(frozen=True)
class ParsedOutput:
    """A finished reply split into content and calls."""

    #: Text outside the calls, stripped; None when there is none.
    content: str | None
    calls: list[ToolCall]


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed fragment, shaped for OpenAI's `delta.tool_calls`."""

    index: int
    #: The first fragment of a call carries its id and name ...
    id: str | None = None
    name: str | None = None
    #: ... later ones pieces of the arguments, which concatenated give `ToolCall.arguments`.
    arguments: str = ""


class ToolCallStreamer(ABC):
    """Splits one reply, arriving in pieces, into content to send and tool-call fragments."""

    @abstractmethod
    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Content safe to send now and new call fragments; text that may still become a call
        marker is held back."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """At the end of the reply: held-back content, and any call that the end completed."""


class ToolCallFormat(ABC):
    """One way of writing tool calls (see the module docstring for the contract)."""

    #: The format's name in `FORMATS` and in the `tool_parser` setting.
    name: ClassVar[str]

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """Content and calls of a finished reply; never raises."""

    @abstractmethod
    def streamer(self) -> ToolCallStreamer:
        """A fresh streamer for one reply."""

    @abstractmethod
    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS) -> str:
        """An llguidance grammar forcing one call (`parallel`: one or more) to one of
        `functions`. `special_tokens`: the serving tokenizer's (`special_token_ids`), so that
        markers it holds as special tokens are named by id (others are literal text).
        InvalidInput naming `tools` when `functions` is empty."""

    def auto_grammar(
        self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS
    ) -> str | None:
        """For tool_choice "auto": a grammar that leaves the model free to answer in text but
        forces a valid call once it starts one; None when the format cannot say where a call
        starts from the first characters (the answer is then parsed as written)."""
        return None

    @abstractmethod
    def describe_tools(self, functions: Sequence[FunctionSpec]) -> str:
        """System-message text listing the tools and this format's exact call syntax, for chat
        templates without a tools section."""


FORMATS: dict[str, type[ToolCallFormat]] = {}
_Format = TypeVar("_Format", bound=ToolCallFormat)


def register(cls: type[_Format]) -> type[_Format]:
    """Class decorator: make a format available under its `name`."""
    FORMATS[cls.name] = cls
    return cls


def tool_format(name: str) -> ToolCallFormat:
    """The format called `name`; InvalidInput naming `tool_parser` for an unknown one."""
    cls = FORMATS.get(name)
    if cls is None:
        known = ", ".join(sorted(FORMATS))
        raise InvalidInput(f"unknown tool call format {name!r}; known formats: {known}", field="tool_parser")
    return cls()


#: Signs of a chat template trained on a format, checked in this order.
_TEMPLATE_SIGNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("hermes", re.compile(re.escape("<tool_call>"))),
    ("mistral", re.compile(re.escape("[TOOL_CALLS]"))),
    ("llama3_json", re.compile(r'<\|python_tag\|>|\bipython\b|\{\s*\\?"name\\?"\s*:[^{}]*\\?"parameters\\?"\s*:')),
)


def detect_format(chat_template: str | None) -> str:
    """The format a chat template's tools section teaches; "generic" when it has none."""
    if chat_template:
        for name, sign in _TEMPLATE_SIGNS:
            if sign.search(chat_template):
                return name
    return DEFAULT_FORMAT


def function_specs(tools: Sequence[Mapping[str, Any]]) -> list[FunctionSpec]:
    """The functions of a request's OpenAI `tools` ({"type": "function", "function": {...}});
    InvalidInput naming `tools` for an entry that is not a function tool."""
    functions = []
    for position, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidInput(f"tools[{position}]: expected {{'type': 'function', 'function': {{'name': ...}}}}", field="tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise InvalidInput(f"tools[{position}].function.parameters: must be a JSON schema object", field="tools")
        description = function.get("description")
        functions.append(
            FunctionSpec(
                name=function["name"],
                description=description if isinstance(description, str) else None,
                parameters=dict(parameters or EMPTY_PARAMETERS),
                strict=function.get("strict") is True,
            )
        )
    return functions


def special_token_ids(tokenizer_json: str) -> dict[str, int]:
    """The added tokens of a tokenizer.json that llguidance treats as special (so that literal
    text never matches them): those marked special, and every one written like `<...>`, the
    rule of llguidance's Hugging Face tokenizer import. Pass the result to `grammar`."""
    added = json.loads(tokenizer_json).get("added_tokens") or []
    return {
        token["content"]: token["id"]
        for token in added
        if isinstance(token, Mapping)
        and isinstance(token.get("content"), str)
        and isinstance(token.get("id"), int)
        and (token.get("special") is True or (token["content"].startswith("<") and token["content"].endswith(">")))
    }


def new_call_id() -> str:
    return CALL_ID_PREFIX + secrets.token_hex(CALL_ID_BYTES)
