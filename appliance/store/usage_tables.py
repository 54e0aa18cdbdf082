"""The `usage_counts` table: how much each API key used each model, per time bucket.

One row per (bucket length, bucket start, key, group, model, version) holds counters only:
requests, errors, tokens, embedding inputs, rerank documents — never any text, so usage is
counted in every privacy mode. Minute rows roll up into hour rows after a day and hour rows
into day rows after a month (`usage_rollup.py`); the three lengths never overlap, so a sum
over every row in a period counts each request once. Created by the migration `0004_usage`.

The identifying columns are NOT NULL with '' for "none" (no key when auth is off, no group,
version unknown): a unique constraint treats NULLs as distinct, which would defeat the
increment-on-conflict writes. Never imports the runtime or the APIs.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from appliance.store.models import Base, UtcDateTime

MINUTE_S = 60
HOUR_S = 3600
DAY_S = 86400
#: Longest key id (the key's public prefix) and group name stored.
KEY_ID_MAX_CHARS = 16
GROUP_MAX_CHARS = 64
MODEL_MAX_CHARS = 64
VERSION_MAX_CHARS = 16
#: The columns that identify a row (its unique constraint, and the upsert's conflict target).
IDENTITY_COLUMNS = ("bucket_s", "bucket_start", "key_id", "key_group", "model", "version")
#: The counters, in the order reports and CSV files list them.
COUNTER_COLUMNS = (
    "requests",
    "errors_4xx",
    "errors_5xx",
    "prompt_tokens",
    "completion_tokens",
    "embedding_inputs",
    "rerank_documents",
)
UNIQUE_CONSTRAINT = "uq_usage_counts_bucket"
#: The model name recorded for requests naming a model the server does not serve (they are
#: errors; recording the name sent would let made-up names grow the table).
UNKNOWN_MODEL = "(unknown)"


class UsageCount(Base):
    """Counters of one key's use of one model version during one bucket."""

    __tablename__ = "usage_counts"
    __table_args__ = (
        UniqueConstraint(*IDENTITY_COLUMNS, name=UNIQUE_CONSTRAINT),
        Index("ix_usage_counts_key_id", "key_id", "bucket_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: Bucket length in seconds: 60, 3600 or 86400.
    bucket_s: Mapped[int] = mapped_column(Integer)
    bucket_start: Mapped[datetime] = mapped_column(UtcDateTime())
    #: The API key's public prefix ('' when auth is off), never the key.
    key_id: Mapped[str] = mapped_column(String(KEY_ID_MAX_CHARS))
    #: The key's group when the counts were written ('' for none).
    key_group: Mapped[str] = mapped_column(String(GROUP_MAX_CHARS))
    model: Mapped[str] = mapped_column(String(MODEL_MAX_CHARS))
    #: The model version that served ('' when not known).
    version: Mapped[str] = mapped_column(String(VERSION_MAX_CHARS))
    requests: Mapped[int] = mapped_column(BigInteger)
    errors_4xx: Mapped[int] = mapped_column(BigInteger)
    errors_5xx: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    embedding_inputs: Mapped[int] = mapped_column(BigInteger)
    rerank_documents: Mapped[int] = mapped_column(BigInteger)
