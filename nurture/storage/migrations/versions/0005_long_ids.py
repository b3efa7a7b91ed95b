"""workflow ids up to Temporal's 1,000 bytes, run keys of any length

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 01:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("runs", "routes"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("workflow_id", existing_type=sa.String(length=512), type_=sa.String(length=1000))
            batch_op.alter_column("key", existing_type=sa.String(length=255), type_=sa.Text())


def downgrade() -> None:
    for table in ("routes", "runs"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column("key", existing_type=sa.Text(), type_=sa.String(length=255))
            batch_op.alter_column("workflow_id", existing_type=sa.String(length=1000), type_=sa.String(length=512))
