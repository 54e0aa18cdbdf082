"""OpenAI-compatible routes of the tensor runtime: `GET /v1/models`, `POST /v1/embeddings`.

Embeddings: text is tokenised with the model's own `tokenizer.json`, split into jobs by
length bucket (so short and long inputs do not pad each other), and the `sentence_embedding`
output that the export stage fused into the graph (pooling + normalisation) is returned as is:
no per-request Python post-processing, except re-normalising after a requested `dimensions`
truncation. Truncation to the model's max_length is reported in `truncated`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime

import numpy as np
from fastapi import APIRouter, Request, Response

from appliance.api.context import ServerContext
from appliance.api.deps import CtxDep, InferKeyDep
from appliance.api.inference import ClientDisconnected, RequestTimer, until_disconnect
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
from appliance.runtime.registry import LoadedModel
from appliance.runtime.runner import length_bucket
from appliance.runtime.tensors import coerce
from appliance.runtime.tokenizer import Encoded

router = APIRouter(tags=["openai"])
ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 403, 404, 413, 429, 503, 504)}


def _created(value: str) -> int:
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, summary="Models ready to serve")
async def list_models(ctx: CtxDep, _key: InferKeyDep) -> ModelList:
    cards: list[ModelCard] = []
    for state in ctx.registry.states():
        if state.status == "ready" and state.loaded is not None:
            cards.append(ModelCard(id=state.name, created=_created(state.loaded.manifest.created_at)))
    for name, created in ctx.extra_models.items():
        cards.append(ModelCard(id=name, created=int(created) if isinstance(created, (int, float)) else 0))
    return ModelList(data=sorted(cards, key=lambda card: card.id))


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


def _encode(model: LoadedModel, texts: list[str] | None, ids: list[list[int]] | None) -> list[Encoded]:
    tokenizer = model.tokenizer
    assert tokenizer is not None
    if texts is not None:
        return tokenizer.encode_batch(texts)
    limit = tokenizer.max_length
    encoded: list[Encoded] = []
    for position, token_ids in enumerate(ids or []):
        tokenizer.check_ids(token_ids, field="input", label=f"input[{position}]")
        kept = token_ids if limit is None else token_ids[:limit]
        encoded.append(Encoded(ids=kept, original_length=len(token_ids)))
    return encoded


def _jobs_for(model: LoadedModel, encoded: list[Encoded]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """Group inputs by length bucket, chunked to the batch limit: (original indices, inputs)."""
    manifest = model.manifest
    max_rows = max(1, model.batcher.policy.max_batch_size)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    groups: list[list[int]] = []
    for index in order:
        bucket = length_bucket(len(encoded[index].ids))
        if groups and length_bucket(len(encoded[groups[-1][0]].ids)) == bucket and len(groups[-1]) < max_rows:
            groups[-1].append(index)
        else:
            groups.append([index])
    specs = {spec.name: spec for spec in manifest.inputs}
    pad_id = manifest.tokenizer.pad_token_id if manifest.tokenizer and manifest.tokenizer.pad_token_id is not None else 0
    jobs = []
    for group in groups:
        width = max(len(encoded[i].ids) for i in group)
        input_ids = np.full((len(group), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for row, index in enumerate(group):
            row_ids = encoded[index].ids
            input_ids[row, : len(row_ids)] = row_ids
            mask[row, : len(row_ids)] = 1
        inputs: dict[str, np.ndarray] = {}
        for name, spec in specs.items():
            if name == "input_ids":
                inputs[name] = coerce(input_ids, spec.datatype, name)
            elif name == "attention_mask":
                inputs[name] = coerce(mask, spec.datatype, name)
            elif name == "token_type_ids":
                inputs[name] = coerce(np.zeros_like(input_ids), spec.datatype, name)
            else:
                raise InvalidInput(f"model {manifest.name!r} needs input '{name}', which text embeddings cannot provide", field="model")
        jobs.append((group, inputs))
    return jobs


def _apply_dimensions(model: LoadedModel, vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    spec = model.manifest.embedding
    assert spec is not None
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    if spec.min_dimensions is None:
        raise InvalidInput(f"dimensions: model {model.manifest.name!r} does not support truncation (it has {vectors.shape[1]})", field="dimensions")
    if not spec.min_dimensions <= dimensions <= vectors.shape[1]:
        raise InvalidInput(f"dimensions: must be between {spec.min_dimensions} and {vectors.shape[1]}", field="dimensions")
    cut = vectors[:, :dimensions]
    if spec.normalize:
        norms = np.linalg.norm(cut, axis=1, keepdims=True)
        cut = cut / np.maximum(norms, 1e-12)
    return cut


def _embedding_model(ctx: ServerContext, name: str) -> LoadedModel:
    model = ctx.registry.get(name)
    if model.manifest.embedding is None or model.tokenizer is None:
        raise InvalidInput(f"model: {name!r} is not an embedding model", field="model")
    return model


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=ERRORS, summary="Create embeddings")
async def create_embeddings(body: EmbeddingsRequest, request: Request, ctx: CtxDep, _key: InferKeyDep) -> Response:
    timer = RequestTimer(ctx, body.model)
    try:
        model = _embedding_model(ctx, body.model)
        timer.version = model.manifest.version
        spec = model.manifest.embedding
        assert spec is not None
        if body.dimensions is not None and body.dimensions > spec.dimension:
            raise InvalidInput(f"dimensions: the model has {spec.dimension} dimensions, asked {body.dimensions}", field="dimensions")
        texts, ids = _normalise_inputs(body)
        encoded = _encode(model, texts, ids)
        jobs = _jobs_for(model, encoded)
        timeout = ctx.settings.request_timeout_s

        async def run_all() -> list:
            return await asyncio.gather(*(model.infer(inputs, [spec.output], timeout) for _, inputs in jobs))

        results = await until_disconnect(request, run_all())
    except ClientDisconnected as exc:
        timer.failure(exc)
        return Response(status_code=499)
    except Exception as exc:
        timer.failure(exc)
        raise
    vectors = np.empty((len(encoded), spec.dimension), dtype=np.float32)
    for (group, _inputs), result in zip(jobs, results, strict=True):
        vectors[group] = result.outputs[spec.output]
    vectors = _apply_dimensions(model, vectors, body.dimensions)
    timer.success(max(r.queue_us for r in results), max(r.compute_us for r in results))
    tokens = sum(len(item.ids) for item in encoded)
    if body.encoding_format == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")}
            for i, row in enumerate(vectors)
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in enumerate(vectors)]
    payload = {
        "object": "list",
        "data": data,
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "truncated": [i for i, item in enumerate(encoded) if item.truncated],
    }
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")
