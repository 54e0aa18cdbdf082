"""The audit log: every admin action, every login attempt and every denied request.

Events are written in UTC with who, what, the outcome and the client address; `detail` is a
short human sentence that must never contain a secret (no password, token, key or prompt).
`record_in` writes inside the caller's transaction, so an action and its audit event commit
together or not at all. Append-only: this module offers no update or delete. Never imports
the runtime or the APIs.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.store.admin_models import AuditEvent
from appliance.store.db import Database

Outcome = Literal["ok", "failed", "denied"]
#: Longest `detail` kept; longer text is cut (the column is 512 characters).
DETAIL_MAX_CHARS = 500
#: Most events one page or CSV export returns.
AUDIT_QUERY_LIMIT = 10_000
CSV_COLUMNS = ("at", "actor", "action", "target", "outcome", "address", "detail")
#: Audit events written per address per minute for denied requests; the rest are counted.
DENIED_EVENTS_PER_MINUTE = 10


@dataclass(frozen=True)
class AuditFilter:
    """What the audit page may filter on; empty fields match everything."""

    actor: str = ""
    action: str = ""
    outcome: str = ""
    since: datetime | None = None
    until: datetime | None = None


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def new_event(action: str, *, actor: str, address: str, outcome: Outcome = "ok", target: str = "", detail: str = "") -> AuditEvent:
    return AuditEvent(
        at=datetime.now(UTC),
        actor=_clip(actor or "-", 64),
        action=_clip(action, 64),
        target=_clip(target, 256),
        outcome=outcome,
        address=_clip(address or "-", 64),
        detail=_clip(detail, DETAIL_MAX_CHARS),
    )


class AuditLog:
    """Writes and reads audit events."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def record(
        self, action: str, *, actor: str, address: str, outcome: Outcome = "ok", target: str = "", detail: str = ""
    ) -> None:
        """Write one event in its own transaction."""
        with self.database.session() as session:
            session.add(new_event(action, actor=actor, address=address, outcome=outcome, target=target, detail=detail))

    @staticmethod
    def record_in(
        session: Session, action: str, *, actor: str, address: str, outcome: Outcome = "ok", target: str = "", detail: str = ""
    ) -> None:
        """Write one event inside the caller's transaction (it commits with the action)."""
        session.add(new_event(action, actor=actor, address=address, outcome=outcome, target=target, detail=detail))

    def query(self, where: AuditFilter = AuditFilter(), limit: int = AUDIT_QUERY_LIMIT) -> list[AuditEvent]:
        """Newest first."""
        statement = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(min(limit, AUDIT_QUERY_LIMIT))
        if where.actor:
            statement = statement.where(AuditEvent.actor == where.actor)
        if where.action:
            statement = statement.where(AuditEvent.action.startswith(where.action))
        if where.outcome:
            statement = statement.where(AuditEvent.outcome == where.outcome)
        if where.since is not None:
            statement = statement.where(AuditEvent.at >= where.since)
        if where.until is not None:
            statement = statement.where(AuditEvent.at <= where.until)
        with self.database.session() as session:
            return list(session.scalars(statement))

    def actions(self) -> list[str]:
        """The distinct action names seen so far (for the filter's choices)."""
        with self.database.session() as session:
            return sorted(session.scalars(select(AuditEvent.action).distinct()))


class DeniedAuditLimiter:
    """At most DENIED_EVENTS_PER_MINUTE audit events per address per minute for denials."""

    def __init__(self, per_minute: int = DENIED_EVENTS_PER_MINUTE, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}
        self._lock = threading.Lock()

    def admit(self, address: str) -> tuple[bool, int]:
        """(write this event?, how many were suppressed before it)."""
        now = self.clock()
        with self._lock:
            started, written, suppressed = self._windows.get(address, (now, 0, 0))
            if now - started >= 60.0:
                started, written = now, 0
            if written < self.per_minute:
                self._windows[address] = (started, written + 1, 0)
                return True, suppressed
            self._windows[address] = (started, written, suppressed + 1)
            return False, 0


def audit_denied(audit: AuditLog, limiter: DeniedAuditLimiter, action: str, *, address: str, target: str, actor: str = "-", detail: str = "") -> None:
    """Write a denial event unless this address is flooding; say how many were skipped."""
    write, suppressed = limiter.admit(address)
    if not write:
        return
    if suppressed:
        detail = f"{detail} ({suppressed} similar events not written)".strip()
    audit.record(action, actor=actor, address=address, outcome="denied", target=target, detail=detail)


def to_csv(events: Iterable[AuditEvent]) -> str:
    """CSV with a header row; times in ISO 8601 UTC. Cells that a spreadsheet would run as a
    formula are prefixed with a quote, since actor names and targets come from users."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for event in events:
        row = [event.at.isoformat(), event.actor, event.action, event.target, event.outcome, event.address, event.detail]
        writer.writerow([_defuse(cell) for cell in row])
    return buffer.getvalue()


def _defuse(cell: str) -> str:
    return "'" + cell if cell[:1] in ("=", "+", "-", "@") and cell != "-" else cell
