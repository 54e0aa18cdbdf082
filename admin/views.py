"""Rendering the admin pages: one Jinja2 environment with autoescaping, and the values every
page needs (signed-in user, CSRF token, navigation, a notice or an error to show).

Templates never contain script: behaviour lives in static/admin.js and reads its inputs from
data- attributes, so the Content-Security-Policy can forbid inline script. Never puts a secret
into a page except the one-time API key on the page that created it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from jinja2 import Environment, FileSystemLoader
from fastapi.templating import Jinja2Templates
from starlette.responses import Response

from appliance import __version__
from appliance.store.admin_sessions import ActiveSession

TEMPLATES_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")

NAVIGATION = (
    ("dashboard", "/admin", "Dashboard"),
    ("models", "/admin/models", "Models"),
    ("keys", "/admin/keys", "API keys"),
    ("usage", "/admin/usage", "Usage"),
    ("batches", "/admin/batches", "Batches"),
    ("privacy", "/admin/privacy", "Privacy"),
    ("audit", "/admin/audit", "Audit log"),
    ("playground", "/admin/playground", "Playground"),
)

#: Messages a redirect may ask a page to show (`?done=<code>`); fixed text, so a link cannot
#: make the page say anything else.
NOTICES = {
    "deployed": "Model deployed: it is loading and will serve when ready.",
    "undeployed": "Model undeployed: it no longer serves and stays unloaded after a restart.",
    "default-set": "Default version set; the model reloads with it.",
    "deleted": "Deleted.",
    "model-deleted": "Model deleted with all its versions.",
    "pinned": "Pinned: this model is never evicted or unloaded for idleness.",
    "unpinned": "Unpinned: this model may be evicted when idle.",
    "keep-alive-set": "Keep-alive saved.",
    "replicas-set": "Replicas saved: Ray Serve adds or removes replicas in place; running replicas keep serving.",
    "replicas-restarting": (
        "Replicas and resources saved: Ray Serve restarts this model's replicas with the new reservations, a fifth of "
        "them at a time."
    ),
    "override": "Rejected version marked deployable by explicit override.",
    "export-started": "Export started; its progress follows below.",
    "key-revoked": "Key revoked.",
    "key-limits-set": "Limits and priority saved: running servers apply them within seconds.",
    "group-limits-set": "Group limits saved: running servers apply them within seconds.",
    "key-group-set": "Group saved: usage from now on counts toward the key's new group; earlier usage stays where it was.",
    "privacy-saved": "Privacy settings saved.",
    "networks-saved": "Client networks saved.",
    "purged": "Request log purged.",
    "cost-saved": "Cost model saved.",
    "batch-cancelled": "Cancel requested: the lines in flight finish, the rest do not run; the batch keeps what it did.",
    "batch-deleted": "Batch deleted with its input, output and error files (an input another unfinished batch reads is kept).",
    "welcome": "Welcome: you are signed in.",
    "signed-out": "Signed out.",
}

templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True))


def _utc(value: datetime | float | None) -> str:
    """A datetime, or unix seconds, as UTC text."""
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def format_size(value: int | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


templates.env.filters["utc"] = _utc
templates.env.filters["size"] = format_size


def render(
    request: Request,
    template: str,
    values: dict[str, Any] | None = None,
    *,
    page: str = "",
    status_code: int = 200,
    session: ActiveSession | None = None,
    error: str | None = None,
    notice: str | None = None,
) -> Response:
    session = session or getattr(request.state, "admin_session", None)
    context: dict[str, Any] = {
        "page": page,
        "navigation": NAVIGATION if session else (),
        "user": session.user_name if session else None,
        "csrf_token": session.csrf_token if session else "",
        "error": error,
        "notice": notice if notice is not None else NOTICES.get(request.query_params.get("done", "")),
        "version": __version__,
    }
    context.update(values or {})
    return templates.TemplateResponse(request, template, context, status_code=status_code)
