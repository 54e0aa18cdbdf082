"""A tokens-per-month limit on API keys (its counts are month rows in `rate_windows`).

Revision ID: 0007_monthly_tokens
Revises: 0006_batches
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_monthly_tokens"
down_revision = "0006_batches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rate_tokens_per_month", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("rate_tokens_per_month")
