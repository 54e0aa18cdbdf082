"""Signed-in admin sessions: created at login, looked up per request, expired when idle.

The cookie carries 256 random bits; only their SHA-256 is stored, so a copy of the database
does not let anyone sign in. Each session has its own CSRF token. A login always creates a
new session (rotation: a token planted before login is worthless after it). Never imports the
runtime or the APIs.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from appliance.store.admin_models import AdminSession, AdminUser
from appliance.store.db import Database

SESSION_TOKEN_BYTES = 32
CSRF_TOKEN_BYTES = 32
#: A session unused for this long is gone.
SESSION_IDLE_TIMEOUT_S = 30 * 60
#: A session is gone after this long whatever its use (the admin signs in again).
SESSION_ABSOLUTE_TIMEOUT_S = 12 * 3600
#: `last_seen_at` is written at most this often, so page loads are not all database writes.
SESSION_TOUCH_RESOLUTION_S = 30


@dataclass(frozen=True)
class ActiveSession:
    session_id: int
    user_id: int
    user_name: str
    csrf_token: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class SessionStore:
    """Admin sessions in the appliance database."""

    def __init__(
        self,
        database: Database,
        *,
        idle_timeout_s: float = SESSION_IDLE_TIMEOUT_S,
        absolute_timeout_s: float = SESSION_ABSOLUTE_TIMEOUT_S,
    ) -> None:
        self.database = database
        self.idle_timeout_s = idle_timeout_s
        self.absolute_timeout_s = absolute_timeout_s

    def create(self, user_id: int, address: str) -> tuple[str, ActiveSession]:
        """A fresh session for `user_id`; returns (cookie value, session)."""
        token = secrets.token_urlsafe(SESSION_TOKEN_BYTES)
        now = datetime.now(UTC)
        row = AdminSession(
            token_sha256=_digest(token),
            user_id=user_id,
            csrf_token=secrets.token_urlsafe(CSRF_TOKEN_BYTES),
            created_at=now,
            last_seen_at=now,
            address=address[:64],
        )
        with self.database.session() as session:
            session.add(row)
            session.flush()
            user = session.get(AdminUser, user_id)
            assert user is not None
            return token, ActiveSession(row.id, user_id, user.name, row.csrf_token)

    def lookup(self, token: str) -> ActiveSession | None:
        """The live session for a cookie value, or None (unknown, idle too long, too old)."""
        if not token:
            return None
        now = datetime.now(UTC)
        with self.database.session() as session:
            row = session.scalar(select(AdminSession).where(AdminSession.token_sha256 == _digest(token)))
            if row is None:
                return None
            idle_s = (now - row.last_seen_at).total_seconds()
            age_s = (now - row.created_at).total_seconds()
            if idle_s > self.idle_timeout_s or age_s > self.absolute_timeout_s:
                session.delete(row)
                return None
            if idle_s >= SESSION_TOUCH_RESOLUTION_S:
                row.last_seen_at = now
            user = session.get(AdminUser, row.user_id)
            if user is None:
                return None
            return ActiveSession(row.id, row.user_id, user.name, row.csrf_token)

    def end(self, token: str) -> None:
        with self.database.session() as session:
            session.execute(delete(AdminSession).where(AdminSession.token_sha256 == _digest(token)))

    def purge_expired(self) -> int:
        """Delete idle and too-old sessions; returns how many."""
        now = datetime.now(UTC)
        idle_cut = now - timedelta(seconds=self.idle_timeout_s)
        age_cut = now - timedelta(seconds=self.absolute_timeout_s)
        with self.database.session() as session:
            result = session.execute(
                delete(AdminSession).where((AdminSession.last_seen_at < idle_cut) | (AdminSession.created_at < age_cut))
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]
