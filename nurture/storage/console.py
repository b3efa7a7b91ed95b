"""The console's tables: accounts, sessions, sign-in attempts and links, and paused
journeys.

Passwords are kept as argon2id hashes, sessions as the SHA-256 of their token (a copy of the
database opens no session), and each sign-in attempt as a row, so every API process throttles
against the same count. A paused journey is a row here: routers read the set before they start
a run.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Index, delete, func
from sqlmodel import Field, Session, SQLModel, col, select

from .db import Database
from .models import UtcDateTime, core_table, utcnow

ROLES = ("viewer", "operator", "admin")
"""Console roles, least to most: viewers read (addresses masked), operators also pause and resume
journeys, end runs and forget people, admins also reveal addresses and add accounts."""


class ConsoleUser(SQLModel, table=True):
    """A console account."""

    __tablename__ = "console_users"

    email: str = Field(primary_key=True, max_length=320)
    role: str = Field(max_length=16)
    """``viewer``, ``operator`` or ``admin``."""
    password_hash: str | None = Field(default=None, max_length=255)
    """argon2id; ``None`` until a password is set (an account made by ``nurture up`` signs in by link)."""
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))


class ConsoleSession(SQLModel, table=True):
    """A signed-in browser: the cookie carries the token, the table its SHA-256."""

    __tablename__ = "console_sessions"

    token_hash: str = Field(primary_key=True, max_length=64)
    email: str = Field(max_length=320, index=True)
    csrf: str = Field(max_length=64)
    """The session's CSRF token, sent back by every form."""
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))
    expires_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False, index=True))


class SignInAttempt(SQLModel, table=True):
    """A failed sign-in, by account and by client address: too many recent ones throttle both."""

    __tablename__ = "console_sign_in_attempts"
    __table_args__ = (Index("ix_console_sign_in_attempts_key_at", "key", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=330)
    """``email:<address>`` or ``ip:<client address>``."""
    at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))


class SignInLink(SQLModel, table=True):
    """A one-time sign-in link: the link carries a random token, the table its SHA-256."""

    __tablename__ = "console_links"

    token_hash: str = Field(primary_key=True, max_length=64)
    email: str = Field(max_length=320)
    expires_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False, index=True))
    used_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))


class PausedJourney(SQLModel, table=True):
    """A journey that starts no new runs (its runs in flight go on)."""

    __tablename__ = "paused_journeys"

    journey: str = Field(primary_key=True, max_length=128)
    paused_at: datetime = Field(default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False))
    paused_by: str = Field(max_length=330)


_PAUSED: Any = select(core_table(PausedJourney).c.journey)
"""The paused journeys' ids: built once."""


def paused_journeys(session: Session) -> frozenset[str]:
    """The paused journeys' ids, read in the caller's session (the event API reads them for every
    event that triggers a journey)."""
    return frozenset(session.connection().execute(_PAUSED).scalars())


class PausedJourneys:
    """Which journeys are paused, for the routers and the console."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> frozenset[str]:
        with self.db.session() as session:
            return paused_journeys(session)

    def details(self) -> dict[str, PausedJourney]:
        with self.db.session() as session:
            return {row.journey: row for row in session.exec(select(PausedJourney)).all()}

    def pause(self, journey: str, by: str) -> bool:
        """Pause ``journey``; ``False`` when it was paused already."""
        with self.db.write_session() as session:
            if session.get(PausedJourney, journey) is not None:
                return False
            session.add(PausedJourney(journey=journey, paused_by=by))
            return True

    def resume(self, journey: str) -> bool:
        """Resume ``journey``; ``False`` when it was not paused."""
        with self.db.write_session() as session:
            row = session.get(PausedJourney, journey)
            if row is None:
                return False
            session.delete(row)
            return True


def count_attempts(db: Database, keys: Iterable[str], since: datetime) -> int:
    """The most failed sign-ins any of ``keys`` had since ``since``."""
    most = 0
    with db.session() as session:
        for key in keys:
            count = session.exec(
                select(func.count())
                .select_from(SignInAttempt)
                .where(col(SignInAttempt.key) == key, col(SignInAttempt.at) >= since)
            ).one()
            most = max(most, int(count))
    return most


def record_attempt(db: Database, keys: Iterable[str], before: datetime) -> None:
    """Record a failed sign-in under each of ``keys``; attempts older than ``before`` are pruned."""
    with db.session() as session:
        session.execute(delete(SignInAttempt).where(col(SignInAttempt.at) < before))
        for key in keys:
            session.add(SignInAttempt(key=key))
