"""Runs in flight and done: listed by journey, version, state and step, and counted per version.

What an operator reads before upgrading a journey (``nurture runs``, ``GET /v1/runs``): which
versions still have active runs, and at which step they wait. Everything comes from the ``runs``
table; nothing asks Temporal. Pages are ordered by entry (then run id) and continue from an
opaque cursor, so a page stays cheap however many runs came before it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, case, func, or_, select
from sqlmodel import col

from nurture.engine.clock import format_instant, parse_instant
from nurture.language.diagnostics import did_you_mean
from nurture.language.migration import waiting_steps
from nurture.storage.db import Database
from nurture.storage.models import JourneyVersion, RunRecord
from nurture.storage.stores import stored_version, stored_versions

State = Literal["active", "ended"]
PAGE_LIMIT = 500
"""The most runs one page holds."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class RunRow(_Model):
    """One run as ``nurture runs`` lists it."""

    run_id: str
    workflow_id: str
    journey: str
    version: str = Field(description="The journey version the run follows now.")
    user_id: str = Field(description="The person's id.")
    key: str
    status: State = Field(description="`active` or `ended`.")
    step: str | None = Field(description="Where an active run waits (a wait, a `wait_for` or a deferred send).")
    entered_at: datetime
    ended_at: datetime | None
    end_reason: str | None


class RunPage(_Model):
    """One page of runs, oldest entry first."""

    runs: list[RunRow]
    next: str | None = Field(description="The cursor of the next page (`after`), `null` on the last page.")


class VersionCount(_Model):
    """The runs of one journey version."""

    version: str
    active: int
    ended: int
    waiting: dict[str, int] = Field(description="Active runs by the step they wait at.")


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


def encode_cursor(row: RunRow) -> str:
    """The cursor that continues after ``row``."""
    text = f"{format_instant(row.entered_at)}\n{row.run_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(entered_at, run_id)`` of a cursor; ``ValueError`` when it is not one."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        entered, run_id = text.split("\n", 1)
        return parse_instant(entered), run_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("not a cursor of this listing (use the `next` value of the previous page)") from exc


class UnknownFilter(ValueError):
    """A journey, version or step no run or stored version has: listing it would show nothing,
    which a typo must not look like. ``field`` names the filter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_filters(db: Database, journey: str, *, version: str | None = None, step: str | None = None) -> None:
    """:class:`UnknownFilter` when no run or stored version has ``journey``, when ``version`` is
    none of its versions, or when ``step`` is no step where a run of a stored version of it (of
    ``version``, when given) can wait. Versions are stored when a worker or the API starts with
    them; a run's own version counts too, for runs older than that store."""
    versions = stored_versions(db, journey)
    if not versions and not _has_runs(db, journey):
        with db.session() as session:  # an error's path: a scan of the runs' journeys is affordable
            known = sorted(
                set(session.execute(select(col(JourneyVersion.journey))).scalars())
                | set(session.execute(select(col(RunRecord.journey)).distinct()).scalars())
            )
        listed = ", ".join(known) or "none"
        raise UnknownFilter(
            "journey",
            f"no run or stored version of a journey {journey}{did_you_mean(journey, known)} (journeys: {listed})",
        )
    if version is not None and version not in versions and not _has_runs(db, journey, version):
        raise UnknownFilter(
            "version",
            f"{journey} has no version {version}{did_you_mean(version, versions)} "
            f"(stored, first deployed first: {', '.join(versions) or 'none'})",
        )
    if step is None or not versions:
        return
    read = [version] if version in versions else versions
    steps = sorted(
        {s.id for v in read if (found := stored_version(db, journey, v)) is not None for s in waiting_steps(found)}
    )
    if step not in steps:
        raise UnknownFilter(
            "step",
            f"no version of {journey} waits at a step {step}{did_you_mean(step, steps)} "
            f"(steps where its runs can wait: {', '.join(steps) or 'none'})",
        )


def _has_runs(db: Database, journey: str, version: str | None = None) -> bool:
    query = select(col(RunRecord.run_id)).where(col(RunRecord.journey) == journey)
    if version is not None:
        query = query.where(col(RunRecord.version) == version)
    with db.session() as session:
        return session.execute(query.limit(1)).first() is not None


def list_runs(
    db: Database,
    journey: str | None = None,
    *,
    version: str | None = None,
    state: State | None = None,
    step: str | None = None,
    limit: int = 100,
    after: str | None = None,
) -> RunPage:
    """A page of runs matching every filter given; ``after`` is a previous page's ``next``."""
    if not 1 <= limit <= PAGE_LIMIT:
        raise ValueError(f"limit must be 1 to {PAGE_LIMIT}")
    query = select(RunRecord)
    if journey is not None:
        query = query.where(col(RunRecord.journey) == journey)
    if version is not None:
        query = query.where(col(RunRecord.version) == version)
    if state is not None:
        query = query.where(col(RunRecord.status) == state)
    if step is not None:
        query = query.where(col(RunRecord.step) == step)
    if after is not None:
        entered, run_id = decode_cursor(after)
        query = query.where(
            or_(
                col(RunRecord.entered_at) > entered,
                and_(col(RunRecord.entered_at) == entered, col(RunRecord.run_id) > run_id),
            )
        )
    query = query.order_by(col(RunRecord.entered_at), col(RunRecord.run_id)).limit(limit + 1)
    with db.session() as session:
        records = list(session.execute(query).scalars())
    rows = [
        RunRow(
            run_id=r.run_id,
            workflow_id=r.workflow_id,
            journey=r.journey,
            version=r.version,
            user_id=r.user_id,
            key=r.key,
            status="active" if r.status == "active" else "ended",
            step=r.step,
            entered_at=_utc(r.entered_at) or r.entered_at,
            ended_at=_utc(r.ended_at),
            end_reason=r.end_reason,
        )
        for r in records[:limit]
    ]
    more = len(records) > limit
    return RunPage(runs=rows, next=encode_cursor(rows[-1]) if more else None)


def version_counts(db: Database, journey: str) -> list[VersionCount]:
    """Active and ended runs of each version of ``journey``, and where the active ones wait."""
    with db.session() as session:
        totals = session.execute(
            select(
                col(RunRecord.version),
                func.count(case((col(RunRecord.status) == "active", 1))),
                func.count(case((col(RunRecord.status) != "active", 1))),
                func.min(col(RunRecord.entered_at)),
            )
            .where(col(RunRecord.journey) == journey)
            .group_by(col(RunRecord.version))
        ).all()
        steps = session.execute(
            select(col(RunRecord.version), col(RunRecord.step), func.count())
            .where(col(RunRecord.journey) == journey, col(RunRecord.status) == "active")
            .group_by(col(RunRecord.version), col(RunRecord.step))
        ).all()
    waiting: dict[str, dict[str, int]] = {}
    for version, step, count in steps:
        waiting.setdefault(version, {})[step or "(starting)"] = count
    ordered = sorted(totals, key=lambda row: (_utc(row[3]) or datetime.min.replace(tzinfo=UTC), row[0]))
    return [
        VersionCount(version=v, active=a, ended=e, waiting=dict(sorted(waiting.get(v, {}).items())))
        for v, a, e, _ in ordered
    ]


def active_runs(db: Database, journey: str, version: str) -> Sequence[RunRow]:
    """Every active run of ``journey`` at ``version``, oldest first (for a migration plan)."""
    found: list[RunRow] = []
    after = None
    while True:
        page = list_runs(db, journey, version=version, state="active", limit=PAGE_LIMIT, after=after)
        found.extend(page.runs)
        if page.next is None:
            return found
        after = page.next
