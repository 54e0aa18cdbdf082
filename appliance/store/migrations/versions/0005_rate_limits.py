"""Rate limits and priority per API key: the limits and priority on the key, and the shared
per-window counts.

Revision ID: 0005_rate_limits
Revises: 0004_usage
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_rate_limits"
down_revision = "0004_usage"
branch_labels = None
depends_on = None

LIMIT_COLUMNS = ("rate_rpm", "rate_tpm", "rate_tokens_per_day")


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        for name in LIMIT_COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("priority", sa.String(16), nullable=False, server_default="interactive"))
    op.create_table(
        "rate_windows",
        sa.Column("key_id", sa.String(16), primary_key=True),
        sa.Column("window_s", sa.Integer(), primary_key=True),
        sa.Column("window_start", sa.BigInteger(), primary_key=True),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("tokens", sa.BigInteger(), nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("rate_windows")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("priority")
        for name in reversed(LIMIT_COLUMNS):
            batch.drop_column(name)
