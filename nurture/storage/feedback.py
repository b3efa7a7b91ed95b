"""What the provider webhooks write: opt-outs by address, provider events, delivery status.

An opt-out is a name in the profile's one ``opted_out`` set: a channel (``email``, ``sms``,
``wechat``) or a subscription topic (``promotions``).

Every provider event is stored once: ``message_events.provider_event_id`` is unique, so a webhook
the provider delivers again (they retry until they get a 2xx) is recognised and changes nothing.
A signed request whose signature does not cover its body (WeChat's plaintext mode) takes its nonce
in ``used_nonces``, so the signature cannot be used again with another body.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from .db import Database
from .models import MessageEvent, MessageRecord, ProfileRecord, UsedNonce, feedback_bit, utcnow
from .stores import DbProfiles

STATUS_RANK: dict[str, int] = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 0,
    "processed": 1,
    "sending": 1,
    "deferred": 2,
    "sent": 2,
    "delivered": 3,
    "undelivered": 3,
    "failed": 3,
    "canceled": 3,
    "bounce": 3,
    "dropped": 3,
    "read": 4,
    "open": 4,
    "click": 5,
    "unsubscribe": 6,
    "group_unsubscribe": 6,
    "spamreport": 6,
}
"""How far along each delivery status is. Providers send callbacks out of order (an ``open`` can
arrive before its ``delivered``), so a status never replaces one further along."""


@dataclass(frozen=True)
class Recorded:
    """The outcome of :func:`record_event`."""

    new: bool
    """False when the provider event was recorded before: nothing changed."""
    message_id: int | None = None
    """The ``messages`` row the event belongs to, when one was found."""
    user_id: str | None = None
    """The event's user: as given, else the message's."""


def user_ids_by_phone(db: Database, phone: str) -> list[str]:
    """Every profile with exactly this phone number (one number may be on several profiles)."""
    return _user_ids(db, col(ProfileRecord.phone) == phone) if phone else []


def user_ids_by_email(db: Database, email: str) -> list[str]:
    """Every profile with exactly this email address."""
    return _user_ids(db, col(ProfileRecord.email) == email) if email else []


def user_ids_by_openid(db: Database, openid: str) -> list[str]:
    """Every profile with exactly this WeChat openid (the ``wechat_openid`` trait)."""
    return _user_ids(db, col(ProfileRecord.wechat_openid) == openid) if openid else []


def _user_ids(db: Database, condition: Any) -> list[str]:
    with db.session() as session:
        rows = session.execute(
            select(col(ProfileRecord.user_id)).where(condition).order_by(col(ProfileRecord.user_id))
        )
        return [user_id for (user_id,) in rows]


def set_opt_out(db: Database, user_ids: Iterable[str], name: str, opted_out: bool) -> list[str]:
    """Opt each user out of ``name``, a channel or a topic (or back in); the users changed, in order.

    Only that name changes: each profile's other opt-outs are kept.
    """
    profiles = DbProfiles(db)
    done = []
    for user_id in user_ids:
        profiles.set_opt_out(user_id, name, opted_out)
        done.append(user_id)
    return done


def find_message(
    session: Session,
    *,
    idempotency_key: str | None = None,
    provider_id: str | None = None,
    lock: bool = False,
) -> MessageRecord | None:
    """The message with this idempotency key, else the one with this provider id.

    ``lock`` holds the row until the session ends (PostgreSQL), so concurrent callbacks for one
    message update its status one after the other.
    """
    for condition in (
        col(MessageRecord.idempotency_key) == idempotency_key if idempotency_key else None,
        col(MessageRecord.provider_id) == provider_id if provider_id else None,
    ):
        if condition is None:
            continue
        query = select(MessageRecord).where(condition).order_by(col(MessageRecord.id)).limit(1)
        row: MessageRecord | None = session.execute(
            query.with_for_update() if lock else query
        ).scalar_one_or_none()
        if row is not None:
            return row
    return None


def update_delivery_status(row: MessageRecord, status: str) -> bool:
    """Set ``row``'s delivery status unless it already records a later stage; whether it changed."""
    current = STATUS_RANK.get(row.delivery_status or "", -1)
    if STATUS_RANK.get(status, -1) < current:
        return False
    row.delivery_status = status
    row.updated_at = utcnow()
    return True


def record_event(
    db: Database,
    *,
    provider: str,
    event: str,
    at: datetime,
    provider_event_id: str | None = None,
    idempotency_key: str | None = None,
    provider_id: str | None = None,
    user_id: str | None = None,
    data: Mapping[str, Any] | None = None,
    status: str | None = None,
) -> Recorded:
    """Store one provider event and, given a ``status``, move its message's ``delivery_status``.

    Both happen in one transaction, once per ``provider_event_id``: a repeat answers
    ``Recorded(new=False)`` and changes nothing. The message is found by idempotency key, else by
    provider id; the event is stored even when no message matches (sent by another system, or
    the row is gone).
    """
    try:
        with db.session() as session:
            row = find_message(session, idempotency_key=idempotency_key, provider_id=provider_id, lock=True)
            if row is not None:
                idempotency_key = idempotency_key or row.idempotency_key
                provider_id = provider_id or row.provider_id
                user_id = user_id or row.user_id or None
                if status is not None:
                    update_delivery_status(row, status)
                row.feedback |= feedback_bit(event)
            session.add(
                MessageEvent(
                    provider=provider,
                    event=event,
                    provider_event_id=provider_event_id,
                    idempotency_key=idempotency_key,
                    provider_id=provider_id,
                    user_id=user_id,
                    at=at,
                    data=dict(data or {}),
                )
            )
            session.flush()  # the unique provider_event_id decides here, before the update commits
            return Recorded(new=True, message_id=None if row is None else row.id, user_id=user_id)
    except IntegrityError:
        if provider_event_id is None or not _seen(db, provider_event_id):
            raise
        return Recorded(new=False)


def _seen(db: Database, provider_event_id: str) -> bool:
    with db.session() as session:
        found = session.execute(
            select(col(MessageEvent.id)).where(col(MessageEvent.provider_event_id) == provider_event_id)
        ).first()
        return found is not None


def forget_event(db: Database, provider_event_id: str) -> None:
    """Drop a recorded event whose effect could not be applied, so the provider's retry is."""
    with db.session() as session:
        session.execute(delete(MessageEvent).where(col(MessageEvent.provider_event_id) == provider_event_id))


def use_nonce(db: Database, key: str, digest: str, expires_at: datetime) -> bool:
    """Take a signed request's ``key`` (its timestamp and nonce) for the body with SHA-256
    ``digest`` until ``expires_at``; False when the key was taken with another body (a replay).

    The same body again is the provider's own retry and is let through: what it records is
    de-duplicated by the event. Expired keys are pruned here, in the same transaction.
    """
    try:
        with db.session() as session:
            session.execute(delete(UsedNonce).where(col(UsedNonce.expires_at) < utcnow()))
            session.add(UsedNonce(key=key, digest=digest, expires_at=expires_at))
            session.flush()  # the primary key decides here, across every API process
            return True
    except IntegrityError:
        with db.session() as session:
            used = session.get(UsedNonce, key)
        return used is not None and hmac.compare_digest(used.digest, digest)
