"""The request log and the live request statistics behind the dashboard.

- `RequestRecord` is what the API layer hands over for one request. In `metadata` mode it
  carries no text at all; in `full` mode it carries the prompt and completion, which get an
  expiry (`retention_days`) and are cleared by the purge that the writer thread runs every
  `purge_interval_s`. In `off` mode nothing reaches the database.
- Records are written by one background thread in batches, so a request never waits on the
  database.
- `LiveStats` keeps the last minutes of requests in memory only (time, latency, status, token
  counts: never text) for requests/s, latency percentiles and tokens/s.

Never imports the runtime or the APIs; never logs prompt or completion text.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError

from appliance.store.admin_models import RequestLogEntry
from appliance.store.db import Database

log = logging.getLogger("appliance.store")

#: Records written per transaction at most.
WRITE_BATCH_MAX = 256
#: How often the writer thread clears expired text (full mode retention), in seconds.
PURGE_INTERVAL_S = 3600.0
#: Records waiting for the writer before new ones are dropped (counted, not blocking).
QUEUE_MAX_RECORDS = 10_000
#: Longest text kept per field in full mode.
TEXT_MAX_CHARS = 100_000
#: How far back LiveStats remembers requests.
LIVE_WINDOW_S = 900.0


@dataclass(frozen=True)
class RequestRecord:
    at: datetime
    endpoint: str
    model: str
    key_id: str | None
    status: int
    latency_s: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_text: str | None = None
    completion_text: str | None = None
    #: Days the text is kept (full mode); set by `RequestLog.submit`.
    text_retention_days: int = 0


@dataclass(frozen=True)
class LiveSample:
    """Requests finished in one interval."""

    requests: int
    errors: int
    latencies_s: tuple[float, ...]
    tokens: int


class LiveStats:
    """Recent requests in memory (no text), for the dashboard."""

    def __init__(self, window_s: float = LIVE_WINDOW_S) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, float, int, int]] = deque()
        self._lock = threading.Lock()

    def add(self, latency_s: float, status: int, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, latency_s, status, tokens))
            while self._events and self._events[0][0] < now - self.window_s:
                self._events.popleft()

    def since(self, started: float) -> LiveSample:
        """What finished after `started` (time.monotonic())."""
        with self._lock:
            chosen = [event for event in self._events if event[0] >= started]
        return LiveSample(
            requests=len(chosen),
            errors=sum(1 for event in chosen if event[2] >= 500),
            latencies_s=tuple(event[1] for event in chosen),
            tokens=sum(event[3] for event in chosen),
        )


class RequestLog:
    """Queue, writer thread and purge for the `request_log` table."""

    def __init__(self, database: Database, *, purge_interval_s: float = PURGE_INTERVAL_S) -> None:
        self.database = database
        self.purge_interval_s = purge_interval_s
        self.live = LiveStats()
        self.dropped = 0
        self._queue: queue.Queue[RequestRecord | None] = queue.Queue(maxsize=QUEUE_MAX_RECORDS)
        self._thread: threading.Thread | None = None
        #: Records submitted but not yet written, guarded by `_written`.
        self._pending = 0
        self._written = threading.Condition()

    # -- producer side (event loop) ---------------------------------------------------------
    def submit(self, record: RequestRecord, retention_days: int) -> None:
        """Queue one record for writing; text gets its expiry now."""
        if record.prompt_text is not None or record.completion_text is not None:
            record = replace(
                record,
                prompt_text=_clip(record.prompt_text),
                completion_text=_clip(record.completion_text),
                text_retention_days=retention_days,
            )
        with self._written:
            self._pending += 1
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            self._done(1)

    # -- writer thread ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is written (tests, purge-now)."""
        if self._thread is None:
            batch = self._drain()
            self._write(batch)
            self._done(len(batch))
            return True
        with self._written:
            return self._written.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def _done(self, count: int) -> None:
        with self._written:
            self._pending -= count
            self._written.notify_all()

    def _drain(self, first: RequestRecord | None = None) -> list[RequestRecord]:
        batch = [first] if first is not None else []
        while len(batch) < WRITE_BATCH_MAX:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        next_purge = time.monotonic() + self.purge_interval_s
        while True:
            timeout = max(0.05, next_purge - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
                if time.monotonic() >= next_purge:
                    self._purge_quietly()
                    next_purge = time.monotonic() + self.purge_interval_s
                continue
            if item is None:
                batch = self._drain()
                self._write(batch)
                self._done(len(batch))
                return
            batch = self._drain(item)
            self._write(batch)
            self._done(len(batch))

    def _purge_quietly(self) -> None:
        try:
            cleared = self.purge_expired()
            if cleared:
                log.info("request log: cleared the text of %d requests past their retention", cleared)
        except SQLAlchemyError as exc:
            log.warning("request log purge failed: %s", exc.__class__.__name__)

    def _write(self, batch: list[RequestRecord]) -> None:
        if not batch:
            return
        try:
            with self.database.session() as session:
                session.add_all(_row(record) for record in batch)
        except SQLAlchemyError as exc:
            self.dropped += len(batch)
            log.warning("request log: %d records not written (%s)", len(batch), exc.__class__.__name__)

    # -- retention ----------------------------------------------------------------------------
    def purge_expired(self, now: datetime | None = None) -> int:
        """Clear prompt and completion text whose retention has passed; returns rows cleared."""
        now = now or datetime.now(UTC)
        with self.database.session() as session:
            result = session.execute(
                update(RequestLogEntry)
                .where(RequestLogEntry.text_expires_at.is_not(None), RequestLogEntry.text_expires_at <= now)
                .values(prompt_text=None, completion_text=None, text_expires_at=None)
            )
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def purge_all(self) -> int:
        """Purge now: delete every logged request (metadata and text); returns rows deleted."""
        self.flush()
        with self.database.session() as session:
            result = session.execute(delete(RequestLogEntry))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def counts(self) -> tuple[int, int]:
        """(rows, rows holding text) for the privacy page."""
        with self.database.session() as session:
            rows = session.scalar(select(func.count()).select_from(RequestLogEntry)) or 0
            with_text = session.scalar(
                select(func.count()).select_from(RequestLogEntry).where(RequestLogEntry.text_expires_at.is_not(None))
            ) or 0
            return int(rows), int(with_text)

    def recent(self, limit: int = 50) -> list[RequestLogEntry]:
        with self.database.session() as session:
            return list(session.scalars(select(RequestLogEntry).order_by(RequestLogEntry.id.desc()).limit(limit)))


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:TEXT_MAX_CHARS]


def _row(record: RequestRecord) -> RequestLogEntry:
    has_text = record.prompt_text is not None or record.completion_text is not None
    return RequestLogEntry(
        at=record.at,
        endpoint=record.endpoint[:128],
        model=record.model[:64],
        key_id=record.key_id,
        status=record.status,
        latency_ms=round(record.latency_s * 1000.0, 3),
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        prompt_text=record.prompt_text,
        completion_text=record.completion_text,
        text_expires_at=record.at + timedelta(days=record.text_retention_days) if has_text else None,
    )
