"""date_triggers: the date trigger workflows started for each person, so forgetting them ends those

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 05:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "date_triggers",
        sa.Column("workflow_id", sa.String(length=1000), nullable=False),
        sa.Column("user_id", sa.String(length=512), nullable=False),
        sa.Column("journey", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workflow_id"),
    )
    op.create_index("ix_date_triggers_user_id", "date_triggers", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_date_triggers_user_id", table_name="date_triggers")
    op.drop_table("date_triggers")
