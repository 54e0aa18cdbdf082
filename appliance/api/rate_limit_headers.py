"""Puts a rate-limited key's `x-ratelimit-*` headers on its response, whatever the response is.

The key check (`deps.require_scope`) leaves the headers in the request's ASGI state; this pure
ASGI middleware copies them onto the response's start message, so JSON answers, streams and the
429 refusal itself all carry them, as OpenAI's API does for keys with limits (here: a key's own
or its group's, whichever has fewer remaining). Requests of keys without limits, in no limited
group, pass through untouched.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.api.deps import RATE_HEADERS_STATE


class RateLimitHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                state = scope.get("state")
                headers = state.get(RATE_HEADERS_STATE) if isinstance(state, dict) else None
                if headers:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())],
                    }
            await send(message)

        await self.app(scope, receive, send_with_headers)
