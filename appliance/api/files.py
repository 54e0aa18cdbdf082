"""OpenAI's Files API, for batch input and output files: `POST /v1/files`, `GET /v1/files`,
`GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.

A file is prompt or answer text, so it is written only when the privacy mode allows storing
text (not in mode `off`: 403 with the reason), only into the state directory, and only until
the retention period ends. Each key sees its own files. Never imports the engines.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from appliance.api.batch_input import check_upload
from appliance.api.batch_schemas import FileDeleted, FileList, FileObject, page_of
from appliance.api.batch_state import BatchApiDep, owner_id
from appliance.api.deps import CtxDep, InferKeyDep
from appliance.api.openai import ERRORS
from appliance.api.upload import receive_upload
from appliance.errors import InvalidInput, NotFound
from appliance.store.batch_files import FILE_PURPOSES, UPLOAD_PURPOSES, FileInfo

router = APIRouter(tags=["files"])
JSONL_MEDIA_TYPE = "application/jsonl"
UPLOAD_PATH = "/v1/files"


def _object(info: FileInfo) -> FileObject:
    return FileObject.model_validate(info.as_openai())


@router.post(
    UPLOAD_PATH,
    response_model=FileObject,
    responses=ERRORS,
    summary="Upload a batch input file (multipart: file, purpose=batch)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file", "purpose"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                        },
                    }
                }
            },
        }
    },
)
async def upload_file(request: Request, ctx: CtxDep, batch_api: BatchApiDep, key: InferKeyDep) -> FileObject:
    batch_api.refuse_if_text_forbidden()
    incoming = await anyio.to_thread.run_sync(batch_api.files.incoming)
    try:
        upload = await receive_upload(request, incoming)
        if upload.purpose not in UPLOAD_PURPOSES:
            raise InvalidInput(f"purpose: must be one of {', '.join(UPLOAD_PURPOSES)}, got {upload.purpose[:32]!r}", field="purpose")
        lines = await anyio.to_thread.run_sync(
            lambda: check_upload(incoming.path, max_lines=batch_api.settings.max_lines, max_line_bytes=ctx.settings.max_body_bytes)
        )
        info = await anyio.to_thread.run_sync(
            lambda: batch_api.files.publish(
                incoming, key_id=owner_id(key), purpose=upload.purpose, filename=upload.filename, lines=lines,
                retention_days=batch_api.privacy.retention_days,
            )
        )
    except BaseException:
        await anyio.to_thread.run_sync(incoming.discard)
        raise
    return _object(info)


@router.get("/v1/files", response_model=FileList, responses=ERRORS, summary="This key's files")
async def list_files(
    batch_api: BatchApiDep,
    key: InferKeyDep,
    purpose: str | None = Query(None, description="Only files of this purpose."),
    limit: int = Query(10_000, ge=1, le=10_000),
    after: str | None = Query(None, description="The last id of the previous page."),
    order: str = Query("desc", pattern="^(asc|desc)$"),
) -> FileList:
    if purpose is not None and purpose not in FILE_PURPOSES:
        raise InvalidInput(f"purpose: must be one of {', '.join(FILE_PURPOSES)}", field="purpose")
    infos = await anyio.to_thread.run_sync(
        lambda: batch_api.files.list(owner_id(key), purpose=purpose, limit=limit + 1, after=after, newest_first=order == "desc")
    )
    return page_of(FileList, [_object(info) for info in infos], limit)


@router.get("/v1/files/{file_id}", response_model=FileObject, responses=ERRORS, summary="One file's metadata")
async def get_file(file_id: str, batch_api: BatchApiDep, key: InferKeyDep) -> FileObject:
    return _object(await anyio.to_thread.run_sync(batch_api.files.get, file_id, owner_id(key)))


@router.get(
    "/v1/files/{file_id}/content",
    responses={**ERRORS, 200: {"content": {JSONL_MEDIA_TYPE: {}}, "description": "The file's JSONL lines"}},
    summary="A file's content",
)
async def file_content(file_id: str, batch_api: BatchApiDep, key: InferKeyDep) -> FileResponse:
    info = await anyio.to_thread.run_sync(batch_api.files.get, file_id, owner_id(key))
    path = batch_api.files.path(info.id)
    if not path.exists():  # deleted (or purged) since the row was read
        raise NotFound(f"file {file_id!r} not found", field="file_id")
    return FileResponse(path, media_type=JSONL_MEDIA_TYPE, filename=info.filename)


@router.delete("/v1/files/{file_id}", response_model=FileDeleted, responses=ERRORS, summary="Delete a file and its text")
async def delete_file(file_id: str, batch_api: BatchApiDep, key: InferKeyDep) -> FileDeleted:
    await anyio.to_thread.run_sync(batch_api.delete_file, file_id, owner_id(key))
    return FileDeleted(id=file_id, deleted=True)
