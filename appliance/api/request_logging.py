"""Applies the request logging mode to every inference request, where the data flows.

A pure ASGI middleware around the inference routes (`/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, `/v2/models/.../infer`, the rerank routes). For each request it notes the model, the API key's
public prefix, status, latency and token counts (read from the response's `usage`, or counted
from the stream's chunks) and then, by the privacy policy's mode:

- `off`: writes no request row;
- `metadata` (default): writes those numbers only, never any text;
- `full`: also the prompt and completion text, which expire after the retention period.

In every mode, `off` included, the live statistics for the dashboard (in memory) and the usage
counts per key and model (`usage_counting.py`: numbers aggregated per minute, never text) are
fed. Text seen while parsing lives only in this request's memory. Never logs prompt or
completion text, never changes what the client receives, and a failure here never fails the
request.

It also writes an audit event for every API request refused with 401 or 403 (who: the key's
public prefix if one was sent; never the key), rate-limited per address.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.deps import verified_key_id
from appliance.api.usage_counting import UsageCounter
from appliance.store.audit import AuditLog, DeniedAuditLimiter, audit_denied
from appliance.store.keys import KEY_PATTERN
from appliance.store.privacy import PrivacyPolicy
from appliance.store.request_log import RequestLog, RequestRecord

log = logging.getLogger("appliance.api")

LOGGED_PATH = re.compile(
    r"^/v1/(?P<openai>chat/completions|completions|embeddings)$"
    r"|^/v2/models/(?P<v2model>[^/]+)(?:/versions/(?P<v2version>[^/]+))?/infer$"
    r"|^(?:/v1|/v2)?/(?P<rerank>rerank)$"
)
ADMIN_PREFIX = "/admin"
#: Request bodies larger than this are not parsed for the model name or prompt.
REQUEST_CAPTURE_MAX_BYTES = 4 << 20
#: JSON responses larger than this are not parsed whole (big embedding batches); their `usage`
#: is then read from the last USAGE_TAIL_BYTES, where every route puts it.
RESPONSE_CAPTURE_MAX_BYTES = 4 << 20
USAGE_TAIL_BYTES = 4096
#: A flat `"usage": {...}` object (no nested braces), as the routes write it.
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*(\{[^{}]*\})')


class _ResponseReader:
    """Reads usage and (for full mode) completion text from a JSON or SSE response."""

    def __init__(self, keep_text: bool) -> None:
        self.keep_text = keep_text
        self.streaming = False
        self._buffer = bytearray()
        self._tail = b""
        self._overflow = False
        self._pending_line = b""
        self.text_parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.stream_chunks = 0

    def start(self, headers: list[tuple[bytes, bytes]]) -> None:
        for key, value in headers:
            if key.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                self.streaming = True

    def feed(self, data: bytes) -> None:
        if self.streaming:
            lines = (self._pending_line + data).split(b"\n")
            self._pending_line = lines.pop()
            for line in lines:
                self._event_line(line.strip())
            return
        if self._overflow:
            self._tail = (self._tail + data)[-USAGE_TAIL_BYTES:]
            return
        self._buffer.extend(data)
        if len(self._buffer) > RESPONSE_CAPTURE_MAX_BYTES:
            self._overflow = True
            self._tail = bytes(self._buffer[-USAGE_TAIL_BYTES:])
            self._buffer.clear()

    def _event_line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(chunk, dict):
            return
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            piece = delta.get("content") if delta else choice.get("text")
            if isinstance(piece, str) and piece:
                self.stream_chunks += 1
                if self.keep_text:
                    self.text_parts.append(piece)

    def finish(self) -> None:
        if self.streaming:
            if self._pending_line:
                self._event_line(self._pending_line.strip())
            return
        if self._overflow:
            self._usage_from_tail()
            return
        if not self._buffer:
            return
        try:
            body = json.loads(bytes(self._buffer))
        except (ValueError, RecursionError):
            return
        finally:
            self._buffer.clear()
        if not isinstance(body, dict):
            return
        if isinstance(body.get("usage"), dict):
            self.usage = body["usage"]
        if self.keep_text:
            for choice in body.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                message = choice.get("message") if isinstance(choice.get("message"), dict) else None
                piece = message.get("content") if message else choice.get("text")
                if isinstance(piece, str):
                    self.text_parts.append(piece)

    def _usage_from_tail(self) -> None:
        matches = USAGE_OBJECT.findall(self._tail)
        if not matches:
            return
        try:
            usage = json.loads(matches[-1])
        except ValueError:
            return
        if isinstance(usage, dict):
            self.usage = usage

    def tokens(self) -> tuple[int | None, int | None]:
        if self.usage is not None:
            prompt = self.usage.get("prompt_tokens")
            completion = self.usage.get("completion_tokens")
            return (prompt if isinstance(prompt, int) else None, completion if isinstance(completion, int) else None)
        if self.streaming:
            return None, self.stream_chunks
        return None, None


def _prompt_text(kind: str, body: dict[str, Any]) -> str | None:
    """The request's text in full mode: chat messages, completion prompt, embedding input, or
    a rerank's query and documents."""
    if kind == "chat/completions":
        lines = []
        for message in body.get("messages") or []:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            if isinstance(content, str):
                lines.append(f"{message.get('role', '?')}: {content}")
        return "\n".join(lines) or None
    if kind == "rerank":
        documents = [doc.get("text") if isinstance(doc, dict) else doc for doc in body.get("documents") or []]
        texts = [body.get("query"), *documents]
        return "\n".join(text for text in texts if isinstance(text, str)) or None
    value = body.get("prompt" if kind == "completions" else "input")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return "\n".join(value)
    return None


def _key_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            match = KEY_PATTERN.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
            return match.group(1) if match else None
    return None


class RequestLogMiddleware:
    def __init__(
        self, app: ASGIApp, *, policy: PrivacyPolicy, request_log: RequestLog, audit: AuditLog, usage: UsageCounter
    ) -> None:
        self.app = app
        self.policy = policy
        self.request_log = request_log
        self.audit = audit
        self.usage = usage
        self.denied_limiter = DeniedAuditLimiter()

    async def _audit_if_denied(self, scope: Scope, status: int) -> None:
        """401 and 403 answers of the API are audit events (rate-limited per address)."""
        if status not in (401, 403):
            return
        client = scope.get("client")
        address = client[0] if client else "-"
        key_id = _key_id(scope)
        detail = "missing or invalid API key" if status == 401 else "key lacks the scope, or network not allowed"
        await anyio.to_thread.run_sync(
            lambda: audit_denied(
                self.audit, self.denied_limiter, f"denied.api.{status}", actor=f"key {key_id}" if key_id else "-",
                address=address, target=f"{scope.get('method')} {scope.get('path', '')}", detail=detail,
            )
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)  # the admin UI audits its own denials
            return
        match = LOGGED_PATH.match(scope.get("path", "")) if scope.get("method") == "POST" else None
        if match is None:
            seen_status = 0

            async def status_send(message: Message) -> None:
                nonlocal seen_status
                if message["type"] == "http.response.start":
                    seen_status = int(message["status"])
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    # Written before the last bytes leave: the event exists once the client has its answer.
                    await self._audit_if_denied(scope, seen_status)
                await send(message)

            await self.app(scope, receive, status_send)
            return
        mode = self.policy.mode
        started = time.perf_counter()
        scope.setdefault("state", {})  # shared with the route, which leaves the verified key there
        kind = match.group("openai") or match.group("rerank")
        body = bytearray()
        status = 500
        recorded = False
        reader = _ResponseReader(keep_text=mode == "full")

        def record_once() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            try:
                self._record(scope, match, kind, bytes(body), reader, status, time.perf_counter() - started, mode)
            except Exception as exc:  # noqa: BLE001 - a logging failure must not fail the request
                log.warning("request log: could not record a request (%s)", exc.__class__.__name__)

        async def capture_receive() -> Message:
            message = await receive()
            if kind is not None and message["type"] == "http.request" and len(body) <= REQUEST_CAPTURE_MAX_BYTES:
                body.extend(message.get("body", b""))
            return message

        async def capture_send(message: Message) -> None:
            nonlocal status
            last = False
            try:
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                    reader.start(list(message.get("headers", [])))
                elif message["type"] == "http.response.body":
                    reader.feed(message.get("body", b""))
                    last = not message.get("more_body", False)
            except Exception:  # noqa: BLE001 - logging must never break a response
                pass
            if last:
                # Recorded before the last bytes leave, so the log is complete when the client
                # has its answer (the latency misses only that final write).
                record_once()
                await self._audit_if_denied(scope, status)
            await send(message)

        try:
            await self.app(scope, capture_receive, capture_send)
        finally:
            record_once()

    def _record(
        self, scope: Scope, match: re.Match[str], kind: str | None, body: bytes, reader: _ResponseReader,
        status: int, latency_s: float, mode: str,
    ) -> None:
        reader.finish()
        prompt_tokens, completion_tokens = reader.tokens()
        generated = completion_tokens if kind not in ("embeddings", "rerank") else prompt_tokens
        self.request_log.live.add(latency_s, status, generated or 0)
        parsed: dict[str, Any] = {}
        if kind is not None and body and len(body) <= REQUEST_CAPTURE_MAX_BYTES:
            try:
                value = json.loads(body)
                parsed = value if isinstance(value, dict) else {}
            except (ValueError, RecursionError):
                # Malformed or nested too deeply to parse (the route refused it with 400):
                # the row is still written, with the metadata that is known.
                parsed = {}
        model = match.group("v2model") or (parsed.get("model") if isinstance(parsed.get("model"), str) else "") or "-"
        self.usage.count(
            scope, kind=kind, model=model, path_version=match.group("v2version"), body=parsed, status=status,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        )
        if mode == "off":
            return
        record = RequestRecord(
            at=datetime.now(UTC),
            endpoint=scope.get("path", ""),
            model=model,
            key_id=verified_key_id(scope) or _key_id(scope),
            status=status,
            latency_s=latency_s,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        if mode == "full" and kind is not None:
            completion = "".join(reader.text_parts) or None
            record = replace(record, prompt_text=_prompt_text(kind, parsed), completion_text=completion)
        self.request_log.submit(record, self.policy.retention_days)
