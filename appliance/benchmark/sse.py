"""Reading OpenAI-style server-sent event streams: event framing and output-token counting.

`SseDecoder` turns arbitrary network chunks into complete `data:` payloads (an event ends at
a blank line; several `data:` lines join with newlines; comments and other fields are
skipped). `StreamTally` reads those payloads as chat or completion chunks and records when
output arrived and how many tokens it was: the server's own `usage.completion_tokens` when the
stream carries it, else one token per output-carrying chunk. Never opens a connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

#: The payload that ends an OpenAI stream.
DONE_SENTINEL = "[DONE]"


class SseDecoder:
    """Incremental SSE parser: feed text as it arrives, get each finished event's data."""

    def __init__(self) -> None:
        self._buffer = ""
        self._data_lines: list[str] = []

    def feed(self, text: str) -> list[str]:
        """Consume `text`; return the data of every event completed by it, in order."""
        self._buffer += text.replace("\r\n", "\n").replace("\r", "\n")
        finished: list[str] = []
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            if line == "":
                if self._data_lines:
                    finished.append("\n".join(self._data_lines))
                    self._data_lines = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data_lines.append(value[1:] if value.startswith(" ") else value)
        return finished

    def close(self) -> list[str]:
        """End of stream: a last event without its blank line still counts."""
        tail = self.feed("\n\n") if self._buffer else []
        if self._data_lines:
            tail.append("\n".join(self._data_lines))
            self._data_lines = []
        return tail


class StreamError(Exception):
    """The stream carried an error object or a payload that is not JSON."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        #: The error object's `code` (e.g. "deadline_exceeded"), when the stream carried one.
        self.code = code


@dataclass
class StreamTally:
    """Output seen on one streamed completion: chunk arrival times and token counts."""

    chunk_times_s: list[float] = field(default_factory=list)
    content_chunks: int = 0
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False

    def add(self, payload: str, at_s: float) -> None:
        """Account one event's data received at `at_s` (seconds, the caller's clock)."""
        if payload.strip() == DONE_SENTINEL:
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise StreamError(f"stream chunk is not JSON: {payload[:80]!r}") from exc
        if not isinstance(chunk, dict):
            raise StreamError(f"stream chunk is not an object: {payload[:80]!r}")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            code = error.get("code") if isinstance(error, dict) else None
            raise StreamError(f"server error in stream: {message}", code=code if isinstance(code, str) else None)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.usage_completion_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.usage_prompt_tokens = usage["prompt_tokens"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if _choice_text(choice):
                self.content_chunks += 1
                self.chunk_times_s.append(at_s)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    @property
    def output_tokens(self) -> int:
        """The server's count when it gave one, else one per output-carrying chunk."""
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return self.content_chunks


def _choice_text(choice: dict) -> str:
    """The new text of one choice: `delta.content` for chat, `text` for completions."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        content = delta.get("content")
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""
