"""The ``audit_log`` table: who forgot or exported which user, when, and how much; and what the
console's operators did (paused or resumed a journey, ended a run, revealed an address).

The log must outlive the data it is about, so it never holds a user id: the subject is a one-way
hash of it (HMAC-SHA256 keyed with ``NURTURE_SECRET`` when set, else plain SHA-256). Knowing a
user id, one can find its entries; reading the log, one cannot recover the id. Without a secret
a guessed id can be confirmed by hashing it, so set ``NURTURE_SECRET`` in production. Details
hold counts only.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from .models import UtcDateTime, utcnow

AuditAction = Literal["forget", "export", "merge", "conflict", "reveal", "pause", "resume", "end_run"]

_DOMAIN = b"nurture-audit-subject\x00"
"""Prefixed to the id before keyed hashing, so a subject never equals another use of the secret."""


class AuditRecord(SQLModel, table=True):
    """One privacy or console action on one user (or, for pause and resume, on one journey)."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UtcDateTime(), nullable=False, index=True)
    )
    action: str = Field(max_length=16)
    """``forget``, ``export``, ``merge`` (two persons became one), ``conflict`` (a call named
    another known user's identifier, which stayed theirs); from the console ``reveal``,
    ``end_run``, ``pause`` or ``resume``."""
    subject: str = Field(max_length=64, index=True)
    """:func:`subject_hash` of the user id, never the id itself; ``journey:<id>`` for pause and resume."""
    actor: str = Field(max_length=330)
    """``key:<fingerprint>`` for the event API's keys, ``cli`` for the command line,
    ``console:<email>`` for a console account."""
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """Counts of what was exported or forgotten; no values."""


def subject_hash(user_id: str, secret: str = "") -> str:
    """The audit subject for ``user_id``: 64 hex digits, keyed by ``secret`` when there is one."""
    if secret:
        return hmac.new(secret.encode(), _DOMAIN + user_id.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(user_id.encode()).hexdigest()


def subject_hashes(user_id: str, secret: str = "") -> list[str]:
    """Every subject ``user_id`` may have been logged under: entries written before
    ``NURTURE_SECRET`` was set carry the unkeyed hash."""
    keyed = subject_hash(user_id, secret)
    plain = subject_hash(user_id)
    return [keyed] if keyed == plain else [keyed, plain]
