"""results: step reach, conversion values, where active runs wait, late conversions, holdouts

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 02:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_reaches",
        sa.Column("run_id", sa.String(length=255), nullable=False),
        sa.Column("step_id", sa.String(length=255), nullable=False),
        sa.Column("journey", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=True),
        sa.Column("reached_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deferrals", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("deferral_reason", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "step_id"),
    )
    op.create_index("ix_step_reaches_journey_step", "step_reaches", ["journey", "step_id"], unique=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("conversion_value", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("step", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("last_message_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("goal_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("holdout", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index(batch_op.f("ix_runs_goal_until"), ["goal_until"], unique=False)
        batch_op.create_index("ix_runs_journey_entered_at", ["journey", "entered_at"], unique=False)
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index("ix_messages_journey_step", ["journey", "step_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_journey_step")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_journey_entered_at")
        batch_op.drop_index(batch_op.f("ix_runs_goal_until"))
        for column in ("holdout", "goal_until", "last_message_at", "step", "conversion_value"):
            batch_op.drop_column(column)
    op.drop_index("ix_step_reaches_journey_step", table_name="step_reaches")
    op.drop_table("step_reaches")
