"""Adding counts to `usage_counts` so that any number of writers stay correct together.

Several server processes (or replicas) on one database flush their counts for the same
(minute, key, model) row. A read-modify-write would lose one writer's counts; instead every
write is one `INSERT ... ON CONFLICT (identity) DO UPDATE SET n = n + excluded.n`, which the
database applies atomically per row. Rows are written in a fixed order so two PostgreSQL
transactions touching the same rows take their row locks in the same order (no deadlock).

The upsert is dialect syntax (upsert.py: SQLite and PostgreSQL; any other database is refused
with a ConfigError naming it). Never imports the runtime or the APIs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from appliance.store.upsert import upsert_insert
from appliance.store.usage_tables import COUNTER_COLUMNS, IDENTITY_COLUMNS, UsageCount

@dataclass(frozen=True, order=True)
class UsageIdentity:
    """What one `usage_counts` row is about (its unique constraint)."""

    bucket_s: int
    bucket_start: datetime
    key_id: str
    key_group: str
    model: str
    version: str


@dataclass
class Counters:
    """The counted quantities of one row, or of one request (mutable: aggregation adds up)."""

    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_inputs: int = 0
    rerank_documents: int = 0

    def add(self, other: Counters) -> None:
        for name in COUNTER_COLUMNS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTER_COLUMNS}

    @classmethod
    def from_row(cls, row: Any) -> Counters:
        """From any object or row with the counter attributes (an ORM row, a result row)."""
        return cls(**{name: int(getattr(row, name) or 0) for name in COUNTER_COLUMNS})


def increment(session: Session, counts: Mapping[UsageIdentity, Counters] | Iterable[tuple[UsageIdentity, Counters]]) -> int:
    """Add `counts` to their rows (created at zero when missing) in `session`'s transaction;
    returns the number of rows touched."""
    items = sorted(counts.items() if isinstance(counts, Mapping) else counts, key=lambda item: item[0])
    if not items:
        return 0
    dialect = session.get_bind().dialect.name
    table = UsageCount.__table__
    statement = upsert_insert(dialect, table)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c[name] for name in IDENTITY_COLUMNS],
        set_={name: table.c[name] + statement.excluded[name] for name in COUNTER_COLUMNS},
    )
    session.execute(statement, [{**asdict(identity), **counters.as_dict()} for identity, counters in items])
    return len(items)
