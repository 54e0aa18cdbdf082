"""SQLAlchemy table classes of the appliance database.

Every table is declared on `Base` here (or in a module imported here) and created only by an
Alembic migration in `migrations/versions/`, never by `create_all`. Adding a table means adding
a class and a migration whose `down_revision` is the current head. Never imports the runtime
or the APIs.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Integer, String, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps stored naive in UTC and always handed back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC times")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base shared by every table of the appliance."""


class ApiKey(Base):
    """An API key: only its SHA-256 is kept; `prefix` (not secret) finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    #: Space-separated scope names (infer, admin, metrics).
    scopes: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    #: The team the key belongs to, for usage and cost per group (None: no group). The column
    #: is `key_group` because GROUP is an SQL keyword.
    group: Mapped[str | None] = mapped_column("key_group", String(64), nullable=True)
    #: Rate limits (None: no limit): requests and tokens per minute, tokens per day and per month.
    rpm: Mapped[int | None] = mapped_column("rate_rpm", BigInteger, nullable=True)
    tpm: Mapped[int | None] = mapped_column("rate_tpm", BigInteger, nullable=True)
    tokens_per_day: Mapped[int | None] = mapped_column("rate_tokens_per_day", BigInteger, nullable=True)
    tokens_per_month: Mapped[int | None] = mapped_column("rate_tokens_per_month", BigInteger, nullable=True)
    #: "interactive" (default) or "batch": the engines admit interactive work first.
    priority: Mapped[str] = mapped_column(String(16), default="interactive", server_default="interactive")


class KeyGroup(Base):
    """A group's own rate limits, shared by every key in it (None: no limit of that kind).

    Membership stays on the keys (`api_keys.key_group`); a group has a row here only while it
    has at least one limit, so a group with none needs no row."""

    __tablename__ = "key_groups"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    rpm: Mapped[int | None] = mapped_column("rate_rpm", BigInteger, nullable=True)
    tpm: Mapped[int | None] = mapped_column("rate_tpm", BigInteger, nullable=True)
    tokens_per_day: Mapped[int | None] = mapped_column("rate_tokens_per_day", BigInteger, nullable=True)
    tokens_per_month: Mapped[int | None] = mapped_column("rate_tokens_per_month", BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
