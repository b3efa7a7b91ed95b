"""identity: persons, identifiers, groups; merged profiles, trait times, anonymous ids on events

Every existing profile, and every user id found in events, runs, routes or messages, becomes a
person whose id is that user id, with its ``user_id`` identifier and (first come, first served)
the profile's email, phone (E.164; one that does not normalise identifies no one) and WeChat
openid. The person id columns widen to 512 characters: a person first seen by an address or an
anonymous id is named ``<kind>:<value>``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 04:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from nurture.engine.identity import normalise

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

PERSON_COLUMNS = (
    ("profiles", False),
    ("events", False),
    ("runs", False),
    ("routes", False),
    ("messages", False),
    ("message_events", True),
)
"""Tables with a ``user_id`` column (now a person id), and whether it may be null."""


def upgrade() -> None:
    op.create_table(
        "identities",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("value", sa.String(length=320), nullable=False),
        sa.Column("person_id", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "value"),
    )
    op.create_index(op.f("ix_identities_person_id"), "identities", ["person_id"], unique=False)
    op.create_table(
        "groups",
        sa.Column("group_id", sa.String(length=255), nullable=False),
        sa.Column("traits", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("group_id"),
    )
    for table, nullable in PERSON_COLUMNS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "user_id",
                existing_type=sa.String(length=255),
                type_=sa.String(length=512),
                existing_nullable=nullable,
            )
    with op.batch_alter_table("profiles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("merged_into", sa.String(length=512), nullable=True))
        batch_op.add_column(
            sa.Column("trait_times", sa.JSON(), nullable=False, server_default=sa.text("'{}'"))
        )
        batch_op.add_column(sa.Column("group_id", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_profiles_merged_into"), ["merged_into"], unique=False)
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("anonymous_id", sa.String(length=255), nullable=True))
    _backfill()


def _backfill() -> None:
    bind = op.get_bind()
    now = datetime.now(UTC)
    known = {user_id for (user_id,) in bind.execute(sa.text("SELECT user_id FROM profiles"))}
    seen: set[str] = set()
    for table in ("events", "runs", "routes", "messages"):
        rows = bind.execute(sa.text(f"SELECT DISTINCT user_id FROM {table} WHERE user_id <> ''"))
        seen.update(user_id for (user_id,) in rows if user_id)
    for user_id in sorted(seen - known):
        bind.execute(
            sa.text(
                "INSERT INTO profiles (user_id, traits, opted_out, created_at, updated_at, trait_times) "
                "VALUES (:user_id, '{}', '[]', :now, :now, '{}')"
            ),
            {"user_id": user_id, "now": now},
        )
    taken: set[tuple[str, str]] = set()
    profiles = bind.execute(
        sa.text("SELECT user_id, email, phone, wechat_openid FROM profiles ORDER BY created_at, user_id")
    ).all()
    insert = sa.text(
        "INSERT INTO identities (kind, value, person_id, created_at) VALUES (:kind, :value, :person, :now)"
    )
    for user_id, email, phone, openid in profiles:
        for kind, raw in (
            ("user_id", user_id),
            ("email", email),
            ("phone", phone),
            ("wechat_openid", openid),
        ):
            value = normalise(kind, raw)
            if value is None or len(value) > 320 or (kind, value) in taken:
                continue  # not an identifier, or another person's first
            taken.add((kind, value))
            bind.execute(insert, {"kind": kind, "value": value, "person": user_id, "now": now})


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("anonymous_id")
    with op.batch_alter_table("profiles", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_profiles_merged_into"))
        batch_op.drop_column("group_id")
        batch_op.drop_column("trait_times")
        batch_op.drop_column("merged_into")
    for table, nullable in PERSON_COLUMNS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "user_id",
                existing_type=sa.String(length=512),
                type_=sa.String(length=255),
                existing_nullable=nullable,
            )
    op.drop_table("groups")
    op.drop_index(op.f("ix_identities_person_id"), table_name="identities")
    op.drop_table("identities")
