"""journey_versions: the compiled form of every journey version deployed; runs by version

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "journey_versions",
        sa.Column("journey", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("ir", sa.JSON(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False, server_default=""),
        sa.Column("deployed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("journey", "version"),
    )
    op.create_index("ix_runs_journey_version_status", "runs", ["journey", "version", "status"])


def downgrade() -> None:
    op.drop_index("ix_runs_journey_version_status", table_name="runs")
    op.drop_table("journey_versions")
