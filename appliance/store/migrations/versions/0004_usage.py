"""Usage accounting: an optional group on API keys, and the usage counters per key and model.

Revision ID: 0004_usage
Revises: 0003_model_policies
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_usage"
down_revision = "0003_model_policies"
branch_labels = None
depends_on = None

COUNTERS = ("requests", "errors_4xx", "errors_5xx", "prompt_tokens", "completion_tokens", "embedding_inputs", "rerank_documents")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("key_group", sa.String(64), nullable=True))
    op.create_table(
        "usage_counts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("bucket_s", sa.Integer(), nullable=False),
        sa.Column("bucket_start", sa.DateTime(), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("key_group", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(16), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0") for name in COUNTERS),
        sa.UniqueConstraint("bucket_s", "bucket_start", "key_id", "key_group", "model", "version", name="uq_usage_counts_bucket"),
    )
    # Reports read a period across every key: the unique index leads with the bucket, this one
    # serves the per-key view (`appliance usage --key`, the admin page's key filter).
    op.create_index("ix_usage_counts_key_id", "usage_counts", ["key_id", "bucket_start"])


def downgrade() -> None:
    op.drop_index("ix_usage_counts_key_id", table_name="usage_counts")
    op.drop_table("usage_counts")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("key_group")
