"""Send rates in the database: every worker paces a journey's sends through one row."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError

from .db import Database
from .models import SendRate


class DbRates:
    """The engine's :class:`~nurture.delivery.deliverer.SendRates` on the ``send_rates`` table.

    One row per rate holds its next free slot. Taking a slot reads and moves it in one write
    transaction (the row locked on PostgreSQL, the database on SQLite), so two workers never take
    the same slot; the first send of a rate inserts the row, guarded by its key.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    async def reserve(self, key: str, now: datetime, spacing: timedelta) -> datetime:
        return await asyncio.to_thread(self._reserve, key, now, spacing)

    def _reserve(self, key: str, now: datetime, spacing: timedelta) -> datetime:
        for _ in range(5):
            try:
                with self.db.write_session() as session:
                    row = session.get(SendRate, key, with_for_update=True)
                    if row is None:
                        session.add(SendRate(key=key, next_free=now + spacing))
                        return now
                    slot = max(now, row.next_free)
                    row.next_free = slot + spacing
                    session.add(row)
                    return slot
            except IntegrityError:  # the first slot of this rate was taken concurrently: read it
                continue
        raise RuntimeError(f"could not take a slot of send rate {key}: too much contention")
