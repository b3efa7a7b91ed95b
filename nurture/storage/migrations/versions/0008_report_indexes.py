"""report indexes: the deferred sends' step reaches

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

DEFERRED = sa.text("deferrals > 0")


def upgrade() -> None:
    op.create_index(
        "ix_step_reaches_deferred",
        "step_reaches",
        ["journey", "step_id"],
        unique=False,
        postgresql_where=DEFERRED,
        sqlite_where=DEFERRED,
    )


def downgrade() -> None:
    op.drop_index("ix_step_reaches_deferred", table_name="step_reaches")
