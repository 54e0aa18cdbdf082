"""Audit log page: filter by who, what, outcome and time; export the filtered events as CSV.
Read-only: no route here (or anywhere in the UI) edits or deletes an event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request
from starlette.responses import Response

from appliance.admin.auth import AdminCtxDep, AdminDep, client_address
from appliance.admin.views import render
from appliance.errors import InvalidInput
from appliance.store.audit import AuditFilter, to_csv

router = APIRouter()
#: Events shown on the page; the CSV export holds up to the store's limit.
PAGE_EVENTS = 500
#: Length of a plain date (YYYY-MM-DD) in the time filters.
DATE_ONLY_CHARS = 10


def _time(value: str, field: str) -> datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{field}: {value!r} is not a date or time (YYYY-MM-DD or YYYY-MM-DDTHH:MM)", field=field) from None
    parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    if field == "until" and len(value) == DATE_ONLY_CHARS:
        parsed += timedelta(days=1) - timedelta(microseconds=1)  # "until a day" includes that day
    return parsed


def _filter(request: Request) -> AuditFilter:
    query = request.query_params
    return AuditFilter(
        actor=query.get("actor", "").strip(),
        action=query.get("action", "").strip(),
        outcome=query.get("outcome", "").strip(),
        since=_time(query.get("since", ""), "since"),
        until=_time(query.get("until", ""), "until"),
    )


@router.get("/admin/audit", include_in_schema=False)
def audit_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    query = dict(request.query_params)
    try:
        where = _filter(request)
    except InvalidInput as exc:
        return render(request, "audit.html", {"events": [], "query": query, "actions": ctx.audit.actions()}, page="audit", error=exc.message, status_code=400)
    events = ctx.audit.query(where, limit=PAGE_EVENTS)
    return render(request, "audit.html", {"events": events, "query": query, "actions": ctx.audit.actions()}, page="audit")


@router.get("/admin/audit.csv", include_in_schema=False)
def audit_csv(request: Request, ctx: AdminCtxDep, admin: AdminDep) -> Response:
    try:
        where = _filter(request)
    except InvalidInput as exc:
        return Response(exc.message + "\n", status_code=400, media_type="text/plain")
    body = to_csv(ctx.audit.query(where))
    ctx.audit.record("audit.export", actor=admin.user_name, address=client_address(request), target="audit_events", detail="CSV export")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Response(
        body, media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="appliance-audit-{stamp}.csv"'},
    )
