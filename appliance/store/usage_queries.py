"""Reading usage back: totals per key, group, model and version over a period, and the time
series behind the usage chart.

A period is [since, until) in UTC over the rows' bucket starts. Rows of every length are summed
(they never overlap), so the last day is exact to the minute, the last month to the hour and
anything older to the day. Never imports the runtime or the APIs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import Select, func, select

from appliance.errors import InvalidInput
from appliance.store.db import Database
from appliance.store.usage_tables import COUNTER_COLUMNS, UsageCount
from appliance.store.usage_writes import Counters

Dimension = Literal["key", "group", "model"]
DIMENSIONS: tuple[Dimension, ...] = ("key", "group", "model")
#: The column each dimension groups by.
_DIMENSION_COLUMNS = {"key": UsageCount.key_id, "group": UsageCount.key_group, "model": UsageCount.model}
#: A relative time: a number of days, hours or minutes back from now ("30d", "12h", "90m").
_RELATIVE = re.compile(r"^(\d{1,6})([dhm])$")
_RELATIVE_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
#: Length of a plain date (YYYY-MM-DD).
DATE_ONLY_CHARS = 10


@dataclass(frozen=True)
class UsageFilter:
    """Which usage to read: a period, optionally one key (by id), one group, one model."""

    since: datetime
    until: datetime
    key_id: str | None = None
    group: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.until <= self.since:
            raise InvalidInput(
                f"since: {self.since:%Y-%m-%d %H:%M} is not before until {self.until:%Y-%m-%d %H:%M}", field="since"
            )


@dataclass(frozen=True)
class UsageTotal:
    """One key's use of one model version over the period."""

    key_id: str
    key_group: str
    model: str
    version: str
    counters: Counters


@dataclass(frozen=True)
class SeriesPoint:
    """Requests and tokens (prompt + completion) of one dimension value in one stored bucket."""

    bucket_start: datetime
    bucket_s: int
    name: str
    requests: int
    tokens: int


def parse_time(text: str, field: str, *, now: datetime | None = None, end: bool = False) -> datetime:
    """A UTC time from `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS]` (UTC unless it says otherwise) or a
    span back from now (`30d`, `12h`, `90m`); InvalidInput naming `field` otherwise. With
    `end`, a plain date means the end of that day (periods exclude their end: "until
    2026-12-31" includes the 31st)."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        now = now or datetime.now(UTC)
        return now - timedelta(**{_RELATIVE_UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(
            f"{field}: {text!r} is not a date (YYYY-MM-DD, YYYY-MM-DDTHH:MM, or a span back like 7d, 12h)", field=field
        ) from None
    parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    if end and len(value) == DATE_ONLY_CHARS:
        parsed += timedelta(days=1)
    return parsed


def _filtered(query: Select, where: UsageFilter) -> Select:
    query = query.where(UsageCount.bucket_start >= where.since, UsageCount.bucket_start < where.until)
    if where.key_id is not None:
        query = query.where(UsageCount.key_id == where.key_id)
    if where.group is not None:
        query = query.where(UsageCount.key_group == where.group)
    if where.model is not None:
        query = query.where(UsageCount.model == where.model)
    return query


def usage_totals(database: Database, where: UsageFilter) -> list[UsageTotal]:
    """Counters per (key, group, model, version) over the period, in that order."""
    identity = (UsageCount.key_id, UsageCount.key_group, UsageCount.model, UsageCount.version)
    sums = [func.sum(getattr(UsageCount, name)).label(name) for name in COUNTER_COLUMNS]
    query = _filtered(select(*identity, *sums), where).group_by(*identity).order_by(*identity)
    with database.session() as session:
        rows = session.execute(query).all()
    return [UsageTotal(row.key_id, row.key_group, row.model, row.version, Counters.from_row(row)) for row in rows]


def usage_series(database: Database, where: UsageFilter, dimension: Dimension) -> list[SeriesPoint]:
    """Requests and tokens per stored bucket and dimension value, oldest first (the chart
    floors them into its own bucket length)."""
    column = _DIMENSION_COLUMNS[dimension]
    query = _filtered(
        select(
            UsageCount.bucket_start,
            UsageCount.bucket_s,
            column.label("name"),
            func.sum(UsageCount.requests).label("requests"),
            func.sum(UsageCount.prompt_tokens + UsageCount.completion_tokens).label("tokens"),
        ),
        where,
    ).group_by(UsageCount.bucket_start, UsageCount.bucket_s, column).order_by(UsageCount.bucket_start)
    with database.session() as session:
        rows = session.execute(query).all()
    return [SeriesPoint(row.bucket_start, row.bucket_s, row.name, int(row.requests), int(row.tokens)) for row in rows]
