"""The formats, one class each, registered by name: hermes, llama3_json, mistral, generic."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from llguidance import LLMatcher

from appliance.generation.tool_calls.base import (
    DEFAULT_FORMAT,
    EMPTY_PARAMETERS,
    FunctionSpec,
    ITEM_SEPARATOR,
    NO_SPECIAL_TOKENS,
    ParsedOutput,
    SpecialTokens,
    ToolCall,
    ToolCallDelta,
    ToolCallFormat,
    ToolCallStreamer,
    new_call_id,
    register,
)
from appliance.generation.tool_calls.json_reader import CallReader, WHITESPACE, scanned_object
from appliance.generation.tool_calls.streaming import Outcome, Streamer, parse_with
from appliance.generation.tool_calls.grammars import calls_list, calls_schema, lark_grammar, marker_item, one_call, tool_json

# --- The formats ------------------------------------------------------------------------------

_HERMES_OPEN = "<tool_call>"
_HERMES_CLOSE = "</tool_call>"


class _HermesMode(enum.Enum):
    CONTENT = enum.auto()
    CALL = enum.auto()
    CLOSE = enum.auto()  # after a call object: its closing tag, if any


class _HermesStreamer(Streamer):
    def __init__(self, *, optimistic: bool) -> None:
        super().__init__(optimistic=optimistic)
        self._mode = _HermesMode.CONTENT

    def _advance(self, *, final: bool) -> None:
        while True:
            if self._mode is _HermesMode.CONTENT:
                if not self._take_content(_HERMES_OPEN, final=final):
                    return
                self._start_call()
                self._mode = _HermesMode.CALL
            elif self._mode is _HermesMode.CALL:
                outcome = self._read_call(final=final)
                if outcome is Outcome.PENDING:
                    return
                self._mode = _HermesMode.CLOSE if outcome is Outcome.DONE else _HermesMode.CONTENT
            else:
                rest = self._buffer.lstrip(WHITESPACE)
                if rest.startswith(_HERMES_CLOSE):
                    self._buffer = rest[len(_HERMES_CLOSE) :]
                elif not final and _HERMES_CLOSE.startswith(rest):
                    return
                self._mode = _HermesMode.CONTENT


@register
class HermesFormat(ToolCallFormat):
    """Hermes, Qwen2.5, Qwen3: content, then `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
    blocks. The closing tag may be missing; a call ends where its object does."""

    name = "hermes"

    def parse(self, text: str) -> ParsedOutput:
        return parse_with(_HermesStreamer(optimistic=False), text)

    def streamer(self) -> ToolCallStreamer:
        return _HermesStreamer(optimistic=True)

    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS) -> str:
        block = f'{marker_item(_HERMES_OPEN, special_tokens)} "\\n" body "\\n" {marker_item(_HERMES_CLOSE, special_tokens)}'
        start = f'{block} ("\\n" {block})*' if parallel else block
        return lark_grammar(start, calls_schema(functions, "arguments", one_call))

    def describe_tools(self, functions: Sequence[FunctionSpec]) -> str:
        tools = "\n".join(tool_json(function) for function in functions)
        return (
            "# Tools\n\n"
            "You may call one or more functions to help with the user's request. "
            f"The functions are described inside <tools></tools> tags:\n<tools>\n{tools}\n</tools>\n\n"
            "To call a function, write a JSON object with its name and arguments inside <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>'
        )


_PYTHON_TAG = "<|python_tag|>"
#: What a Llama 3.1 model writes between calls; newlines and ";" are both read.
_LLAMA_SEPARATOR = "; "
_LLAMA_SKIPPED = WHITESPACE + ";"


class _LlamaMode(enum.Enum):
    START = enum.auto()  # the reply's start decides: a call object (or the tag), or content
    CONTENT = enum.auto()
    CALLS = enum.auto()  # another call object, or the end of the calls
    CALL = enum.auto()


class _LlamaStreamer(Streamer):
    def __init__(self, *, optimistic: bool) -> None:
        super().__init__(optimistic=optimistic)
        self._mode = _LlamaMode.START

    def _advance(self, *, final: bool) -> None:
        while True:
            if self._mode is _LlamaMode.START:
                rest = self._buffer.lstrip(WHITESPACE)
                if rest.startswith("{"):
                    self._mode = _LlamaMode.CALLS
                elif rest.startswith(_PYTHON_TAG):
                    self._lstrip_buffer()
                    self._consume(len(_PYTHON_TAG))
                    self._mode = _LlamaMode.CALLS
                elif not final and _PYTHON_TAG.startswith(rest):
                    return
                else:
                    self._mode = _LlamaMode.CONTENT
            elif self._mode is _LlamaMode.CONTENT:
                if not self._take_content(_PYTHON_TAG, final=final):
                    return
                self._mode = _LlamaMode.CALLS
            elif self._mode is _LlamaMode.CALLS:
                rest = self._buffer.lstrip(_LLAMA_SKIPPED)
                if not rest and not final:
                    return
                if self._pending_raw:  # after the tag: content if no call follows
                    self._consume(len(self._buffer) - len(rest))
                else:  # after a call: separators, dropped
                    self._buffer = rest
                if rest.startswith("{"):
                    self._start_call()
                    self._mode = _LlamaMode.CALL
                else:
                    self._abandon_structure()
                    self._mode = _LlamaMode.CONTENT
            else:
                outcome = self._read_call(final=final)
                if outcome is Outcome.PENDING:
                    return
                self._mode = _LlamaMode.CALLS if outcome is Outcome.DONE else _LlamaMode.CONTENT


@register
class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.1 / 3.2 JSON tool calling: the reply is `{"name": ..., "parameters": {...}}`,
    perhaps after `<|python_tag|>`; several calls are separated by "; " or newlines. A reply
    that does not start with "{" or the tag is content (content may precede the tag)."""

    name = "llama3_json"

    def parse(self, text: str) -> ParsedOutput:
        return parse_with(_LlamaStreamer(optimistic=False), text)

    def streamer(self) -> ToolCallStreamer:
        return _LlamaStreamer(optimistic=True)

    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS) -> str:
        start = f"body ({json.dumps(_LLAMA_SEPARATOR)} body)*" if parallel else "body"
        return lark_grammar(start, calls_schema(functions, "parameters", one_call))

    def describe_tools(self, functions: Sequence[FunctionSpec]) -> str:
        tools = "\n\n".join(tool_json(function) for function in functions)
        return (
            "You have access to the following functions:\n\n"
            f"{tools}\n\n"
            "To call a function, reply with only a JSON object in the format "
            '{"name": function name, "parameters": dictionary of argument name and its value}. '
            f'To call several, separate the objects with "{_LLAMA_SEPARATOR}". Do not use variables. '
            "If no function is needed, answer normally."
        )


_MISTRAL_MARKER = "[TOOL_CALLS]"


class _MistralMode(enum.Enum):
    CONTENT = enum.auto()
    OPEN = enum.auto()  # after the marker: "[" (or a lone call object)
    FIRST = enum.auto()  # after "[": a call object or "]"
    NEXT = enum.auto()  # after a call: "," or "]"
    ELEMENT = enum.auto()  # after ",": a call object
    CALL = enum.auto()


class _MistralStreamer(Streamer):
    def __init__(self, *, optimistic: bool) -> None:
        super().__init__(optimistic=optimistic)
        self._mode = _MistralMode.CONTENT

    def _advance(self, *, final: bool) -> None:
        while True:
            mode = self._mode
            if mode is _MistralMode.CONTENT:
                if not self._take_content(_MISTRAL_MARKER, final=final):
                    return
                self._mode = _MistralMode.OPEN
                continue
            if mode is _MistralMode.CALL:
                outcome = self._read_call(final=final)
                if outcome is Outcome.PENDING:
                    return
                self._mode = _MistralMode.NEXT if outcome is Outcome.DONE else _MistralMode.CONTENT
                continue
            rest = self._lstrip_buffer()
            if not rest and not final:
                return
            self._mode = self._after_structure(mode, rest[:1])

    def _after_structure(self, mode: _MistralMode, ch: str) -> _MistralMode:
        """The next mode, given the first character after whitespace in a structural mode."""
        if ch == "{" and mode in (_MistralMode.OPEN, _MistralMode.FIRST, _MistralMode.ELEMENT):
            self._start_call()
            return _MistralMode.CALL
        if (ch == "[" and mode is _MistralMode.OPEN) or (ch == "," and mode is _MistralMode.NEXT):
            self._consume(1)
            return _MistralMode.FIRST if ch == "[" else _MistralMode.ELEMENT
        if ch == "]" and mode in (_MistralMode.FIRST, _MistralMode.NEXT):
            self._consume(1)
            self._pending_raw = ""
            return _MistralMode.CONTENT
        self._abandon_structure()
        return _MistralMode.CONTENT


@register
class MistralFormat(ToolCallFormat):
    """Mistral: content, then `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`. A missing
    "]" at the end is forgiven, and so is a lone call object without the list."""

    name = "mistral"

    def parse(self, text: str) -> ParsedOutput:
        return parse_with(_MistralStreamer(optimistic=False), text)

    def streamer(self) -> ToolCallStreamer:
        return _MistralStreamer(optimistic=True)

    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS) -> str:
        start = f'{marker_item(_MISTRAL_MARKER, special_tokens)} " " body'
        return lark_grammar(start, calls_schema(functions, "arguments", lambda call: calls_list(call, parallel=parallel)))

    def describe_tools(self, functions: Sequence[FunctionSpec]) -> str:
        tools = ", ".join(tool_json(function) for function in functions)
        return (
            f"You have access to the following tools: [{tools}]\n\n"
            f"To call tools, reply with {_MISTRAL_MARKER} followed by a JSON list of calls, for example "
            f'{_MISTRAL_MARKER} [{{"name": "function name", "arguments": {{"argument name": "value"}}}}]. '
            "If no tool is needed, answer normally."
        )


#: The key of the generic envelope: {"tool_calls": [{"name": ..., "arguments": {...}}, ...]}.
_ENVELOPE_KEY = "tool_calls"
_FENCE = "```"
_FENCED = re.compile(r"```(?:json|JSON)?\s*(.*?)\s*```", re.DOTALL)


def _envelope_calls(text: str) -> list[ToolCall] | None:
    """The calls of a generic envelope, or None if `text` is not exactly one with calls."""
    scanner = scanned_object(text)
    span = None if scanner is None else scanner.members.get(_ENVELOPE_KEY)
    if scanner is None or span is None:
        return None
    listed = scanner.text(*span)  # normalised: "[" objects joined by ITEM_SEPARATOR "]"
    if not listed.startswith("["):
        return None
    position, calls = 1, []
    while listed.startswith("{", position):
        reader = CallReader()
        position = reader.feed(listed, position)
        name, arguments = reader.name, reader.arguments() if reader.done else None
        if name is None or arguments is None:
            return None
        calls.append(ToolCall(name=name, arguments=arguments, id=new_call_id()))
        if listed.startswith(ITEM_SEPARATOR, position):
            position += len(ITEM_SEPARATOR)
    return calls if calls and position == len(listed) - 1 else None


class _GenericMode(enum.Enum):
    START = enum.auto()
    CONTENT = enum.auto()
    HOLD = enum.auto()  # a reply that may be the envelope: decided at the end


class _GenericStreamer(ToolCallStreamer):
    """Streams a reply that cannot be the envelope as content; holds one that may be (it
    starts with "{" or a code fence) to the end and parses it whole."""

    def __init__(self, parse: Callable[[str], ParsedOutput]) -> None:
        self._parse = parse
        self._mode = _GenericMode.START
        self._buffer = ""

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> tuple[str, list[ToolCallDelta]]:
        if self._mode is _GenericMode.START:
            rest = self._buffer.lstrip(WHITESPACE)
            if not rest and not final:
                return "", []
            if rest.startswith(("{", _FENCE)) or (not final and _FENCE.startswith(rest)):
                self._mode = _GenericMode.HOLD
            else:
                self._mode = _GenericMode.CONTENT
        if self._mode is _GenericMode.CONTENT:
            content, self._buffer = self._buffer, ""
            return content, []
        if not final:
            return "", []
        parsed, self._buffer = self._parse(self._buffer), ""
        deltas = []
        for index, call in enumerate(parsed.calls):
            deltas.append(ToolCallDelta(index=index, id=call.id, name=call.name))
            deltas.append(ToolCallDelta(index=index, arguments=call.arguments))
        return parsed.content or "", deltas


#: Free text for tool_choice "auto" in the generic format: anything that does not open with "{"
#: (after leading whitespace), so that a reply starting a JSON object is held to the envelope.
_FREE_TEXT = r"\s*[^{\s](?s:.)*"


@register
class GenericFormat(ToolCallFormat):
    """For chat templates without a tools section: the tools are described in a system message
    and a call is the whole reply, `{"tool_calls": [{"name": ..., "arguments": {...}}]}`
    (a ```json fence around it is forgiven). Any other reply is content."""

    name = DEFAULT_FORMAT

    def parse(self, text: str) -> ParsedOutput:
        stripped = text.strip()
        fenced = _FENCED.fullmatch(stripped)
        calls = _envelope_calls(fenced.group(1) if fenced else stripped)
        if calls:
            return ParsedOutput(content=None, calls=calls)
        return ParsedOutput(content=stripped or None, calls=[])

    def streamer(self) -> ToolCallStreamer:
        return _GenericStreamer(self.parse)

    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS) -> str:
        return lark_grammar("body", self._envelope(functions, parallel=parallel))

    def auto_grammar(
        self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS
    ) -> str | None:
        """A reply that starts with "{" is a call and must be a valid envelope; any other reply is free text."""
        body = self._envelope(functions, parallel=parallel)
        return LLMatcher.grammar_from_lark(f"%llguidance {{}}\nstart: body | free\nbody: {body}\nfree: /{_FREE_TEXT}/\n")

    @staticmethod
    def _envelope(functions: Sequence[FunctionSpec], *, parallel: bool) -> str:
        def envelope(call: dict[str, Any]) -> dict[str, Any]:
            return {
                "type": "object",
                "properties": {_ENVELOPE_KEY: calls_list(call, parallel=parallel)},
                "required": [_ENVELOPE_KEY],
                "additionalProperties": False,
            }

        return calls_schema(functions, "arguments", envelope)

    def describe_tools(self, functions: Sequence[FunctionSpec]) -> str:
        listed = []
        for function in functions:
            parameters = json.dumps(function.parameters or EMPTY_PARAMETERS, ensure_ascii=False)
            summary = f"- {function.name}: {function.description}" if function.description else f"- {function.name}"
            listed.append(f"{summary}\n  Parameters (JSON schema): {parameters}")
        tools = "\n".join(listed)
        return (
            f"You can call the following functions:\n{tools}\n\n"
            "To call one or more functions, reply with only this JSON object and nothing else:\n"
            f'{{"{_ENVELOPE_KEY}": [{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}]}}\n'
            "Otherwise, answer normally."
        )
