"""delivery: message attempts and feedback, provider tokens

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 15:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempts", sa.JSON(), nullable=False, server_default="[]"))
        batch_op.add_column(sa.Column("category", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("topic", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("delivery_status", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_messages_provider_id"), ["provider_id"], unique=False)
        batch_op.create_index("ix_messages_user_sent", ["user_id", "sent_at"], unique=False)

    with op.batch_alter_table("profiles", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_profiles_wechat_openid"), ["wechat_openid"], unique=False)

    op.create_table(
        "message_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("provider_event_id", sa.String(length=255), nullable=True),
        sa.Column("idempotency_key", sa.String(length=512), nullable=True),
        sa.Column("provider_id", sa.String(length=255), nullable=True),
        sa.Column("user_id", sa.String(length=255), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("provider_event_id"),
    )
    with op.batch_alter_table("message_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_message_events_event"), ["event"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_message_events_idempotency_key"), ["idempotency_key"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_message_events_provider_id"), ["provider_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_message_events_user_id"), ["user_id"], unique=False)

    op.create_table(
        "provider_tokens",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("token", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    with op.batch_alter_table("profiles", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_profiles_wechat_openid"))
    op.drop_table("provider_tokens")
    with op.batch_alter_table("message_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_message_events_user_id"))
        batch_op.drop_index(batch_op.f("ix_message_events_provider_id"))
        batch_op.drop_index(batch_op.f("ix_message_events_idempotency_key"))
        batch_op.drop_index(batch_op.f("ix_message_events_event"))
    op.drop_table("message_events")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_user_sent")
        batch_op.drop_index(batch_op.f("ix_messages_provider_id"))
        batch_op.drop_column("updated_at")
        batch_op.drop_column("delivery_status")
        batch_op.drop_column("revision")
        batch_op.drop_column("sent_at")
        batch_op.drop_column("topic")
        batch_op.drop_column("category")
        batch_op.drop_column("attempts")
