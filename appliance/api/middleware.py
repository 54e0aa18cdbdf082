"""The ASGI guard around the whole app: body size cap, drain, in-flight count, last resort.

- Request bodies are counted as they stream in; Content-Length is only a first hint (a lying
  or absent one, e.g. chunked, is caught by counting). Over the cap: 413, whatever the route.
  Upload routes (the Files API) have their own, larger cap (`upload_limits`, by exact path).
- While the server drains (after SIGTERM), new requests get 503 (liveness still answers).
- An unexpected exception becomes a 500 with one log line, never a traceback.
Pure ASGI (no BaseHTTPMiddleware), so streaming responses and disconnect detection work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.errors import error_bytes, error_headers
from appliance.errors import PayloadTooLarge

log = logging.getLogger("appliance.api")

#: Paths that answer during a drain (probes must keep saying what is happening).
DRAIN_EXEMPT = ("/v2/health/live", "/v2/health/ready", "/metrics")


class InflightCounter:
    """HTTP requests being served (the drain waits for this to reach zero)."""

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class GuardMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, draining: Callable[[], bool], counter: InflightCounter,
        upload_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.upload_limits = dict(upload_limits or {})
        self.draining = draining
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if self.draining() and not path.startswith(DRAIN_EXEMPT):
            await _answer(send, path, 503, "the server is shutting down")
            return
        limit = self.upload_limits.get(path, self.max_body_bytes) if scope.get("method") == "POST" else self.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _answer(send, path, 413, f"request body of {declared} bytes is over the limit of {limit}")
            return
        received = 0
        overflow = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, overflow
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if overflow:
                return  # the 413 below replaces whatever the app tried to say
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        self.counter.inc()
        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception as exc:  # noqa: BLE001 - last resort: one line, no traceback
            if not overflow:
                log.error("%s %s -> 500 %s: %s", scope.get("method"), path, exc.__class__.__name__, _first_line(exc))
                if not started:
                    await _answer(send, path, 500, "internal error")
                return
        finally:
            self.counter.dec()
        if overflow and not started:
            log.info("%s %s -> 413 body over %d bytes", scope.get("method"), path, limit)
            await _answer(send, path, 413, f"request body is over the limit of {limit} bytes")


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer(send: Send, path: str, status: int, message: str) -> None:
    body = error_bytes(path, status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(key.lower().encode(), value.encode()) for key, value in error_headers(status).items()]
    if status in (413, 503):
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [""])[0][:300]
