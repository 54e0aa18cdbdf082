"""Counting usage without slowing requests: add up in memory, write every few seconds.

The API layer hands over one `UsageEvent` per finished inference request (numbers only, never
text). `add` is a dictionary update under a lock, on the request's own thread; a background
thread writes what accumulated every `flush_interval_s` (and at `close`, so a clean shutdown
loses nothing) as increments of the (minute, key, group, model, version) rows, which stay
correct with any number of processes flushing into one database (`usage_writes`). The same
thread runs the rollup every `rollup_interval_s` (`usage_rollup`), so the table stays bounded.

A key's group is looked up when its counts are written (one query per flush for the keys in
it), so a request never waits on the database and counts follow a key into a new group from
the next flush on. When the database cannot be written, the counts stay pending and are
retried at the next flush; beyond `PENDING_ROWS_MAX` distinct rows new events are dropped and
counted in `dropped_events`. Never imports the runtime or the APIs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from appliance.store.db import Database
from appliance.store.models import ApiKey
from appliance.store.usage_rollup import ROLLUP_INTERVAL_S, bucket_start, roll_up
from appliance.store.usage_tables import HOUR_S, MINUTE_S
from appliance.store.upsert import check_dialect
from appliance.store.usage_writes import Counters, UsageIdentity, increment

log = logging.getLogger("appliance.store")

#: Seconds between two writes of the accumulated counts.
FLUSH_INTERVAL_S = 5.0
#: Distinct rows waiting to be written before new events are dropped (a database outage).
PENDING_ROWS_MAX = 100_000
#: How long `close` waits for the last write, in seconds.
CLOSE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class UsageEvent:
    """One finished inference request, as counted."""

    at: datetime
    #: The verified key's public prefix; '' when auth is off.
    key_id: str
    model: str
    #: The model version that served it; '' when not known.
    version: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embedding_inputs: int = 0
    rerank_documents: int = 0

    def counters(self) -> Counters:
        return Counters(
            requests=1,
            errors_4xx=int(400 <= self.status < 500),
            errors_5xx=int(self.status >= 500),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            embedding_inputs=self.embedding_inputs,
            rerank_documents=self.rerank_documents,
        )


#: Pending counts are keyed without the group: it is looked up when they are written.
_PendingKey = tuple[datetime, str, str, str]


class UsageRecorder:
    """Per-minute usage counts of this process, flushed to the database in the background."""

    def __init__(
        self,
        database: Database,
        *,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        rollup_interval_s: float = ROLLUP_INTERVAL_S,
    ) -> None:
        check_dialect(database.engine.dialect.name)
        self.database = database
        self.flush_interval_s = flush_interval_s
        self.rollup_interval_s = rollup_interval_s
        self.dropped_events = 0
        self._pending: dict[_PendingKey, Counters] = {}
        self._lock = threading.Lock()
        #: One write at a time per process (the background thread, `flush()` callers).
        self._writing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- producer side (the request path) ------------------------------------------------------
    def add(self, event: UsageEvent) -> None:
        """Count one request into its minute; never touches the database."""
        key = (bucket_start(event.at, MINUTE_S), event.key_id, event.model, event.version)
        with self._lock:
            counters = self._pending.get(key)
            if counters is None:
                if len(self._pending) >= PENDING_ROWS_MAX:
                    self.dropped_events += 1
                    return
                counters = self._pending[key] = Counters()
            counters.add(event.counters())

    @property
    def pending_rows(self) -> int:
        """Rows counted but not written yet (a failed write keeps them for the next flush)."""
        with self._lock:
            return len(self._pending)

    # -- writing -----------------------------------------------------------------------------
    def flush(self) -> int:
        """Write everything counted so far; returns rows written (0 when the write failed and
        the counts were kept for the next try)."""
        with self._writing:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return 0
            try:
                groups = self._groups({key_id for _, key_id, _, _ in batch})
                rows: dict[UsageIdentity, Counters] = {}
                for (minute, key_id, model, version), counters in batch.items():
                    identity = UsageIdentity(MINUTE_S, minute, key_id, groups.get(key_id, ""), model, version)
                    rows.setdefault(identity, Counters()).add(counters)
                # The write transaction holds nothing but the upserts: it starts with its write,
                # so a busy SQLite file makes it wait (busy timeout), never fail on a stale read.
                with self.database.session() as session:
                    return increment(session, rows)
            except SQLAlchemyError as exc:
                log.warning(
                    "usage: %d rows not written yet, retrying at the next flush (%s; %d events dropped so far)",
                    len(batch), exc.__class__.__name__, self.dropped_events,
                )
                self._restore(batch)
                return 0

    def _groups(self, key_ids: set[str]) -> dict[str, str]:
        """Each key's group now ('' for none), in one read."""
        named = sorted(key_id for key_id in key_ids if key_id)
        if not named:
            return {}
        with self.database.session() as session:
            rows = session.execute(select(ApiKey.prefix, ApiKey.group).where(ApiKey.prefix.in_(named))).all()
        return {prefix: group or "" for prefix, group in rows}

    def _restore(self, batch: dict[_PendingKey, Counters]) -> None:
        with self._lock:
            for key, counters in batch.items():
                current = self._pending.get(key)
                if current is not None:
                    current.add(counters)
                elif len(self._pending) < PENDING_ROWS_MAX:
                    self._pending[key] = counters
                else:
                    self.dropped_events += counters.requests

    # -- background thread ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="usage-flush", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread and write what is left."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        next_rollup = time.monotonic()  # at the first tick: a server that restarts often must still roll up
        while not self._stop.wait(self.flush_interval_s):
            self.flush()
            if time.monotonic() >= next_rollup:
                self._roll_up_quietly()
                next_rollup = time.monotonic() + self.rollup_interval_s

    def _roll_up_quietly(self) -> None:
        try:
            rolled = roll_up(self.database)
        except SQLAlchemyError as exc:
            log.warning("usage rollup failed, retrying later (%s)", exc.__class__.__name__)
            return
        if any(rolled.values()):
            log.info("usage rollup: %d minute rows into hours, %d hour rows into days", rolled.get(MINUTE_S, 0), rolled.get(HOUR_S, 0))
