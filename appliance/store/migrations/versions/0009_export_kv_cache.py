"""The KV cache an export job asked for (`export_jobs.kv_cache`), so the Models page's job list
shows it beside the quantisation, also after a restart.

Every job recorded before this column ran with the export's default fp32 cache (the UI could not
ask for another), so existing rows get `fp32`. Going back drops the column.

Revision ID: 0009_export_kv_cache
Revises: 0008_group_limits
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_export_kv_cache"
down_revision = "0008_group_limits"
branch_labels = None
depends_on = None

#: `appliance export --kv-cache`'s default, which every earlier job used.
EARLIER_JOBS_KV_CACHE = "fp32"


def upgrade() -> None:
    with op.batch_alter_table("export_jobs") as batch:
        batch.add_column(sa.Column("kv_cache", sa.String(8), nullable=False, server_default=EARLIER_JOBS_KV_CACHE))


def downgrade() -> None:
    with op.batch_alter_table("export_jobs") as batch:
        batch.drop_column("kv_cache")
