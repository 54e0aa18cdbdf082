"""Batches of the Batch API: their rows, counters, outcome, and which server process runs them.

Statuses follow OpenAI's: `validating` is never stored (lines are checked before the row is
written), `in_progress` waits for or is being run, `cancelling` runs no new line,
`finalizing` writes the outcome files, then one of `completed`, `failed`, `expired`,
`cancelled`. A batch is run by one process at a time: the process claims it by writing its
owner id (host:pid:nonce) and refreshes `heartbeat_at`; another process may take it over when
the heartbeat is older than CLAIM_STALE_S or, on the same host, when the owner's pid is gone
(a restart after kill -9 resumes at once). Counters here are for display and cost: the
progress files (batch_progress.py) are the truth a resumed batch starts from. Never imports
the runtime or the APIs.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from sqlalchemy import func, or_, select, update

from appliance.errors import InvalidInput, NotFound
from appliance.store.batch_tables import Batch
from appliance.store.db import Database
from appliance.store.pages import keyset_page

BatchStatus = Literal["in_progress", "cancelling", "finalizing", "completed", "failed", "expired", "cancelled"]
BATCH_STATUSES: tuple[str, ...] = get_args(BatchStatus)
#: Statuses a server process still has work for.
OPEN_STATUSES = ("in_progress", "cancelling", "finalizing")
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
BATCH_ID_PREFIX = "batch_"
BATCH_ID_HEX_BYTES = 12
#: A running batch's heartbeat is written this often; a claim older than CLAIM_STALE_S is free.
HEARTBEAT_S = 5.0
CLAIM_STALE_S = 30.0
LIST_LIMIT_MAX = 100


def process_owner_id() -> str:
    """This process's owner id: host, pid, and a nonce (a reused pid is not mistaken for us)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_is_gone(owner: str, me: str) -> bool:
    """True when `owner` is another incarnation on this host whose process no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text, _, _nonce = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit() or owner == me:
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # our pid, not our nonce: an earlier process that had it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class BatchInfo:
    id: str
    key_id: str
    endpoint: str
    model: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: datetime
    expires_at: datetime
    times: dict[str, datetime | None]
    total: int
    completed: int
    failed: int
    prompt_tokens: int
    completion_tokens: int
    #: Embedding inputs or rerank documents of the lines that succeeded.
    inputs: int
    output_file_id: str | None
    error_file_id: str | None
    errors: list[dict[str, Any]] | None
    metadata: dict[str, str] | None

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    def as_openai(self) -> dict[str, object]:
        def stamp(value: datetime | None) -> int | None:
            return int(value.timestamp()) if value is not None else None

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": stamp(self.created_at),
            "expires_at": stamp(self.expires_at),
            **{name: stamp(value) for name, value in self.times.items()},
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": {
                "input_tokens": self.prompt_tokens,
                "output_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
            "metadata": self.metadata,
        }


TIME_COLUMNS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")
#: The time column each final (or cancelling/finalizing) status sets.
STATUS_TIME = {
    "cancelling": "cancelling_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelled": "cancelled_at",
}


def _info(row: Batch) -> BatchInfo:
    return BatchInfo(
        id=row.id, key_id=row.key_id, endpoint=row.endpoint, model=row.model, input_file_id=row.input_file_id,
        completion_window=row.completion_window, status=row.status, created_at=row.created_at, expires_at=row.expires_at,
        times={name: getattr(row, name) for name in TIME_COLUMNS}, total=row.total, completed=row.completed,
        failed=row.failed, prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens, inputs=row.inputs,
        output_file_id=row.output_file_id, error_file_id=row.error_file_id,
        errors=json.loads(row.errors_json) if row.errors_json else None,
        metadata=json.loads(row.metadata_json) if row.metadata_json else None,
    )


@dataclass(frozen=True)
class Progress:
    """A running batch's counters, as recovered from or written to its progress files."""

    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    inputs: int = 0


class BatchStore:
    """Rows of `batches` (any thread)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def create(
        self, *, key_id: str, endpoint: str, model: str, input_file_id: str, completion_window: str, window: timedelta,
        total: int, metadata: dict[str, str] | None, errors: list[dict[str, Any]] | None = None,
    ) -> BatchInfo:
        """A new batch, in progress — or already failed when its lines did not validate."""
        now = datetime.now(UTC)
        row = Batch(
            id=BATCH_ID_PREFIX + secrets.token_hex(BATCH_ID_HEX_BYTES), key_id=key_id, endpoint=endpoint, model=model,
            input_file_id=input_file_id, completion_window=completion_window,
            status="failed" if errors else "in_progress", created_at=now, expires_at=now + window, total=total,
            completed=0, failed=0, prompt_tokens=0, completion_tokens=0, inputs=0,
            failed_at=now if errors else None, errors_json=json.dumps(errors) if errors else None,
            metadata_json=json.dumps(metadata) if metadata else None,
        )
        with self.database.session() as session:
            session.add(row)
        return _info(row)

    def get(self, batch_id: str, key_id: str | None) -> BatchInfo:
        with self.database.session() as session:
            row = session.get(Batch, batch_id)
            if row is None or (key_id is not None and row.key_id != key_id):
                raise NotFound(f"batch {batch_id!r} not found", field="batch_id")
            return _info(row)

    def list(
        self, key_id: str | None, *, limit: int = 20, after: str | None = None, status: str | None = None
    ) -> list[BatchInfo]:
        """Newest first; `after` is the last id of the previous page; `status` keeps only
        batches in that status (the admin page's filter)."""
        statement = select(Batch)
        if key_id is not None:
            statement = statement.where(Batch.key_id == key_id)
        if status is not None:
            if status not in BATCH_STATUSES:
                raise InvalidInput(f"status: must be one of {', '.join(BATCH_STATUSES)}, got {status[:32]!r}", field="status")
            statement = statement.where(Batch.status == status)
        with self.database.session() as session:
            statement = keyset_page(session, statement, Batch, key_id=key_id, after=after, newest_first=True, what="batch")
            rows = session.scalars(statement.limit(limit)).all()
            return [_info(row) for row in rows]

    def request_cancel(self, batch_id: str, key_id: str | None) -> BatchInfo:
        """Mark a running batch `cancelling` (its runner finishes the lines in flight, then
        writes what it has); a finished one cannot be cancelled (400)."""
        with self.database.session() as session:
            row = session.get(Batch, batch_id)
            if row is None or (key_id is not None and row.key_id != key_id):
                raise NotFound(f"batch {batch_id!r} not found", field="batch_id")
            if row.status in ("in_progress",):
                row.status = "cancelling"
                row.cancelling_at = datetime.now(UTC)
            elif row.status not in ("cancelling", "cancelled"):
                raise InvalidInput(f"batch_id: cannot cancel a batch whose status is {row.status!r}", field="batch_id")
            return _info(row)

    def claim(self, owner: str, *, now: datetime | None = None) -> BatchInfo | None:
        """Take the oldest open batch nobody runs (or whose runner is gone) for `owner`."""
        now = now or datetime.now(UTC)
        stale = now - timedelta(seconds=CLAIM_STALE_S)
        with self.database.session() as session:
            candidates = session.scalars(
                select(Batch).where(Batch.status.in_(OPEN_STATUSES)).order_by(Batch.created_at, Batch.id)
            ).all()
            for row in candidates:
                previous = row.owner
                # Our own claim is free too: this process runs one batch at a time, so a batch
                # it still holds at a claim is one whose run ended early (an error) and is retried.
                free = (
                    previous is None or previous == owner or row.heartbeat_at is None or row.heartbeat_at < stale
                    or owner_is_gone(previous, owner)
                )
                if not free:
                    continue
                taken = session.execute(
                    update(Batch)
                    .where(Batch.id == row.id, or_(Batch.owner.is_(None), Batch.owner == previous))
                    .values(owner=owner, heartbeat_at=now)
                ).rowcount
                if taken == 1:
                    session.flush()
                    session.refresh(row)
                    return _info(row)
        return None

    def heartbeat(self, batch_id: str, owner: str) -> BatchInfo | None:
        """Refresh the claim; the batch as it is now (a cancel made by another process shows in
        its status), or None when another process took it."""
        with self.database.session() as session:
            taken = session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.owner == owner).values(heartbeat_at=datetime.now(UTC))
            ).rowcount
            if taken != 1:
                return None
            row = session.get(Batch, batch_id)
            return _info(row) if row is not None else None

    def start(self, batch_id: str, owner: str, progress: Progress) -> None:
        """The runner begins (or resumes) with the counters its progress files hold."""
        with self.database.session() as session:
            session.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.owner == owner)
                .values(
                    in_progress_at=func.coalesce(Batch.in_progress_at, datetime.now(UTC)), completed=progress.completed, failed=progress.failed,
                    prompt_tokens=progress.prompt_tokens, completion_tokens=progress.completion_tokens, inputs=progress.inputs,
                )
            )

    def add_progress(self, batch_id: str, owner: str, delta: Progress) -> None:
        with self.database.session() as session:
            session.execute(
                update(Batch)
                .where(Batch.id == batch_id, Batch.owner == owner)
                .values(
                    completed=Batch.completed + delta.completed, failed=Batch.failed + delta.failed,
                    prompt_tokens=Batch.prompt_tokens + delta.prompt_tokens,
                    completion_tokens=Batch.completion_tokens + delta.completion_tokens, inputs=Batch.inputs + delta.inputs,
                )
            )

    def set_status(self, batch_id: str, owner: str, status: str, **values: Any) -> None:
        """Move a claimed batch on (finalizing, or a final status with its files and errors)."""
        if status not in BATCH_STATUSES:
            raise ValueError(f"unknown batch status {status!r}")
        changes: dict[str, Any] = dict(values)
        changes["status"] = status
        if status in STATUS_TIME:
            changes[STATUS_TIME[status]] = datetime.now(UTC)
        if "errors" in changes:
            errors = changes.pop("errors")
            changes["errors_json"] = json.dumps(errors) if errors else None
        if status in FINAL_STATUSES:
            changes["owner"] = None
        with self.database.session() as session:
            session.execute(update(Batch).where(Batch.id == batch_id, Batch.owner == owner).values(**changes))

    def open_input_files(self) -> set[str]:
        """Input files that unfinished batches still read (never purged)."""
        with self.database.session() as session:
            return set(session.scalars(select(Batch.input_file_id).where(Batch.status.in_(OPEN_STATUSES))).all())

    def files_of(self, batch_id: str) -> list[str]:
        info = self.get(batch_id, None)
        return [file_id for file_id in (info.input_file_id, info.output_file_id, info.error_file_id) if file_id]

    def delete(self, batch_id: str) -> BatchInfo:
        """Forget a finished batch (the caller deletes its files)."""
        with self.database.session() as session:
            row = session.get(Batch, batch_id)
            if row is None:
                raise NotFound(f"batch {batch_id!r} not found", field="batch_id")
            if row.status not in FINAL_STATUSES:
                raise InvalidInput(f"batch_id: cancel the batch first (its status is {row.status!r})", field="batch_id")
            info = _info(row)
            session.delete(row)
            return info
