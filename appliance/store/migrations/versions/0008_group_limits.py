"""Rate limits per key group: the groups' own limits (`key_groups`), and rate windows counted
per subject (a key or a group) instead of per key.

`rate_windows.key_id` becomes `subject`; the rows already there are a key's, so they get the
`key:` tag and keys keep their current counts. Going back drops the groups' limits and their
windows and takes the tag off again.

Revision ID: 0008_group_limits
Revises: 0007_monthly_tokens
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_group_limits"
down_revision = "0007_monthly_tokens"
branch_labels = None
depends_on = None

LIMIT_COLUMNS = ("rate_rpm", "rate_tpm", "rate_tokens_per_day", "rate_tokens_per_month")
KEY_TAG = "key:"


def upgrade() -> None:
    op.create_table(
        "key_groups",
        sa.Column("name", sa.String(64), primary_key=True),
        *(sa.Column(name, sa.BigInteger(), nullable=True) for name in LIMIT_COLUMNS),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    with op.batch_alter_table("rate_windows") as batch:
        batch.alter_column("key_id", new_column_name="subject", type_=sa.String(80), existing_nullable=False)
    op.execute(f"UPDATE rate_windows SET subject = '{KEY_TAG}' || subject")


def downgrade() -> None:
    op.execute(f"DELETE FROM rate_windows WHERE subject NOT LIKE '{KEY_TAG}%'")
    op.execute(f"UPDATE rate_windows SET subject = substr(subject, {len(KEY_TAG) + 1})")
    with op.batch_alter_table("rate_windows") as batch:
        batch.alter_column("subject", new_column_name="key_id", type_=sa.String(16), existing_nullable=False)
    op.drop_table("key_groups")
