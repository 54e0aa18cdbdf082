"""`INSERT ... ON CONFLICT DO UPDATE` for the databases the appliance runs on.

Counters that several server processes add to (usage counts, rate-limit windows) are written as
one atomic upsert per row, never read-modify-write. The upsert is dialect syntax: SQLite and
PostgreSQL are supported (the databases the appliance is tested on); any other database is
refused with a ConfigError naming it, at start (the usage recorder checks) and on use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite

from appliance.errors import ConfigError

#: The INSERT construct with ON CONFLICT support, per SQLAlchemy dialect name.
_UPSERT_INSERTS: dict[str, Callable[[Any], Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


def check_dialect(dialect_name: str) -> None:
    """ConfigError unless counters can be written atomically on this database."""
    if dialect_name not in _UPSERT_INSERTS:
        raise ConfigError(
            f"database_url: usage accounting needs SQLite or PostgreSQL, not {dialect_name!r}", field="database_url"
        )


def upsert_insert(dialect_name: str, table: Any) -> Any:
    """The dialect's INSERT on `table`, ready for `.on_conflict_do_update(...)`."""
    check_dialect(dialect_name)
    return _UPSERT_INSERTS[dialect_name](table)
