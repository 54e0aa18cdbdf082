"""Playground page: try a chat model (streaming, structured output, tool calls), an embedding
model or a reranker against the live API.

The page itself holds no model logic: static/admin.js calls `/v1/models`, `/v1/chat/completions`,
`/v1/embeddings` and `/v1/rerank` from the browser with the API key the admin types, exactly as
a client would, so what works here works for clients. The key stays in the page's memory only.
The schema and tools editors start with the examples below; the page checks that they are JSON
before sending and leaves everything else to the API's own validation.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.admin.auth import AdminCtxDep, AdminDep
from appliance.admin.views import render

router = APIRouter()

#: What the JSON schema editor starts with: small, bounded, so even a tiny model fills it fast.
EXAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["city", "rating"],
    "additionalProperties": False,
}
#: What the tools editor starts with: one OpenAI function tool.
EXAMPLE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
]


@router.get("/admin/playground", include_in_schema=False)
def playground_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    return render(
        request,
        "playground.html",
        {
            "auth": ctx.settings.auth,
            "example_schema": json.dumps(EXAMPLE_SCHEMA, indent=2),
            "example_tools": json.dumps(EXAMPLE_TOOLS, indent=2),
        },
        page="playground",
    )
