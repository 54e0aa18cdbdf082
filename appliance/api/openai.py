"""OpenAI-compatible routes of tensor models and the model list: `GET /v1/models`,
`POST /v1/embeddings`.

The route turns OpenAI's input shapes into texts or token-id lists and hands them to the
model's TensorClient, which tokenises, batches by length and returns the vectors the export
stage's fused pooling produced (truncation to the model's max length is reported in
`truncated`). No per-request model logic lives here. Never imports the engines.
"""

from __future__ import annotations

import base64
import json

from fastapi import APIRouter, Request, Response

from appliance.api.deps import CtxDep, InferKeyDep, ModelsDep, key_priority
from appliance.api.inference import RequestTimer, until_disconnect
from appliance.api.openai_schemas import (
    MAX_EMBEDDING_INPUTS,
    MAX_INPUT_CHARS,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ModelCard,
    ModelList,
    OpenAIError,
)
from appliance.errors import InvalidInput
from appliance.serving.states import ServingState
from appliance.serving.tasks import Route
from appliance.serving.keep_alive import parse_keep_alive
from appliance.serving.protocols import TensorClient

router = APIRouter(tags=["openai"])
ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 403, 404, 413, 429, 503, 504)}


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, summary="Models this server can serve")
async def list_models(models: ModelsDep, _key: InferKeyDep) -> ModelList:
    """Every model a request can use now: loaded ones and those that load on their first
    request (not the undeployed, failed or too large)."""
    cards = [
        ModelCard(id=status.name, created=status.created)
        for status in models.statuses()
        if status.state is not ServingState.UNAVAILABLE
    ]
    return ModelList(data=cards)


def _normalise_inputs(body: EmbeddingsRequest) -> tuple[list[str] | None, list[list[int]] | None]:
    value = body.input
    if isinstance(value, str):
        texts: list[str] | None = [value]
        ids = None
    elif not value:
        raise InvalidInput("input: must not be empty", field="input")
    elif isinstance(value[0], str):
        texts, ids = list(value), None  # type: ignore[arg-type]
    elif isinstance(value[0], int):
        texts, ids = None, [list(value)]  # type: ignore[arg-type]
    else:
        texts, ids = None, [list(item) for item in value]  # type: ignore[union-attr]
    count = len(texts or ids or [])
    if count > MAX_EMBEDDING_INPUTS:
        raise InvalidInput(f"input: at most {MAX_EMBEDDING_INPUTS} inputs per request, got {count}", field="input")
    for position, text in enumerate(texts or []):
        if not text:
            raise InvalidInput(f"input[{position}]: must not be an empty string", field="input")
        if len(text) > MAX_INPUT_CHARS:
            raise InvalidInput(f"input[{position}]: longer than {MAX_INPUT_CHARS} characters", field="input")
    for position, token_ids in enumerate(ids or []):
        if not token_ids:
            raise InvalidInput(f"input[{position}]: token list must not be empty", field="input")
    return texts, ids


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERRORS, summary="Create embeddings")
async def create_embeddings(
    body: EmbeddingsRequest, request: Request, ctx: CtxDep, models: ModelsDep, key: InferKeyDep
) -> Response:
    async with RequestTimer(ctx, body.model) as timer:
        texts, ids = _normalise_inputs(body)
        keep_alive = parse_keep_alive(body.keep_alive)
        async with await models.lease(body.model, Route.EMBEDDINGS, keep_alive_s=keep_alive) as lease:
            timer.version = lease.version
            client: TensorClient = lease.client
            result = await until_disconnect(
                request, client.embed(texts, ids, dimensions=body.dimensions, timeout_s=ctx.settings.request_timeout_s, priority=key_priority(key))
            )
    timer.success(result.queue_us, result.compute_us)
    if body.encoding_format == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")}
            for i, row in enumerate(result.vectors)
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(result.vectors)]
    payload = {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        "truncated": result.truncated,
    }
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")
