"""Console accounts, sessions, CSRF tokens, throttled sign-in and one-time sign-in links.

A password is kept as an argon2id hash (argon2-cffi's defaults). A session is a random token in
an HttpOnly, SameSite=Strict cookie (Secure when the public URL is https); the database keeps only
its SHA-256, with the session's CSRF token, which every form sends back. Failed sign-ins are
counted per account and per client address: past :data:`MAX_FAILURES` for the account (or
:data:`MAX_CLIENT_FAILURES` from the address) in :data:`THROTTLE_WINDOW`, sign-in is refused
until the window passes. A sign-in link carries a random token, kept as its
SHA-256, that works once and expires.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlmodel import col, delete, select

from nurture.storage.console import (
    ROLES,
    ConsoleSession,
    ConsoleUser,
    SignInLink,
    count_attempts,
    record_attempt,
)
from nurture.storage.db import Database
from nurture.storage.models import utcnow

Role = Literal["viewer", "operator", "admin"]
SESSION_LIFETIME = timedelta(hours=12)
LINK_LIFETIME = timedelta(minutes=30)
THROTTLE_WINDOW = timedelta(minutes=15)
MAX_FAILURES = 5
"""Failed sign-ins allowed per account within :data:`THROTTLE_WINDOW`."""
MAX_CLIENT_FAILURES = 20
"""Failed sign-ins allowed per client address within :data:`THROTTLE_WINDOW`: more than per
account, since colleagues behind one proxy or office address share it."""
MIN_PASSWORD = 10

_hasher = PasswordHasher()
# Verifying against this keeps an unknown account as slow as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A refused account change; the message says why."""


class Throttled(Exception):
    """Too many failed sign-ins: try again after :data:`THROTTLE_WINDOW`."""


@dataclass(frozen=True)
class Account:
    """Who is signed in, and what the session's forms must carry."""

    email: str
    role: Role
    csrf: str

    def may(self, needed: Role) -> bool:
        """Whether the account's role is ``needed`` or above."""
        return ROLES.index(self.role) >= ROLES.index(needed)

    @property
    def actor(self) -> str:
        """The audit log's actor for this account."""
        return f"console:{self.email}"


def normal_email(email: str) -> str:
    text = email.strip().lower()
    local, at, domain = text.partition("@")
    if not at or not local or not domain or any(c.isspace() for c in text) or len(text) > 320:
        raise AccountError(f"{email!r} is not an email address")
    return text


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(db: Database, email: str, role: str, password: str | None) -> ConsoleUser:
    """Create an account or change its role (and password, when given)."""
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if password is not None and len(password) < MIN_PASSWORD:
        raise AccountError(f"the password needs at least {MIN_PASSWORD} characters")
    address = normal_email(email)
    with db.write_session() as session:
        user = session.get(ConsoleUser, address) or ConsoleUser(email=address, role=role)
        user.role = role
        if password is not None:
            user.password_hash = _hasher.hash(password)
        session.add(user)
    return user


def has_users(db: Database) -> bool:
    with db.session() as session:
        return session.exec(select(ConsoleUser.email).limit(1)).first() is not None


def has_password(db: Database, email: str) -> bool:
    with db.session() as session:
        user = session.get(ConsoleUser, email)
        return user is not None and user.password_hash is not None


def set_password(db: Database, email: str, password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password needs at least {MIN_PASSWORD} characters")
    with db.write_session() as session:
        user = session.get(ConsoleUser, email)
        if user is None:
            raise AccountError("no such account")
        user.password_hash = _hasher.hash(password)
        session.add(user)


def _throttle_keys(email: str, client: str) -> list[str]:
    return [f"email:{email.strip().lower()}"[:330], f"ip:{client}"[:330]]


def _throttled(db: Database, keys: list[str], since: datetime) -> bool:
    account, address = keys
    return (
        count_attempts(db, [account], since) >= MAX_FAILURES
        or count_attempts(db, [address], since) >= MAX_CLIENT_FAILURES
    )


def check_password(db: Database, email: str, password: str, client: str) -> str | None:
    """The account's email when ``password`` is right, else ``None`` (the failure is counted);
    :class:`Throttled` while the account or the client address has too many recent failures."""
    now = utcnow()
    keys = _throttle_keys(email, client)
    if _throttled(db, keys, now - THROTTLE_WINDOW):
        raise Throttled
    try:
        address = normal_email(email)
    except AccountError:
        address = ""
    with db.session() as session:
        user = session.get(ConsoleUser, address) if address else None
    try:
        _hasher.verify(user.password_hash if user and user.password_hash else _DUMMY_HASH, password)
        ok = user is not None and user.password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        ok = False
    if not ok:
        record_attempt(db, keys, now - THROTTLE_WINDOW)
        return None
    assert user is not None
    if user.password_hash and _hasher.check_needs_rehash(user.password_hash):
        set_password(db, user.email, password)
    return user.email


def start_session(db: Database, email: str) -> str:
    """A new session for ``email``: the cookie's token."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with db.session() as session:
        session.execute(delete(ConsoleSession).where(col(ConsoleSession.expires_at) < now))
        session.add(
            ConsoleSession(
                token_hash=digest(token), email=email, csrf=secrets.token_urlsafe(32), expires_at=now + SESSION_LIFETIME
            )
        )
    return token


def session_account(db: Database, token: str | None) -> Account | None:
    """The account a session cookie belongs to, while the session and the account last."""
    if not token:
        return None
    with db.session() as session:
        row = session.get(ConsoleSession, digest(token))
        if row is None or row.expires_at <= utcnow():
            return None
        user = session.get(ConsoleUser, row.email)
        if user is None or user.role not in ROLES:
            return None
        role: Role = user.role  # type: ignore[assignment]
        return Account(email=user.email, role=role, csrf=row.csrf)


def end_session(db: Database, token: str | None) -> None:
    if token:
        with db.session() as session:
            session.execute(delete(ConsoleSession).where(col(ConsoleSession.token_hash) == digest(token)))


def csrf_ok(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


def make_link(db: Database, email: str, *, lifetime: timedelta = LINK_LIFETIME) -> str:
    """A one-time sign-in token for an existing account."""
    address = normal_email(email)
    token = secrets.token_urlsafe(32)
    with db.session() as session:
        if session.get(ConsoleUser, address) is None:
            raise AccountError(f"no console account {address} (nurture console add-user {address})")
        session.execute(delete(SignInLink).where(col(SignInLink.expires_at) < utcnow()))
        session.add(SignInLink(token_hash=digest(token), email=address, expires_at=utcnow() + lifetime))
    return token


def use_link(db: Database, token: str) -> str | None:
    """The account a sign-in token opens, once: ``None`` when unknown, used or expired."""
    with db.write_session() as session:
        link = session.get(SignInLink, digest(token))
        now = utcnow()
        if link is None or link.used_at is not None or link.expires_at <= now:
            return None
        link.used_at = now
        session.add(link)
        return link.email


FIRST_ADMIN = "admin@localhost"
"""The account ``nurture up`` creates when the console has none (``NURTURE_CONSOLE_ADMIN`` overrides)."""


def first_admin_link(db: Database, email: str = FIRST_ADMIN) -> tuple[str, str] | None:
    """For ``nurture up``: create ``email`` as an admin when the console has no account yet, and
    a one-time sign-in token for it; ``None`` when other accounts exist and ``email`` is not one."""
    address = normal_email(email)
    if not has_users(db):
        add_user(db, address, "admin", None)
    with db.session() as session:
        user = session.get(ConsoleUser, address)
    if user is None or user.role != "admin":
        return None
    return address, make_link(db, address)
