"""Helpers for the admin UI tests: create an admin, sign in with a real HTTP client, read the
CSRF token from a page, open the playground in the browser. Only tests import this module."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from appliance.config import load_settings
from appliance.store.admin_users import AdminUserStore
from appliance.store.db import Database
from appliance.store.migrate import upgrade

#: Debian's chromium (scripts/test_system_deps.sh installs it); Playwright drives it, never its own download.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
#: Playwright waits at most this long for one step (ms).
STEP_TIMEOUT_MS = 15_000
ADMIN_NAME = "alice"
ADMIN_PASSWORD = "a long admin passphrase"
_HIDDEN_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
_BODY_CSRF = re.compile(r'data-csrf="([^"]*)"')
_SETUP_URL = re.compile(r"(https?://\S+/admin/setup\?token=(\S+))")


def create_admin(state_dir: Path, name: str = ADMIN_NAME, password: str = ADMIN_PASSWORD) -> None:
    database = Database(load_settings(state_dir=state_dir).db_url)
    upgrade(database)
    AdminUserStore(database).create(name, password)
    database.close()


def form_token(html: str) -> str:
    match = _HIDDEN_CSRF.search(html)
    assert match, "no csrf_token field on the page"
    return match.group(1)


def page_csrf(html: str) -> str:
    match = _BODY_CSRF.search(html)
    assert match and match.group(1), "no session CSRF token on the page"
    return match.group(1)


def setup_token_from(text: str) -> str:
    match = _SETUP_URL.search(text)
    assert match, "no setup URL in the log"
    return match.group(2)


def sign_in(client: httpx.Client, base_url: str, name: str = ADMIN_NAME, password: str = ADMIN_PASSWORD) -> str:
    """Sign in through the login form; returns the session's CSRF token."""
    page = client.get(f"{base_url}/admin/login")
    assert page.status_code == 200, page.text
    answer = client.post(
        f"{base_url}/admin/login",
        data={"csrf_token": form_token(page.text), "name": name, "password": password, "next": "/admin"},
    )
    assert answer.status_code == 303, answer.text
    dashboard = client.get(f"{base_url}/admin/keys")
    assert dashboard.status_code == 200, dashboard.text
    return page_csrf(dashboard.text)


def open_playground(browser: Any, base_url: str, key: str, model: str, kind: str) -> Any:
    """A new Playwright page, signed in as the test admin, on the playground with `key`'s
    models loaded and `model` and `kind` chosen."""
    page = browser.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(base_url + "/admin/login")
    page.fill("#name", ADMIN_NAME)
    page.fill("#password", ADMIN_PASSWORD)
    page.click("#sign-in")
    page.wait_for_selector("#dashboard")
    page.goto(base_url + "/admin/playground")
    page.fill("#pg-key", key)
    page.click("#pg-load")
    page.wait_for_selector("#pg-status:has-text('models ready')")
    page.select_option("#pg-model", model)
    page.select_option("#pg-kind", kind)
    return page
