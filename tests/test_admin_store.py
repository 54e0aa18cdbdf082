"""The admin UI's storage and security rules on a real SQLite file: migrations up and down, an
append-only audit log, argon2id passwords, sessions that expire when idle, login lockout, the
one-time setup token, settings saved from the UI, and the audit CSV."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text, update
from sqlalchemy.exc import IntegrityError

from appliance.admin.security import LoginThrottle
from appliance.admin.setup_token import SetupToken
from appliance.config import load_settings
from appliance.errors import InvalidInput
from appliance.store.admin_models import AdminSession, AuditEvent
from appliance.store.admin_sessions import SessionStore
from appliance.store.admin_users import AdminUserStore
from appliance.store.audit import AuditFilter, AuditLog, DeniedAuditLimiter, to_csv
from appliance.store.db import Database
from appliance.store.deployments import DeploymentStore
from appliance.store.export_jobs import ExportJobStore
from appliance.store.migrate import alembic_config, current_revision, head_revision, upgrade
from appliance.store.privacy import PrivacyPolicy

ADMIN_TABLES = {"admin_users", "admin_sessions", "deployments", "app_settings", "export_jobs", "audit_events", "request_log"}


@pytest.fixture
def database(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'appliance.db'}")
    upgrade(db)
    yield db
    db.close()


def test_migrations_go_up_and_down_and_up_again(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'migrate.db'}")
    assert upgrade(db) == head_revision()
    assert ADMIN_TABLES <= set(inspect(db.engine).get_table_names())
    command.downgrade(alembic_config(db), "0001_api_keys")
    tables = set(inspect(db.engine).get_table_names())
    assert not ADMIN_TABLES & tables and "api_keys" in tables
    command.downgrade(alembic_config(db), "base")
    assert current_revision(db) is None
    assert upgrade(db) == head_revision()
    assert ADMIN_TABLES <= set(inspect(db.engine).get_table_names())
    db.close()


def test_migration_0009_keeps_earlier_export_jobs_as_fp32_kv_cache_and_goes_back(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'migrate.db'}")
    upgrade(db, "0008_group_limits")
    with db.session() as session:
        session.execute(
            text(
                "INSERT INTO export_jobs (id, source, name, quant, task, status, log_file, created_by, created_at) "
                "VALUES (1, 'package:x', 'x', 'int4', NULL, 'succeeded', '', 'alice', '2026-12-01 00:00:00')"
            )
        )
    assert upgrade(db) == head_revision()
    jobs = ExportJobStore(db)
    assert jobs.get(1).kv_cache == "fp32", "every job before the column ran with the export's default"
    assert jobs.create(source="package:y", name="y", quant="int4", task=None, kv_cache="int8", log_file="", actor="a", address="local").kv_cache == "int8"
    command.downgrade(alembic_config(db), "0008_group_limits")
    assert "kv_cache" not in {column["name"] for column in inspect(db.engine).get_columns("export_jobs")}
    assert upgrade(db) == head_revision()
    assert [job.kv_cache for job in jobs.recent()] == ["fp32", "fp32"]
    db.close()


def test_the_audit_log_refuses_updates_and_deletes(database: Database) -> None:
    AuditLog(database).record("login.success", actor="alice", address="127.0.0.1")
    for statement in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
        with pytest.raises(IntegrityError, match="append-only"), database.session() as session:
            session.execute(text(statement))
    assert [e.actor for e in AuditLog(database).query()] == ["alice"]


def test_passwords_are_stored_as_argon2id_and_checked(database: Database) -> None:
    users = AdminUserStore(database)
    users.create("alice", "correct horse battery staple")
    with database.session() as session:
        stored = session.execute(text("SELECT password_hash FROM admin_users")).scalar_one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert users.authenticate("alice", "correct horse battery staple") is not None
    assert users.authenticate("alice", "wrong") is None
    assert users.authenticate("nobody", "correct horse battery staple") is None
    with pytest.raises(InvalidInput, match="password: must be at least 12"):
        users.create("bob", "short")
    with pytest.raises(InvalidInput, match="already exists"):
        users.create("alice", "another long password")
    with pytest.raises(InvalidInput, match="an admin already exists"):
        users.create_first("carol", "another long password", address="127.0.0.1")


def test_sessions_expire_when_idle_and_end_at_logout(database: Database) -> None:
    user = AdminUserStore(database).create("alice", "correct horse battery staple")
    sessions = SessionStore(database, idle_timeout_s=60)
    token, made = sessions.create(user.id, "127.0.0.1")
    assert sessions.lookup(token) == made
    second, _ = sessions.create(user.id, "127.0.0.1")
    assert second != token  # every login gets a fresh token
    with database.session() as session:
        session.execute(update(AdminSession).values(last_seen_at=datetime.now(UTC) - timedelta(seconds=61)))
    assert sessions.lookup(token) is None
    assert sessions.lookup(second) is None
    third, _ = sessions.create(user.id, "127.0.0.1")
    sessions.end(third)
    assert sessions.lookup(third) is None
    assert sessions.lookup("") is None


def test_login_throttle_locks_a_name_and_an_address(database: Database) -> None:
    now = [0.0]
    throttle = LoginThrottle(user_failures_max=3, address_failures_max=5, window_s=60, lockout_s=300, clock=lambda: now[0])
    assert [throttle.failed("alice", "10.0.0.1") for _ in range(3)] == [False, False, True]
    assert throttle.locked_for_s("alice", "10.0.0.2") == pytest.approx(300)
    assert throttle.locked_for_s("bob", "10.0.0.1") == 0
    for name in ("bob", "carol"):
        throttle.failed(name, "10.0.0.1")
    assert throttle.locked_for_s("dave", "10.0.0.1") > 0  # the address is locked for every name
    now[0] = 301.0
    assert throttle.locked_for_s("alice", "10.0.0.1") == 0


def test_denied_request_events_are_rate_limited_per_address() -> None:
    limiter = DeniedAuditLimiter(per_minute=2, clock=lambda: 0.0)
    assert [limiter.admit("10.0.0.9")[0] for _ in range(4)] == [True, True, False, False]
    assert limiter.admit("10.0.0.8") == (True, 0)


def test_the_setup_token_works_once_and_only_in_time() -> None:
    now = [0.0]
    token_store = SetupToken(ttl_s=60, clock=lambda: now[0])
    token = token_store.issue()
    assert not token_store.consume("wrong")
    assert token_store.consume(token)
    assert not token_store.consume(token)
    late = token_store.issue()
    now[0] = 61.0
    assert not token_store.active and not token_store.consume(late)


def test_privacy_settings_saved_from_the_ui_override_the_configuration(tmp_path: Path, database: Database) -> None:
    settings = load_settings(state_dir=tmp_path)
    policy = PrivacyPolicy(settings, database)
    assert (policy.mode, policy.retention_days) == ("metadata", 7)
    networks = policy.admin_networks
    policy.set_logging("full", 30, actor="alice", address="127.0.0.1")
    policy.set_networks(["192.168.0.0/16"], ["127.0.0.0/8", "192.168.1.0/24"], actor="alice", address="127.0.0.1")
    policy.set_cost({"hardware_price": 999.0, "power_watts": 30.0}, actor="alice", address="127.0.0.1")
    assert [str(n) for n in networks] == ["127.0.0.0/8", "192.168.1.0/24"]  # the same list, changed in place
    reopened = PrivacyPolicy(settings, database)
    assert (reopened.mode, reopened.retention_days) == ("full", 30)
    assert [str(n) for n in reopened.api_networks] == ["192.168.0.0/16"]
    assert (reopened.cost.hardware_price, reopened.cost.power_watts) == (999.0, 30.0)
    with pytest.raises(InvalidInput, match="retention_days"):
        policy.set_logging("full", 0, actor="alice", address="127.0.0.1")
    with pytest.raises(InvalidInput, match="api_networks: 'nope'"):
        policy.set_networks(["nope"], ["127.0.0.0/8"], actor="alice", address="127.0.0.1")
    with pytest.raises(InvalidInput, match="cost.power_watts|power_watts"):
        policy.set_cost({"power_watts": -1}, actor="alice", address="127.0.0.1")
    actions = [e.action for e in AuditLog(database).query()]
    assert actions == ["settings.cost", "privacy.networks", "privacy.logging"]


def test_deployment_decisions_are_kept_and_audited(database: Database) -> None:
    deployments = DeploymentStore(database)
    deployments.set("adder", False, actor="alice", address="127.0.0.1")
    assert deployments.held_back() == {"adder"}
    deployments.set("adder", True, actor="alice", address="127.0.0.1")
    assert deployments.held_back() == set()
    assert [e.action for e in AuditLog(database).query(AuditFilter(action="model."))] == ["model.deploy", "model.undeploy"]


def test_audit_csv_defuses_spreadsheet_formulas(database: Database) -> None:
    AuditLog(database).record("login.failure", actor="=HYPERLINK(\"x\")", address="127.0.0.1", outcome="failed")
    body = to_csv(AuditLog(database).query())
    header, row = body.splitlines()
    assert header == "at,actor,action,target,outcome,address,detail"
    assert "'=HYPERLINK" in row


def test_audit_filter_by_time_window(database: Database) -> None:
    log = AuditLog(database)
    log.record("login.success", actor="alice", address="127.0.0.1")
    time.sleep(0.01)
    cut = datetime.now(UTC)
    log.record("logout", actor="alice", address="127.0.0.1")
    assert [e.action for e in log.query(AuditFilter(since=cut))] == ["logout"]
    assert [e.action for e in log.query(AuditFilter(until=cut))] == ["login.success"]
    assert [e.action for e in log.query(AuditFilter(outcome="denied"))] == []
    assert isinstance(log.query()[0], AuditEvent)
