"""The admin UI over real HTTP (uvicorn on a free port, real SQLite): setup, login, throttling,
sessions, CSRF, network allow-list, security headers, keys, deployments, audit log."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from appliance.repository.store import ModelRepository
from appliance.store.audit import AuditFilter
from tests.helpers.admin import (
    ADMIN_NAME,
    ADMIN_PASSWORD,
    create_admin,
    form_token,
    setup_token_from,
    sign_in,
)
from tests.helpers.server import running_server
from tests.helpers.tiny_models import publish_adder

#: Every state-changing admin route, with an existing model "adder" (version 1) and job 1.
STATE_CHANGING_ROUTES = [
    "/admin/logout",
    "/admin/cost",
    "/admin/keys",
    "/admin/keys/test/group",
    "/admin/keys/test/limits",
    "/admin/keys/test/revoke",
    "/admin/key-groups",
    "/admin/privacy/logging",
    "/admin/privacy/networks",
    "/admin/privacy/purge",
    "/admin/privacy/batch-files/delete",
    "/admin/batches/batch_x/cancel",
    "/admin/batches/batch_x/delete",
    "/admin/models/adder/deploy",
    "/admin/models/adder/undeploy",
    "/admin/models/adder/versions/1/default",
    "/admin/models/adder/versions/1/override",
    "/admin/models/adder/versions/1/delete",
    "/admin/exports",
    "/admin/exports/1/cancel",
]


def _events(server, action: str) -> list:
    return server.app.state.admin.audit.query(AuditFilter(action=action))


def test_admin_redirects_to_setup_before_the_first_admin_exists(state_dir: Path) -> None:
    with running_server(state_dir) as server, httpx.Client() as client:
        answer = client.get(server.url("/admin"))
        assert answer.status_code == 303
        assert answer.headers["location"] == "/admin/setup"
        assert client.get(server.url("/admin/login")).headers["location"] == "/admin/setup"


def test_setup_token_from_the_log_creates_the_first_admin_once(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="appliance.admin")
    with running_server(state_dir) as server, httpx.Client() as client:
        token = setup_token_from(caplog.text)
        page = client.get(server.url(f"/admin/setup?token={token}"))
        assert page.status_code == 200 and token in page.text
        wrong = client.post(
            server.url("/admin/setup"),
            data={"csrf_token": form_token(page.text), "token": "not-the-token", "name": "root", "password": ADMIN_PASSWORD, "password_again": ADMIN_PASSWORD},
        )
        assert wrong.status_code == 403
        assert "setup token" in wrong.text
        made = client.post(
            server.url("/admin/setup"),
            data={"csrf_token": form_token(page.text), "token": token, "name": "root", "password": ADMIN_PASSWORD, "password_again": ADMIN_PASSWORD},
        )
        assert made.status_code == 303 and made.headers["location"] == "/admin?done=welcome"
        assert client.get(server.url("/admin")).status_code == 200
        # The token is spent and setup is closed once an admin exists.
        assert not server.app.state.admin.setup_token.active
        with httpx.Client() as other:
            assert other.get(server.url("/admin/setup")).headers["location"] == "/admin/login"
        assert [e.outcome for e in _events(server, "setup.failure")] == ["denied"]


def test_login_sets_an_httponly_samesite_strict_cookie_and_rotates_the_session(state_dir: Path) -> None:
    create_admin(state_dir)
    with running_server(state_dir) as server, httpx.Client() as client:
        page = client.get(server.url("/admin/login"))
        client.cookies.set("appliance_admin", "planted-by-an-attacker", domain="127.0.0.1", path="/admin")
        answer = client.post(
            server.url("/admin/login"),
            data={"csrf_token": form_token(page.text), "name": ADMIN_NAME, "password": ADMIN_PASSWORD, "next": "/admin"},
        )
        assert answer.status_code == 303
        cookie = next(h for h in answer.headers.get_list("set-cookie") if h.startswith("appliance_admin="))
        lowered = cookie.lower()
        assert "httponly" in lowered and "samesite=strict" in lowered and "path=/admin" in lowered
        assert "secure" not in lowered  # plain HTTP on loopback in this test
        assert "planted-by-an-attacker" not in cookie
        assert client.get(server.url("/admin")).status_code == 200
        assert [e.actor for e in _events(server, "login.success")] == [ADMIN_NAME]


def test_failed_logins_are_audited_and_lock_the_user_out(state_dir: Path) -> None:
    create_admin(state_dir)
    with running_server(state_dir) as server, httpx.Client() as client:
        page = client.get(server.url("/admin/login"))
        token = form_token(page.text)
        statuses = []
        for _ in range(6):
            answer = client.post(server.url("/admin/login"), data={"csrf_token": token, "name": ADMIN_NAME, "password": "wrong password!"})
            statuses.append(answer.status_code)
        assert statuses == [401, 401, 401, 401, 401, 429]
        # Even the right password is refused during the lockout, without being checked.
        locked = client.post(server.url("/admin/login"), data={"csrf_token": token, "name": ADMIN_NAME, "password": ADMIN_PASSWORD})
        assert locked.status_code == 429 and "locked" in locked.text
        failures = _events(server, "login.failure")
        assert len(failures) == 5 and all(e.address == "127.0.0.1" and e.outcome == "failed" for e in failures)
        assert all("wrong password" not in e.detail for e in server.app.state.admin.audit.query())
        assert len(_events(server, "login.locked")) == 2


def test_login_form_without_its_token_answers_403(state_dir: Path) -> None:
    create_admin(state_dir)
    with running_server(state_dir) as server, httpx.Client() as client:
        answer = client.post(server.url("/admin/login"), data={"name": ADMIN_NAME, "password": ADMIN_PASSWORD})
        assert answer.status_code == 403
        assert "appliance_admin=" not in answer.headers.get("set-cookie", "")


@pytest.fixture
def admin_server(state_dir: Path):
    create_admin(state_dir)
    publish_adder(ModelRepository(state_dir / "models"))
    with running_server(state_dir) as server:
        yield server


def test_every_state_changing_route_without_a_session_answers_401(admin_server) -> None:
    with httpx.Client() as client:
        for path in STATE_CHANGING_ROUTES:
            answer = client.post(admin_server.url(path), data={"csrf_token": "x"})
            assert answer.status_code == 401, path
        assert client.get(admin_server.url("/admin/keys")).status_code == 303
    assert len(_events(admin_server, "denied.unauthenticated")) == 10  # the rest were rate-limited


def test_every_state_changing_route_without_the_csrf_token_answers_403(admin_server) -> None:
    with httpx.Client() as client:
        sign_in(client, admin_server.base_url)
        for path in STATE_CHANGING_ROUTES:
            assert client.post(admin_server.url(path), data={}).status_code == 403, path
            assert client.post(admin_server.url(path), data={"csrf_token": "forged"}).status_code == 403, path
        # Nothing happened: the model still serves and the key still exists.
        assert admin_server.state("adder") == "ready"
        assert [k.state() for k in admin_server.ctx.keys.list()] == ["active"]
    assert _events(admin_server, "denied.csrf")


def test_a_valid_csrf_token_from_another_origin_answers_403(admin_server) -> None:
    with httpx.Client() as client:
        csrf = sign_in(client, admin_server.base_url)
        answer = client.post(
            admin_server.url("/admin/privacy/purge"), data={"csrf_token": csrf}, headers={"Origin": "http://evil.example"}
        )
        assert answer.status_code == 403
        same = client.post(admin_server.url("/admin/privacy/purge"), data={"csrf_token": csrf}, headers={"Origin": admin_server.base_url})
        assert same.status_code == 303


def test_api_requests_refused_with_401_or_403_are_audited_without_the_key(admin_server) -> None:
    bogus = "apl_0123456789ab_" + "x" * 43
    answer = httpx.get(admin_server.url("/v1/models"), headers={"Authorization": f"Bearer {bogus}"})
    assert answer.status_code == 401
    assert httpx.get(admin_server.url("/v1/models")).status_code == 401
    events = _events(admin_server, "denied.api.401")
    assert len(events) == 2 and {e.actor for e in events} == {"key 0123456789ab", "-"}
    assert all(bogus not in f"{e.detail}{e.target}{e.actor}" for e in events)
    assert events[0].target == "GET /v1/models" and events[0].address == "127.0.0.1"


def test_admin_ui_from_a_disallowed_network_answers_403_with_a_reason(state_dir: Path) -> None:
    create_admin(state_dir)
    with running_server(state_dir, admin_networks=["10.0.0.0/8"]) as server, httpx.Client() as client:
        for path in ("/admin", "/admin/login", "/admin/static/admin.js"):
            answer = client.get(server.url(path))
            assert answer.status_code == 403
            assert "127.0.0.1 is not in the admin networks" in answer.text
        assert client.post(server.url("/admin/login"), data={"name": "x"}).status_code == 403
        events = _events(server, "denied.network")
        assert events and events[0].address == "127.0.0.1" and events[0].outcome == "denied"
        # The API keeps answering: only the admin UI is fenced.
        assert client.get(server.url("/v2/health/live")).status_code == 200


def test_admin_pages_send_strict_security_headers(admin_server) -> None:
    with httpx.Client() as client:
        sign_in(client, admin_server.base_url)
        for path in ("/admin", "/admin/login", "/admin/static/admin.css"):
            headers = client.get(admin_server.url(path)).headers
            csp = headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
            assert headers["x-frame-options"] == "DENY"
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["referrer-policy"] == "no-referrer"
        page = client.get(admin_server.url("/admin")).text
        assert "<script>" not in page and "http://" not in page.replace(admin_server.base_url, "") and "https://" not in page


def test_key_created_in_the_ui_works_with_the_api_until_revoked(admin_server) -> None:
    with httpx.Client() as client:
        csrf = sign_in(client, admin_server.base_url)
        made = client.post(admin_server.url("/admin/keys"), data={"csrf_token": csrf, "name": "laptop", "scope_infer": "on", "expires_days": "30"})
        assert made.status_code == 201
        key = made.text.split('id="new-key">')[1].split("<")[0]
        assert key.startswith("apl_")
        assert client.get(admin_server.url("/admin/keys")).text.count(key) == 0  # shown once
        auth = {"Authorization": f"Bearer {key}"}
        assert client.get(admin_server.url("/v1/models"), headers=auth).status_code == 200
        bad = client.post(admin_server.url("/admin/keys"), data={"csrf_token": csrf, "name": "bad name!"})
        assert bad.status_code == 400 and "name:" in bad.text
        assert client.post(admin_server.url("/admin/keys/laptop/revoke"), data={"csrf_token": csrf}).status_code == 303
        admin_server.app.state.key_cache.clear()
        assert client.get(admin_server.url("/v1/models"), headers=auth).status_code == 401
    created = _events(admin_server, "key.create")
    assert created and key not in created[0].detail and key[:20] not in created[0].detail
    assert _events(admin_server, "key.revoke")


def test_key_created_in_the_ui_with_rate_limits_is_limited(admin_server) -> None:
    with httpx.Client() as client:
        csrf = sign_in(client, admin_server.base_url)
        form = {
            "csrf_token": csrf, "name": "limited", "scope_infer": "on", "rpm": "2", "tpm": "", "tokens_per_day": "900",
            "tokens_per_month": "30000", "priority": "batch",
        }
        made = client.post(admin_server.url("/admin/keys"), data=form)
        assert made.status_code == 201
        key = made.text.split('id="new-key">')[1].split("<")[0]
        page = client.get(admin_server.url("/admin/keys")).text
        row = page.split('data-key="limited"')[1].split("</tr>")[0]
        assert "2 req/min" in row and "900 tok/day" in row and "30000 tok/month" in row and 'data-role="priority">batch' in row
        auth = {"Authorization": f"Bearer {key}"}
        statuses = [client.get(admin_server.url("/v1/models"), headers=auth).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        bad = client.post(admin_server.url("/admin/keys"), data={**form, "name": "other", "rpm": "lots"})
        assert bad.status_code == 400 and "rpm:" in bad.text
        unknown = client.post(admin_server.url("/admin/keys"), data={**form, "name": "other", "priority": "urgent"})
        assert unknown.status_code == 400 and "priority:" in unknown.text


def _group_row(client: httpx.Client, server, group: str) -> str:
    return client.get(server.url("/admin/keys")).text.split(f'data-group="{group}"')[1].split("</tr>")[0]


def test_group_limits_set_in_the_ui_are_shared_by_the_groups_keys_and_audited(admin_server) -> None:
    with httpx.Client() as client:
        csrf = sign_in(client, admin_server.base_url)
        keys = []
        for name in ("team-1", "team-2"):
            made = client.post(admin_server.url("/admin/keys"), data={"csrf_token": csrf, "name": name, "scope_infer": "on", "group": "ui-team"})
            keys.append(made.text.split('id="new-key">')[1].split("<")[0])
        assert "2 (2 active)" in _group_row(client, admin_server, "ui-team")
        form = {"csrf_token": csrf, "group": "ui-team", "rpm": "3", "tpm": "", "tokens_per_day": "", "tokens_per_month": "5000"}
        saved = client.post(admin_server.url("/admin/key-groups"), data=form)
        assert saved.status_code == 303 and saved.headers["location"].startswith("/admin/keys?done=group-limits-set")
        row = _group_row(client, admin_server, "ui-team")
        assert "3 req/min" in row and "5000 tok/month" in row and 'name="rpm" value="3"' in row
        statuses = [client.get(admin_server.url("/v1/models"), headers={"Authorization": f"Bearer {keys[i % 2]}"}) for i in range(4)]
        assert [a.status_code for a in statuses] == [200, 200, 200, 429]
        assert "group 'ui-team'" in statuses[3].json()["error"]["message"]
        for bad, field in (({"rpm": "lots"}, "rpm:"), ({"tpm": "10000000000000"}, "tpm:"), ({"group": "no good"}, "group:")):
            refused = client.post(admin_server.url("/admin/key-groups"), data={**form, **bad})
            assert refused.status_code == 400 and field in refused.text
        later = client.post(admin_server.url("/admin/key-groups"), data={"csrf_token": csrf, "group": "next-team", "tpm": "900"})
        assert later.status_code == 303 and "900 tok/min" in _group_row(client, admin_server, "next-team"), "a group before its keys"
        cleared = client.post(admin_server.url("/admin/key-groups"), data={"csrf_token": csrf, "group": "ui-team"})
        assert cleared.status_code == 303 and 'data-role="limits-text">—' in _group_row(client, admin_server, "ui-team")
    events = _events(admin_server, "group.update")
    assert [(e.actor, e.target) for e in events] == [(ADMIN_NAME, "ui-team"), (ADMIN_NAME, "next-team"), (ADMIN_NAME, "ui-team")]
    assert "'rpm': 3" in events[2].detail and "'rpm': None" in events[0].detail


def test_undeploy_unloads_the_model_and_keeps_it_unloaded_after_a_restart(state_dir: Path) -> None:
    create_admin(state_dir)
    publish_adder(ModelRepository(state_dir / "models"))
    with running_server(state_dir) as server, httpx.Client() as client:
        csrf = sign_in(client, server.base_url)
        assert client.post(server.url("/admin/models/adder/undeploy"), data={"csrf_token": csrf}).status_code == 303
        assert server.state("adder") == "unavailable"
        assert client.get(server.url("/v2/models/adder/ready"), headers=server.auth()).status_code != 200
    with running_server(state_dir, create_keys={}) as server, httpx.Client() as client:
        assert server.state("adder") == "unavailable"
        csrf = sign_in(client, server.base_url)
        assert client.post(server.url("/admin/models/adder/deploy"), data={"csrf_token": csrf}).status_code == 303
        assert server.state("adder") == "ready"
        assert [e.action for e in server.app.state.admin.audit.query(AuditFilter(action="model."))] == ["model.deploy", "model.undeploy"]


def test_models_page_lists_versions_with_their_report(admin_server) -> None:
    with httpx.Client() as client:
        sign_in(client, admin_server.base_url)
        page = client.get(admin_server.url("/admin/models")).text
        assert 'id="model-adder"' in page and "accepted" in page and "<td>cpu</td>" in page


def test_audit_log_filters_and_exports_csv(admin_server) -> None:
    with httpx.Client() as client:
        sign_in(client, admin_server.base_url)
        filtered = client.get(admin_server.url("/admin/audit?action=login.success")).text
        assert "login.success" in filtered and "admin.user.create</td>" not in filtered
        today = datetime.now(UTC).date().isoformat()
        assert "login.success" in client.get(admin_server.url(f"/admin/audit?since={today}&until={today}")).text
        bad = client.get(admin_server.url("/admin/audit?since=yesterday"))
        assert bad.status_code == 400 and "since:" in bad.text
        csv_answer = client.get(admin_server.url("/admin/audit.csv?outcome=ok"))
        assert csv_answer.status_code == 200 and csv_answer.headers["content-type"].startswith("text/csv")
        lines = csv_answer.text.splitlines()
        assert lines[0] == "at,actor,action,target,outcome,address,detail"
        assert any(",login.success," in line for line in lines[1:])


def test_privacy_mode_change_is_saved_and_audited(admin_server) -> None:
    with httpx.Client() as client:
        csrf = sign_in(client, admin_server.base_url)
        bad = client.post(admin_server.url("/admin/privacy/logging"), data={"csrf_token": csrf, "mode": "everything"})
        assert bad.status_code == 400 and "mode:" in bad.text
        ok = client.post(admin_server.url("/admin/privacy/logging"), data={"csrf_token": csrf, "mode": "full", "retention_days": "3"})
        assert ok.status_code == 303
        policy = admin_server.app.state.admin.privacy
        assert (policy.mode, policy.retention_days) == ("full", 3)
        lockout = client.post(
            admin_server.url("/admin/privacy/networks"),
            data={"csrf_token": csrf, "api_networks": "0.0.0.0/0", "admin_networks": "192.168.1.0/24"},
        )
        assert lockout.status_code == 400 and "locked out" in lockout.text
    events = _events(admin_server, "privacy.logging")
    assert events and "metadata -> full" in events[0].detail and events[0].actor == ADMIN_NAME


def test_dashboard_metrics_json_needs_a_session(admin_server) -> None:
    with httpx.Client() as client:
        refused = client.get(admin_server.url("/admin/api/metrics"))
        assert refused.status_code == 401 and refused.json() == {"error": "sign in first: this action needs an admin session"}
        sign_in(client, admin_server.base_url)
        data = client.get(admin_server.url("/admin/api/metrics")).json()
        assert {"points", "summary", "models"} <= set(data)
        assert data["models"][0]["provider"] == "cpu"
        assert "per_1k_tokens" in data["summary"]["cost"]


def test_rejected_version_needs_an_explicit_override_then_can_be_default_and_deleted(state_dir: Path) -> None:
    create_admin(state_dir)
    repository = ModelRepository(state_dir / "models")
    publish_adder(repository)
    publish_adder(repository)
    repository.set_deployable("adder", 2, False)  # as the export stage leaves a rejected variant
    with running_server(state_dir) as server, httpx.Client() as client:
        csrf = sign_in(client, server.base_url)
        assert server.status("adder").loaded_version == 1
        refused = client.post(server.url("/admin/models/adder/versions/2/default"), data={"csrf_token": csrf})
        assert refused.status_code == 400 and "override it first" in refused.text
        unconfirmed = client.post(server.url("/admin/models/adder/versions/2/override"), data={"csrf_token": csrf})
        assert unconfirmed.status_code == 400 and "confirm:" in unconfirmed.text
        confirmed = client.post(server.url("/admin/models/adder/versions/2/override"), data={"csrf_token": csrf, "confirm": "yes"})
        assert confirmed.status_code == 303 and repository.get("adder", 2).manifest.deployable
        assert client.post(server.url("/admin/models/adder/versions/2/default"), data={"csrf_token": csrf}).status_code == 303
        assert server.status("adder").loaded_version == 2
        assert client.post(server.url("/admin/models/adder/versions/2/delete"), data={"csrf_token": csrf}).status_code == 303
        assert [v.version for v in repository.versions("adder")] == [1]
        assert server.status("adder").loaded_version == 1 and server.state("adder") == "ready"
        missing = client.post(server.url("/admin/models/adder/versions/7/delete"), data={"csrf_token": csrf})
        assert missing.status_code == 404 and "version 7" in missing.text
    actions = [e.action for e in server.app.state.admin.audit.query(AuditFilter(action="model."))]
    assert actions == ["model.delete", "model.default", "model.override"]
