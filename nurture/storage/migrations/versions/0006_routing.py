"""routing at least once: events.routed_at, runs.trigger_message_id

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 01:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("routed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_events_routed_at"), ["routed_at"], unique=False)
    # Events stored before this revision were routed, or answered 503 and forgotten: none is left
    # for the API's start-up to route again.
    op.execute("UPDATE events SET routed_at = received_at")

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trigger_message_id", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_runs_trigger_message_id"), ["trigger_message_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_runs_trigger_message_id"))
        batch_op.drop_column("trigger_message_id")

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_routed_at"))
        batch_op.drop_column("routed_at")
