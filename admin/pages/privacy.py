"""Privacy page: request logging mode and retention, purge-now, the client networks allowed to
the API and to this UI, the Batch API's files (prompt and answer text: listed, deletable all
at once by the store's rule, store/batch_cleanup.py), and a plain-language account of what the
box stores and sends. Never shows stored prompt or completion text."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from appliance.admin.auth import AdminActionDep, AdminCtxDep, AdminDep, client_address, form_list, form_of
from appliance.admin.context import AdminContext
from appliance.admin.pages.batches import key_names
from appliance.admin.views import format_size, render
from appliance.errors import InvalidInput
from appliance.store import batch_cleanup
from appliance.store.privacy import LOGGING_MODES, RETENTION_DAYS_MAX

router = APIRouter()
#: Logged requests listed on the page (metadata only; the page never shows stored text).
RECENT_REQUESTS_SHOWN = 20
#: Batch files listed on the page (newest first; the totals count them all).
BATCH_FILES_SHOWN = 500
FormDep = Annotated[dict[str, str], Depends(form_of)]


def _page(
    request: Request, ctx: AdminContext, *, error: str | None = None, notice: str | None = None, status_code: int = 200
) -> Response:
    rows, with_text = ctx.request_log.counts()
    files = ctx.files.list(None, limit=BATCH_FILES_SHOWN) if ctx.files is not None else []
    file_count, file_bytes = ctx.files.totals() if ctx.files is not None else (0, 0)
    values = {
        "mode": ctx.privacy.mode,
        "modes": LOGGING_MODES,
        "retention_days": ctx.privacy.retention_days,
        "retention_max": RETENTION_DAYS_MAX,
        "api_networks": [str(n) for n in ctx.privacy.api_networks],
        "admin_networks": [str(n) for n in ctx.privacy.admin_networks],
        "log_rows": rows,
        "log_rows_with_text": with_text,
        "recent": ctx.request_log.recent(RECENT_REQUESTS_SHOWN),
        "your_address": client_address(request),
        "database": "the SQLite file in the state directory" if ctx.database.url.startswith("sqlite") else "the configured database",
        "batch_stores": ctx.files is not None and ctx.batches is not None,
        "batch_api_on": ctx.settings.batch_api.enabled,
        "batch_files": files,
        "batch_files_total": file_count,
        "batch_files_bytes": file_bytes,
        "batch_files_shown": BATCH_FILES_SHOWN,
        "batch_inputs_in_use": ctx.batches.open_input_files() if ctx.batches is not None else set(),
        "key_names": key_names(ctx),
    }
    return render(request, "privacy.html", values, page="privacy", error=error, notice=notice, status_code=status_code)


@router.get("/admin/privacy", include_in_schema=False)
def privacy_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    return _page(request, ctx)


@router.post("/admin/privacy/logging", include_in_schema=False)
def set_logging(request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    raw_days = form.get("retention_days", "").strip() or str(ctx.privacy.retention_days)
    try:
        try:
            days = int(raw_days)
        except ValueError:
            raise InvalidInput(f"retention_days: {raw_days!r} is not a whole number of days", field="retention_days") from None
        ctx.privacy.set_logging(form.get("mode", ""), days, actor=admin.user_name, address=client_address(request))
    except InvalidInput as exc:
        return _page(request, ctx, error=exc.message, status_code=400)
    return RedirectResponse("/admin/privacy?done=privacy-saved", status_code=303)


@router.post("/admin/privacy/networks", include_in_schema=False)
def set_networks(request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    try:
        ctx.privacy.set_networks(
            form_list(form, "api_networks"), form_list(form, "admin_networks"),
            actor=admin.user_name, address=client_address(request),
        )
    except InvalidInput as exc:
        return _page(request, ctx, error=exc.message, status_code=400)
    return RedirectResponse("/admin/privacy?done=networks-saved", status_code=303)


@router.post("/admin/privacy/purge", include_in_schema=False)
async def purge_now(request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    deleted = await anyio.to_thread.run_sync(ctx.request_log.purge_all)
    await anyio.to_thread.run_sync(
        lambda: ctx.audit.record(
            "privacy.purge", actor=admin.user_name, address=client_address(request), target="request_log",
            detail=f"{deleted} logged requests deleted",
        )
    )
    return RedirectResponse("/admin/privacy?done=purged", status_code=303)


@router.post("/admin/privacy/batch-files/delete", include_in_schema=False)
def delete_batch_files(request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    """Delete every batch file except the inputs of unfinished batches; the answer says how
    many files and bytes went (and is audited with the same numbers)."""
    if ctx.files is None or ctx.batches is None:
        return _page(request, ctx, error="this admin UI was started without the Batch API's stores", status_code=404)
    deleted = batch_cleanup.delete_all_files(ctx.batches, ctx.files)
    kept = f"; {deleted.kept} kept: unfinished batches read them" if deleted.kept else ""
    ctx.audit.record(
        "privacy.purge", actor=admin.user_name, address=client_address(request), target="batch_files",
        detail=f"{deleted.files} batch files ({deleted.bytes} bytes) deleted{kept}",
    )
    notice = f"{deleted.files} batch files deleted ({format_size(deleted.bytes)}){kept}."
    return _page(request, ctx, notice=notice)
