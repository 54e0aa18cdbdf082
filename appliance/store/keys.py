"""API keys: creation, lookup, listing, revocation, the optional group (team) a key is in, and
its rate limits (enforced by rate_limits.py). A key's info carries its group's limits too
(key_groups.py sets them), so the server's short key cache serves both.

A key reads `apl_<prefix>_<secret>`: the prefix (48 random bits, not secret) finds the row,
the secret carries 256 random bits. Only the SHA-256 of the whole key is stored and it is
compared in constant time; the key itself is shown once, at creation. Never logs a key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.errors import InvalidInput, NotFound, Unauthorized
from appliance.store.db import Database
from appliance.store.models import ApiKey, KeyGroup
from appliance.store.rate_limits import Quota, RateLimits, checked_limit, group_quota, key_quota

Scope = Literal["infer", "admin", "metrics"]
SCOPES: tuple[str, ...] = get_args(Scope)
Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[str, ...] = get_args(Priority)
KEY_TAG = "apl"
PREFIX_BYTES = 6
SECRET_BYTES = 32
#: `last_used_at` is written at most this often per key, so busy keys do not turn every
#: request into a database write.
LAST_USED_RESOLUTION_S = 60.0
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Group names follow the key names' rule (they appear in reports, CSV files and URLs).
GROUP_NAME_PATTERN = KEY_NAME_PATTERN
KEY_PATTERN = re.compile(rf"^{KEY_TAG}_([0-9a-f]{{{PREFIX_BYTES * 2}}})_([A-Za-z0-9_-]{{20,128}})$")


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: everything except the secret."""

    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    #: The team the key's usage and cost count toward (None: no group).
    group: str | None = None
    limits: RateLimits = RateLimits()
    #: "interactive" or "batch" (admitted after interactive work; refused first under overload).
    priority: str = "interactive"
    #: The group's own limits, shared by every key in it (none when the key is in no group).
    group_limits: RateLimits = RateLimits()

    def quotas(self) -> tuple[Quota, ...]:
        """What the key's requests are counted against, its own limits first, then its
        group's; only those that limit something."""
        quotas = [key_quota(self.prefix, self.limits)] if self.limits.any else []
        if self.group is not None and self.group_limits.any:
            quotas.append(group_quota(self.group, self.group_limits))
        return tuple(quotas)

    def state(self, now: datetime | None = None) -> str:
        now = now or datetime.now(UTC)
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def as_json(self) -> dict[str, object]:
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "name": self.name,
            "prefix": self.prefix,
            "scopes": list(self.scopes),
            "state": self.state(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "last_used_at": iso(self.last_used_at),
            "group": self.group,
            "limits": self.limits.as_json(),
            "priority": self.priority,
        }


def limits_of(row: ApiKey | KeyGroup | None) -> RateLimits:
    """The limits a key's or a group's row holds (none for a missing group row)."""
    if row is None:
        return RateLimits()
    return RateLimits(rpm=row.rpm, tpm=row.tpm, tokens_per_day=row.tokens_per_day, tokens_per_month=row.tokens_per_month)


def _info(row: ApiKey, session: Session) -> KeyInfo:
    return KeyInfo(
        name=row.name,
        prefix=row.prefix,
        scopes=tuple(row.scopes.split()),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        group=row.group,
        limits=limits_of(row),
        priority=row.priority or "interactive",
        group_limits=limits_of(session.get(KeyGroup, row.group)) if row.group is not None else RateLimits(),
    )


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_group(group: str | None) -> str | None:
    """A valid group name, or None for an empty one (no group); InvalidInput otherwise."""
    if group is None or not group.strip():
        return None
    if not GROUP_NAME_PATTERN.fullmatch(group.strip()):
        raise InvalidInput(f"group: {group!r} is not a valid group name (1-64 of A-Z a-z 0-9 . _ -)", field="group")
    return group.strip()


def _named(session: Session, name: str) -> ApiKey:
    """The key row called `name`, or NotFound naming it."""
    row = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise NotFound(f"name: no key named {name!r}", field="name")
    return row


def check_priority(priority: str) -> str:
    if priority not in PRIORITIES:
        raise InvalidInput(f"priority: {priority!r} is not one of {', '.join(PRIORITIES)}", field="priority")
    return priority


class KeyStore:
    """API keys in the appliance database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def create(
        self,
        name: str,
        scopes: Iterable[str] = ("infer",),
        *,
        expires_days: float | None = None,
        group: str | None = None,
        limits: RateLimits = RateLimits(),
        priority: str = "interactive",
    ) -> tuple[str, KeyInfo]:
        """Create a key; returns (the key, shown once; its public info)."""
        if not KEY_NAME_PATTERN.fullmatch(name):
            raise InvalidInput(
                f"name: {name!r} is not a valid key name (1-64 of A-Z a-z 0-9 . _ -)", field="name"
            )
        chosen = tuple(dict.fromkeys(scopes)) or ("infer",)
        unknown = [scope for scope in chosen if scope not in SCOPES]
        if unknown:
            raise InvalidInput(f"scope: unknown scope {unknown[0]!r}; choose from {', '.join(SCOPES)}", field="scope")
        if expires_days is not None and expires_days <= 0:
            raise InvalidInput("expires: must be a positive number of days", field="expires")
        group = check_group(group)
        priority = check_priority(priority)
        rpm, tpm = checked_limit(limits.rpm, "rpm"), checked_limit(limits.tpm, "tpm")
        tokens_per_day = checked_limit(limits.tokens_per_day, "tokens-per-day")
        tokens_per_month = checked_limit(limits.tokens_per_month, "tokens-per-month")
        prefix = secrets.token_hex(PREFIX_BYTES)
        key = f"{KEY_TAG}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
        now = datetime.now(UTC)
        row = ApiKey(
            name=name,
            prefix=prefix,
            key_sha256=hash_key(key),
            scopes=" ".join(chosen),
            created_at=now,
            expires_at=now + timedelta(days=expires_days) if expires_days is not None else None,
            group=group,
            rpm=rpm,
            tpm=tpm,
            tokens_per_day=tokens_per_day,
            tokens_per_month=tokens_per_month,
            priority=priority,
        )
        try:
            with self.database.session() as session:
                session.add(row)
                session.flush()
                info = _info(row, session)
        except IntegrityError:
            raise InvalidInput(f"name: a key named {name!r} already exists", field="name") from None
        return key, info

    def list(self) -> list[KeyInfo]:
        with self.database.session() as session:
            return [_info(row, session) for row in session.scalars(select(ApiKey).order_by(ApiKey.created_at))]

    def revoke(self, name: str) -> KeyInfo:
        with self.database.session() as session:
            row = _named(session, name)
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
            return _info(row, session)

    def set_group(self, name: str, group: str | None) -> KeyInfo:
        """Put the key in `group` (None or '': in no group). Usage counted from then on goes to
        the new group; what was counted before stays with the old one."""
        group = check_group(group)
        with self.database.session() as session:
            row = _named(session, name)
            row.group = group
            return _info(row, session)

    def set_limits(
        self, name: str, *, rpm: int | None = None, tpm: int | None = None, tokens_per_day: int | None = None,
        tokens_per_month: int | None = None,
    ) -> KeyInfo:
        """Change the limits given (None: unchanged; 0: no limit). Running servers apply them
        within their key cache's lifetime (seconds)."""
        changes = {
            column: checked_limit(value, flag)
            for column, value, flag in (
                ("rpm", rpm, "rpm"), ("tpm", tpm, "tpm"), ("tokens_per_day", tokens_per_day, "tokens-per-day"),
                ("tokens_per_month", tokens_per_month, "tokens-per-month"),
            )
            if value is not None
        }
        with self.database.session() as session:
            row = _named(session, name)
            for column, value in changes.items():
                setattr(row, column, value)
            return _info(row, session)

    def set_priority(self, name: str, priority: str) -> KeyInfo:
        """Make the key's work interactive or batch (running servers: within seconds)."""
        priority = check_priority(priority)
        with self.database.session() as session:
            row = _named(session, name)
            row.priority = priority
            return _info(row, session)

    def find(self, name_or_id: str) -> KeyInfo:
        """The key with this name, or with this id (its public prefix); NotFound otherwise."""
        with self.database.session() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.name == name_or_id)) or session.scalar(
                select(ApiKey).where(ApiKey.prefix == name_or_id)
            )
            if row is None:
                raise NotFound(f"key: no key named {name_or_id!r} or with that id", field="key")
            return _info(row, session)

    def by_id(self, key_id: str) -> KeyInfo:
        """The key whose public prefix is `key_id` (batch lines run as the key that created
        the batch, known by its id only); NotFound otherwise."""
        with self.database.session() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.prefix == key_id))
            if row is None:
                raise NotFound(f"key: no key with id {key_id!r}", field="key")
            return _info(row, session)

    def count_active(self) -> int:
        now = datetime.now(UTC)
        return sum(1 for info in self.list() if info.state(now) == "active")

    def verify(self, key: str) -> KeyInfo:
        """The key's info when it is valid, else Unauthorized (same message for every cause
        a client could probe: unknown, wrong, revoked, expired)."""
        match = KEY_PATTERN.fullmatch(key.strip())
        if match is None:
            raise Unauthorized("invalid API key")
        digest = hash_key(key.strip())
        now = datetime.now(UTC)
        with self.database.session() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.prefix == match.group(1)))
            # Compare even when no row matched so timing does not reveal which prefixes exist.
            stored = row.key_sha256 if row is not None else "0" * 64
            if not hmac.compare_digest(stored, digest) or row is None:
                raise Unauthorized("invalid API key")
            if row.revoked_at is not None:
                raise Unauthorized("API key revoked")
            if row.expires_at is not None and row.expires_at <= now:
                raise Unauthorized("API key expired")
            if row.last_used_at is None or (now - row.last_used_at).total_seconds() >= LAST_USED_RESOLUTION_S:
                row.last_used_at = now
            return _info(row, session)
