"""Key groups: the groups keys are in, and each group's own rate limits, shared by all its keys.

A group exists while a key names it (`api_keys.key_group`) or while it has limits (a row in
`key_groups`, which may come before its first key). Setting limits writes the row and its audit
event in one transaction; removing a group's last limit deletes its row. Running servers apply
a change within their key cache's lifetime (seconds), since a key's info carries its group's
limits. Counting and refusing happen in rate_limits.py. Never imports the runtime or the APIs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import select

from appliance.errors import InvalidInput
from appliance.store.audit import AuditLog
from appliance.store.db import Database
from appliance.store.keys import check_group, limits_of
from appliance.store.models import ApiKey, KeyGroup
from appliance.store.rate_limits import RateLimits, checked_limit

#: Each limit field with the name errors give it (the CLI flag's, as for keys).
LIMIT_FLAGS = {"rpm": "rpm", "tpm": "tpm", "tokens_per_day": "tokens-per-day", "tokens_per_month": "tokens-per-month"}


@dataclass(frozen=True)
class GroupInfo:
    """A group as the CLI and the admin page show it."""

    name: str
    #: Keys in the group, in any state; `active_keys`: those neither revoked nor expired.
    keys: int
    active_keys: int
    limits: RateLimits
    #: When its limits were first set and last changed (None: it never had limits).
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "keys": self.keys,
            "active_keys": self.active_keys,
            "limits": self.limits.as_json(),
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def group_name(name: str | None) -> str:
    """A valid group name; InvalidInput naming the field otherwise (an empty one included)."""
    checked = check_group(name)
    if checked is None:
        raise InvalidInput("group: a group name is required", field="group")
    return checked


class GroupStore:
    """Key groups and their limits in the appliance database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def list(self) -> list[GroupInfo]:
        """Every group a key names or that has limits, by name."""
        now = datetime.now(UTC)
        keys: Counter[str] = Counter()
        active: Counter[str] = Counter()
        with self.database.session() as session:
            for group, revoked_at, expires_at in session.execute(
                select(ApiKey.group, ApiKey.revoked_at, ApiKey.expires_at).where(ApiKey.group.is_not(None))
            ):
                keys[group] += 1
                active[group] += int(revoked_at is None and (expires_at is None or expires_at > now))
            rows = {row.name: row for row in session.scalars(select(KeyGroup))}
        return [
            GroupInfo(
                name=name, keys=keys[name], active_keys=active[name], limits=limits_of(rows.get(name)),
                created_at=rows[name].created_at if name in rows else None,
                updated_at=rows[name].updated_at if name in rows else None,
            )
            for name in sorted(keys.keys() | rows.keys())
        ]

    def get(self, name: str) -> GroupInfo:
        """One group (with no keys and no limits when nothing names it yet)."""
        name = group_name(name)
        return next((group for group in self.list() if group.name == name), GroupInfo(name, 0, 0, RateLimits()))

    def set_limits(
        self, name: str, *, rpm: int | None = None, tpm: int | None = None, tokens_per_day: int | None = None,
        tokens_per_month: int | None = None, actor: str, address: str,
    ) -> GroupInfo:
        """Change the limits given (None: unchanged; 0: no limit), audited as `group.update` in
        the same transaction. Every value is checked before anything is written."""
        name = group_name(name)
        given = {"rpm": rpm, "tpm": tpm, "tokens_per_day": tokens_per_day, "tokens_per_month": tokens_per_month}
        changes = {field: checked_limit(value, LIMIT_FLAGS[field]) for field, value in given.items() if value is not None}
        now = datetime.now(UTC)
        with self.database.session() as session:
            row = session.get(KeyGroup, name)
            before = limits_of(row)
            after = replace(before, **changes)
            if row is None and after.any:
                row = KeyGroup(name=name, created_at=now)
                session.add(row)
            if row is not None and after.any:
                for field, value in after.as_json().items():
                    setattr(row, field, value)
                row.updated_at = now
            elif row is not None:
                session.delete(row)
            AuditLog.record_in(
                session, "group.update", actor=actor, address=address, target=name,
                detail=f"limits {before.as_json()} -> {after.as_json()}",
            )
        return self.get(name)
