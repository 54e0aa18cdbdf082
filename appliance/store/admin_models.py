"""Tables of the admin web UI: admin users, their sessions, deployments, settings set from the
UI, export jobs, the audit log and the request log.

Declared on the shared `Base` (so one metadata describes the whole database) and created only
by the migrations (`0002_admin`; `0009_export_kv_cache` adds the export jobs' KV cache). Never
stores a password, a session token or an API key in clear: only their argon2id hash or SHA-256.
Never imports the runtime or the APIs.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from appliance.store.models import Base, UtcDateTime

#: The KV cache of jobs recorded before migration 0009: the export's only cache then, fp32.
KV_CACHE_OF_OLDER_JOBS = "fp32"


class AdminUser(Base):
    """A person who may sign in to /admin; `password_hash` is an argon2id PHC string."""

    __tablename__ = "admin_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_login_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class AdminSession(Base):
    """A signed-in browser: only the SHA-256 of the cookie value is kept."""

    __tablename__ = "admin_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("admin_users.id", ondelete="CASCADE"))
    #: Sent back in forms and the X-CSRF-Token header; bound to this session only.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime())
    address: Mapped[str] = mapped_column(String(64))


class Deployment(Base):
    """An admin's decisions about a model: deployed or held back; pinned (never evicted) or
    unpinned (None: no decision, the config file's applies); its keep-alive (None: default)."""

    __tablename__ = "deployments"

    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    deployed: Mapped[bool] = mapped_column()
    pinned: Mapped[bool | None] = mapped_column(nullable=True)
    keep_alive_s: Mapped[float | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_by: Mapped[str] = mapped_column(String(64))


class AppSetting(Base):
    """A setting changed from the UI (JSON value); it overrides the configuration file."""

    __tablename__ = "app_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value_json: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_by: Mapped[str] = mapped_column(String(64))


class ExportJob(Base):
    """An `appliance export` process started from the UI, and how it ended."""

    __tablename__ = "export_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(1024))
    name: Mapped[str] = mapped_column(String(64))
    quant: Mapped[str] = mapped_column(String(16))
    #: `--kv-cache` of the job: fp32 (the export's default) or int8.
    kv_cache: Mapped[str] = mapped_column(String(8), server_default=KV_CACHE_OF_OLDER_JOBS)
    task: Mapped[str | None] = mapped_column(String(32), nullable=True)
    #: queued, running, succeeded, failed, cancelled
    status: Mapped[str] = mapped_column(String(16))
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    log_file: Mapped[str] = mapped_column(String(1024))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class AuditEvent(Base):
    """One admin action, login attempt or denied request. Append-only: the UI offers no edit
    or delete, and on SQLite a trigger refuses UPDATE and DELETE."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(String(512))


class RequestLogEntry(Base):
    """One API request. Text columns are filled only in `full` logging mode and are cleared
    when `text_expires_at` passes; in `metadata` mode they stay NULL."""

    __tablename__ = "request_log"
    __table_args__ = (Index("ix_request_log_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    endpoint: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(64))
    #: The API key's public prefix (its id), never the key.
    key_id: Mapped[str | None] = mapped_column(String(16), nullable=True)
    status: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column()
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    completion_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    text_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True, index=True)
