"""audiences: current members, the history of entries and exits, the upkeep state, the versions
evaluated from scratch and the persons waiting for upkeep

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 07:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audience_members",
        sa.Column("audience", sa.String(length=128), nullable=False),
        sa.Column("person", sa.String(length=512), nullable=False),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("audience", "person"),
    )
    op.create_table(
        "audience_history",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("audience", sa.String(length=128), nullable=False),
        sa.Column("person", sa.String(length=512), nullable=False),
        sa.Column("change", sa.String(length=8), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audience_history_person", "audience_history", ["person"])
    op.create_index("ix_audience_history_audience_at", "audience_history", ["audience", "at"])
    op.create_table(
        "audience_state",
        sa.Column("audience", sa.String(length=128), nullable=False),
        sa.Column("person", sa.String(length=512), nullable=False),
        sa.Column("tallies", sa.JSON(), nullable=False),
        sa.Column("changes_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.String(length=32), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("audience", "person"),
    )
    op.create_index("ix_audience_state_changes_at", "audience_state", ["changes_at"])
    op.create_index("ix_audience_state_person", "audience_state", ["person"])
    op.create_table(
        "audience_versions",
        sa.Column("audience", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("deployed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("evaluated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("members", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("audience", "version"),
    )
    op.create_table(
        "audience_pending",
        sa.Column("person", sa.String(length=512), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("person"),
    )
    op.create_index("ix_audience_members_person", "audience_members", ["person"])
    op.create_index("ix_events_user_id_name", "events", ["user_id", "name"])


def downgrade() -> None:
    op.drop_index("ix_events_user_id_name", table_name="events")
    op.drop_index("ix_audience_members_person", table_name="audience_members")
    op.drop_table("audience_pending")
    op.drop_table("audience_versions")
    op.drop_index("ix_audience_state_person", table_name="audience_state")
    op.drop_index("ix_audience_state_changes_at", table_name="audience_state")
    op.drop_table("audience_state")
    op.drop_index("ix_audience_history_audience_at", table_name="audience_history")
    op.drop_index("ix_audience_history_person", table_name="audience_history")
    op.drop_table("audience_history")
    op.drop_table("audience_members")
