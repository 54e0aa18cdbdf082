"""Rate limits per API key and per key group (requests per minute, tokens per minute, per day
and per calendar month), shared by every server process on one database.

A *quota* is one set of limits and the subject whose counts it reads: a key's own
(`key:<prefix>`) or its group's (`group:<name>`, shared by every key in the group; `:` is in
neither a key prefix nor a group name, so the two never meet). The counts live in
`rate_windows`, one row per (subject, window length, window start): a minute row for requests
and tokens, a day row and a month row for tokens (the month row's length is the tag MONTH_S; it
starts on the 1st at 00:00 UTC and ends when the next month begins). Keys and groups share the
table (migration 0008 turned its `key_id` into `subject`) rather than each having one, because
a group's windows are counted, charged and pruned exactly like a key's: one upsert, one flush
and one cleanup serve both.

Admitting a request is one transaction over its quotas, the key's own first: an atomic
`INSERT ... ON CONFLICT DO UPDATE SET requests = requests + 1 RETURNING ...` on each minute row
and a read of the day and month rows (upsert.py), so several processes or replicas never lose
each other's counts. The request runs only if every quota allows it. Once one quota refuses,
the later ones are read, not counted: a key retrying past its own limit never uses up its
group's share. The x-ratelimit-* headers report, for requests and for tokens, the quota with
the fewest remaining (the tighter one).

The rule for tokens (written in docs/USAGE.md): a request is admitted while its quotas' tokens
in the current minute (day, month) are below their limits; its prompt and completion tokens are
charged to each of them when it finishes, so a stream already admitted is never cut by a token
limit, and the next request after a large one is refused until the window turns. Charges are
kept in memory and written with the next admission of this process or within `CHARGE_FLUSH_S`,
whichever comes first. Refusals answer 429 with `Retry-After` (the window's end) and a message
naming the limit and whose it is. Never imports the runtime or the APIs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Integer, String, delete, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from appliance.errors import InvalidInput
from appliance.store.db import Database
from appliance.store.models import Base
from appliance.store.upsert import upsert_insert

MINUTE_S = 60
DAY_S = 86_400
#: The window length recorded on month rows (a tag: months are calendar months, 28-31 days).
MONTH_S = 31 * DAY_S
#: Minute and day rows older than this are deleted (the day window is the longest of them).
KEEP_WINDOWS_S = 2 * DAY_S
#: Month rows older than this are deleted (the current month's row is the only one read).
KEEP_MONTH_WINDOWS_S = 2 * MONTH_S
#: Pending token charges reach the database at least this often.
CHARGE_FLUSH_S = 1.0
#: Largest limit accepted (a typo guard, not a policy).
LIMIT_MAX = 10**12
#: Subject tags of the two kinds of quota.
KEY_SUBJECT = "key:"
GROUP_SUBJECT = "group:"
#: Longest subject: the group tag and a 64-character group name, with room to spare.
SUBJECT_MAX_CHARS = 80
#: The columns a window row is found by (the upserts' conflict target).
WINDOW_ROW = ["subject", "window_s", "window_start"]


class RateWindow(Base):
    """One subject's counts in one window (a minute, a day or a month, by its start in epoch seconds)."""

    __tablename__ = "rate_windows"

    #: `key:<prefix>` or `group:<name>`.
    subject: Mapped[str] = mapped_column(String(SUBJECT_MAX_CHARS), primary_key=True)
    window_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


@dataclass(frozen=True)
class RateLimits:
    """A key's or a group's limits; None means no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.counts_tokens

    @property
    def counts_tokens(self) -> bool:
        return self.tpm is not None or self.tokens_per_day is not None or self.tokens_per_month is not None

    def as_json(self) -> dict[str, int | None]:
        return {"rpm": self.rpm, "tpm": self.tpm, "tokens_per_day": self.tokens_per_day, "tokens_per_month": self.tokens_per_month}


@dataclass(frozen=True)
class Quota:
    """Limits and whose counts they apply to: a key's own, or its group's."""

    subject: str
    limits: RateLimits
    #: How a refusal names it ("this key", "group 'team-a' (shared by its keys)").
    label: str


def key_quota(key_id: str, limits: RateLimits) -> Quota:
    return Quota(KEY_SUBJECT + key_id, limits, "this key")


def group_quota(group: str, limits: RateLimits) -> Quota:
    return Quota(GROUP_SUBJECT + group, limits, f"group {group!r} (shared by its keys)")


def month_window(now: float) -> tuple[int, int]:
    """(start, end) of the calendar month (UTC) holding `now`, in epoch seconds."""
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return int(start.timestamp()), int(end.timestamp())


def checked_limit(value: int | None, name: str) -> int | None:
    """A limit as stored: None stays None (unchanged / none), 0 means "no limit" (None)."""
    if value is None or value == 0:
        return None
    if value < 0 or value > LIMIT_MAX:
        raise InvalidInput(f"{name}: must be between 1 and {LIMIT_MAX} (0: no limit)", field=name)
    return value


@dataclass(frozen=True)
class RateDecision:
    """Whether a request may run now, and the headers its response carries."""

    allowed: bool
    headers: dict[str, str]
    retry_after_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class _Windows:
    """The windows holding one instant (starts in epoch seconds) and the month's end."""

    now: float
    minute: int
    day: int
    month: int
    month_end: int

    @classmethod
    def at(cls, now: float) -> _Windows:
        month, month_end = month_window(now)
        return cls(now, int(now // MINUTE_S) * MINUTE_S, int(now // DAY_S) * DAY_S, month, month_end)

    @property
    def minute_left_s(self) -> float:
        return self.minute + MINUTE_S - self.now


@dataclass(frozen=True)
class _Counts:
    """One quota's counts in the current windows (requests include this one if it was counted)."""

    quota: Quota
    requests: int
    minute_tokens: int
    day_tokens: int
    month_tokens: int


def _refusal(counts: _Counts, windows: _Windows, *, per_minute: bool = True) -> tuple[float, str] | None:
    """(seconds until the window turns, reason) when a limit of this quota is reached, else None."""
    limits = counts.quota.limits
    reached: tuple[float, str] | None = None
    if per_minute and limits.rpm is not None and counts.requests > limits.rpm:
        reached = windows.minute_left_s, f"{limits.rpm} requests per minute"
    elif per_minute and limits.tpm is not None and counts.minute_tokens >= limits.tpm:
        reached = windows.minute_left_s, f"{limits.tpm} tokens per minute"
    elif limits.tokens_per_day is not None and counts.day_tokens >= limits.tokens_per_day:
        reached = windows.day + DAY_S - windows.now, f"{limits.tokens_per_day} tokens per day"
    elif limits.tokens_per_month is not None and counts.month_tokens >= limits.tokens_per_month:
        reached = windows.month_end - windows.now, f"{limits.tokens_per_month} tokens per month"
    if reached is None:
        return None
    return reached[0], f"rate limit: {reached[1]} for {counts.quota.label}"


def _reset(seconds: float) -> str:
    """OpenAI's reset format ("12s", "1m30s")."""
    whole = max(1, math.ceil(seconds))
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def _headers(counted: Sequence[_Counts], minute_left_s: float) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for requests and tokens per minute, each from the quota
    with the fewest remaining (on a tie, the lower limit)."""
    headers: dict[str, str] = {}
    for kind, used in (
        ("requests", [(c.quota.limits.rpm, c.requests) for c in counted]),
        ("tokens", [(c.quota.limits.tpm, c.minute_tokens) for c in counted]),
    ):
        left = [(max(0, limit - count), limit) for limit, count in used if limit is not None]
        if left:
            remaining, limit = min(left)
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            headers[f"x-ratelimit-reset-{kind}"] = _reset(minute_left_s)
    return headers


class RateLimiter:
    """Admission checks and token charges against `rate_windows` (any thread)."""

    def __init__(self, database: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.database = database
        self._clock = clock
        self._dialect = database.engine.dialect.name
        #: Tokens not yet written, by (subject, minute, day, month start) of the moment they were charged.
        self._pending: dict[tuple[str, int, int, int], int] = defaultdict(int)
        self._lock = threading.Lock()
        self._flusher: threading.Timer | None = None

    def admit(self, quotas: Sequence[Quota]) -> RateDecision:
        """Count one request against `quotas` in order (the key's own first) and say whether it
        may run (blocking: call off the loop). After a refusal the remaining quotas are read only."""
        windows = _Windows.at(self._clock())
        counted: list[_Counts] = []
        refusal: tuple[float, str] | None = None
        with self.database.session() as session:
            self._write_pending(session, windows.now)
            for quota in quotas:
                counts = self._counts(session, quota, windows, count_request=refusal is None)
                counted.append(counts)
                refusal = refusal or _refusal(counts, windows)
        headers = _headers(counted, windows.minute_left_s)
        if refusal is not None:
            return RateDecision(False, headers, *refusal)
        return RateDecision(True, headers)

    def _counts(self, session: Session, quota: Quota, windows: _Windows, *, count_request: bool) -> _Counts:
        if count_request:
            statement = (
                upsert_insert(self._dialect, RateWindow)
                .values(subject=quota.subject, window_s=MINUTE_S, window_start=windows.minute, requests=1, tokens=0)
                .on_conflict_do_update(index_elements=WINDOW_ROW, set_={"requests": RateWindow.requests + 1})
                .returning(RateWindow.requests, RateWindow.tokens)
            )
            requests, minute_tokens = session.execute(statement).one()
        else:
            row = session.execute(
                select(RateWindow.requests, RateWindow.tokens).where(
                    RateWindow.subject == quota.subject, RateWindow.window_s == MINUTE_S, RateWindow.window_start == windows.minute
                )
            ).one_or_none()
            requests, minute_tokens = row if row is not None else (0, 0)
        limits = quota.limits
        return _Counts(
            quota,
            requests,
            minute_tokens,
            self._tokens(session, quota.subject, DAY_S, windows.day) if limits.tokens_per_day is not None else 0,
            self._tokens(session, quota.subject, MONTH_S, windows.month) if limits.tokens_per_month is not None else 0,
        )

    @staticmethod
    def _tokens(session: Session, subject: str, window_s: int, start: int) -> int:
        return session.scalar(
            select(RateWindow.tokens).where(
                RateWindow.subject == subject, RateWindow.window_s == window_s, RateWindow.window_start == start
            )
        ) or 0

    def day_budget(self, quotas: Sequence[Quota]) -> RateDecision:
        """Whether the tokens-per-day and per-month budgets of `quotas` have room, without
        counting a request: batch lines are exempt from the per-minute limits but not from these."""
        budgeted = [q for q in quotas if q.limits.tokens_per_day is not None or q.limits.tokens_per_month is not None]
        if not budgeted:
            return RateDecision(True, {})
        windows = _Windows.at(self._clock())
        with self.database.session() as session:
            self._write_pending(session, windows.now)
            for quota in budgeted:
                day_used = self._tokens(session, quota.subject, DAY_S, windows.day)
                month_used = self._tokens(session, quota.subject, MONTH_S, windows.month)
                refusal = _refusal(_Counts(quota, 0, 0, day_used, month_used), windows, per_minute=False)
                if refusal is not None:
                    return RateDecision(False, {}, *refusal)
        return RateDecision(True, {})

    def charge(self, subjects: Iterable[str], tokens: int) -> None:
        """Add a finished request's tokens to its quotas' windows (soon: see the module docstring)."""
        if tokens <= 0:
            return
        windows = _Windows.at(self._clock())
        with self._lock:
            for subject in subjects:
                self._pending[(subject, windows.minute, windows.day, windows.month)] += tokens
            if self._flusher is None:
                self._flusher = threading.Timer(CHARGE_FLUSH_S, self.flush)
                self._flusher.daemon = True
                self._flusher.start()

    def flush(self) -> None:
        """Write the pending charges now (also called at shutdown)."""
        with self.database.session() as session:
            self._write_pending(session, self._clock())

    def _write_pending(self, session: Session, now: float) -> None:
        with self._lock:
            pending, self._pending = dict(self._pending), defaultdict(int)
            if self._flusher is not None:
                self._flusher.cancel()
                self._flusher = None
        for (subject, minute, day, month), tokens in sorted(pending.items()):
            for window_s, start in ((MINUTE_S, minute), (DAY_S, day), (MONTH_S, month)):
                session.execute(
                    upsert_insert(self._dialect, RateWindow)
                    .values(subject=subject, window_s=window_s, window_start=start, requests=0, tokens=tokens)
                    .on_conflict_do_update(index_elements=WINDOW_ROW, set_={"tokens": RateWindow.tokens + tokens})
                )
        if pending:
            session.execute(
                delete(RateWindow).where(RateWindow.window_s != MONTH_S, RateWindow.window_start < int(now) - KEEP_WINDOWS_S)
            )
            session.execute(
                delete(RateWindow).where(RateWindow.window_s == MONTH_S, RateWindow.window_start < int(now) - KEEP_MONTH_WINDOWS_S)
            )
