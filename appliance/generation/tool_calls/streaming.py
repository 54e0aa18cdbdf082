"""The streaming machinery the marker-based formats share: content until a call marker,
calls read as they arrive, fragments out as soon as they are known; `parse` is a stream fed
all at once, so both give the same calls.
"""

from __future__ import annotations

import enum
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.generation.tool_calls.base import ParsedOutput, ToolCall, ToolCallDelta, ToolCallStreamer, new_call_id
from appliance.generation.tool_calls.json_reader import CallReader, WHITESPACE

# --- Streaming --------------------------------------------------------------------------------


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


class Outcome(enum.Enum):
    PENDING = enum.auto()
    DONE = enum.auto()
    FAILED = enum.auto()


@dataclass
class _OpenCall:
    """A call being read by a streamer."""

    reader: CallReader
    #: Text consumed since the call's segment began (its marker included), which becomes
    #: content if the call turns out malformed before anything of it was sent.
    raw: list[str]
    id: str
    index: int | None = None  # given when the header is sent
    sent_arguments: int = 0


class Streamer(ToolCallStreamer):
    """What every marker-based format's streamer shares: held-back content, and calls read by
    `CallReader`. `optimistic` streamers (what clients get) send a call's header and arguments
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
        if self._after_call and not text.strip(WHITESPACE):
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
        rest = self._buffer.lstrip(WHITESPACE)
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
        self._call = _OpenCall(CallReader(), [self._pending_raw], new_call_id())
        self._pending_raw, self._held_space, self._after_call = "", "", False

    def _read_call(self, *, final: bool) -> Outcome:
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
                return Outcome.DONE
        elif not (call.reader.failed or final):
            if self._optimistic and name is not None:
                self._send_call(call, name, call.reader.arguments_beyond(call.sent_arguments))
            return Outcome.PENDING
        if call.index is None:
            self._send_content("".join(call.raw))
        self._call = None
        return Outcome.FAILED

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


def parse_with(streamer: ToolCallStreamer, text: str) -> ParsedOutput:
    content, deltas = streamer.push(text)
    tail, more = streamer.finish()
    return _assemble(content + tail, deltas + more)
