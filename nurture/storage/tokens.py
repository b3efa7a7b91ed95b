"""Provider access tokens in the ``provider_tokens`` table, shared by every worker.

:class:`DbTokens` is the database ``TokenStore`` of :mod:`channels.wechat`: a token one worker
fetched is reused by all the others until it nears expiry, instead of each worker spending the
provider's daily token quota. Calls are synchronous SQLAlchemy run in a thread, so the event loop
never blocks on the database.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from sqlalchemy import delete
from sqlmodel import col

from .db import Database, upsert
from .models import ProviderToken, utcnow

__all__ = ["DbTokens"]


class DbTokens:
    """A token store on the ``provider_tokens`` table (``channels.wechat.TokenStore``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, name: str) -> tuple[str, datetime] | None:
        """The stored token and when it expires (UTC), or ``None``."""
        return await asyncio.to_thread(self._get, name)

    async def put(self, name: str, token: str, expires_at: datetime) -> None:
        """Insert or replace the token stored under ``name``."""
        await asyncio.to_thread(self._put, name, token, expires_at)

    async def discard(self, name: str, token: str) -> None:
        """Delete ``name`` only if it still holds ``token``: a newer token another worker stored
        after ``token`` was refused stays."""
        await asyncio.to_thread(self._discard, name, token)

    def _get(self, name: str) -> tuple[str, datetime] | None:
        with self.db.session() as session:
            row = session.get(ProviderToken, name)
            if row is None:
                return None
            return row.token, row.expires_at

    def _put(self, name: str, token: str, expires_at: datetime) -> None:
        # SQLite keeps no time zone, so every instant is written as UTC and read back as UTC.
        values = {"name": name, "token": token, "expires_at": expires_at, "updated_at": utcnow()}
        with self.db.session() as session:
            insert = upsert(session)
            if insert is None:  # other engines: a merge; the primary key keeps one row per name
                session.merge(ProviderToken.model_validate(values))
                return
            statement = insert(ProviderToken).values(**values)
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=["name"],
                    set_={key: statement.excluded[key] for key in ("token", "expires_at", "updated_at")},
                )
            )

    def _discard(self, name: str, token: str) -> None:
        with self.db.session() as session:
            session.execute(
                delete(ProviderToken)
                .where(col(ProviderToken.name) == name)
                .where(col(ProviderToken.token) == token)
            )

