"""First-admin setup, login and logout.

Setup works only while no admin exists and only with the one-time token from the server log.
Login is throttled per user name and per address; every attempt, good or bad, is an audit
event (the name tried and the address, never the password). A login always starts a new
session, so a session id planted before login is useless after it. Never logs or audits a
password or a token.
"""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from appliance.admin.auth import (
    PRELOGIN_COOKIE,
    SESSION_COOKIE,
    AdminActionDep,
    AdminCtxDep,
    clear_session_cookie,
    client_address,
    form_of,
    prelogin_token,
    prelogin_valid,
    set_prelogin_cookie,
    set_session_cookie,
)
from appliance.admin.context import AdminContext
from appliance.admin.views import render
from appliance.errors import InvalidInput
from appliance.store.admin_users import PASSWORD_MIN_CHARS, check_new_password, check_user_name
from appliance.store.audit import audit_denied

router = APIRouter()
FormDep = Annotated[dict[str, str], Depends(form_of)]


def safe_next(value: str | None) -> str:
    """Only a path inside /admin (no scheme, no //host): never an open redirect."""
    if value and value.startswith("/admin") and not value.startswith("//") and "\\" not in value and "://" not in value:
        return value
    return "/admin"


def _with_prelogin(request: Request, ctx: AdminContext, template: str, values: dict, *, status_code: int = 200, error: str | None = None) -> Response:
    token, fresh = prelogin_token(request)
    response = render(request, template, {**values, "prelogin": token}, status_code=status_code, error=error)
    if fresh:
        set_prelogin_cookie(response, token, tls=ctx.tls)
    return response


def _signed_in(ctx: AdminContext, request: Request, user_id: int, target: str) -> Response:
    """Start a fresh session (rotation), drop any old one, and go to `target`."""
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        ctx.sessions.end(old)
    token, _session = ctx.sessions.create(user_id, client_address(request))
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(response, token, tls=ctx.tls)
    response.delete_cookie(PRELOGIN_COOKIE, path="/admin")
    return response


# -- setup ---------------------------------------------------------------------------------------
@router.get("/admin/setup", include_in_schema=False)
async def setup_page(request: Request, ctx: AdminCtxDep) -> Response:
    if await anyio.to_thread.run_sync(ctx.users.count) > 0:
        return RedirectResponse("/admin/login", status_code=303)
    values = {"token": request.query_params.get("token", ""), "min_chars": PASSWORD_MIN_CHARS, "token_active": ctx.setup_token.active}
    return _with_prelogin(request, ctx, "setup.html", values)


@router.post("/admin/setup", include_in_schema=False)
def setup_submit(request: Request, ctx: AdminCtxDep, form: FormDep) -> Response:
    address = client_address(request)
    values = {"token": form.get("token", ""), "min_chars": PASSWORD_MIN_CHARS, "token_active": ctx.setup_token.active, "name": form.get("name", "")}
    if not prelogin_valid(request, form):
        audit_denied(ctx.audit, ctx.denied_limiter, "denied.csrf", address=address, target="POST /admin/setup", detail="missing or wrong form token")
        return _with_prelogin(request, ctx, "setup.html", values, status_code=403, error="The form expired: reload the page and try again.")
    if ctx.users.count() > 0:
        return RedirectResponse("/admin/login", status_code=303)
    name, password = form.get("name", "").strip(), form.get("password", "")
    if password != form.get("password_again", ""):
        return _with_prelogin(request, ctx, "setup.html", values, status_code=400, error="password_again: the two passwords differ.")
    try:
        check_user_name(name)
        check_new_password(password)
    except InvalidInput as exc:
        return _with_prelogin(request, ctx, "setup.html", values, status_code=400, error=exc.message)
    if not ctx.setup_token.consume(form.get("token", "").strip()):
        audit_denied(ctx.audit, ctx.denied_limiter, "setup.failure", actor=name or "-", address=address, target=name, detail="wrong, used or expired setup token")
        return _with_prelogin(
            request, ctx, "setup.html", values, status_code=403,
            error="token: wrong, used or expired setup token. Restart the server for a new one, or use `appliance admin create-user`.",
        )
    try:
        user = ctx.users.create_first(name, password, address=address)
    except InvalidInput as exc:
        return _with_prelogin(request, ctx, "setup.html", values, status_code=400, error=exc.message)
    ctx.audit.record("login.success", actor=user.name, address=address, target=user.name, detail="first admin created with the setup token")
    return _signed_in(ctx, request, user.id, "/admin?done=welcome")


# -- login / logout ------------------------------------------------------------------------------
@router.get("/admin/login", include_in_schema=False)
async def login_page(request: Request, ctx: AdminCtxDep) -> Response:
    if await anyio.to_thread.run_sync(ctx.users.count) == 0:
        return RedirectResponse("/admin/setup", status_code=303)
    return _with_prelogin(request, ctx, "login.html", {"next": safe_next(request.query_params.get("next"))})


@router.post("/admin/login", include_in_schema=False)
def login_submit(request: Request, ctx: AdminCtxDep, form: FormDep) -> Response:
    address = client_address(request)
    name = form.get("name", "").strip()[:64]
    target = safe_next(form.get("next"))
    values = {"next": target, "name": name}
    if not prelogin_valid(request, form):
        audit_denied(ctx.audit, ctx.denied_limiter, "denied.csrf", address=address, target="POST /admin/login", detail="missing or wrong form token")
        return _with_prelogin(request, ctx, "login.html", values, status_code=403, error="The form expired: reload the page and try again.")
    wait_s = ctx.throttle.locked_for_s(name, address)
    if wait_s > 0:
        audit_denied(ctx.audit, ctx.denied_limiter, "login.locked", actor=name or "-", address=address, target=name, detail="attempt during lockout")
        minutes = max(1, int(wait_s // 60) + 1)
        return _with_prelogin(
            request, ctx, "login.html", values, status_code=429,
            error=f"Too many failed attempts: sign-in is locked for about {minutes} minutes.",
        )
    user = ctx.users.authenticate(name, form.get("password", ""))
    if user is None:
        locked = ctx.throttle.failed(name, address)
        detail = "wrong name or password" + ("; now locked out" if locked else "")
        ctx.audit.record("login.failure", actor=name or "-", address=address, outcome="failed", target=name, detail=detail)
        message = "Wrong name or password."
        if locked:
            message += " Too many failed attempts: sign-in is locked for a while."
        return _with_prelogin(request, ctx, "login.html", values, status_code=401, error=message)
    ctx.throttle.succeeded(name, address)
    ctx.audit.record("login.success", actor=user.name, address=address, target=user.name)
    return _signed_in(ctx, request, user.id, target)


@router.post("/admin/logout", include_in_schema=False)
def logout(request: Request, ctx: AdminCtxDep, admin: AdminActionDep) -> Response:
    token = request.cookies.get(SESSION_COOKIE, "")
    ctx.sessions.end(token)
    ctx.audit.record("logout", actor=admin.user_name, address=client_address(request), target=admin.user_name)
    response = RedirectResponse("/admin/login?done=signed-out", status_code=303)
    clear_session_cookie(response, tls=ctx.tls)
    return response
