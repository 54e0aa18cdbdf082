"""Admin users of the web UI: creation and password checks.

Passwords are hashed with argon2id (argon2-cffi's defaults, RFC 9106's low-memory profile) and
never stored or logged in clear. A check against an unknown name still runs one hash, so the
answer time does not reveal which names exist. There is no default user and no default
password: the first admin comes from `appliance admin create-user` or the one-time setup
token. Never imports the runtime or the APIs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from appliance.errors import InvalidInput
from appliance.store.admin_models import AdminUser
from appliance.store.audit import AuditLog
from appliance.store.db import Database

USER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
#: Shortest password accepted; long passphrases beat complexity rules.
PASSWORD_MIN_CHARS = 12
PASSWORD_MAX_CHARS = 1024

_hasher = PasswordHasher()
#: Hash of a random string, verified against when the user does not exist (equal timing).
_DUMMY_HASH = _hasher.hash("no such user: equal timing only")


@dataclass(frozen=True)
class AdminIdentity:
    id: int
    name: str


def check_new_password(password: str) -> None:
    if len(password) < PASSWORD_MIN_CHARS:
        raise InvalidInput(f"password: must be at least {PASSWORD_MIN_CHARS} characters", field="password")
    if len(password) > PASSWORD_MAX_CHARS:
        raise InvalidInput(f"password: must be at most {PASSWORD_MAX_CHARS} characters", field="password")


def check_user_name(name: str) -> None:
    if not USER_NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"name: {name!r} is not a valid user name (1-64 of A-Z a-z 0-9 . _ @ -)", field="name")


class AdminUserStore:
    """Admin users in the appliance database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def count(self) -> int:
        with self.database.session() as session:
            return int(session.scalar(select(func.count()).select_from(AdminUser)) or 0)

    def create(self, name: str, password: str, *, actor: str = "cli", address: str = "local") -> AdminIdentity:
        """Create an admin; the audit event commits with the user."""
        check_user_name(name)
        check_new_password(password)
        row = AdminUser(name=name, password_hash=_hasher.hash(password), created_at=datetime.now(UTC))
        try:
            with self.database.session() as session:
                session.add(row)
                session.flush()
                AuditLog.record_in(session, "admin.user.create", actor=actor, address=address, target=name)
        except IntegrityError:
            raise InvalidInput(f"name: an admin named {name!r} already exists", field="name") from None
        return AdminIdentity(id=row.id, name=row.name)

    def create_first(self, name: str, password: str, *, address: str) -> AdminIdentity:
        """Create the first admin (setup page); refuses once any admin exists."""
        if self.count() > 0:
            raise InvalidInput("setup: an admin already exists; sign in instead", field="setup")
        return self.create(name, password, actor="setup", address=address)

    def authenticate(self, name: str, password: str) -> AdminIdentity | None:
        """The user when name and password match, else None (same cost either way)."""
        with self.database.session() as session:
            row = session.scalar(select(AdminUser).where(AdminUser.name == name))
            stored = row.password_hash if row is not None else _DUMMY_HASH
            try:
                _hasher.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return None
            if row is None:
                return None
            if _hasher.check_needs_rehash(row.password_hash):
                row.password_hash = _hasher.hash(password)
            row.last_login_at = datetime.now(UTC)
            return AdminIdentity(id=row.id, name=row.name)

    @staticmethod
    def by_id(session: Session, user_id: int) -> AdminUser | None:
        return session.get(AdminUser, user_id)
