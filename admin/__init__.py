"""The admin web UI (installed as appliance.admin): pages, templates and static assets served by
the appliance itself, with no CDN and no inline script.

`install_admin(app, ctx)` is the one call the app factory makes: it adds the routes, the static
files, the network guard with its security headers, the error pages, and a lifespan that
starts the request log writer, the dashboard sampler and (while no admin exists) prints the
one-time setup URL. Never imports the API layer or the export stage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from appliance.admin.auth import AdminHTTPError, LoginRequired
from appliance.admin.context import AdminContext
from appliance.admin.dashboard import SAMPLE_INTERVAL_S, DashboardSampler
from appliance.admin.exports import ExportRunner
from appliance.admin.pages import audit, auth, batches, dashboard, keys, models, playground, privacy, usage
from appliance.admin.security import AdminGuardMiddleware, LoginThrottle
from appliance.admin.setup_token import SETUP_TOKEN_TTL_S, SetupToken
from appliance.admin.views import STATIC_DIR, render
from appliance.store.audit import DeniedAuditLimiter

log = logging.getLogger("appliance.admin")

__all__ = ["AdminContext", "install_admin"]


def setup_url(ctx: AdminContext, token: str) -> str:
    host = ctx.settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "<this-box-address>"
    elif ":" in host:
        host = f"[{host}]"
    scheme = "https" if ctx.tls else "http"
    return f"{scheme}://{host}:{ctx.settings.port}/admin/setup?token={token}"


def _lifespan(ctx: AdminContext):  # noqa: ANN202 - an async context manager factory
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        abandoned = await anyio.to_thread.run_sync(ctx.export_jobs.abandon_unfinished)
        if abandoned:
            log.warning("%d export jobs of a previous run were left unfinished; marked failed", abandoned)
        await anyio.to_thread.run_sync(ctx.sessions.purge_expired)
        ctx.request_log.start()
        ctx.sampler.start()
        if await anyio.to_thread.run_sync(ctx.users.count) == 0:
            token = ctx.setup_token.issue()
            minutes = int(SETUP_TOKEN_TTL_S // 60)
            log.warning(
                "no admin user yet: open %s to create one (works once, for %d minutes), "
                "or run `appliance admin create-user NAME`",
                setup_url(ctx, token), minutes,
            )
        try:
            yield
        finally:
            await ctx.sampler.stop()
            await ctx.exports.close()
            await asyncio.to_thread(ctx.request_log.close)

    return lifespan


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    ctx: AdminContext = request.app.state.admin
    if await anyio.to_thread.run_sync(ctx.users.count) == 0:
        return RedirectResponse("/admin/setup", status_code=303)
    target = "/admin/login" if exc.next_path in ("/admin", "/admin/") else f"/admin/login?next={quote(exc.next_path)}"
    return RedirectResponse(target, status_code=303)


async def _admin_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AdminHTTPError)
    wants_json = request.url.path.startswith("/admin/api/") or "application/json" in request.headers.get("accept", "")
    if wants_json:
        return JSONResponse({"error": exc.message}, status_code=exc.status_code)
    return render(request, "error.html", {"status": exc.status_code, "message": exc.message}, status_code=exc.status_code)


def install_admin(
    app: FastAPI,
    ctx: AdminContext,
    *,
    sample_interval_s: float = SAMPLE_INTERVAL_S,
    export_command: list[str] | None = None,
) -> None:
    """Add the admin UI to `app` (routes, static files, guard, error pages, lifespan)."""
    ctx.throttle = LoginThrottle()
    ctx.denied_limiter = DeniedAuditLimiter()
    ctx.setup_token = SetupToken()
    ctx.sampler = DashboardSampler(ctx.models, ctx.request_log.live, sample_interval_s)
    ctx.exports = ExportRunner(
        ctx.settings.state_dir, ctx.export_jobs, ctx.models.load, ctx.deployments,
        command=export_command, config=ctx.settings.config,
    )
    app.state.admin = ctx

    router = APIRouter(lifespan=_lifespan(ctx))
    for page in (auth, dashboard, models, keys, usage, batches, privacy, audit, playground):
        router.include_router(page.router)
    app.include_router(router)
    app.mount("/admin/static", StaticFiles(directory=STATIC_DIR), name="admin-static")
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(AdminHTTPError, _admin_error)
    app.add_middleware(
        AdminGuardMiddleware, networks=ctx.privacy.admin_networks, audit=ctx.audit, limiter=ctx.denied_limiter, tls=ctx.tls
    )
