"""Per-key rate limits (requests per minute, tokens per minute, per day and per calendar month),
shared by every server process on one database.

The counts live in `rate_windows`, one row per (key, window length, window start): a minute row
for requests and tokens, a day row and a month row for tokens (the month row's length is the tag
MONTH_S; it starts on the 1st at 00:00 UTC and ends when the next month begins). Admitting a request is one transaction: an atomic
`INSERT ... ON CONFLICT DO UPDATE SET requests = requests + 1 RETURNING ...` on the minute row
and a read of the day row (upsert.py), so several processes or replicas never lose each
other's counts.

The rule for tokens (written in docs/USAGE.md): a request is admitted while the key's tokens in
the current minute (day, month) are below its limits; its prompt and completion tokens are charged
when it finishes, so a stream already admitted is never cut by a token limit, and the next
request after a large one is refused until the window turns. Charges are kept in memory and
written with the next admission of this process or within `CHARGE_FLUSH_S`, whichever comes
first. Refusals answer 429 with `Retry-After` (the window's end) and OpenAI's `x-ratelimit-*`
headers, which every response of a limited key carries. Never imports the runtime or the APIs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
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

class RateWindow(Base):
    """One key's counts in one window (a minute or a day, by its start in epoch seconds)."""

    __tablename__ = "rate_windows"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    window_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


@dataclass(frozen=True)
class RateLimits:
    """A key's limits; None means no limit of that kind."""

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


def _reset(seconds: float) -> str:
    """OpenAI's reset format ("12s", "1m30s")."""
    whole = max(1, math.ceil(seconds))
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class RateLimiter:
    """Admission checks and token charges against `rate_windows` (any thread)."""

    def __init__(self, database: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.database = database
        self._clock = clock
        self._dialect = database.engine.dialect.name
        #: Tokens not yet written, by (key, minute, day, month start) of the moment they were charged.
        self._pending: dict[tuple[str, int, int, int], int] = defaultdict(int)
        self._lock = threading.Lock()
        self._flusher: threading.Timer | None = None

    def admit(self, key_id: str, limits: RateLimits) -> RateDecision:
        """Count one request of `key_id` and say whether it may run (blocking: call off the loop)."""
        now = self._clock()
        minute = int(now // MINUTE_S) * MINUTE_S
        day = int(now // DAY_S) * DAY_S
        with self.database.session() as session:
            self._write_pending(session, now)
            statement = (
                upsert_insert(self._dialect, RateWindow)
                .values(key_id=key_id, window_s=MINUTE_S, window_start=minute, requests=1, tokens=0)
                .on_conflict_do_update(
                    index_elements=["key_id", "window_s", "window_start"], set_={"requests": RateWindow.requests + 1}
                )
                .returning(RateWindow.requests, RateWindow.tokens)
            )
            requests, minute_tokens = session.execute(statement).one()
            day_tokens = self._tokens(session, key_id, DAY_S, day) if limits.tokens_per_day is not None else 0
            month, month_end = month_window(now)
            month_tokens = self._tokens(session, key_id, MONTH_S, month) if limits.tokens_per_month is not None else 0
        minute_left = minute + MINUTE_S - now
        headers: dict[str, str] = {}
        if limits.rpm is not None:
            headers.update(
                {
                    "x-ratelimit-limit-requests": str(limits.rpm),
                    "x-ratelimit-remaining-requests": str(max(0, limits.rpm - requests)),
                    "x-ratelimit-reset-requests": _reset(minute_left),
                }
            )
        if limits.tpm is not None:
            headers.update(
                {
                    "x-ratelimit-limit-tokens": str(limits.tpm),
                    "x-ratelimit-remaining-tokens": str(max(0, limits.tpm - minute_tokens)),
                    "x-ratelimit-reset-tokens": _reset(minute_left),
                }
            )
        if limits.rpm is not None and requests > limits.rpm:
            return RateDecision(False, headers, minute_left, f"rate limit: {limits.rpm} requests per minute for this key")
        if limits.tpm is not None and minute_tokens >= limits.tpm:
            return RateDecision(False, headers, minute_left, f"rate limit: {limits.tpm} tokens per minute for this key")
        if limits.tokens_per_day is not None and day_tokens >= limits.tokens_per_day:
            return RateDecision(
                False, headers, day + DAY_S - now, f"rate limit: {limits.tokens_per_day} tokens per day for this key"
            )
        if limits.tokens_per_month is not None and month_tokens >= limits.tokens_per_month:
            return RateDecision(
                False, headers, month_end - now, f"rate limit: {limits.tokens_per_month} tokens per month for this key"
            )
        return RateDecision(True, headers)

    @staticmethod
    def _tokens(session: Session, key_id: str, window_s: int, start: int) -> int:
        return session.scalar(
            select(RateWindow.tokens).where(
                RateWindow.key_id == key_id, RateWindow.window_s == window_s, RateWindow.window_start == start
            )
        ) or 0

    def day_budget(self, key_id: str, limits: RateLimits) -> RateDecision:
        """Whether the key's tokens-per-day and per-month budgets have room, without counting a
        request: batch lines are exempt from the per-minute limits but not from these budgets."""
        if limits.tokens_per_day is None and limits.tokens_per_month is None:
            return RateDecision(True, {})
        now = self._clock()
        day = int(now // DAY_S) * DAY_S
        month, month_end = month_window(now)
        with self.database.session() as session:
            self._write_pending(session, now)
            day_used = self._tokens(session, key_id, DAY_S, day)
            month_used = self._tokens(session, key_id, MONTH_S, month)
        if limits.tokens_per_day is not None and day_used >= limits.tokens_per_day:
            return RateDecision(False, {}, day + DAY_S - now, f"rate limit: {limits.tokens_per_day} tokens per day for this key")
        if limits.tokens_per_month is not None and month_used >= limits.tokens_per_month:
            return RateDecision(False, {}, month_end - now, f"rate limit: {limits.tokens_per_month} tokens per month for this key")
        return RateDecision(True, {})

    def charge(self, key_id: str, tokens: int) -> None:
        """Add a finished request's tokens to its key's windows (soon: see the module docstring)."""
        if tokens <= 0:
            return
        now = self._clock()
        with self._lock:
            self._pending[(key_id, int(now // MINUTE_S) * MINUTE_S, int(now // DAY_S) * DAY_S, month_window(now)[0])] += tokens
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
        for (key_id, minute, day, month), tokens in sorted(pending.items()):
            for window_s, start in ((MINUTE_S, minute), (DAY_S, day), (MONTH_S, month)):
                session.execute(
                    upsert_insert(self._dialect, RateWindow)
                    .values(key_id=key_id, window_s=window_s, window_start=start, requests=0, tokens=tokens)
                    .on_conflict_do_update(
                        index_elements=["key_id", "window_s", "window_start"], set_={"tokens": RateWindow.tokens + tokens}
                    )
                )
        if pending:
            session.execute(
                delete(RateWindow).where(RateWindow.window_s != MONTH_S, RateWindow.window_start < int(now) - KEEP_WINDOWS_S)
            )
            session.execute(
                delete(RateWindow).where(RateWindow.window_s == MONTH_S, RateWindow.window_start < int(now) - KEEP_MONTH_WINDOWS_S)
            )
