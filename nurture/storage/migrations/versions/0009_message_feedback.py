"""messages.feedback: one bit per kind of provider feedback a message got

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The kinds as this revision knows them (bit 0 first); the models may add kinds later.
KINDS = (
    ("delivered",),
    ("bounce", "dropped", "undelivered"),
    ("open", "read"),
    ("click",),
    ("unsubscribe", "group_unsubscribe"),
    ("spamreport",),
)


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("feedback", sa.Integer(), nullable=False, server_default=sa.text("0")))
    for bit, events in enumerate(KINDS):
        names = ", ".join(f"'{name}'" for name in events)
        op.execute(
            f"UPDATE messages SET feedback = feedback | {1 << bit} WHERE idempotency_key IN "
            f"(SELECT idempotency_key FROM message_events WHERE event IN ({names}))"
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("feedback")
