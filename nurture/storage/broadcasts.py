"""Broadcasts in the database: occurrences with their cursor and lease, the audience read in
pages, and the progress of an occurrence counted from ``runs`` and ``messages``.

Every change to an occurrence that only its driver may make is a conditional ``UPDATE`` on the
lease owner, so of two processes that both believe they drive one occurrence, only the holder's
writes land (on SQLite and PostgreSQL alike).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlmodel import col

from .db import Database, upsert
from .models import AudienceMember, BroadcastOccurrence, MessageRecord, RunRecord, StepReach, utcnow
from .stores import activate_routes as activate_many


class Occurrences:
    """The ``broadcast_occurrences`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def open(
        self, broadcast: str, occurrence: str, *, audience: str, journey: Mapping[str, Any], version: str
    ) -> BroadcastOccurrence:
        """The occurrence's row, created (with the audience's size now) when it is the first start."""
        with self.db.session() as session:
            row = session.get(BroadcastOccurrence, (broadcast, occurrence))
            if row is not None:
                return row
        selected = count_members(self.db, audience)
        values: dict[str, Any] = {
            "broadcast": broadcast,
            "occurrence": occurrence,
            "audience": audience,
            "version": version,
            "journey": dict(journey),
            "status": "running",
            "selected": selected,
            "started": 0,
            "existing": 0,
            "created_at": utcnow(),
            "updated_at": utcnow(),
        }
        with self.db.session() as session:
            insert = upsert(session)
            if insert is not None:
                session.execute(insert(BroadcastOccurrence).values(**values).on_conflict_do_nothing())
            elif session.get(BroadcastOccurrence, (broadcast, occurrence)) is None:
                session.add(BroadcastOccurrence(**values))
        found = self.get(broadcast, occurrence)
        assert found is not None
        return found

    def get(self, broadcast: str, occurrence: str) -> BroadcastOccurrence | None:
        with self.db.session() as session:
            return session.get(BroadcastOccurrence, (broadcast, occurrence))

    def latest(self, broadcast: str) -> BroadcastOccurrence | None:
        """The occurrence started last."""
        with self.db.session() as session:
            return session.execute(
                select(BroadcastOccurrence)
                .where(col(BroadcastOccurrence.broadcast) == broadcast)
                .order_by(col(BroadcastOccurrence.created_at).desc())
                .limit(1)
            ).scalar()

    def _where(self, broadcast: str, occurrence: str) -> Any:
        return (col(BroadcastOccurrence.broadcast) == broadcast) & (col(BroadcastOccurrence.occurrence) == occurrence)

    def acquire(self, broadcast: str, occurrence: str, owner: str, lease: timedelta) -> bool:
        """Take (or keep) the lease of a running occurrence: free, expired or already ``owner``'s."""
        return self._lease(
            broadcast,
            occurrence,
            owner,
            lease,
            lambda now: or_(
                col(BroadcastOccurrence.lease_owner).is_(None),
                col(BroadcastOccurrence.lease_owner) == owner,
                col(BroadcastOccurrence.lease_until) < now,
            ),
        )

    def renew(self, broadcast: str, occurrence: str, owner: str, lease: timedelta) -> bool:
        """Extend ``owner``'s lease; ``False`` when it lost it or the occurrence is no longer running."""
        return self._lease(broadcast, occurrence, owner, lease, lambda now: col(BroadcastOccurrence.lease_owner) == owner)

    def _lease(
        self, broadcast: str, occurrence: str, owner: str, lease: timedelta, free: Callable[[datetime], Any]
    ) -> bool:
        """Give ``owner`` the lease of a running occurrence for ``lease`` where ``free(now)`` holds."""
        now = utcnow()
        with self.db.session() as session:
            result = session.execute(
                update(BroadcastOccurrence)
                .where(self._where(broadcast, occurrence))
                .where(col(BroadcastOccurrence.status) == "running")
                .where(free(now))
                .values(lease_owner=owner, lease_until=now + lease, updated_at=now)
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def advance(
        self, broadcast: str, occurrence: str, owner: str, cursor: str | None, started: int, existing: int
    ) -> bool:
        """A page is started: move the cursor past it (``None``: keep it) and add its counts; only
        for the lease holder."""
        with self.db.session() as session:
            result = session.execute(
                update(BroadcastOccurrence)
                .where(self._where(broadcast, occurrence))
                .where(col(BroadcastOccurrence.lease_owner) == owner)
                .values(
                    cursor=col(BroadcastOccurrence.cursor) if cursor is None else cursor,
                    started=col(BroadcastOccurrence.started) + started,
                    existing=col(BroadcastOccurrence.existing) + existing,
                    updated_at=utcnow(),
                )
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def finish(self, broadcast: str, occurrence: str, owner: str) -> bool:
        """Every member was started: ``done``, lease released."""
        now = utcnow()
        with self.db.session() as session:
            result = session.execute(
                update(BroadcastOccurrence)
                .where(self._where(broadcast, occurrence))
                .where(col(BroadcastOccurrence.lease_owner) == owner)
                .where(col(BroadcastOccurrence.status) == "running")
                .values(status="done", finished_at=now, lease_owner=None, lease_until=None, updated_at=now)
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def release(self, broadcast: str, occurrence: str, owner: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(BroadcastOccurrence)
                .where(self._where(broadcast, occurrence))
                .where(col(BroadcastOccurrence.lease_owner) == owner)
                .values(lease_owner=None, lease_until=None, updated_at=utcnow())
            )

    def cancel(self, broadcast: str, occurrence: str) -> bool:
        """Mark a running or done occurrence ``cancelled``: a driver stops at its next lease
        renewal, and no start of it does anything again."""
        now = utcnow()
        with self.db.session() as session:
            result = session.execute(
                update(BroadcastOccurrence)
                .where(self._where(broadcast, occurrence))
                .where(col(BroadcastOccurrence.status).in_(("running", "done")))
                .values(
                    status="cancelled",
                    finished_at=func.coalesce(col(BroadcastOccurrence.finished_at), now),
                    updated_at=now,
                )
            )
            return bool(getattr(result, "rowcount", 0) == 1)

    def held(self, broadcast: str, occurrence: str) -> bool:
        """Whether a live lease is held (a driver may still be starting runs)."""
        row = self.get(broadcast, occurrence)
        return row is not None and row.lease_owner is not None and (row.lease_until or utcnow()) > utcnow()


def count_members(db: Database, audience: str) -> int:
    with db.session() as session:
        return int(
            session.execute(
                select(func.count()).select_from(AudienceMember).where(col(AudienceMember.audience) == audience)
            ).scalar()
            or 0
        )


def members_after(db: Database, audience: str, after: str | None, limit: int) -> list[str]:
    """The next ``limit`` members of ``audience`` in person order after ``after`` (keyset paging:
    each page is one index range scan, however far into the audience it is)."""
    query = select(col(AudienceMember.person)).where(col(AudienceMember.audience) == audience)
    if after is not None:
        query = query.where(col(AudienceMember.person) > after)
    with db.session() as session:
        return list(session.execute(query.order_by(col(AudienceMember.person)).limit(limit)).scalars())


def activate_routes(db: Database, rows: Sequence[tuple[str, str]], *, journey: str, key: str, listens: Sequence[str]) -> None:
    """Routes for a page of started runs, ``(workflow id, person)`` each
    (:func:`~nurture.storage.stores.activate_routes`): the person's events reach their run (goal,
    ``exit_on``, ``wait_for``)."""
    with db.session() as session:
        activate_many(
            session,
            [{"workflow_id": wid, "user_id": person, "journey": journey, "key": key, "listens": listens} for wid, person in rows],
        )


def active_run_ids(db: Database, journey: str, key: str, after: str | None, limit: int) -> list[str]:
    """Workflow ids of the occurrence's active runs, a page at a time."""
    query = (
        select(col(RunRecord.workflow_id))
        .where(col(RunRecord.journey) == journey)
        .where(col(RunRecord.key) == key)
        .where(col(RunRecord.status) == "active")
    )
    if after is not None:
        query = query.where(col(RunRecord.workflow_id) > after)
    with db.session() as session:
        return list(session.execute(query.order_by(col(RunRecord.workflow_id)).limit(limit)).scalars())


@dataclass
class Progress:
    """An occurrence's progress, for ``nurture broadcast status`` and ``GET /v1/broadcasts/{id}``."""

    broadcast: str
    occurrence: str
    status: str
    selected: int
    started: int
    """Runs started (by this occurrence's drivers, over every restart)."""
    runs: int
    """Runs recorded in ``runs`` (a run records itself as it begins)."""
    active: int
    ended: dict[str, int] = field(default_factory=dict)
    """Ended runs by end reason."""
    sent: int = 0
    sending: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Messages skipped, by reason (``frequency_cap``, ``opted_out``, ``holdout``, ...)."""
    failed: dict[str, int] = field(default_factory=dict)
    deferred: dict[str, int] = field(default_factory=dict)
    """Sends held back at least once, by latest reason (``quiet_hours``, ``frequency_cap``, ``rate_limit``)."""
    driving: bool = False
    """A driver holds the lease now."""
    created_at: datetime | None = None
    finished_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for name in ("created_at", "finished_at"):
            value = data[name]
            data[name] = None if value is None else value.isoformat()
        return data


def progress(db: Database, row: BroadcastOccurrence, journey: str) -> Progress:
    """Count an occurrence's runs and messages (grouped queries over the occurrence's runs)."""
    runs = select(col(RunRecord.run_id)).where(col(RunRecord.journey) == journey).where(col(RunRecord.key) == row.occurrence)
    with db.session() as session:
        by_state: Counter[tuple[str, str | None]] = Counter()
        for status, reason, count in session.execute(
            select(col(RunRecord.status), col(RunRecord.end_reason), func.count())
            .where(col(RunRecord.journey) == journey)
            .where(col(RunRecord.key) == row.occurrence)
            .group_by(col(RunRecord.status), col(RunRecord.end_reason))
        ):
            by_state[(status, reason)] += int(count)
        outcomes: Counter[tuple[str, str | None]] = Counter()
        for status, reason, count in session.execute(
            select(col(MessageRecord.status), col(MessageRecord.reason), func.count())
            .where(col(MessageRecord.journey) == journey)
            .where(col(MessageRecord.run_id).in_(runs))
            .group_by(col(MessageRecord.status), col(MessageRecord.reason))
        ):
            outcomes[(status, reason)] += int(count)
        deferred: Counter[str] = Counter()
        for reason, count in session.execute(
            select(col(StepReach.deferral_reason), func.count())
            .where(col(StepReach.journey) == journey)
            .where(col(StepReach.run_id).in_(runs))
            .where(col(StepReach.deferrals) > 0)
            .group_by(col(StepReach.deferral_reason))
        ):
            deferred[reason or "deferred"] += int(count)
    now = utcnow()
    return Progress(
        broadcast=row.broadcast,
        occurrence=row.occurrence,
        status=row.status,
        selected=row.selected,
        started=row.started,
        runs=sum(by_state.values()),
        active=sum(n for (status, _), n in by_state.items() if status == "active"),
        ended={reason or "completed": n for (status, reason), n in sorted(by_state.items(), key=str) if status == "ended"},
        sent=sum(n for (s, _), n in outcomes.items() if s == "sent"),
        sending=sum(n for (s, _), n in outcomes.items() if s == "sending"),
        skipped={r or "skipped": n for (s, r), n in sorted(outcomes.items(), key=str) if s == "skipped"},
        failed={r or "failed": n for (s, r), n in sorted(outcomes.items(), key=str) if s == "failed"},
        deferred=dict(sorted(deferred.items())),
        driving=row.lease_owner is not None and row.lease_until is not None and row.lease_until > now,
        created_at=row.created_at,
        finished_at=row.finished_at,
    )
