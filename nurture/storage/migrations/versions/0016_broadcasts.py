"""broadcasts: each occurrence started, its cursor in the audience and its lease

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broadcast_occurrences",
        sa.Column("broadcast", sa.String(length=128), nullable=False),
        sa.Column("occurrence", sa.String(length=64), nullable=False),
        sa.Column("audience", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("journey", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("selected", sa.Integer(), nullable=False),
        sa.Column("started", sa.Integer(), nullable=False),
        sa.Column("existing", sa.Integer(), nullable=False),
        sa.Column("cursor", sa.String(length=512), nullable=True),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("broadcast", "occurrence"),
    )
    # A broadcast's status reads its runs by (journey, key): the occurrence is the run key.
    op.create_index("ix_runs_journey_key", "runs", ["journey", "key"])


def downgrade() -> None:
    op.drop_index("ix_runs_journey_key", table_name="runs")
    op.drop_table("broadcast_occurrences")
