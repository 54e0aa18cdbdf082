"""Admin UI tables: admin users, sessions, deployments, settings, export jobs, audit events,
request log. On SQLite and PostgreSQL, triggers make the audit log append-only.

Revision ID: 0002_admin
Revises: 0001_api_keys
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_admin"
down_revision = "0001_api_keys"
branch_labels = None
depends_on = None

AUDIT_TRIGGERS = {
    "audit_events_no_update": "UPDATE",
    "audit_events_no_delete": "DELETE",
}
POSTGRES_AUDIT_FUNCTION = "audit_events_append_only"


def upgrade() -> None:
    op.create_table(
        "admin_users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_login_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "admin_sessions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("admin_users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
    )
    op.create_index("ix_admin_sessions_token_sha256", "admin_sessions", ["token_sha256"], unique=True)
    op.create_table(
        "deployments",
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("deployed", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
    )
    op.create_table(
        "app_settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value_json", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
    )
    op.create_table(
        "export_jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(1024), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("quant", sa.String(16), nullable=False),
        sa.Column("task", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("log_file", sa.String(1024), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("detail", sa.String(512), nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_table(
        "request_log",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("endpoint", sa.String(128), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=True),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("completion_text", sa.Text(), nullable=True),
        sa.Column("text_expires_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_request_log_at", "request_log", ["at"])
    op.create_index("ix_request_log_text_expires_at", "request_log", ["text_expires_at"])
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for trigger, statement in AUDIT_TRIGGERS.items():
            op.execute(
                f"CREATE TRIGGER {trigger} BEFORE {statement} ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            f"CREATE FUNCTION {POSTGRES_AUDIT_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$"
        )
        for trigger, statement in AUDIT_TRIGGERS.items():
            op.execute(
                f"CREATE TRIGGER {trigger} BEFORE {statement} ON audit_events "
                f"FOR EACH STATEMENT EXECUTE FUNCTION {POSTGRES_AUDIT_FUNCTION}()"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for trigger in AUDIT_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    elif dialect == "postgresql":
        for trigger in AUDIT_TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON audit_events")
        op.execute(f"DROP FUNCTION IF EXISTS {POSTGRES_AUDIT_FUNCTION}()")
    op.drop_index("ix_request_log_text_expires_at", table_name="request_log")
    op.drop_index("ix_request_log_at", table_name="request_log")
    op.drop_table("request_log")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("export_jobs")
    op.drop_table("app_settings")
    op.drop_table("deployments")
    op.drop_index("ix_admin_sessions_token_sha256", table_name="admin_sessions")
    op.drop_table("admin_sessions")
    op.drop_table("admin_users")
