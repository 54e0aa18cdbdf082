"""Reading JSON as it arrives: the one incremental reader behind parsing and streaming.

`parse` and every streamer read call objects with the same scanner, so the argument fragments
a streamer sends concatenate to exactly what `parse` of the whole text returns; arguments are
re-laid out with `json.dumps`' separators while the model's own tokens are kept.
"""

from __future__ import annotations

import enum
import json
import re

from appliance.generation.tool_calls.base import ARGUMENT_KEYS, ITEM_SEPARATOR, KEY_SEPARATOR

# --- Reading JSON as it arrives ---------------------------------------------------------------

WHITESPACE = " \t\n\r"
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
    UNICODE = enum.auto()  # inside a \u escape (four hex digits)
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
        if ch in WHITESPACE:
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


def scanned_object(text: str) -> _JsonScanner | None:
    """`text` read whole, if it is exactly one JSON object (whitespace around allowed)."""
    scanner = _JsonScanner()
    for position, ch in enumerate(text):
        if not scanner.feed(ch):
            return None
        if scanner.done:
            return None if text[position + 1 :].strip(WHITESPACE) else scanner
    return None


def _normalised_object(text: str) -> str | None:
    """`text` as normalised JSON if it is exactly one JSON object."""
    scanner = scanned_object(text)
    return None if scanner is None else scanner.text()


class CallReader:
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
