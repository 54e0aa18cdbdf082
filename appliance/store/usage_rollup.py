"""Bounded growth of `usage_counts`: minute rows become hour rows after a day, hour rows become
day rows after a month.

One rollup step runs in one transaction: DELETE the old rows of the finer length ... RETURNING
them, add them up per coarser bucket, and increment the coarser rows (`usage_writes`). The
DELETE is the claim: when two servers roll up at once, each old row is returned to exactly one
of them (SQLite serialises the writers; PostgreSQL's second DELETE waits on the first's row
locks and then skips the rows it removed), so nothing is counted twice or lost. Only whole
coarse buckets are rolled (the cutoff is a bucket boundary); a minute row that arrives late
for an hour already rolled up is simply added to that hour's row at the next run.

Rows per key, model and version at most: 1440 minute rows (a day) + 720 hour rows (30 days) +
one day row per day kept (365 a year). Never imports the runtime or the APIs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete

from appliance.store.db import Database
from appliance.store.usage_tables import COUNTER_COLUMNS, DAY_S, HOUR_S, IDENTITY_COLUMNS, MINUTE_S, UsageCount
from appliance.store.usage_writes import Counters, UsageIdentity, increment

#: How often the server runs the rollup, in seconds.
ROLLUP_INTERVAL_S = 600.0


@dataclass(frozen=True)
class RollupStep:
    """Rows of `from_s` buckets older than `after_s` become rows of `to_s` buckets."""

    from_s: int
    to_s: int
    after_s: int


#: Minutes -> hours after a day; hours -> days after 30 days. Day rows are kept.
ROLLUP_STEPS = (
    RollupStep(from_s=MINUTE_S, to_s=HOUR_S, after_s=DAY_S),
    RollupStep(from_s=HOUR_S, to_s=DAY_S, after_s=30 * DAY_S),
)


def bucket_start(at: datetime, bucket_s: int) -> datetime:
    """The start of the `bucket_s` bucket (UTC, aligned to the epoch) that holds `at`."""
    seconds = int(at.timestamp()) // bucket_s * bucket_s
    return datetime.fromtimestamp(seconds, UTC)


def roll_up(database: Database, now: datetime | None = None) -> dict[int, int]:
    """Run every rollup step once; returns {finer bucket length: rows rolled up}."""
    now = now or datetime.now(UTC)
    rolled: dict[int, int] = {}
    for step in ROLLUP_STEPS:
        rolled[step.from_s] = _roll(database, step, now)
    return rolled


def _roll(database: Database, step: RollupStep, now: datetime) -> int:
    table = UsageCount.__table__
    cutoff = bucket_start(now - timedelta(seconds=step.after_s), step.to_s)
    with database.session() as session:
        claimed = session.execute(
            delete(table)
            .where(table.c.bucket_s == step.from_s, table.c.bucket_start < cutoff)
            .returning(*(table.c[name] for name in (*IDENTITY_COLUMNS, *COUNTER_COLUMNS)))
        ).all()
        coarse: dict[UsageIdentity, Counters] = {}
        for row in claimed:
            identity = UsageIdentity(
                step.to_s, bucket_start(row.bucket_start, step.to_s), row.key_id, row.key_group, row.model, row.version
            )
            coarse.setdefault(identity, Counters()).add(Counters.from_row(row))
        increment(session, coarse)
    return len(claimed)
