"""API keys page: create (the key is shown once, on the answer to the create form, never in a
URL or the audit log) with an optional group (the team its usage counts toward), list with
group and last use, move a key to another group or none, change its rate limits and priority,
revoke; and the Groups section: each group's keys and its own limits, shared by all its keys,
set there as `appliance keys group-limits` sets them. Group names are checked by the stores, as
the CLI checks them. Never stores or logs a key: the key store keeps only its hash."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from appliance.admin.auth import AdminActionDep, AdminCtxDep, AdminDep, client_address, form_of
from appliance.admin.context import AdminContext
from appliance.admin.views import render
from appliance.errors import InvalidInput, NotFound
from appliance.store.keys import PRIORITIES, SCOPES, check_priority
from appliance.store.rate_limits import RateLimits

router = APIRouter()
FormDep = Annotated[dict[str, str], Depends(form_of)]


def _page(
    request: Request, ctx: AdminContext, *, new_key: str | None = None, new_name: str | None = None,
    error: str | None = None, status_code: int = 200,
) -> Response:
    values = {
        "keys": ctx.keys.list(), "groups": ctx.groups.list(), "scopes": SCOPES, "priorities": PRIORITIES,
        "new_key": new_key, "new_name": new_name,
    }
    return render(request, "keys.html", values, page="keys", error=error, status_code=status_code)


@router.get("/admin/keys", include_in_schema=False)
def keys_page(request: Request, ctx: AdminCtxDep, _admin: AdminDep) -> Response:
    return _page(request, ctx)


@router.post("/admin/keys", include_in_schema=False)
def create_key(request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    name = form.get("name", "").strip()
    scopes = [scope for scope in SCOPES if form.get(f"scope_{scope}") in ("on", "1", "true")] or ["infer"]
    raw_days = form.get("expires_days", "").strip()
    try:
        expires_days: float | None = None
        if raw_days:
            try:
                expires_days = float(raw_days)
            except ValueError:
                raise InvalidInput(f"expires_days: {raw_days!r} is not a number of days", field="expires_days") from None
        limits = RateLimits(
            rpm=_whole(form, "rpm"), tpm=_whole(form, "tpm"), tokens_per_day=_whole(form, "tokens_per_day"),
            tokens_per_month=_whole(form, "tokens_per_month"),
        )
        key, info = ctx.keys.create(
            name, scopes, expires_days=expires_days, group=form.get("group"), limits=limits,
            priority=form.get("priority") or "interactive",
        )
    except InvalidInput as exc:
        return _page(request, ctx, error=exc.message, status_code=400)
    expiry = f", expires {info.expires_at:%Y-%m-%d}" if info.expires_at else ", no expiry"
    group = f", group {info.group}" if info.group else ""
    limited = f", limits {info.limits.as_json()}" if info.limits.any else ""
    limited += f", priority {info.priority}" if info.priority != "interactive" else ""
    ctx.audit.record(
        "key.create", actor=admin.user_name, address=client_address(request), target=info.name,
        detail=f"prefix {info.prefix}, scopes {' '.join(info.scopes)}{expiry}{group}{limited}",
    )
    return _page(request, ctx, new_key=key, new_name=info.name, status_code=201)


def _whole(form: dict[str, str], field: str) -> int | None:
    """A limit field of the form: empty is no limit; anything but a whole number is a 400."""
    raw = form.get(field, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise InvalidInput(f"{field}: {raw!r} is not a whole number", field=field)
    return int(raw)


@router.post("/admin/keys/{name}/group", include_in_schema=False)
def set_key_group(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    """Move the key into the form's group (empty: into no group). Usage counted from now on
    goes to the new group; what was counted before stays with the old one."""
    try:
        before = ctx.keys.find(name)
        info = ctx.keys.set_group(name, form.get("group", ""))
    except (InvalidInput, NotFound) as exc:
        return _page(request, ctx, error=exc.message, status_code=exc.status_code)
    ctx.audit.record(
        "key.update", actor=admin.user_name, address=client_address(request), target=info.name,
        detail=f"prefix {info.prefix}, group {before.group or '(none)'} -> {info.group or '(none)'}",
    )
    return RedirectResponse("/admin/keys?done=key-group-set", status_code=303)


def _limit_or_clear(form: dict[str, str], field: str) -> int:
    """A limit field of the edit form: empty clears the limit (0 to the store), else a whole number."""
    value = _whole(form, field)
    return 0 if value is None else value


@router.post("/admin/keys/{name}/limits", include_in_schema=False)
def set_key_limits(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    """Replace the key's rate limits (an empty field: no limit of that kind) and priority.
    Running servers apply them within their key cache's lifetime (2 s)."""
    try:
        before = ctx.keys.find(name)
        rpm, tpm, per_day, per_month = (
            _limit_or_clear(form, field) for field in ("rpm", "tpm", "tokens_per_day", "tokens_per_month")
        )
        priority = check_priority(form.get("priority") or before.priority)  # before writing anything
        ctx.keys.set_limits(name, rpm=rpm, tpm=tpm, tokens_per_day=per_day, tokens_per_month=per_month)
        info = ctx.keys.set_priority(name, priority)
    except (InvalidInput, NotFound) as exc:
        return _page(request, ctx, error=exc.message, status_code=exc.status_code)
    ctx.audit.record(
        "key.update", actor=admin.user_name, address=client_address(request), target=info.name,
        detail=f"prefix {info.prefix}, limits {before.limits.as_json()} -> {info.limits.as_json()}, "
        f"priority {before.priority} -> {info.priority}",
    )
    return RedirectResponse("/admin/keys?done=key-limits-set", status_code=303)


@router.post("/admin/key-groups", include_in_schema=False)
def set_group_limits(request: Request, ctx: AdminCtxDep, admin: AdminActionDep, form: FormDep) -> Response:
    """Replace the form's group's limits (an empty field: no limit of that kind), audited in the
    same transaction. Running servers apply them within their key cache's lifetime (2 s)."""
    try:
        rpm, tpm, per_day, per_month = (
            _limit_or_clear(form, field) for field in ("rpm", "tpm", "tokens_per_day", "tokens_per_month")
        )
        ctx.groups.set_limits(
            form.get("group", ""), rpm=rpm, tpm=tpm, tokens_per_day=per_day, tokens_per_month=per_month,
            actor=admin.user_name, address=client_address(request),
        )
    except InvalidInput as exc:
        return _page(request, ctx, error=exc.message, status_code=400)
    return RedirectResponse("/admin/keys?done=group-limits-set#groups", status_code=303)


@router.post("/admin/keys/{name}/revoke", include_in_schema=False)
def revoke_key(name: str, request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    try:
        info = ctx.keys.revoke(name)
    except NotFound as exc:
        return _page(request, ctx, error=exc.message, status_code=404)
    ctx.audit.record("key.revoke", actor=admin.user_name, address=client_address(request), target=info.name, detail=f"prefix {info.prefix}")
    return RedirectResponse("/admin/keys?done=key-revoked", status_code=303)
