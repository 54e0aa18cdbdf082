"""Reranking for retrieval-augmented chat: `POST /v1/rerank`, `POST /v2/rerank`, `POST /rerank`.

A text classifier trained as a cross-encoder scores each (query, document) pair; the route
leases the model, hands the query and documents to its TensorClient (which joins the pairs by
the model's template, cuts long documents and batches the pairs by length with other
requests' rows), then sorts. Errors follow the path's family: OpenAI's object on `/v1`, V2's
`{"error"}` elsewhere. Never imports the engines.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from appliance.api.deps import CtxDep, InferKeyDep, ModelsDep, key_priority
from appliance.api.errors import is_openai_path
from appliance.api.inference import RequestTimer, until_disconnect
from appliance.api.openai_schemas import OpenAIError
from appliance.api.rerank_schemas import DocumentText, RerankRequest, RerankResponse, RerankResultItem, RerankUsage
from appliance.api.v2_schemas import ErrorResponse
from appliance.errors import InvalidInput
from appliance.serving.keep_alive import parse_keep_alive
from appliance.serving.protocols import TensorClient
from appliance.serving.tasks import Route

router = APIRouter(tags=["rerank"])
ERROR_CODES = (400, 401, 403, 404, 413, 429, 503, 504)
PATHS = ("/v1/rerank", "/v2/rerank", "/rerank")


async def rerank(body: RerankRequest, request: Request, ctx: CtxDep, models: ModelsDep, key: InferKeyDep) -> RerankResponse:
    """Score every document against the query; results sorted by relevance, best first."""
    async with RequestTimer(ctx, body.model) as timer:
        if not body.documents:
            raise InvalidInput("documents: must contain at least one document", field="documents")
        documents = body.texts()
        keep_alive = parse_keep_alive(body.keep_alive)
        async with await models.lease(body.model, Route.RERANK, keep_alive_s=keep_alive) as lease:
            timer.version = lease.version
            client: TensorClient = lease.client
            result = await until_disconnect(
                request,
                client.rerank(
                    body.query, documents, max_tokens_per_doc=body.max_tokens_per_doc, timeout_s=ctx.settings.request_timeout_s,
                    priority=key_priority(key),
                ),
            )
    timer.success(result.queue_us, result.compute_us)
    order = sorted(range(len(documents)), key=lambda index: -result.scores[index])
    if body.top_n is not None:
        order = order[: body.top_n]
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=body.model,
        results=[
            RerankResultItem(
                index=index,
                relevance_score=result.scores[index],
                document=DocumentText(text=documents[index]) if body.return_documents else None,
            )
            for index in order
        ],
        usage=RerankUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
        truncated=result.truncated,
    )


for path in PATHS:
    # Errors follow the path's family: OpenAI's error object on /v1, V2's elsewhere.
    error_model = OpenAIError if is_openai_path(path) else ErrorResponse
    router.add_api_route(
        path, rerank, methods=["POST"], response_model=RerankResponse, responses={code: {"model": error_model} for code in ERROR_CODES},
        summary="Rerank documents against a query (cross-encoder)", operation_id=f"rerank{path.replace('/', '_')}",
    )
