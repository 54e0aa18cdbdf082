"""Playground page: try a chat model (streaming), an embedding model or a reranker against the
live API.

The page itself holds no model logic: static/admin.js calls `/v1/models`, `/v1/chat/completions`,
`/v1/embeddings` and `/v1/rerank` from the browser with the API key the admin types, exactly as
a client would, so what works here works for clients. The key stays in the page's memory only.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.admin.auth import AdminCtxDep, AdminDep
from appliance.admin.views import render

router = APIRouter()


@router.get("/admin/playground", include_in_schema=False)
def playground_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    return render(request, "playground.html", {"auth": ctx.settings.auth}, page="playground")
