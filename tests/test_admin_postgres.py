"""The admin tables on PostgreSQL (Debian's server, started for this module in a throwaway
cluster on a Unix socket): migrations up and down, and the stores the admin UI uses, including
the append-only audit log and the request-log purge. Skipped where PostgreSQL is not installed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError

from appliance.config import load_settings
from appliance.store.admin_models import RequestLogEntry
from appliance.store.admin_sessions import SessionStore
from appliance.store.admin_users import AdminUserStore
from appliance.store.audit import AuditLog
from appliance.store.db import Database
from appliance.store.deployments import DeploymentStore
from appliance.store.export_jobs import ExportJobStore
from appliance.store.keys import KeyStore
from appliance.store.migrate import alembic_config, current_revision, head_revision, upgrade
from appliance.store.privacy import PrivacyPolicy
from appliance.store.request_log import RequestLog, RequestRecord
from tests.helpers.postgres import postgres_url  # noqa: F401 - fixture

pytest.importorskip("psycopg")
ADMIN_TABLES = {"admin_users", "admin_sessions", "deployments", "app_settings", "export_jobs", "audit_events", "request_log"}


@pytest.fixture
def database(postgres_url: str) -> Iterator[Database]:
    db = Database(postgres_url)
    command.downgrade(alembic_config(db), "base")
    upgrade(db)
    yield db
    db.close()


def test_migrations_go_up_and_down_on_postgresql(postgres_url: str) -> None:
    db = Database(postgres_url)
    command.downgrade(alembic_config(db), "base")
    assert current_revision(db) is None
    assert upgrade(db) == head_revision()
    assert ADMIN_TABLES <= set(inspect(db.engine).get_table_names())
    command.downgrade(alembic_config(db), "0001_api_keys")
    assert not ADMIN_TABLES & set(inspect(db.engine).get_table_names())
    assert upgrade(db) == head_revision()
    db.close()


def test_admin_stores_work_on_postgresql(database: Database, tmp_path: Path) -> None:
    user = AdminUserStore(database).create("alice", "correct horse battery staple")
    assert AdminUserStore(database).authenticate("alice", "correct horse battery staple") == user
    token, session = SessionStore(database).create(user.id, "10.0.0.1")
    assert SessionStore(database).lookup(token) == session
    key, _ = KeyStore(database).create("laptop", ["infer"])
    assert KeyStore(database).verify(key).name == "laptop"
    DeploymentStore(database).set("adder", False, actor="alice", address="10.0.0.1")
    assert DeploymentStore(database).held_back() == {"adder"}
    jobs = ExportJobStore(database)
    job = jobs.create(source="package:x", name="x", quant="int8", kv_cache="fp32", task=None, log_file="", actor="alice", address="10.0.0.1")
    assert jobs.finished(job.id, "failed", 1).status == "failed"
    settings = load_settings(state_dir=tmp_path, database_url=database.url)
    PrivacyPolicy(settings, database).set_logging("full", 2, actor="alice", address="10.0.0.1")
    assert PrivacyPolicy(settings, database).mode == "full"
    log = RequestLog(database)
    log.submit(RequestRecord(datetime.now(UTC), "/v1/completions", "m", None, 200, 0.1, 3, 4, "a prompt", "an answer"), retention_days=2)
    assert log.flush()
    assert log.purge_expired(now=datetime.now(UTC) + timedelta(days=3)) == 1
    with database.session() as db_session:
        row = db_session.scalar(select(RequestLogEntry))
        assert row is not None and row.prompt_text is None and row.prompt_tokens == 3
    assert log.purge_all() == 1
    actions = {event.action for event in AuditLog(database).query()}
    assert {"admin.user.create", "model.undeploy", "export.start", "export.finish", "privacy.logging"} <= actions


def test_the_audit_log_is_append_only_on_postgresql(database: Database) -> None:
    AuditLog(database).record("login.success", actor="alice", address="10.0.0.1")
    for statement in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events"):
        with pytest.raises(DBAPIError, match="append-only"), database.session() as session:
            session.execute(text(statement))
    assert [event.actor for event in AuditLog(database).query()] == ["alice"]
