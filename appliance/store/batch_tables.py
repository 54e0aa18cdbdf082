"""The tables of the Files and Batch API: uploaded and produced files, and batches.

Only metadata lives here. A file's content (prompt or answer text) is a file in the state
directory (`batch_files.py`), never a database value, so the privacy page can list exactly
what text the box holds and deleting a file deletes the text. Created by the migration
`0006_batches`. Never imports the runtime or the APIs.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from appliance.store.models import Base, UtcDateTime

#: Longest id of a file or a batch ("file-" or "batch_" and 24 hex digits).
ID_MAX_CHARS = 40
FILENAME_MAX_CHARS = 255
#: Who runs a batch now: "host:pid:nonce" of the claiming server process.
OWNER_MAX_CHARS = 128


class BatchFile(Base):
    """One file of the Files API: a batch's input (purpose "batch") or a batch's output or
    error lines (purpose "batch_output")."""

    __tablename__ = "batch_files"
    __table_args__ = (Index("ix_batch_files_key_id", "key_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(ID_MAX_CHARS), primary_key=True)
    #: The owning API key's public prefix ('' when auth is off).
    key_id: Mapped[str] = mapped_column(String(16))
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(FILENAME_MAX_CHARS))
    bytes: Mapped[int] = mapped_column(BigInteger)
    #: JSONL lines in the file.
    lines: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    #: When the retention period ends and the file is purged.
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Batch(Base):
    """One batch: its input, progress counters, outcome files and who is running it."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_status", "status", "created_at"), Index("ix_batches_key_id", "key_id", "created_at"))

    id: Mapped[str] = mapped_column(String(ID_MAX_CHARS), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(32))
    #: The one model every line names (cost and the admin page group by it).
    model: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(ID_MAX_CHARS))
    completion_window: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    in_progress_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finalizing_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    cancelling_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    total: Mapped[int] = mapped_column(Integer)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    #: Embedding inputs or rerank documents of the lines that succeeded (what those are priced per).
    inputs: Mapped[int] = mapped_column(BigInteger, default=0)
    output_file_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(ID_MAX_CHARS), nullable=True)
    #: JSON list of {code, message, param, line} when the batch failed as a whole.
    errors_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The client's metadata (JSON object of up to 16 short strings).
    metadata_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(OWNER_MAX_CHARS), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
