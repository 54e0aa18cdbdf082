"""OpenAI's Batch API: `POST /v1/batches`, `GET /v1/batches`, `GET /v1/batches/{id}`,
`POST /v1/batches/{id}/cancel`.

Creating a batch checks every line of its input file first (batch_input.py): a batch whose
lines cannot run is created `failed` with the problems and their line numbers, as OpenAI
reports them. A valid one waits for the runner (batch_runner.py), which runs its lines at the
lowest priority in the same engines as interactive requests. Never imports the engines.
"""

from __future__ import annotations

from datetime import timedelta

import anyio
from fastapi import APIRouter, Query

from appliance.api.batch_input import plan_batch
from appliance.api.batch_schemas import (
    METADATA_KEY_MAX_CHARS,
    METADATA_MAX_PAIRS,
    METADATA_VALUE_MAX_CHARS,
    BatchCreateRequest,
    BatchList,
    BatchObject,
    page_of,
)
from appliance.api.batch_state import BatchApiDep, owner_id
from appliance.api.deps import InferKeyDep
from appliance.api.openai import ERRORS
from appliance.errors import InvalidInput
from appliance.store.batch_store import LIST_LIMIT_MAX, BatchInfo

router = APIRouter(tags=["batches"])
INPUT_PURPOSE = "batch"


def _object(info: BatchInfo) -> BatchObject:
    return BatchObject.model_validate(info.as_openai())


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > METADATA_MAX_PAIRS:
        raise InvalidInput(f"metadata: at most {METADATA_MAX_PAIRS} pairs", field="metadata")
    for name, value in metadata.items():
        if len(name) > METADATA_KEY_MAX_CHARS or len(value) > METADATA_VALUE_MAX_CHARS:
            raise InvalidInput(
                f"metadata: keys up to {METADATA_KEY_MAX_CHARS} and values up to {METADATA_VALUE_MAX_CHARS} characters",
                field="metadata",
            )


@router.post("/v1/batches", response_model=BatchObject, responses=ERRORS, summary="Run a file of requests as a batch")
async def create_batch(body: BatchCreateRequest, batch_api: BatchApiDep, key: InferKeyDep) -> BatchObject:
    batch_api.refuse_if_text_forbidden()
    _check_metadata(body.metadata)
    hours = int(body.completion_window[:-1])
    if hours > batch_api.settings.max_completion_window_h:
        raise InvalidInput(
            f"completion_window: at most {batch_api.settings.max_completion_window_h}h on this box", field="completion_window"
        )
    owner = owner_id(key)
    source = await anyio.to_thread.run_sync(batch_api.files.get, body.input_file_id, owner)
    if source.purpose != INPUT_PURPOSE:
        raise InvalidInput(f"input_file_id: {source.id} has purpose {source.purpose!r}, not 'batch'", field="input_file_id")
    plan = await anyio.to_thread.run_sync(plan_batch, batch_api.files.path(source.id), body.endpoint)
    info = await anyio.to_thread.run_sync(
        lambda: batch_api.batches.create(
            key_id=owner, endpoint=body.endpoint, model=plan.model, input_file_id=source.id,
            completion_window=body.completion_window, window=timedelta(hours=hours), total=plan.total,
            metadata=body.metadata, errors=plan.errors or None,
        )
    )
    if not info.finished:
        batch_api.runner.wake()
    return _object(info)


@router.get("/v1/batches", response_model=BatchList, responses=ERRORS, summary="This key's batches, newest first")
async def list_batches(
    batch_api: BatchApiDep,
    key: InferKeyDep,
    limit: int = Query(20, ge=1, le=LIST_LIMIT_MAX),
    after: str | None = Query(None, description="The last id of the previous page."),
) -> BatchList:
    infos = await anyio.to_thread.run_sync(lambda: batch_api.batches.list(owner_id(key), limit=limit + 1, after=after))
    return page_of(BatchList, [_object(info) for info in infos], limit)


@router.get("/v1/batches/{batch_id}", response_model=BatchObject, responses=ERRORS, summary="One batch and its progress")
async def get_batch(batch_id: str, batch_api: BatchApiDep, key: InferKeyDep) -> BatchObject:
    return _object(await anyio.to_thread.run_sync(batch_api.batches.get, batch_id, owner_id(key)))


@router.post("/v1/batches/{batch_id}/cancel", response_model=BatchObject, responses=ERRORS, summary="Cancel a batch")
async def cancel_batch(batch_id: str, batch_api: BatchApiDep, key: InferKeyDep) -> BatchObject:
    """The lines in flight finish; the rest are not run. The output and error files keep
    what was done."""
    info = await anyio.to_thread.run_sync(batch_api.batches.request_cancel, batch_id, owner_id(key))
    batch_api.runner.cancel(batch_id)
    return _object(info)
