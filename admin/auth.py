"""Who is signed in, and whether a state-changing request really comes from our own page.

- The session cookie (`appliance_admin`) is HttpOnly, SameSite=Strict, limited to /admin, and
  Secure when the server speaks TLS. Its value is looked up in the session store.
- `AdminDep`: a signed-in admin, else a redirect to the login page (GET of a page) or 401
  (the JSON endpoints under /admin/api/, and anything that changes state), written to the
  audit log.
- `AdminActionDep`: the same plus the session's CSRF token, sent as the `csrf_token` form
  field or the `X-CSRF-Token` header, and no foreign `Origin`; otherwise 403, written to the
  audit log.
- Login and setup forms, which have no session yet, carry a pre-login token that must match
  the `appliance_prelogin` cookie (double submit), so another site cannot log a browser in.

Never logs cookie values, tokens or passwords.
"""

from __future__ import annotations

import hmac
import json
import secrets
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

import anyio
from fastapi import Depends, Request
from starlette.responses import Response

from appliance.admin.context import AdminContext
from appliance.store.admin_sessions import ActiveSession
from appliance.store.audit import audit_denied

SESSION_COOKIE = "appliance_admin"
PRELOGIN_COOKIE = "appliance_prelogin"
COOKIE_PATH = "/admin"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
PRELOGIN_TOKEN_BYTES = 24
#: Largest admin form body parsed (the server's own body cap applies first).
FORM_MAX_BYTES = 1 << 20


class AdminHTTPError(Exception):
    """An admin request refused with a status and a sentence for the person (HTML or JSON)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class LoginRequired(Exception):
    """A page was asked for without a session: send the browser to setup or login."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def admin_ctx(request: Request) -> AdminContext:
    return request.app.state.admin


AdminCtxDep = Annotated[AdminContext, Depends(admin_ctx)]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "-"


async def form_of(request: Request) -> dict[str, str]:
    """The request's form (urlencoded) or JSON object as strings, parsed once per request."""
    cached = getattr(request.state, "admin_form", None)
    if cached is not None:
        return cached
    body = await request.body()
    if len(body) > FORM_MAX_BYTES:
        raise AdminHTTPError(413, f"form over {FORM_MAX_BYTES} bytes")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form: dict[str, str] = {}
    if content_type == "application/json" and body:
        try:
            value = json.loads(body)
        except ValueError:
            raise AdminHTTPError(400, "body: malformed JSON") from None
        if not isinstance(value, dict):
            raise AdminHTTPError(400, "body: expected a JSON object")
        form = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
    elif body:
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise AdminHTTPError(400, "body: not UTF-8") from None
        form = {key: values[-1] for key, values in parsed.items()}
    request.state.admin_form = form
    return form


def form_list(form: dict[str, str], field: str) -> list[str]:
    """A field holding one item per line or comma, stripped, blanks dropped."""
    raw = form.get(field, "").replace(",", "\n")
    return [line.strip() for line in raw.splitlines() if line.strip()]


async def current_admin(request: Request, ctx: AdminCtxDep) -> ActiveSession:
    token = request.cookies.get(SESSION_COOKIE, "")
    session = await anyio.to_thread.run_sync(ctx.sessions.lookup, token) if token else None
    if session is not None:
        request.state.admin_session = session
        return session
    if request.method in ("GET", "HEAD") and not request.url.path.startswith("/admin/api/"):
        raise LoginRequired(request.url.path)
    address = client_address(request)
    await anyio.to_thread.run_sync(
        lambda: audit_denied(
            ctx.audit, ctx.denied_limiter, "denied.unauthenticated", address=address,
            target=f"{request.method} {request.url.path}", detail="no valid session",
        )
    )
    raise AdminHTTPError(401, "sign in first: this action needs an admin session")


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site (Origin header).

    Under `Referrer-Policy: no-referrer` browsers send `Origin: null` even for our own forms,
    so "null" (like no header) proves nothing either way; the CSRF token decides then."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    parsed = urlsplit(origin)
    return f"{parsed.netloc}".lower() == request.headers.get("host", "").lower()


async def checked_admin(request: Request, ctx: AdminCtxDep, session: Annotated[ActiveSession, Depends(current_admin)]) -> ActiveSession:
    sent = request.headers.get(CSRF_HEADER) or (await form_of(request)).get(CSRF_FIELD, "")
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf_token.encode()) or not same_origin(request):
        address = client_address(request)
        await anyio.to_thread.run_sync(
            lambda: audit_denied(
                ctx.audit, ctx.denied_limiter, "denied.csrf", actor=session.user_name, address=address,
                target=f"{request.method} {request.url.path}", detail="missing or wrong CSRF token",
            )
        )
        raise AdminHTTPError(403, "missing or wrong CSRF token: reload the page and try again")
    return session


AdminDep = Annotated[ActiveSession, Depends(current_admin)]
AdminActionDep = Annotated[ActiveSession, Depends(checked_admin)]


def set_session_cookie(response: Response, token: str, *, tls: bool) -> None:
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=tls, path=COOKIE_PATH)


def clear_session_cookie(response: Response, *, tls: bool) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=tls)


def prelogin_token(request: Request) -> tuple[str, bool]:
    """(token for the form, whether the cookie must be set now)."""
    existing = request.cookies.get(PRELOGIN_COOKIE, "")
    if existing and len(existing) <= 64:
        return existing, False
    return secrets.token_urlsafe(PRELOGIN_TOKEN_BYTES), True


def set_prelogin_cookie(response: Response, token: str, *, tls: bool) -> None:
    response.set_cookie(PRELOGIN_COOKIE, token, httponly=True, samesite="strict", secure=tls, path=COOKIE_PATH)


def prelogin_valid(request: Request, form: dict[str, str]) -> bool:
    cookie = request.cookies.get(PRELOGIN_COOKIE, "")
    sent = form.get(CSRF_FIELD, "")
    return bool(cookie) and bool(sent) and hmac.compare_digest(cookie.encode(), sent.encode())
