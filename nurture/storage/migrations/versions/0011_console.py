"""console: accounts, sessions, sign-in attempts and links, paused journeys, an index for the
latest reaches of a step; audit actors may be console accounts

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("email"),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    with op.batch_alter_table("console_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_console_sessions_email"), ["email"], unique=False)
        batch_op.create_index(batch_op.f("ix_console_sessions_expires_at"), ["expires_at"], unique=False)
    op.create_table(
        "console_sign_in_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=330), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("console_sign_in_attempts", schema=None) as batch_op:
        batch_op.create_index("ix_console_sign_in_attempts_key_at", ["key", "at"], unique=False)
    op.create_table(
        "console_links",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    with op.batch_alter_table("console_links", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_console_links_expires_at"), ["expires_at"], unique=False)
    with op.batch_alter_table("step_reaches", schema=None) as batch_op:
        # The console lists the latest people to reach a step.
        batch_op.create_index("ix_step_reaches_journey_step_at", ["journey", "step_id", "reached_at"], unique=False)
    op.create_table(
        "paused_journeys",
        sa.Column("journey", sa.String(length=128), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paused_by", sa.String(length=330), nullable=False),
        sa.PrimaryKeyConstraint("journey"),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.alter_column(
            "actor", existing_type=sa.String(length=64), type_=sa.String(length=330), existing_nullable=False
        )


def downgrade() -> None:
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.alter_column(
            "actor", existing_type=sa.String(length=330), type_=sa.String(length=64), existing_nullable=False
        )
    op.drop_table("paused_journeys")
    with op.batch_alter_table("step_reaches", schema=None) as batch_op:
        batch_op.drop_index("ix_step_reaches_journey_step_at")
    with op.batch_alter_table("console_links", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_console_links_expires_at"))
    op.drop_table("console_links")
    with op.batch_alter_table("console_sign_in_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_console_sign_in_attempts_key_at")
    op.drop_table("console_sign_in_attempts")
    with op.batch_alter_table("console_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_console_sessions_expires_at"))
        batch_op.drop_index(batch_op.f("ix_console_sessions_email"))
    op.drop_table("console_sessions")
    op.drop_table("console_users")
