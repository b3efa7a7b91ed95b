"""The tables: profiles, events, runs, routes and messages.

Columns the service queries are real columns with indexes; free-form data (traits, properties,
rendered content) is JSON, which SQLite and PostgreSQL both store natively.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def _when(**kwargs: Any) -> Any:
    return Field(sa_column=Column(DateTime(timezone=True), **kwargs))


class ProfileRecord(SQLModel, table=True):
    """A user: traits (identity fields mirrored into columns) and per-channel opt-outs."""

    __tablename__ = "profiles"

    user_id: str = Field(primary_key=True, max_length=255)
    traits: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    email: str | None = Field(default=None, max_length=320, index=True)
    phone: str | None = Field(default=None, max_length=32, index=True)
    wechat_openid: str | None = Field(default=None, max_length=128)
    opted_out: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _when(nullable=False, default=utcnow)
    updated_at: datetime = _when(nullable=False, default=utcnow)


class EventRecord(SQLModel, table=True):
    """Every accepted track or identify call; ``message_id`` de-duplicates retries."""

    __tablename__ = "events"

    id: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(max_length=255, unique=True)
    kind: str = Field(max_length=16)
    """``track`` or ``identify``."""
    user_id: str = Field(max_length=255, index=True)
    name: str | None = Field(default=None, max_length=255)
    properties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    timestamp: datetime = _when(nullable=False)
    received_at: datetime = _when(nullable=False, default=utcnow)


class RunRecord(SQLModel, table=True):
    """One journey run (one workflow run), written by the workflow's own activities."""

    __tablename__ = "runs"

    run_id: str = Field(primary_key=True, max_length=255)
    workflow_id: str = Field(max_length=512, index=True)
    journey: str = Field(max_length=128, index=True)
    version: str = Field(max_length=32)
    user_id: str = Field(max_length=255, index=True)
    key: str = Field(default="", max_length=255)
    status: str = Field(default="active", max_length=16, index=True)
    """``active`` or ``ended``."""
    entered_at: datetime = _when(nullable=False)
    ended_at: datetime | None = _when(nullable=True)
    end_reason: str | None = Field(default=None, max_length=64)
    variants: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    converted_at: datetime | None = _when(nullable=True)


class Route(SQLModel, table=True):
    """Where a user's events go: one row per (journey, user, key) workflow id.

    The event API writes it when it signals a trigger, so an event right behind a trigger (the
    next item of a batch) already finds the run; the workflow clears ``active`` when it ends.
    """

    __tablename__ = "routes"

    workflow_id: str = Field(primary_key=True, max_length=512)
    user_id: str = Field(max_length=255, index=True)
    journey: str = Field(max_length=128)
    key: str = Field(default="", max_length=255)
    listens: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    active: bool = Field(default=True, index=True)
    updated_at: datetime = _when(nullable=False, default=utcnow)


class MessageRecord(SQLModel, table=True):
    """One send step's message and outcome; the idempotency key is unique per (run, step)."""

    __tablename__ = "messages"

    id: int | None = Field(default=None, primary_key=True)
    idempotency_key: str = Field(max_length=512, unique=True)
    run_id: str = Field(max_length=255, index=True)
    user_id: str = Field(default="", max_length=255, index=True)
    journey: str = Field(default="", max_length=128)
    step_id: str = Field(max_length=255)
    channel: str = Field(max_length=16)
    template: str = Field(max_length=255)
    provider: str | None = Field(default=None, max_length=32)
    provider_id: str | None = Field(default=None, max_length=255)
    status: str = Field(max_length=16)
    """``sent``, ``skipped`` or ``failed``."""
    reason: str | None = Field(default=None, max_length=255)
    variant: str | None = Field(default=None, max_length=64)
    locale: str | None = Field(default=None, max_length=16)
    address: str | None = Field(default=None, max_length=320)
    subject: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    preview: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    content: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The rendered message as sent (RenderedMessage.to_dict())."""
    created_at: datetime = _when(nullable=False, default=utcnow)
