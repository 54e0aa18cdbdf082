"""The authentication matrix, built from the app's own route table so a new route is covered
the day it is added.

Every /v1 and /v2 route (health excepted) refuses a missing, malformed, wrong, revoked and
expired API key with 401, and a key without the scope with 403. Every admin route refuses no
session, a forged cookie, an expired session, a signed-out session, and an API key (even one
with the admin scope): API keys never open the admin UI. Failed admin logins lock the name
out (brute force). No key, password or session cookie ever reaches the log.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from sqlalchemy import update

from appliance.repository.store import ModelRepository
from appliance.store.admin_models import AdminSession
from appliance.store.keys import KeyStore
from tests.helpers.admin import ADMIN_NAME, ADMIN_PASSWORD, create_admin, sign_in
from tests.helpers.server import RunningServer, create_key, running_server
from tests.helpers.tiny_models import publish_adder, publish_embedder

#: Routes anyone may call: probes, the API description, and the pages that sign you in.
PUBLIC_PATHS = {
    "/v2/health/live", "/v2/health/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
    "/admin/setup", "/admin/login",
}
#: /metrics answers the admin networks without a key (checked on its own below).
OWN_POLICY_PATHS = {"/metrics"}
PATH_VALUES = {"name": "adder", "version": "1", "job_id": "1"}
EXPIRING_KEY_DAYS = 1e-6  # about 0.09 s
ADMIN_SCOPED = ("/v2/repository/",)
SESSION_COOKIE = "appliance_admin"
FORGED_SESSION = "x" * 43


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str

    def url(self) -> str:
        path = self.path
        for key, value in PATH_VALUES.items():
            path = path.replace("{" + key + "}", value)
        return path


def _walk(routes: list, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Flatten the app's route table (FastAPI keeps included routers nested)."""
    for route in routes:
        original = getattr(route, "original_router", None)
        if original is not None:
            context = getattr(route, "include_context", None)
            yield from _walk(original.routes, prefix + (getattr(context, "prefix", "") or ""))
        else:
            yield prefix, route


def endpoints(app: FastAPI) -> list[Endpoint]:
    found = []
    for prefix, route in _walk(list(app.routes)):
        if isinstance(route, APIRoute):
            found.extend(Endpoint(method, prefix + route.path) for method in sorted(route.methods))
    return found


def api_endpoints(app: FastAPI) -> list[Endpoint]:
    return [
        e for e in endpoints(app)
        if e.path.startswith(("/v1", "/v2")) and e.path not in PUBLIC_PATHS
    ]


def admin_endpoints(app: FastAPI) -> list[Endpoint]:
    return [e for e in endpoints(app) if e.path.startswith("/admin") and e.path not in PUBLIC_PATHS]


@dataclass
class AuthWorld:
    server: RunningServer
    keys: dict[str, str]
    session_cookie: str
    expired_cookie: str
    signed_out_cookie: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthWorld]:
    state = tmp_path_factory.mktemp("auth") / "state"
    state.mkdir()
    repository = ModelRepository(state / "models")
    publish_adder(repository)
    publish_embedder(repository)
    create_admin(state)
    keys = {
        "admin": create_key(state, "admin-key", ["admin"]),
        "infer": create_key(state, "infer-key", ["infer"]),
        "metrics": create_key(state, "metrics-key", ["metrics"]),
        "revoked": create_key(state, "revoked-key", ["admin"]),
    }
    with running_server(state, create_keys={}, admin_networks=["127.0.0.0/8"]) as server:
        store = KeyStore(server.ctx.database)
        store.revoke("revoked-key")
        keys["expired"], _ = store.create("expired-key", ["admin"], expires_days=EXPIRING_KEY_DAYS)
        time.sleep(EXPIRING_KEY_DAYS * 86400 * 2)
        cookies = []
        for _ in range(3):
            with httpx.Client() as browser:
                sign_in(browser, server.base_url)
                cookies.append(browser.cookies.get(SESSION_COOKIE, path="/admin"))
        live, expired, signed_out = cookies
        with server.ctx.database.session() as session:
            long_ago = datetime.now(UTC) - timedelta(days=2)
            session.execute(
                update(AdminSession).where(AdminSession.token_sha256 == _sha256(expired)).values(created_at=long_ago, last_seen_at=long_ago)
            )
        _sign_out(server, signed_out)
        server.key = None
        yield AuthWorld(server, keys, live, expired, signed_out)


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _sign_out(server: RunningServer, cookie: str) -> None:
    with httpx.Client(cookies={SESSION_COOKIE: cookie}) as browser:
        page = browser.get(server.url("/admin/keys"))
        csrf = page.text.split('data-csrf="', 1)[1].split('"', 1)[0]
        answer = browser.post(server.url("/admin/logout"), data={"csrf_token": csrf})
        assert answer.status_code in (200, 303), answer.text


def _call(server: RunningServer, endpoint: Endpoint, *, headers: dict[str, str] | None = None, cookies: dict[str, str] | None = None) -> httpx.Response:
    body = {} if endpoint.method == "POST" else None
    with httpx.Client(cookies=cookies or {}, follow_redirects=False, timeout=30) as client:
        return client.request(endpoint.method, server.url(endpoint.url()), headers=headers or {}, json=body)


def test_the_route_table_is_enumerated_and_has_what_the_interfaces_promise(world: AuthWorld) -> None:
    paths = {e.path for e in endpoints(world.server.app)}
    assert {"/v1/chat/completions", "/v1/embeddings", "/v2/models/{name}/infer", "/v2/repository/index", "/admin/keys"} <= paths
    assert len(api_endpoints(world.server.app)) >= 14 and len(admin_endpoints(world.server.app)) >= 20


@pytest.mark.parametrize(
    "credential", ["missing", "malformed", "wrong", "revoked", "expired"],
)
def test_every_api_route_refuses_a_bad_key_with_401(world: AuthWorld, credential: str) -> None:
    headers = {
        "missing": {},
        "malformed": {"Authorization": "Basic YWRtaW46YWRtaW4="},
        "wrong": {"Authorization": "Bearer " + world.keys["admin"][:-6] + "AAAAAA"},
        "revoked": {"Authorization": f"Bearer {world.keys['revoked']}"},
        "expired": {"Authorization": f"Bearer {world.keys['expired']}"},
    }[credential]
    answered = {f"{e.method} {e.path}": _call(world.server, e, headers=headers) for e in api_endpoints(world.server.app)}
    wrong = {route: (r.status_code, r.text[:120]) for route, r in answered.items() if r.status_code != 401}
    print(f"{len(answered)} API routes with a {credential} key: {len(answered) - len(wrong)} answered 401")
    assert wrong == {}
    assert all("error" in r.json() for r in answered.values())


def test_a_key_without_the_scope_gets_403_and_infer_keys_cannot_manage_the_repository(world: AuthWorld) -> None:
    metrics_only = {"Authorization": f"Bearer {world.keys['metrics']}"}
    infer_only = {"Authorization": f"Bearer {world.keys['infer']}"}
    refused = {}
    for endpoint in api_endpoints(world.server.app):
        status = _call(world.server, endpoint, headers=metrics_only).status_code
        if status != 403:
            refused[f"metrics-key {endpoint.method} {endpoint.path}"] = status
        if endpoint.path.startswith(ADMIN_SCOPED):
            status = _call(world.server, endpoint, headers=infer_only).status_code
            if status != 403:
                refused[f"infer-key {endpoint.method} {endpoint.path}"] = status
    assert refused == {}


@pytest.mark.parametrize("credential", ["none", "forged", "expired", "signed-out", "admin-api-key"])
def test_every_admin_route_refuses_without_a_live_session(world: AuthWorld, credential: str) -> None:
    cookies = {
        "none": {},
        "forged": {SESSION_COOKIE: FORGED_SESSION},
        "expired": {SESSION_COOKIE: world.expired_cookie},
        "signed-out": {SESSION_COOKIE: world.signed_out_cookie},
        "admin-api-key": {},
    }[credential]
    headers = {"Authorization": f"Bearer {world.keys['admin']}"} if credential == "admin-api-key" else {}
    let_in = {}
    for endpoint in admin_endpoints(world.server.app):
        answer = _call(world.server, endpoint, headers=headers, cookies=cookies)
        to_login = answer.status_code == 303 and answer.headers["location"].startswith("/admin/login")
        if not (to_login or answer.status_code in (401, 403)):
            let_in[f"{endpoint.method} {endpoint.path}"] = answer.status_code
        if endpoint.method == "POST":
            assert answer.status_code in (401, 403), (endpoint, answer.status_code)
    print(f"{len(admin_endpoints(world.server.app))} admin routes with {credential}: {len(let_in)} let in")
    assert let_in == {}


def test_a_live_session_opens_the_admin_pages(world: AuthWorld) -> None:
    """The control for the matrix above: the same requests with a live session get in."""
    with httpx.Client(cookies={SESSION_COOKIE: world.session_cookie}, follow_redirects=False) as browser:
        for path in ("/admin", "/admin/keys", "/admin/models", "/admin/audit", "/admin/api/metrics"):
            assert browser.get(world.server.url(path)).status_code == 200, path


def test_metrics_need_a_metrics_key_from_outside_the_admin_networks(tmp_path: Path) -> None:
    metrics_key = create_key(tmp_path / "state", "m", ["metrics"])
    infer_key = create_key(tmp_path / "state", "i", ["infer"])
    with running_server(tmp_path / "state", create_keys={}, admin_networks=["10.9.8.0/24"]) as server:
        assert httpx.get(server.url("/metrics")).status_code == 401
        assert httpx.get(server.url("/metrics"), headers={"Authorization": f"Bearer {infer_key}"}).status_code == 403
        assert httpx.get(server.url("/metrics"), headers={"Authorization": f"Bearer {metrics_key}"}).status_code == 200


def test_repeated_wrong_passwords_lock_the_admin_out_even_with_the_right_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    create_admin(state)
    with running_server(state, create_keys={}) as server:
        with httpx.Client(follow_redirects=False) as browser:
            for attempt in range(8):
                page = browser.get(server.url("/admin/login"))
                token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
                browser.post(server.url("/admin/login"), data={"csrf_token": token, "name": ADMIN_NAME, "password": f"guess-{attempt}"})
            page = browser.get(server.url("/admin/login"))
            token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
            answer = browser.post(server.url("/admin/login"), data={"csrf_token": token, "name": ADMIN_NAME, "password": ADMIN_PASSWORD})
        assert answer.status_code != 303 and "locked" in answer.text.lower()


def test_no_key_password_or_session_cookie_reaches_the_log(world: AuthWorld, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_sent = [*world.keys.values(), world.session_cookie, ADMIN_PASSWORD]
    for endpoint in api_endpoints(world.server.app)[:6]:
        for key in world.keys.values():
            _call(world.server, endpoint, headers={"Authorization": f"Bearer {key}"})
    with httpx.Client(follow_redirects=False) as browser:
        sign_in(browser, world.server.base_url)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert logged, "nothing was logged at all: the check would prove nothing"
    assert [secret[:12] + "…" for secret in secrets_sent if secret in logged] == []
