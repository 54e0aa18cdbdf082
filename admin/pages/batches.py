"""Batches page: the Batch API's batches, newest first, with their progress, failures, tokens,
cost and validation errors; cancel a running batch, delete a finished one with its files,
download a batch's input, output and error files.

Deleting follows the store's rule (store/batch_cleanup.py), the same as the API's: a batch is
deleted only once finished, with its files, never an input another unfinished batch reads.
A cancel is written to the database and handed to this server's runner at once (a batch run
by another server process sees it at that runner's next heartbeat). Downloads are audited:
they are prompt and answer text. The page itself never shows file content.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse
from starlette.responses import Response

from appliance.admin.auth import AdminActionDep, AdminCtxDep, AdminDep, client_address
from appliance.admin.context import AdminContext
from appliance.admin.views import render
from appliance.errors import InvalidInput, ModelNotFound, NotFound
from appliance.store import batch_cleanup
from appliance.store.batch_pricing import BatchCost, batch_cost
from appliance.store.batch_store import BATCH_STATUSES, BatchInfo
from appliance.store.usage_pricing import PriceList
from appliance.store.usage_report import format_cost

router = APIRouter()
#: Most batches the page lists (the newest matching the filter).
BATCHES_SHOWN = 200
#: How a batch made while authentication was off is named (its key id is '').
AUTH_OFF_LABEL = "(auth off)"
#: Statuses a batch can still be cancelled in (a repeated cancel reaches this server's runner).
CANCELLABLE = ("in_progress", "cancelling")
JSONL_MEDIA_TYPE = "application/jsonl"
API_OFF = "the Batch API is off on this server (batch_api.enabled = false): no batch runs here, so none can be cancelled"
NO_STORES = "this admin UI was started without the Batch API's stores"


def key_names(ctx: AdminContext) -> dict[str, str]:
    """Key prefix -> key name, with '' (auth off) named too."""
    names = {info.prefix: info.name for info in ctx.keys.list()}
    names[""] = AUTH_OFF_LABEL
    return names


@dataclass(frozen=True)
class BatchQuery:
    """The page's filters: a status, and a key (its prefix; '' for batches made with auth off)."""

    status: str | None = None
    key_id: str | None = None

    @classmethod
    def parse(cls, request: Request) -> BatchQuery:
        status = request.query_params.get("status") or None
        if status is not None and status not in BATCH_STATUSES:
            raise InvalidInput(f"status: must be one of {', '.join(BATCH_STATUSES)}, got {status[:32]!r}", field="status")
        key = request.query_params.get("key") or None
        return cls(status, "" if key == AUTH_OFF_LABEL else key)

    @property
    def key_value(self) -> str:
        """The key filter as the form sends it."""
        return AUTH_OFF_LABEL if self.key_id == "" else self.key_id or ""


@dataclass(frozen=True)
class BatchRow:
    batch: BatchInfo
    key_name: str
    cost: BatchCost

    @property
    def done(self) -> int:
        return self.batch.completed + self.batch.failed

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.batch.total) if self.batch.total else 100

    @property
    def cost_text(self) -> str:
        if self.cost.cost is None:
            return f"not priced: {self.cost.basis}"
        return format_cost(self.cost.cost, self.cost.currency)

    @property
    def cancellable(self) -> bool:
        return self.batch.status in CANCELLABLE

    @property
    def files(self) -> list[tuple[str, str]]:
        """(label, file id) of the files the batch names."""
        named = (("input", self.batch.input_file_id), ("output", self.batch.output_file_id), ("errors", self.batch.error_file_id))
        return [(label, file_id) for label, file_id in named if file_id]


def _serving_version(ctx: AdminContext, model: str) -> int | None:
    try:
        return ctx.models.status(model).version
    except ModelNotFound:
        return None


def _rows(ctx: AdminContext, batches: list[BatchInfo]) -> list[BatchRow]:
    names = key_names(ctx)
    prices = PriceList.from_bench_dir(ctx.bench_dir, ctx.privacy.cost)
    versions = {model: _serving_version(ctx, model) for model in {batch.model for batch in batches}}
    return [
        BatchRow(batch, names.get(batch.key_id, batch.key_id), batch_cost(batch, prices, versions[batch.model]))
        for batch in batches
    ]


def _page(
    request: Request, ctx: AdminContext, query: BatchQuery | None = None, *, error: str | None = None, status_code: int = 200
) -> Response:
    query = query or BatchQuery()
    found = ctx.batches.list(query.key_id, status=query.status, limit=BATCHES_SHOWN + 1) if ctx.batches is not None else []
    values = {
        "rows": _rows(ctx, found[:BATCHES_SHOWN]),
        "more": len(found) > BATCHES_SHOWN,
        "shown_max": BATCHES_SHOWN,
        "query": query,
        "statuses": BATCH_STATUSES,
        "keys": ctx.keys.list(),
        "auth_off_label": AUTH_OFF_LABEL,
        "stores": ctx.batches is not None,
        "runs_here": ctx.cancel_batch is not None,
    }
    return render(request, "batches.html", values, page="batches", error=error, status_code=status_code)


@router.get("/admin/batches", include_in_schema=False)
def batches_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    try:
        query = BatchQuery.parse(request)
    except InvalidInput as exc:
        return render(request, "error.html", {"status": 400, "message": exc.message}, status_code=400)
    return _page(request, ctx, query)


@router.post("/admin/batches/{batch_id}/cancel", include_in_schema=False)
async def cancel_batch(batch_id: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    """Mark the batch `cancelling` and tell this server's runner (on the event loop: the
    runner's signals are asyncio's). The lines in flight finish; the batch keeps what it did."""

    async def refused(message: str, status_code: int) -> Response:
        return await anyio.to_thread.run_sync(lambda: _page(request, ctx, error=message, status_code=status_code))

    if ctx.batches is None:
        return await refused(NO_STORES, 404)
    if ctx.cancel_batch is None:
        return await refused(API_OFF, 409)
    batches = ctx.batches
    try:
        info = await anyio.to_thread.run_sync(batches.request_cancel, batch_id, None)
    except (InvalidInput, NotFound) as exc:
        return await refused(exc.message, exc.status_code)
    ctx.cancel_batch(batch_id)
    owner = key_names(ctx).get(info.key_id, info.key_id)
    await anyio.to_thread.run_sync(
        lambda: ctx.audit.record(
            "batch.cancel", actor=admin.user_name, address=client_address(request), target=batch_id,
            detail=f"key {owner}, {info.model}, {info.completed + info.failed} of {info.total} lines done",
        )
    )
    return RedirectResponse("/admin/batches?done=batch-cancelled", status_code=303)


@router.post("/admin/batches/{batch_id}/delete", include_in_schema=False)
def delete_batch(batch_id: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    if ctx.batches is None or ctx.files is None:
        return _page(request, ctx, error=NO_STORES, status_code=404)
    try:
        info, deleted = batch_cleanup.delete_batch(ctx.batches, ctx.files, batch_id)
    except (InvalidInput, NotFound) as exc:
        return _page(request, ctx, error=exc.message, status_code=exc.status_code)
    owner = key_names(ctx).get(info.key_id, info.key_id)
    kept = f", {deleted.kept} kept (an unfinished batch reads it)" if deleted.kept else ""
    ctx.audit.record(
        "batch.delete", actor=admin.user_name, address=client_address(request), target=batch_id,
        detail=f"key {owner}, {info.model}, {info.status}; {deleted.files} files ({deleted.bytes} bytes) deleted{kept}",
    )
    return RedirectResponse("/admin/batches?done=batch-deleted", status_code=303)


@router.get("/admin/batches/files/{file_id}", include_in_schema=False)
def download_file(file_id: str, request: Request, ctx: AdminCtxDep, admin: AdminDep) -> Response:
    """A batch file as an attachment (prompt or answer text: the download is audited)."""
    if ctx.files is None:
        return render(request, "error.html", {"status": 404, "message": NO_STORES}, status_code=404)
    try:
        info = ctx.files.get(file_id, None)
    except NotFound as exc:
        return render(request, "error.html", {"status": 404, "message": exc.message}, status_code=404)
    path = ctx.files.path(info.id)
    if not path.is_file():
        return render(request, "error.html", {"status": 404, "message": f"file {file_id!r} has no content on disk"}, status_code=404)
    owner = key_names(ctx).get(info.key_id, info.key_id)
    ctx.audit.record(
        "batch.download", actor=admin.user_name, address=client_address(request), target=file_id,
        detail=f"key {owner}, {info.purpose}, {info.bytes} bytes, {info.lines} lines",
    )
    return FileResponse(path, media_type=JSONL_MEDIA_TYPE, filename=info.filename, content_disposition_type="attachment")
