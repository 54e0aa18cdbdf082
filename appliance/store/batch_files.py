"""The Files API's files: JSONL text in the state directory, metadata in `batch_files`.

A file appears complete or not at all: an upload is written under `.incoming/`, fsynced, then
renamed to `<id>.jsonl` before its row is committed; a crash in between leaves a file without
a row, which `sweep_orphans` removes at the next start (nothing half-written is ever served).
Every file expires after the privacy policy's retention period and is then purged, unless a
batch that has not finished still reads it. Each key sees only its own files (admins see all
through the admin UI). Never imports the runtime or the APIs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Literal, get_args

from sqlalchemy import delete, func, select

from appliance.errors import InvalidInput, NotFound
from appliance.store.batch_tables import FILENAME_MAX_CHARS, BatchFile
from appliance.store.db import Database
from appliance.store.pages import keyset_page

FilePurpose = Literal["batch", "batch_output"]
FILE_PURPOSES: tuple[str, ...] = get_args(FilePurpose)
#: Purposes a client may upload (outputs are written by the batch runner only).
UPLOAD_PURPOSES = ("batch",)
FILE_ID_PREFIX = "file-"
FILE_ID_HEX_BYTES = 12
FILE_SUFFIX = ".jsonl"
INCOMING_DIR = ".incoming"
#: Files and folders in the state directory are readable by the service user only.
FILE_MODE = 0o600
DIR_MODE = 0o700
#: Longest page of a file listing (one more row is read to tell whether there are more).
LIST_LIMIT_MAX = 10_000


@dataclass(frozen=True)
class FileInfo:
    """What the Files API says about a file (never its content)."""

    id: str
    key_id: str
    purpose: str
    filename: str
    bytes: int
    lines: int
    created_at: datetime
    expires_at: datetime

    def as_openai(self) -> dict[str, object]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "expires_at": int(self.expires_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


def _info(row: BatchFile) -> FileInfo:
    return FileInfo(row.id, row.key_id, row.purpose, row.filename, row.bytes, row.lines, row.created_at, row.expires_at)


def new_file_id() -> str:
    return FILE_ID_PREFIX + secrets.token_hex(FILE_ID_HEX_BYTES)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def clean_filename(name: str | None) -> str:
    """The client's file name as shown back: its last path part, printable, bounded."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    printable = "".join(ch for ch in base if ch.isprintable()).strip()
    return (printable or "upload.jsonl")[:FILENAME_MAX_CHARS]


class IncomingFile:
    """An upload being written: bytes go to a private temporary file in the files folder."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.path = folder / f"{secrets.token_hex(8)}.part"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        self.handle: BinaryIO = os.fdopen(descriptor, "wb")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        self.size += len(data)

    def finish(self) -> None:
        """Flush to disk (before the rename that publishes it)."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        self.path.unlink(missing_ok=True)


class FileStore:
    """Publishing, finding, listing, deleting and purging files (any thread)."""

    def __init__(self, database: Database, folder: Path) -> None:
        self.database = database
        self.folder = folder

    def path(self, file_id: str) -> Path:
        if not file_id.startswith(FILE_ID_PREFIX) or not file_id[len(FILE_ID_PREFIX) :].isalnum():
            raise NotFound(f"file {file_id!r} not found", field="file_id")
        return self.folder / f"{file_id}{FILE_SUFFIX}"

    @staticmethod
    def derived_id(batch_id: str, suffix: str) -> str:
        """The id of a batch's output or error file, fixed by the batch's id, so a finish that
        a crash interrupted and that runs again finds the file it already published."""
        return FILE_ID_PREFIX + batch_id.rpartition("_")[2] + suffix

    def incoming(self) -> IncomingFile:
        return IncomingFile(self.folder / INCOMING_DIR)

    def publish(
        self, source: IncomingFile | Path, *, key_id: str, purpose: str, filename: str, lines: int, retention_days: int,
        file_id: str | None = None,
    ) -> FileInfo:
        """Move a complete file into place and record it; the source is consumed either way."""
        if purpose not in FILE_PURPOSES:
            raise InvalidInput(f"purpose: must be one of {', '.join(UPLOAD_PURPOSES)}", field="purpose")
        path = source.path if isinstance(source, IncomingFile) else source
        file_id = file_id or new_file_id()
        target = self.path(file_id)
        try:
            size = path.stat().st_size
            self.folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            os.replace(path, target)
            _fsync_dir(self.folder)
            now = datetime.now(UTC)
            row = BatchFile(
                id=file_id, key_id=key_id, purpose=purpose, filename=clean_filename(filename), bytes=size, lines=lines,
                created_at=now, expires_at=now + timedelta(days=retention_days),
            )
            with self.database.session() as session:
                session.add(row)
            return _info(row)
        except BaseException:
            path.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
            raise

    def get(self, file_id: str, key_id: str | None) -> FileInfo:
        """The file, if `key_id` owns it (None: any owner, for admins)."""
        with self.database.session() as session:
            row = session.get(BatchFile, file_id)
            if row is None or (key_id is not None and row.key_id != key_id):
                raise NotFound(f"file {file_id!r} not found", field="file_id")
            return _info(row)

    def list(
        self, key_id: str | None, *, purpose: str | None = None, limit: int = LIST_LIMIT_MAX, after: str | None = None,
        newest_first: bool = True,
    ) -> list[FileInfo]:
        statement = select(BatchFile)
        if key_id is not None:
            statement = statement.where(BatchFile.key_id == key_id)
        if purpose is not None:
            statement = statement.where(BatchFile.purpose == purpose)
        with self.database.session() as session:
            statement = keyset_page(session, statement, BatchFile, key_id=key_id, after=after, newest_first=newest_first, what="file")
            rows = session.scalars(statement.limit(min(limit, LIST_LIMIT_MAX + 1))).all()
            return [_info(row) for row in rows]

    def ids(self) -> list[str]:
        """Every file's id (the privacy page's "delete every batch file")."""
        with self.database.session() as session:
            return list(session.scalars(select(BatchFile.id).order_by(BatchFile.created_at, BatchFile.id)).all())

    def delete(self, file_id: str, key_id: str | None) -> FileInfo:
        """Forget the row, then remove the text (a crash in between leaves an orphan that the
        next start sweeps, never a row without content)."""
        info = self.get(file_id, key_id)
        with self.database.session() as session:
            session.execute(delete(BatchFile).where(BatchFile.id == file_id))
        self.path(file_id).unlink(missing_ok=True)
        return info

    def delete_many(self, file_ids: Iterable[str]) -> int:
        count = 0
        for file_id in file_ids:
            with contextlib.suppress(NotFound):
                self.delete(file_id, None)
                count += 1
        return count

    def purge_expired(self, now: datetime, *, in_use: set[str]) -> int:
        """Delete every file past its retention that no unfinished batch reads."""
        with self.database.session() as session:
            expired = session.scalars(select(BatchFile.id).where(BatchFile.expires_at <= now)).all()
        return self.delete_many(file_id for file_id in expired if file_id not in in_use)

    def sweep_orphans(self) -> int:
        """Remove contents without a row and unfinished uploads (left by a crash)."""
        if not self.folder.is_dir():
            return 0
        with self.database.session() as session:
            known = set(session.scalars(select(BatchFile.id)).all())
        removed = 0
        for path in self.folder.glob(f"*{FILE_SUFFIX}"):
            if path.stem not in known:
                path.unlink(missing_ok=True)
                removed += 1
        incoming = self.folder / INCOMING_DIR
        if incoming.is_dir():
            for path in incoming.iterdir():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def totals(self) -> tuple[int, int]:
        """(files, bytes) held, for the privacy page."""
        with self.database.session() as session:
            count, size = session.execute(select(func.count(BatchFile.id), func.coalesce(func.sum(BatchFile.bytes), 0))).one()
            return int(count), int(size)
