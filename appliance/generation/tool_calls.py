"""Tool-call formats: how models write function calls, and how to read, stream and force them.

A chat model given tools answers in the format it was trained on: Hermes / Qwen wrap each call in
`<tool_call>` tags, Llama 3.1 writes a bare JSON object, Mistral a `[TOOL_CALLS]` list; a model
whose chat template has no tools section is told (in a system message, `describe_tools`) to answer
with a JSON envelope (`generic`). The OpenAI API returns those calls as `message.tool_calls`,
streams them as `delta.tool_calls`, and `tool_choice` = "required" or a named function must force a
call. This module is the one place that knows each format; one small class per format, registered
by name in `FORMATS` (the `tool_parser` setting), in the manner of vLLM's tool parsers.

Contract of every format:
- `parse(text)` never raises: text that is not a well-formed call is content. Forgiving the way
  models are sloppy: any whitespace, `arguments` written as a JSON string holding the object,
  "parameters" instead of "arguments", extra keys in a call object, a missing closing tag or `]`.
- `arguments` is the object as the model wrote it (numbers and string escapes untouched), checked
  to be JSON and with the whitespace between tokens normalised to `json.dumps`' (", " and ": ").
  One incremental reader (`_JsonScanner`) does this for `parse` and for streaming alike, so the
  argument fragments a streamer sends for a call concatenate to exactly what `parse` of the whole
  text gives.
- `streamer()` sends content as soon as it cannot be the start of a call marker, a call's id and
  name as soon as the name is read, and its arguments as they arrive. A call found malformed after
  its name was sent stays as sent (it cannot be taken back); `parse` of the same text makes it
  content.
- `grammar(functions, parallel=..., special_tokens=...)` is an llguidance grammar forcing one call
  (or one or more) to one of `functions`, arguments valid against its parameters. A marker the
  serving tokenizer holds as a special token must be named by its id: llguidance never matches a
  special token against literal text (it even fast-forwards the marker's special token and then
  rejects it). So pass `special_token_ids(tokenizer.json text)` of the serving model (computed
  once per model); without it markers are literal text, right only for tokenizers without them.
- `function_specs(tools)` turns the request's OpenAI tool dicts into FunctionSpecs.

Never imports onnxruntime, torch or transformers.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from llguidance import LLMatcher

from appliance.errors import InvalidInput

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
    return GenericFormat.name


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


def _new_call_id() -> str:
    return CALL_ID_PREFIX + secrets.token_hex(CALL_ID_BYTES)


# --- Reading JSON as it arrives ---------------------------------------------------------------

_WHITESPACE = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_STARTS = frozenset("-0123456789")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_SIMPLE_ESCAPES = frozenset('"\\/bfnrt')
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_UNICODE_ESCAPE_DIGITS = 4
#: Characters below this must be escaped inside a JSON string.
_FIRST_UNESCAPED = 0x20


class _Json(enum.Enum):
    """Where `_JsonScanner` is in the text."""

    START = enum.auto()  # before the top-level object
    VALUE = enum.auto()  # a value must come
    FIRST_ITEM = enum.auto()  # after "[": a value or "]"
    FIRST_KEY = enum.auto()  # after "{": a key or "}"
    KEY = enum.auto()  # after "," in an object
    COLON = enum.auto()
    AFTER_VALUE = enum.auto()  # "," or the container's close
    STRING = enum.auto()
    ESCAPE = enum.auto()  # after a backslash
    UNICODE = enum.auto()  # inside \uXXXX
    NUMBER = enum.auto()
    LITERAL = enum.auto()  # true, false, null
    DONE = enum.auto()
    FAILED = enum.auto()


class _JsonScanner:
    """One JSON object read a character at a time, written out as it is validated with the
    whitespace between tokens normalised. It also records where each top-level member's value
    lies in that output, which is how a call object's name and arguments are found while the
    object is still arriving. No recursion, so no nesting depth breaks it."""

    def __init__(self) -> None:
        self._state = _Json.START
        self._out: list[str] = []  # one character an item: appending and slicing cost only what they touch
        self._stack: list[str] = []  # open containers, "{" or "["
        self._token = ""  # a number or literal read so far
        self._literal = ""  # the literal being read
        self._hex_left = 0
        self._in_key = False
        self._key = ""  # raw text of the top-level key being read
        self._member: tuple[str, int] | None = None  # top-level key and where its value starts
        #: Top-level members read so far: key -> (start, end) of the value in the output; the
        #: first of a repeated key wins.
        self.members: dict[str, tuple[int, int]] = {}

    @property
    def done(self) -> bool:
        return self._state is _Json.DONE

    @property
    def failed(self) -> bool:
        return self._state is _Json.FAILED

    @property
    def open_member(self) -> tuple[str, int] | None:
        """The top-level member whose value is being read: its key and where the value starts."""
        return self._member

    def text(self, start: int = 0, end: int | None = None) -> str:
        """The normalised output (validated so far)."""
        return "".join(self._out[start:end])

    def feed(self, ch: str) -> bool:
        """Read one character; False (and failed) when no JSON object can continue with it."""
        state = self._state
        if state is _Json.STRING:
            self._read_string(ch)
        elif state is _Json.ESCAPE:
            self._read_escape(ch)
        elif state is _Json.UNICODE:
            self._read_unicode(ch)
        elif state is _Json.NUMBER and ch in _NUMBER_CHARS:
            self._token += ch
        elif state is _Json.NUMBER:
            if self._end_number():
                self._read_structure(ch)
        elif state is _Json.LITERAL:
            self._read_literal(ch)
        elif state in (_Json.DONE, _Json.FAILED):
            self._state = _Json.FAILED
        else:
            self._read_structure(ch)
        return self._state is not _Json.FAILED

    def _write(self, text: str) -> None:
        self._out.extend(text)
        if self._in_key and len(self._stack) == 1:
            self._key += text

    def _read_structure(self, ch: str) -> None:
        """A character outside strings, numbers and literals, where whitespace is skipped."""
        state = self._state
        if ch in _WHITESPACE:
            return
        if state is _Json.START and ch == "{":
            self._open(ch)
        elif state is _Json.FIRST_KEY and ch == "}":
            self._close(ch)
        elif state in (_Json.FIRST_KEY, _Json.KEY) and ch == '"':
            self._start_string(key=True)
        elif state is _Json.COLON and ch == ":":
            self._after_colon()
        elif state in (_Json.START, _Json.FIRST_KEY, _Json.KEY, _Json.COLON):
            self._fail()
        elif state is _Json.AFTER_VALUE:
            self._after_value(ch)
        elif state is _Json.FIRST_ITEM and ch == "]":
            self._close(ch)
        else:
            self._start_value(ch)

    def _start_value(self, ch: str) -> None:
        if ch in "{[":
            self._open(ch)
        elif ch == '"':
            self._start_string(key=False)
        elif ch in _NUMBER_STARTS:
            self._state, self._token = _Json.NUMBER, ch
        elif ch in _LITERALS:
            self._state, self._literal, self._token = _Json.LITERAL, _LITERALS[ch], ch
        else:
            self._fail()

    def _open(self, ch: str) -> None:
        self._stack.append(ch)
        self._write(ch)
        self._state = _Json.FIRST_KEY if ch == "{" else _Json.FIRST_ITEM

    def _close(self, ch: str) -> None:
        self._stack.pop()
        self._write(ch)
        self._end_value()

    def _after_colon(self) -> None:
        self._write(KEY_SEPARATOR)
        if len(self._stack) == 1:
            self._member = (json.loads(self._key), len(self._out))
        self._state = _Json.VALUE

    def _after_value(self, ch: str) -> None:
        top = self._stack[-1]
        if ch == ",":
            self._write(ITEM_SEPARATOR)
            self._state = _Json.KEY if top == "{" else _Json.VALUE
        elif (ch == "}" and top == "{") or (ch == "]" and top == "["):
            self._close(ch)
        else:
            self._fail()

    def _end_value(self) -> None:
        if not self._stack:
            self._state = _Json.DONE
            return
        if len(self._stack) == 1 and self._member is not None:
            key, start = self._member
            self.members.setdefault(key, (start, len(self._out)))
            self._member = None
        self._state = _Json.AFTER_VALUE

    def _start_string(self, *, key: bool) -> None:
        self._in_key = key
        if key:
            self._key = ""
        self._write('"')
        self._state = _Json.STRING

    def _read_string(self, ch: str) -> None:
        if ch == '"':
            self._write(ch)
            if self._in_key:
                self._in_key = False
                self._state = _Json.COLON
            else:
                self._end_value()
        elif ch == "\\":
            self._write(ch)
            self._state = _Json.ESCAPE
        elif ord(ch) < _FIRST_UNESCAPED:
            self._fail()
        else:
            self._write(ch)

    def _read_escape(self, ch: str) -> None:
        if ch in _SIMPLE_ESCAPES:
            self._write(ch)
            self._state = _Json.STRING
        elif ch == "u":
            self._write(ch)
            self._state, self._hex_left = _Json.UNICODE, _UNICODE_ESCAPE_DIGITS
        else:
            self._fail()

    def _read_unicode(self, ch: str) -> None:
        if ch not in _HEX_DIGITS:
            self._fail()
            return
        self._write(ch)
        self._hex_left -= 1
        if self._hex_left == 0:
            self._state = _Json.STRING

    def _end_number(self) -> bool:
        """The number ended (at a character that is not part of it): check and write it."""
        if not _NUMBER.fullmatch(self._token):
            self._fail()
            return False
        self._write(self._token)
        self._end_value()
        return True

    def _read_literal(self, ch: str) -> None:
        self._token += ch
        if not self._literal.startswith(self._token):
            self._fail()
        elif self._token == self._literal:
            self._write(self._literal)
            self._end_value()

    def _fail(self) -> None:
        self._state = _Json.FAILED


def _scanned_object(text: str) -> _JsonScanner | None:
    """`text` read whole, if it is exactly one JSON object (whitespace around allowed)."""
    scanner = _JsonScanner()
    for position, ch in enumerate(text):
        if not scanner.feed(ch):
            return None
        if scanner.done:
            return None if text[position + 1 :].strip(_WHITESPACE) else scanner
    return None


def _normalised_object(text: str) -> str | None:
    """`text` as normalised JSON if it is exactly one JSON object."""
    scanner = _scanned_object(text)
    return None if scanner is None else scanner.text()


class _CallReader:
    """One call object, {"name": ..., "arguments": {...}}, read as it arrives."""

    def __init__(self) -> None:
        self._scanner = _JsonScanner()
        self._name: str | None = None

    @property
    def done(self) -> bool:
        return self._scanner.done

    @property
    def failed(self) -> bool:
        return self._scanner.failed

    def feed(self, text: str, position: int) -> int:
        """Read `text` from `position` until the object closes or a character cannot belong to
        it; return where reading stopped (that character is not consumed)."""
        scanner = self._scanner
        while position < len(text) and not scanner.done and scanner.feed(text[position]):
            position += 1
        return position

    @property
    def name(self) -> str | None:
        """The function name, once its string has been read in full."""
        span = self._scanner.members.get("name")
        if self._name is None and span is not None:
            value = json.loads(self._scanner.text(*span))
            self._name = value if isinstance(value, str) else None
        return self._name

    def _arguments_span(self) -> tuple[int, int | None] | None:
        """Where the first arguments member's value lies (end None while it is being read)."""
        for key, span in self._scanner.members.items():
            if key in ARGUMENT_KEYS:
                return span
        member = self._scanner.open_member
        if member is not None and member[0] in ARGUMENT_KEYS:
            return member[1], None
        return None

    def arguments_beyond(self, sent: int) -> str:
        """What the final part of the arguments text has grown by past its first `sent`
        characters: an object counts as far as it has been read; an arguments string only once
        complete (see `arguments`)."""
        span = self._arguments_span()
        if span is None or self._scanner.text(span[0], span[0] + 1) != "{":
            return ""
        return self._scanner.text(span[0] + sent, span[1])

    def arguments(self) -> str | None:
        """The arguments text of a finished call; None if they are not a JSON object (or a
        JSON string holding one)."""
        span = self._arguments_span()
        if span is None:
            return json.dumps({})
        text = self._scanner.text(*span)
        if text.startswith("{"):
            return text
        if text.startswith('"'):
            return _normalised_object(json.loads(text))
        return None


# --- Streaming --------------------------------------------------------------------------------


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class _Outcome(enum.Enum):
    PENDING = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


@dataclass
class _OpenCall:
    """A call being read by a streamer."""

    reader: _CallReader
    #: Text consumed since the call's segment began (its marker included), which becomes
    #: content if the call turns out malformed before anything of it was sent.
    raw: list[str]
    id: str
    index: int | None = None  # given when the header is sent
    sent_arguments: int = 0


class _Streamer(ToolCallStreamer):
    """What every marker-based format's streamer shares: held-back content, and calls read by
    `_CallReader`. `optimistic` streamers (what clients get) send a call's header and arguments
    as they arrive; `parse` runs a non-optimistic one over the whole text, which sends a call
    only once it is complete, so a malformed one can still become content. Subclasses say in
    `_advance` how the buffer is cut into content and calls."""

    def __init__(self, *, optimistic: bool) -> None:
        self._optimistic = optimistic
        self._buffer = ""
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []
        self._call: _OpenCall | None = None
        self._calls_sent = 0
        #: Structure consumed before a call began (a marker, "["): content if no call follows.
        self._pending_raw = ""
        #: Whitespace after a call: sent only if more content follows, dropped otherwise.
        self._after_call = False
        self._held_space = ""

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buffer += text
        self._advance(final=False)
        return self._drain()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        self._advance(final=True)
        return self._drain()

    @abstractmethod
    def _advance(self, *, final: bool) -> None:
        """Consume as much of the buffer as can be decided (all of it when `final`)."""

    def _drain(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas

    def _send_content(self, text: str) -> None:
        if not text:
            return
        if self._after_call and not text.strip(_WHITESPACE):
            self._held_space += text
            return
        self._content.append(self._held_space + text)
        self._held_space, self._after_call = "", False

    def _take_content(self, marker: str, *, final: bool) -> bool:
        """Send content up to `marker` and consume the marker (True), or send what cannot be the
        start of one and hold the rest back (False)."""
        found = self._buffer.find(marker)
        if found >= 0:
            self._send_content(self._buffer[:found])
            self._buffer = self._buffer[found + len(marker) :]
            self._pending_raw = marker
            return True
        keep = 0 if final else _partial_marker(self._buffer, marker)
        self._send_content(self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return False

    def _lstrip_buffer(self) -> str:
        """Drop whitespace at the buffer's start (into the pending structure) and return the rest."""
        rest = self._buffer.lstrip(_WHITESPACE)
        self._pending_raw += self._buffer[: len(self._buffer) - len(rest)]
        self._buffer = rest
        return rest

    def _consume(self, length: int) -> None:
        """Move `length` characters of structure from the buffer into the pending structure."""
        self._pending_raw += self._buffer[:length]
        self._buffer = self._buffer[length:]

    def _abandon_structure(self) -> None:
        """What looked like the start of calls was not: it is content."""
        self._send_content(self._pending_raw)
        self._pending_raw = ""

    def _start_call(self) -> None:
        self._call = _OpenCall(_CallReader(), [self._pending_raw], _new_call_id())
        self._pending_raw, self._held_space, self._after_call = "", "", False

    def _read_call(self, *, final: bool) -> _Outcome:
        """Feed the buffer to the open call; send what is ready; settle it when it ends."""
        call = self._call
        assert call is not None
        stop = call.reader.feed(self._buffer, 0)
        if call.index is None:
            call.raw.append(self._buffer[:stop])
        self._buffer = self._buffer[stop:]
        name = call.reader.name
        if call.reader.done:
            arguments = call.reader.arguments()
            if name is not None and arguments is not None:
                self._send_call(call, name, arguments[call.sent_arguments :])
                self._call, self._after_call = None, True
                return _Outcome.DONE
        elif not (call.reader.failed or final):
            if self._optimistic and name is not None:
                self._send_call(call, name, call.reader.arguments_beyond(call.sent_arguments))
            return _Outcome.PENDING
        if call.index is None:
            self._send_content("".join(call.raw))
        self._call = None
        return _Outcome.FAILED

    def _send_call(self, call: _OpenCall, name: str, more_arguments: str) -> None:
        """Send the header if not sent yet, then the arguments' new part."""
        if call.index is None:
            call.index = self._calls_sent
            self._calls_sent += 1
            self._deltas.append(ToolCallDelta(index=call.index, id=call.id, name=name))
        if more_arguments:
            self._deltas.append(ToolCallDelta(index=call.index, arguments=more_arguments))
            call.sent_arguments += len(more_arguments)


def _assemble(content: str, deltas: Sequence[ToolCallDelta]) -> ParsedOutput:
    """A ParsedOutput from everything a streamer sent."""
    headers: dict[int, tuple[str, str]] = {}
    arguments: dict[int, list[str]] = {}
    for delta in deltas:
        if delta.id is not None and delta.name is not None:
            headers[delta.index] = (delta.id, delta.name)
        arguments.setdefault(delta.index, []).append(delta.arguments)
    calls = [ToolCall(name=name, arguments="".join(arguments[index]), id=id_) for index, (id_, name) in sorted(headers.items())]
    return ParsedOutput(content=content.strip() or None, calls=calls)


def _parse_with(streamer: ToolCallStreamer, text: str) -> ParsedOutput:
    content, deltas = streamer.push(text)
    tail, more = streamer.finish()
    return _assemble(content + tail, deltas + more)


# --- Grammars and descriptions ----------------------------------------------------------------


def _marker_item(marker: str, special_tokens: SpecialTokens) -> str:
    """A marker as a grammar item: the special token's id when the tokenizer holds the marker
    as one (llguidance never matches a special token against literal text), else the text."""
    token = special_tokens.get(marker)
    return json.dumps(marker) if token is None else f"<[{token}]>"


def _rerooted(schema: Any, base: str) -> Any:
    """A copy of `schema` whose local references ("#/...") point below `base`, where the copy
    will live in a larger schema."""
    if isinstance(schema, dict):
        return {
            key: base + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#") else _rerooted(value, base)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_rerooted(value, base) for value in schema]
    return schema


def _calls_schema(functions: Sequence[FunctionSpec], arguments_key: str, wrap: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """The %json item for calls: `wrap` places the schema of one call object (an anyOf over the
    functions) in the format's surroundings. Each function's parameters live under $defs, so
    their own "#/..." references still resolve."""
    if not functions:
        raise InvalidInput("forcing a tool call needs at least one function", field="tools")
    definitions: dict[str, Any] = {}
    options = []
    for number, function in enumerate(functions):
        key = f"function{number}"
        definitions[key] = _rerooted(function.parameters or EMPTY_PARAMETERS, f"#/$defs/{key}")
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function.name}, arguments_key: {"$ref": f"#/$defs/{key}"}},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    layout = {**JSON_LAYOUT, "lenient": not all(function.strict for function in functions)}
    schema = {**wrap({"anyOf": options}), "$defs": definitions, "x-guidance": layout}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _one_call(call: dict[str, Any]) -> dict[str, Any]:
    """A call object on its own, unwrapped."""
    return call


def _calls_list(call: dict[str, Any], *, parallel: bool) -> dict[str, Any]:
    """A JSON list of calls: one, or one or more."""
    return {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def _lark(start: str, body: str) -> str:
    """A compiled grammar: `start` built around the rule `body` (the JSON part)."""
    return LLMatcher.grammar_from_lark(f"%llguidance {{}}\nstart: {start}\nbody: {body}\n")


def _tool_json(function: FunctionSpec) -> str:
    """A function as OpenAI's tool JSON, one line."""
    body: dict[str, Any] = {"name": function.name}
    if function.description:
        body["description"] = function.description
    body["parameters"] = function.parameters or EMPTY_PARAMETERS
    return json.dumps({"type": "function", "function": body}, ensure_ascii=False)


# --- The formats ------------------------------------------------------------------------------

_HERMES_OPEN = "<tool_call>"
_HERMES_CLOSE = "</tool_call>"


class _HermesMode(enum.Enum):
    CONTENT = enum.auto()
    CALL = enum.auto()
    CLOSE = enum.auto()  # after a call object: its closing tag, if any


class _HermesStreamer(_Streamer):
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
                if outcome is _Outcome.PENDING:
                    return
                self._mode = _HermesMode.CLOSE if outcome is _Outcome.DONE else _HermesMode.CONTENT
            else:
                rest = self._buffer.lstrip(_WHITESPACE)
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
        return _parse_with(_HermesStreamer(optimistic=False), text)

    def streamer(self) -> ToolCallStreamer:
        return _HermesStreamer(optimistic=True)

    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS) -> str:
        block = f'{_marker_item(_HERMES_OPEN, special_tokens)} "\\n" body "\\n" {_marker_item(_HERMES_CLOSE, special_tokens)}'
        start = f'{block} ("\\n" {block})*' if parallel else block
        return _lark(start, _calls_schema(functions, "arguments", _one_call))

    def describe_tools(self, functions: Sequence[FunctionSpec]) -> str:
        tools = "\n".join(_tool_json(function) for function in functions)
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
_LLAMA_SKIPPED = _WHITESPACE + ";"


class _LlamaMode(enum.Enum):
    START = enum.auto()  # the reply's start decides: a call object (or the tag), or content
    CONTENT = enum.auto()
    CALLS = enum.auto()  # another call object, or the end of the calls
    CALL = enum.auto()


class _LlamaStreamer(_Streamer):
    def __init__(self, *, optimistic: bool) -> None:
        super().__init__(optimistic=optimistic)
        self._mode = _LlamaMode.START

    def _advance(self, *, final: bool) -> None:
        while True:
            if self._mode is _LlamaMode.START:
                rest = self._buffer.lstrip(_WHITESPACE)
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
                if outcome is _Outcome.PENDING:
                    return
                self._mode = _LlamaMode.CALLS if outcome is _Outcome.DONE else _LlamaMode.CONTENT


@register
class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.1 / 3.2 JSON tool calling: the reply is `{"name": ..., "parameters": {...}}`,
    perhaps after `<|python_tag|>`; several calls are separated by "; " or newlines. A reply
    that does not start with "{" or the tag is content (content may precede the tag)."""

    name = "llama3_json"

    def parse(self, text: str) -> ParsedOutput:
        return _parse_with(_LlamaStreamer(optimistic=False), text)

    def streamer(self) -> ToolCallStreamer:
        return _LlamaStreamer(optimistic=True)

    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS) -> str:
        start = f"body ({json.dumps(_LLAMA_SEPARATOR)} body)*" if parallel else "body"
        return _lark(start, _calls_schema(functions, "parameters", _one_call))

    def describe_tools(self, functions: Sequence[FunctionSpec]) -> str:
        tools = "\n\n".join(_tool_json(function) for function in functions)
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


class _MistralStreamer(_Streamer):
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
                if outcome is _Outcome.PENDING:
                    return
                self._mode = _MistralMode.NEXT if outcome is _Outcome.DONE else _MistralMode.CONTENT
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
        return _parse_with(_MistralStreamer(optimistic=False), text)

    def streamer(self) -> ToolCallStreamer:
        return _MistralStreamer(optimistic=True)

    def grammar(self, functions: Sequence[FunctionSpec], *, parallel: bool, special_tokens: SpecialTokens = NO_SPECIAL_TOKENS) -> str:
        start = f'{_marker_item(_MISTRAL_MARKER, special_tokens)} " " body'
        return _lark(start, _calls_schema(functions, "arguments", lambda call: _calls_list(call, parallel=parallel)))

    def describe_tools(self, functions: Sequence[FunctionSpec]) -> str:
        tools = ", ".join(_tool_json(function) for function in functions)
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
    scanner = _scanned_object(text)
    span = None if scanner is None else scanner.members.get(_ENVELOPE_KEY)
    if scanner is None or span is None:
        return None
    listed = scanner.text(*span)  # normalised: "[" objects joined by ITEM_SEPARATOR "]"
    if not listed.startswith("["):
        return None
    position, calls = 1, []
    while listed.startswith("{", position):
        reader = _CallReader()
        position = reader.feed(listed, position)
        name, arguments = reader.name, reader.arguments() if reader.done else None
        if name is None or arguments is None:
            return None
        calls.append(ToolCall(name=name, arguments=arguments, id=_new_call_id()))
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
            rest = self._buffer.lstrip(_WHITESPACE)
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

    name = "generic"

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
        return _lark("body", self._envelope(functions, parallel=parallel))

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
                "properties": {_ENVELOPE_KEY: _calls_list(call, parallel=parallel)},
                "required": [_ENVELOPE_KEY],
                "additionalProperties": False,
            }

        return _calls_schema(functions, "arguments", envelope)

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
