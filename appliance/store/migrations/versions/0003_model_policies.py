"""Per-model serving rules beside the deploy decision: pinned (never evicted) and keep-alive.

Revision ID: 0003_model_policies
Revises: 0002_admin
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_model_policies"
down_revision = "0002_admin"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("pinned", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("keep_alive_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("keep_alive_s")
        batch.drop_column("pinned")
