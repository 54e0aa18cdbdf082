"""Calling the appliance's own HTTP routes in-process, as the Batch API's lines do.

A batch line is an ordinary request (`POST /v1/chat/completions` and friends) and must get
exactly what a client would: the same validation and errors, chat templates, tool calls,
structured output, request log, usage counting. So the runner sends it through the whole ASGI
app (middleware included) without a socket. The line carries no API key: the scope's
`extensions` name the batch's owning key (BATCH_EXTENSION), which `deps.require_scope`
honours. An HTTP client cannot forge it: servers build the scope of network requests
themselves and never fill `extensions` from anything a client sends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.types import ASGIApp, Message

#: The scope extension that marks an in-process batch line: {"key_id": str}.
BATCH_EXTENSION = "appliance.batch"
#: Where an in-process call says it comes from (loopback, port 0: no socket).
LOCAL_CLIENT = ("127.0.0.1", 0)


@dataclass
class LocalResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON (a non-JSON body, which the routes never send, becomes a string)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return self.body.decode("utf-8", "replace")


async def call_local(app: ASGIApp, path: str, body: bytes, *, key_id: str, disconnect: anyio.Event) -> LocalResponse:
    """POST `body` (JSON) to `path` as the batch owner `key_id`; setting `disconnect` makes the
    route see its client go away (it then stops the work and frees the engine's slot)."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii"))],
        "client": LOCAL_CLIENT,
        "server": LOCAL_CLIENT,
        "extensions": {BATCH_EXTENSION: {"key_id": key_id}},
        "state": {},
    }
    sent_body = False
    response = LocalResponse(status=500)
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            response.status = int(message["status"])
            response.headers = {
                name.decode("latin-1").lower(): value.decode("latin-1") for name, value in message.get("headers", [])
            }
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    response.body = b"".join(chunks)
    return response


def batch_key_id(scope: dict[str, Any]) -> str | None:
    """The owning key of an in-process batch line ('' when auth is off), None for a network request."""
    extension = (scope.get("extensions") or {}).get(BATCH_EXTENSION)
    return extension.get("key_id") if isinstance(extension, dict) else None
