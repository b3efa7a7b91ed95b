"""Audience membership in the database: kept current as calls arrive, as time passes, and
evaluated from scratch when an audience (or a new version of one) is deployed.

The rules are :mod:`nurture.engine.audience`'s; this module only feeds them stored data and
writes what they decide:

- ``audience_members``: who is in each audience now; ``audience_history``: every entry and exit.
- ``audience_state``: per (audience, person), the tallies and the next moment membership changes
  with no new input (``changes_at``). It is a cache: a person with no row (or a row of another
  audience version) has their tallies counted again from their stored events, with one indexed
  query. So the evaluation from scratch writes rows only for people whose membership will change
  with time, and the time sweep finds them by ``changes_at``.
- ``audience_pending``: people whose traits or opt-outs changed outside the event API (a
  provider's unsubscribe, a journey's profile update); the sweep brings them up to date.

Each entry and exit also stores a track event for the person, ``Audience Entered`` or ``Audience
Exited`` with ``properties.audience``, in the same transaction: routed like any event, it starts
the journeys triggered by it. Those events never count towards an audience themselves.

Concurrency: every change to one person's memberships happens while their ``profiles`` row is
locked (``SELECT ... FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE``), the lock every call of the event
API takes (:mod:`nurture.storage.identities`). The evaluation from scratch reads the events in one
set-based pass, then writes a few thousand people at a time under their locks; a person who got an
event or changed after the pass began is counted again there, under the lock.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    ARRAY,
    Text,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    null,
    type_coerce,
    union_all,
)
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from nurture.engine.audience import Standing, Tally, empty_tallies, evaluate, event_matches, note
from nurture.engine.clock import format_instant
from nurture.engine.model import Event, Profile
from nurture.language.audiences import ENTERED, EXITED, Activity, Audience, audience_to_dict

from .db import Database, upsert, upsert_statement
from .identities import canonical, with_group
from .models import (
    AudienceChange,
    AudienceMember,
    AudiencePending,
    AudienceState,
    AudienceVersion,
    EventRecord,
    GroupRecord,
    ProfileRecord,
    UtcDateTime,
    core_table,
    utcnow,
)

AUDIENCE_EVENTS = frozenset({ENTERED, EXITED})
"""The events membership changes produce: they count towards no audience (no loops)."""
CHUNK = 2000
"""People written per transaction by the evaluation from scratch and the sweep."""


@dataclass(frozen=True, slots=True)
class Change:
    """One entry or exit, with the track event stored for it."""

    audience: str
    person: str
    entered: bool
    event: Event


@dataclass
class Evaluated:
    """What an evaluation from scratch did."""

    audience: str
    version: str
    members: int = 0
    changes: list[Change] = field(default_factory=list)
    recounted: int = 0
    """People counted again under their lock: they changed while the events were read."""


_VERSIONS: dict[int, tuple[Audience, str]] = {}


def _version(audience: Audience) -> str:
    """``audience.version`` (a hash of its JSON form), computed once per audience object."""
    found = _VERSIONS.get(id(audience))
    if found is None or found[0] is not audience:
        found = _VERSIONS[id(audience)] = (audience, audience.version)
    return found[1]


def _among(session: Session, column: Any, values: Sequence[str]) -> Any:
    """``column IN values`` with the values as one parameter (an array on PostgreSQL, JSON on
    SQLite), so a long list costs no statement rendering."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam("among", list(values), type_=ARRAY(Text())))
    if session.get_bind().dialect.name == "sqlite":
        listed: Any = sa_select(literal_column("value")).select_from(func.json_each(bindparam("among", json.dumps(list(values)))))
        return column.in_(listed)
    return column.in_(values)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _dump(tallies: Sequence[Tally]) -> list[list[str]]:
    return [[format_instant(t) for t in tally] for tally in tallies]


def _load(stored: Sequence[Sequence[str]]) -> tuple[Tally, ...]:
    return tuple(tuple(_instant(t) for t in tally) for tally in stored)


@lru_cache(maxsize=1 << 16)
def _instant(stored: str) -> datetime:
    """One stored tally time, parsed once: the same times come back with every event."""
    return _aware(datetime.fromisoformat(stored.replace("Z", "+00:00")))


def _counted_at() -> Any:
    """An event's time for a tally: its own, or when it arrived if that is earlier (no future)."""
    columns = core_table(EventRecord).c
    ts, received = columns.timestamp, columns.received_at
    return type_coerce(case((ts < received, ts), else_=received), UtcDateTime())


class AudienceStore:
    """The project's audiences kept in the database. ``routable``: event names some journey
    listens for; an audience event of another name is stored as routed (nothing to route)."""

    def __init__(
        self, db: Database, audiences: Mapping[str, Audience], *, routable: Iterable[str] = ()
    ) -> None:
        self.db = db
        self.audiences = dict(audiences)
        self.routable = frozenset(routable)
        self._by_event: dict[str, list[tuple[Audience, int]]] = {}
        for audience in self.audiences.values():
            for index, clause in enumerate(audience.clauses):
                if clause.event not in AUDIENCE_EVENTS:
                    self._by_event.setdefault(clause.event, []).append((audience, index))
        self._by_traits = [a for a in self.audiences.values() if a.reads_traits]
        self._by_opt_outs = [a for a in self.audiences.values() if a.subscribed]
        self.events = frozenset(self._by_event)
        """Event names whose arrival can change some membership."""

    # Upkeep, one person at a time, in the caller's transaction ---------------------------------

    def upkeep(
        self,
        session: Session,
        profile: Profile,
        *,
        event: Event | None = None,
        traits: bool = False,
        opt_outs: bool = False,
        now: datetime | None = None,
    ) -> list[Change]:
        """Bring the person's memberships up to date after a call, in its transaction (their
        profile row locked, the call's event stored): a track ``event``, changed ``traits``,
        changed ``opt_outs``. An event no audience counts costs one dictionary look-up."""
        noted: dict[str, set[int]] = {}
        if event is not None and event.name in self._by_event:
            scope = {"user": dict(profile.traits), "event": event.scope()}
            for audience, index in self._by_event[event.name]:
                if event_matches(audience.clauses[index], event.name, scope):
                    noted.setdefault(audience.id, set()).add(index)
        touched = {a: set[int]() for a in noted}
        recount: set[str] = set()
        if traits:
            for audience in self._by_traits:
                touched.setdefault(audience.id, set())
                if any(c.cond is not None and c.cond.reads_user for c in audience.clauses):
                    recount.add(audience.id)  # which events counted depends on the traits
        if opt_outs:
            for audience in self._by_opt_outs:
                touched.setdefault(audience.id, set())
        if not touched:
            return []
        now = now or utcnow()
        at = now if event is None else min(_aware(event.timestamp), now)
        return self._upkeep(session, profile, [self.audiences[a] for a in sorted(touched)], noted, recount, at, now)

    def _upkeep(
        self,
        session: Session,
        profile: Profile,
        audiences: Sequence[Audience],
        noted: Mapping[str, set[int]],
        recount: set[str],
        at: datetime,
        now: datetime,
    ) -> list[Change]:
        person = profile.user_id
        states: dict[str, tuple[Any, str, datetime | None]] = {}
        members: set[str] = set()
        ids = {a.id for a in audiences}
        read = session.connection().execute(_STANDING, {"person": person})
        for audience_id, member, stored, version, changes_at in read:
            if audience_id not in ids:
                continue
            if member:
                members.add(audience_id)
            else:
                states[audience_id] = (stored, version, changes_at)
        counted: dict[str, tuple[Tally, ...]] | None = None
        writes = _Writes(self.routable, now)
        for audience in audiences:
            state = states.get(audience.id)
            if not audience.clauses:
                tallies: tuple[Tally, ...] = ()
            elif state is not None and state[1] == _version(audience) and audience.id not in recount:
                tallies = _load(state[0])
                for index in noted.get(audience.id, ()):
                    tallies = _noted(audience.clauses[index], tallies, index, at, now)
            else:  # not cached: count the stored events (the call's own is among them)
                if counted is None:
                    counted = self._count(session, profile, audiences)
                tallies = counted[audience.id]
            standing = evaluate(audience, profile.traits, profile.opted_out, tallies, now)
            writes.state(audience, person, tallies, standing, state)
            writes.settle(audience.id, person, standing.member, audience.id in members)
        return writes.flush(session)

    def _count(self, session: Session, profile: Profile, audiences: Sequence[Audience]) -> dict[str, tuple[Tally, ...]]:
        """The tallies of ``audiences`` for one person, counted from their stored events."""
        names = sorted({c.event for a in audiences for c in a.clauses} - AUDIENCE_EVENTS)
        tallies = {a.id: list(empty_tallies(a)) for a in audiences}
        if not names:
            return {a: tuple(t) for a, t in tallies.items()}
        rows = session.connection().execute(_PERSON_EVENTS, {"person": profile.user_id, "names": names}).all()
        user = dict(profile.traits)
        counting = [
            (audience.id, index, clause)
            for audience in audiences
            for index, clause in enumerate(audience.clauses)
            if clause.event not in AUDIENCE_EVENTS
        ]
        for name, at, properties, timestamp in rows:
            scope: Mapping[str, Any] = {}  # built only for a clause with a condition
            for audience_id, index, clause in counting:
                if clause.event != name:
                    continue
                if clause.cond is not None and not scope:
                    scope = {"user": user, "event": Event(name, _aware(timestamp), properties).scope()}
                if event_matches(clause, name, scope):
                    tallies[audience_id][index] = note(clause, tallies[audience_id][index], _aware(at))
        return {a: tuple(t) for a, t in tallies.items()}

    def evaluate_person(self, session: Session, person: str, now: datetime | None = None) -> list[Change]:
        """Every audience of ``person`` counted again from their stored data (their profile row
        locked by the caller): after a merge, or a change outside the event API."""
        now = now or utcnow()
        row = session.get(ProfileRecord, person)
        if row is None or row.merged_into is not None:
            return self.leave_all(session, [person], now, events=False)
        profile = with_group(session, row, person)
        audiences = [self.audiences[a] for a in sorted(self.audiences)]
        recount = {a.id for a in audiences}
        return self._upkeep(session, profile, audiences, {}, recount, now, now)

    def leave_all(self, session: Session, persons: Sequence[str], now: datetime, *, events: bool = True) -> list[Change]:
        """``persons`` leave every audience and lose their upkeep state (merged away, or gone).
        Their exits are in the history; ``events``: with an ``Audience Exited`` event each."""
        writes = _Writes(self.routable, now, events=events)
        for person in persons:
            for audience in sorted(_members_of(session, person, None)):
                writes.settle(audience, person, False, True)
        changes = writes.flush(session)
        if persons:
            session.execute(delete(AudienceState).where(col(AudienceState.person).in_(persons)))
        return changes

    def merged(self, session: Session, kept: str, gone: Sequence[str], now: datetime | None = None) -> list[Change]:
        """After a merge (in its transaction): the merged-away people leave their audiences (no
        event: they are the survivor now) and the survivor is counted again over the joined data."""
        now = now or utcnow()
        self.leave_all(session, gone, now, events=False)
        return self.evaluate_person(session, kept, now)

    # The time sweep --------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None, *, limit: int = CHUNK) -> list[Change]:
        """Re-evaluate whoever is due: state rows with ``changes_at <= now`` and people pending
        (traits or opt-outs changed outside the event API), a chunk per transaction."""
        now = now or utcnow()
        changes: list[Change] = []
        while True:
            with self.db.session() as session:
                due: dict[str, set[str]] = {}
                for audience, person in session.execute(
                    select(col(AudienceState.audience), col(AudienceState.person))
                    .where(col(AudienceState.changes_at) <= now)
                    .order_by(col(AudienceState.changes_at))
                    .limit(limit)
                ):
                    due.setdefault(person, set()).add(audience)
                pending = list(session.execute(select(col(AudiencePending.person)).limit(limit)).scalars())
            if not due and not pending:
                return changes
            with self.db.write_session() as session:
                persons = sorted(set(due) | set(pending))
                _lock(session, persons)
                for person in persons:
                    changes += self._sweep_one(session, person, due.get(person, set()), person in pending, now)
                if pending:
                    session.execute(delete(AudiencePending).where(col(AudiencePending.person).in_(pending)))

    def _sweep_one(self, session: Session, person: str, due: set[str], pending: bool, now: datetime) -> list[Change]:
        survivor = canonical(session, person)
        if survivor != person or session.get(ProfileRecord, person) is None:
            self.leave_all(session, [person], now, events=False)
            return []
        if pending:
            return self.evaluate_person(session, person, now)
        gone = sorted(due - set(self.audiences))  # an audience no longer deployed: no timer
        if gone:
            session.execute(
                delete(AudienceState)
                .where(col(AudienceState.person) == person)
                .where(col(AudienceState.audience).in_(gone))
            )
        audiences = [self.audiences[a] for a in sorted(due & set(self.audiences))]
        if not audiences:
            return []
        row = session.get(ProfileRecord, person)
        assert row is not None
        profile = with_group(session, row, person)
        return self._upkeep(session, profile, audiences, {}, set(), now, now)

    # Evaluation from scratch -----------------------------------------------------------------

    def deploy(self) -> list[Audience]:
        """Record each audience version (once) and return those not yet evaluated from scratch."""
        rows: list[dict[str, Any]] = [
            {
                "audience": a.id,
                "version": a.version,
                "definition": audience_to_dict(a),
                "deployed_at": utcnow(),
                "evaluated_at": None,
                "members": None,
            }
            for a in self.audiences.values()
        ]
        if not rows:
            return []
        with self.db.session() as session:
            insert_ = upsert(session)
            if insert_ is not None:
                session.execute(insert_(AudienceVersion).values(rows).on_conflict_do_nothing())
            else:
                for values in rows:
                    if session.get(AudienceVersion, (values["audience"], values["version"])) is None:
                        session.add(AudienceVersion(**values))
            evaluated = {
                (a, v)
                for a, v in session.execute(
                    select(col(AudienceVersion.audience), col(AudienceVersion.version)).where(
                        col(AudienceVersion.evaluated_at).is_not(None)
                    )
                )
            }
        return [a for a in self.audiences.values() if (a.id, a.version) not in evaluated]

    def evaluate_all(self, audience_id: str, now: datetime | None = None, *, chunk: int = CHUNK) -> Evaluated:
        """Evaluate ``audience_id`` over the whole stored population: tallies from the events in
        one grouped query per clause, ``where`` in Python over the traits; then people are written
        ``chunk`` at a time under their locks, with entries and exits recorded."""
        audience = self.audiences[audience_id]
        now = now or utcnow()
        result = Evaluated(audience.id, audience.version)
        with self.db.session() as reader:
            last = reader.execute(select(func.max(col(EventRecord.id)))).scalar() or 0
            streams = [
                _Stream(self._clause_rows(reader, audience, index, last, now)) for index in range(len(audience.clauses))
            ]
            # With a `did` clause, only people with its events can be members: they (and the members
            # now) are all there is to look at. Else everyone is.
            people: Iterator[str] = (
                streams[0].people()
                if audience.did
                else reader.execute(
                    select(col(ProfileRecord.user_id))
                    .where(col(ProfileRecord.merged_into).is_(None))
                    .order_by(_ordered(reader, col(ProfileRecord.user_id)))
                ).scalars()
            )
            batch: list[tuple[str, tuple[Tally, ...]]] = []
            for person in _with_members(people, self._members_stream(audience.id)):
                batch.append((person, tuple(stream.upto(person, audience.clauses[i]) for i, stream in enumerate(streams))))
                if len(batch) >= chunk:
                    self._write(audience, batch, last, now, result)
                    batch = []
            if batch:
                self._write(audience, batch, last, now, result)
        with self.db.session() as session:
            # Another version's cache and timers (people this evaluation did not look at).
            session.execute(
                delete(AudienceState)
                .where(col(AudienceState.audience) == audience.id)
                .where(col(AudienceState.version) != audience.version)
            )
            result.members = self.size(audience.id, session=session)
            version = session.get(AudienceVersion, (audience.id, audience.version))
            if version is not None:
                version.evaluated_at = utcnow()
                version.members = result.members
        return result

    def _members_stream(self, audience: str) -> Iterator[str]:
        """Current members, in the order people are read (members with no profile left leave)."""
        with self.db.session() as session:
            yield from session.execute(
                select(col(AudienceMember.person))
                .where(col(AudienceMember.audience) == audience)
                .order_by(_ordered(session, col(AudienceMember.person)))
            ).scalars()

    def _clause_rows(
        self, session: Session, audience: Audience, index: int, last: int, now: datetime
    ) -> Iterator[tuple[str, datetime]]:
        """(person, time) of the events counting for one clause, the newest ``at_least`` per
        person, by person: grouped in SQL when the clause has no condition, else filtered here.
        Events before a clause's window never count again: they are not read."""
        clause = audience.clauses[index]
        counted = _counted_at()
        at = counted.label("at")
        person = col(EventRecord.user_id)
        base = (
            select(person, at)
            .where(col(EventRecord.name) == clause.event)
            .where(col(EventRecord.kind) == "track")
            .where(col(EventRecord.id) <= last)
        )
        if clause.within is not None:
            base = base.where(counted > now - timedelta(seconds=clause.within))
        ordered = _ordered(session, person)
        if clause.cond is None and clause.at_least == 1:
            grouped = base.subquery()
            query = (
                select(grouped.c.user_id, type_coerce(func.max(grouped.c.at), UtcDateTime()))
                .group_by(grouped.c.user_id)
                .order_by(_ordered(session, grouped.c.user_id))
            )
            for user, when in session.execute(query.execution_options(yield_per=5000)):
                yield user, _aware(when)
            return
        if clause.cond is None:
            ranked = base.add_columns(
                func.row_number().over(partition_by=person, order_by=at.desc()).label("rank")
            ).subquery()
            query = (
                select(ranked.c.user_id, type_coerce(ranked.c.at, UtcDateTime()))
                .where(ranked.c.rank <= clause.at_least)
                .order_by(_ordered(session, ranked.c.user_id), ranked.c.at)
            )
            for user, when in session.execute(query.execution_options(yield_per=5000)):
                yield user, _aware(when)
            return
        # A condition: evaluated here, over each event (and the person's traits when it reads them).
        filtered = base.add_columns(col(EventRecord.properties), col(EventRecord.timestamp)).order_by(ordered)
        traits: Mapping[str, Any] = {}
        current = None
        for user, when, properties, timestamp in session.execute(filtered.execution_options(yield_per=5000)):
            if clause.cond.reads_user and user != current:
                current = user
                row = session.get(ProfileRecord, user)
                traits = {} if row is None else with_group(session, row, user).traits
            scope = {"user": traits, "event": Event(clause.event, _aware(timestamp), properties).scope()}
            if event_matches(clause, clause.event, scope):
                yield user, _aware(when)

    def _write(
        self, audience: Audience, batch: Sequence[tuple[str, tuple[Tally, ...]]], last: int, now: datetime, result: Evaluated
    ) -> None:
        persons = [person for person, _ in batch]
        with self.db.write_session() as session:
            profiles = _lock_profiles(session, persons, with_traits=_reads_profile(audience))
            moved = set(
                session.execute(
                    select(col(EventRecord.user_id))
                    .where(col(EventRecord.id) > last)
                    .where(_among(session, col(EventRecord.user_id), persons))
                    .distinct()
                ).scalars()
            )
            members = set(
                session.execute(
                    select(col(AudienceMember.person))
                    .where(col(AudienceMember.audience) == audience.id)
                    .where(_among(session, col(AudienceMember.person), persons))
                ).scalars()
            )
            writes = _Writes(self.routable, now)
            for person, tallies in batch:
                found = profiles.get(person)
                if found is None:  # forgotten or merged meanwhile: no longer a member of anything
                    writes.settle(audience.id, person, False, person in members, event=False)
                    continue
                profile, updated = found
                if person in moved or updated > now:  # changed since the events were read
                    result.recounted += 1
                    tallies = self._count(session, profile, [audience])[audience.id]
                standing = evaluate(audience, profile.traits, profile.opted_out, tallies, now)
                if standing.changes_at is not None:
                    writes.states.append(_state_values(audience, person, tallies, standing))
                writes.settle(audience.id, person, standing.member, person in members)
            result.changes += writes.flush(session)

    # Queries ---------------------------------------------------------------------------------

    def size(self, audience: str, *, session: Session | None = None) -> int:
        if session is None:
            with self.db.session() as own:
                return self.size(audience, session=own)
        return int(
            session.execute(
                select(func.count()).select_from(AudienceMember).where(col(AudienceMember.audience) == audience)
            ).scalar()
            or 0
        )


def _ordered(session: Session, column: Any) -> Any:
    """``column`` ordered by code point on both databases (PostgreSQL's collation may not be)."""
    if session.get_bind().dialect.name == "postgresql":
        return column.collate("C")
    return column


class _Stream:
    """One clause's (person, time) rows, by person: :meth:`upto` takes one person's tally."""

    def __init__(self, rows: Iterator[tuple[str, datetime]]) -> None:
        self.rows = rows
        self.head: tuple[str, datetime] | None = next(rows, None)

    def people(self) -> Iterator[str]:
        """The people of the rows, each once, as :meth:`upto` takes their rows."""
        while self.head is not None:
            yield self.head[0]

    def upto(self, person: str, clause: Any) -> Tally:
        tally: Tally = ()
        while self.head is not None and self.head[0] <= person:
            if self.head[0] == person:
                tally = note(clause, tally, self.head[1])
            self.head = next(self.rows, None)
        return tally


def _with_members(people: Iterable[str], members: Iterator[str]) -> Iterator[str]:
    """People in order, with current members who have no surviving profile among them (they
    leave); both inputs in code point order."""
    member = next(members, None)
    for person in people:
        while member is not None and member < person:
            yield member
            member = next(members, None)
        if member == person:
            member = next(members, None)
        yield person
    while member is not None:
        yield member
        member = next(members, None)


def _lock(session: Session, persons: Sequence[str]) -> None:
    """Lock the persons' profile rows (in id order, as every call of the event API does)."""
    for start in range(0, len(persons), 1000):
        part = sorted(persons[start : start + 1000])
        session.execute(
            select(col(ProfileRecord.user_id))
            .where(col(ProfileRecord.user_id).in_(part))
            .order_by(col(ProfileRecord.user_id))
            .with_for_update()
        ).all()


def _reads_profile(audience: Audience) -> bool:
    """Whether membership reads the traits or the opt-outs."""
    return audience.reads_traits or bool(audience.subscribed)


def _lock_profiles(session: Session, persons: Sequence[str], *, with_traits: bool) -> dict[str, tuple[Profile, datetime]]:
    """Lock the persons' profile rows (in id order) and read the surviving ones: each one's
    profile (with its group's traits; ``with_traits``: else none) and when it last changed."""
    found: dict[str, tuple[Profile, datetime]] = {}
    groups: dict[str, Mapping[str, Any]] = {}
    read = (
        (col(ProfileRecord.traits), col(ProfileRecord.opted_out), col(ProfileRecord.group_id))
        if with_traits
        else (literal_column("NULL"), literal_column("NULL"), literal_column("NULL"))
    )
    for start in range(0, len(persons), 1000):
        part = sorted(persons[start : start + 1000])
        rows = session.execute(
            sa_select(
                col(ProfileRecord.user_id),
                *read,
                col(ProfileRecord.merged_into),
                col(ProfileRecord.updated_at),
            )
            .where(_among(session, col(ProfileRecord.user_id), part))
            .order_by(col(ProfileRecord.user_id))
            .with_for_update()
        ).all()
        for user, traits, opted_out, group, merged_into, updated in rows:
            if merged_into is not None:
                continue
            if group is not None:
                if group not in groups:
                    stored = session.get(GroupRecord, group)
                    groups[group] = {} if stored is None else stored.traits
                traits = {**traits, "group": {**groups[group], "id": group}}
            found[user] = (Profile(user, traits or {}, frozenset(opted_out or ())), _aware(updated))
    return found


def _members_of(session: Session, person: str, audiences: Sequence[str] | None) -> set[str]:
    query = select(col(AudienceMember.audience)).where(col(AudienceMember.person) == person)
    if audiences is not None:
        query = query.where(col(AudienceMember.audience).in_(audiences))
    return set(session.execute(query).scalars())


def _state_values(audience: Audience, person: str, tallies: Sequence[Tally], standing: Standing) -> dict[str, Any]:
    return {
        "audience": audience.id,
        "person": person,
        "tallies": _dump(tallies),
        "changes_at": standing.changes_at,
        "version": _version(audience),
    }


def _noted(clause: Activity, tallies: tuple[Tally, ...], index: int, at: datetime, now: datetime) -> tuple[Tally, ...]:
    """``tallies`` with one more event for clause ``index``. A full tally of a clause with no
    window, none of it in the future, holds for good: it is left as it is (no write)."""
    tally = tallies[index]
    if clause.within is None and len(tally) >= clause.at_least and tally[-1] <= now:
        return tallies
    return (*tallies[:index], note(clause, tally, at), *tallies[index + 1 :])


class _Writes:
    """The rows one transaction's membership changes write, each kind in one statement."""

    def __init__(self, routable: frozenset[str], now: datetime, *, events: bool = True) -> None:
        self.routable = routable
        self.now = now
        self.events = events
        self.states: list[dict[str, Any]] = []
        self.stale: list[tuple[str, str]] = []
        self.entered: list[dict[str, Any]] = []
        self.exited: dict[str, list[str]] = {}
        self.history: list[dict[str, Any]] = []
        self.stored: list[dict[str, Any]] = []
        self.changes: list[Change] = []

    def state(
        self,
        audience: Audience,
        person: str,
        tallies: Sequence[Tally],
        standing: Standing,
        cached: tuple[Any, str, datetime | None] | None,
    ) -> None:
        """Cache the tallies (and the timer) of one person, when they changed; no row when there
        is nothing to keep."""
        if not any(tallies) and standing.changes_at is None:
            if cached is not None:
                self.stale.append((audience.id, person))
            return
        values = _state_values(audience, person, tallies, standing)
        if cached is not None and (list(cached[0]), cached[1], cached[2]) == (
            values["tallies"],
            values["version"],
            values["changes_at"],
        ):
            return
        self.states.append(values)

    def settle(self, audience: str, person: str, member: bool, was: bool, *, event: bool = True) -> None:
        """Make ``person`` a member of ``audience`` or not (``was``: whether they are); an entry
        or exit is recorded in the history, and (``event``) with its track event."""
        if member == was:
            return
        if member:
            self.entered.append({"audience": audience, "person": person, "entered_at": self.now})
        else:
            self.exited.setdefault(audience, []).append(person)
        change = "entered" if member else "exited"
        self.history.append({"audience": audience, "person": person, "change": change, "at": self.now})
        if not (event and self.events):
            return
        name = ENTERED if member else EXITED
        stored = Event(name, self.now, {"audience": audience}, f"audience:{uuid.uuid4()}")
        self.stored.append(
            {
                "message_id": stored.message_id,
                "kind": "track",
                "user_id": person,
                "anonymous_id": None,
                "name": name,
                "properties": {"audience": audience},
                "timestamp": self.now,
                "received_at": self.now,
                "routed_at": None if name in self.routable else self.now,
            }
        )
        self.changes.append(Change(audience, person, member, stored))

    def flush(self, session: Session) -> list[Change]:
        """Write it all."""
        for audience in sorted({a for a, _ in self.stale}):
            gone = [p for a, p in self.stale if a == audience]
            session.connection().execute(_FORGET_STATES, {"audience": audience, "persons": gone})
        if self.states:
            _write_states(session, self.states)
        for audience, persons in self.exited.items():
            for start in range(0, len(persons), 1000):
                session.execute(
                    delete(AudienceMember)
                    .where(col(AudienceMember.audience) == audience)
                    .where(_among(session, col(AudienceMember.person), persons[start : start + 1000]))
                )
        for statement, rows in ((_ENTER, self.entered), (_RECORD, self.history), (_STORE, self.stored)):
            if rows:
                session.connection().execute(statement, rows)
        return self.changes


_MEMBERS = core_table(AudienceMember)
_HISTORY = core_table(AudienceChange)
_EVENTS = core_table(EventRecord)
_STATES = core_table(AudienceState)
"""The tables, for plain multi-row statements (the ORM's bulk path costs more per call)."""

# The statements of the upkeep's hot path, built once: SQLAlchemy then reuses their cache key
# and compiled form, and they run on the session's connection (no ORM execution step).
_ENTER: Any = insert(_MEMBERS)
_RECORD: Any = insert(_HISTORY)
_STORE: Any = insert(_EVENTS)
_FORGET_STATES: Any = (
    delete(_STATES)
    .where(_STATES.c.audience == bindparam("audience"))
    .where(_STATES.c.person.in_(bindparam("persons", expanding=True)))
)
_STANDING: Any = union_all(
    # The state first: a union's columns have the types of its first query's (JSON, timestamps).
    sa_select(
        _STATES.c.audience, literal_column("0"), _STATES.c.tallies, _STATES.c.version, _STATES.c.changes_at
    ).where(_STATES.c.person == bindparam("person")),
    sa_select(_MEMBERS.c.audience, literal_column("1"), null(), null(), null()).where(
        _MEMBERS.c.person == bindparam("person")
    ),
)
"""One person's upkeep state and memberships, in one read (a few rows per audience at most, and
no list parameter: the statement's SQL is the same every time): rows of (audience, member,
tallies, version, changes_at), the last three ``NULL`` on a membership row."""
_PERSON_EVENTS: Any = sa_select(
    _EVENTS.c.name, _counted_at(), _EVENTS.c.properties, _EVENTS.c.timestamp
).where(
    _EVENTS.c.user_id == bindparam("person"),
    _EVENTS.c.name.in_(bindparam("names", expanding=True)),
    _EVENTS.c.kind == "track",
)
"""One person's track events of some names, each with its time for a tally."""


def _write_states(session: Session, rows: list[dict[str, Any]]) -> None:
    statement = upsert_statement(session, _STATES, ("audience", "person"), ("tallies", "changes_at", "version"))
    if statement is None:
        for values in rows:
            session.merge(AudienceState(**values))
        return
    session.connection().execute(statement, rows)


# Reading ---------------------------------------------------------------------------------------


def audiences_of(session: Session, person: str) -> list[str]:
    """The audiences ``person`` is in now, by id."""
    return sorted(_members_of(session, person, None))


def members(session: Session, audience: str, *, after: str | None = None, limit: int = 100) -> list[tuple[str, datetime]]:
    """Members of ``audience`` by person id (keyset paging: those after ``after``), with the time
    each entered: rows of (person, entered_at)."""
    query = select(col(AudienceMember.person), col(AudienceMember.entered_at)).where(
        col(AudienceMember.audience) == audience
    )
    if after is not None:
        query = query.where(col(AudienceMember.person) > after)
    # The database's own order, as the primary key's index has it (``after`` compares the same way).
    found = session.execute(query.order_by(col(AudienceMember.person)).limit(limit))
    return [(person, _aware(entered)) for person, entered in found]


def sizes(session: Session, audiences: Sequence[str]) -> dict[str, int]:
    """Members per audience (0 for one with none)."""
    found = dict.fromkeys(audiences, 0)
    if audiences:
        for audience, count in session.execute(
            select(col(AudienceMember.audience), func.count())
            .where(col(AudienceMember.audience).in_(audiences))
            .group_by(col(AudienceMember.audience))
        ):
            found[audience] = int(count)
    return found


def history(session: Session, audience: str, *, limit: int = 100) -> list[AudienceChange]:
    """The latest entries and exits of ``audience``, newest first."""
    return list(
        session.execute(
            select(AudienceChange)
            .where(col(AudienceChange.audience) == audience)
            .order_by(col(AudienceChange.at).desc(), col(AudienceChange.id).desc())
            .limit(limit)
        ).scalars()
    )


def evaluated_at(session: Session, audience: str, version: str) -> datetime | None:
    """When ``version`` of ``audience`` was evaluated from scratch (``None``: not yet)."""
    row = session.get(AudienceVersion, (audience, version))
    return None if row is None or row.evaluated_at is None else _aware(row.evaluated_at)


def describe_audience(audience: Audience) -> str:
    """What membership needs, in words: ``where user.vip; did Order Completed in the last 30d``."""
    parts = [] if audience.where is None else [f"where {audience.where.source}"]
    parts += [f"did {clause.describe}" for clause in audience.did]
    parts += [f"not did {clause.describe}" for clause in audience.not_did]
    parts += [f"subscribed to {topic}" for topic in audience.subscribed]
    return "; ".join(parts) or "everyone"


def mark_pending(session: Session, person: str) -> None:
    """Have the next sweep bring ``person``'s memberships up to date (a change outside the API)."""
    insert_ = upsert(session)
    values: dict[str, Any] = {"person": person, "since": utcnow()}
    if insert_ is None:
        session.merge(AudiencePending(**values))
        return
    session.execute(insert_(AudiencePending).values(**values).on_conflict_do_nothing())


def forget(session: Session, persons: Sequence[str]) -> int:
    """Erase every audience row about ``persons`` (right to erasure); rows deleted."""
    deleted = 0
    for model in (AudienceMember, AudienceState, AudienceChange, AudiencePending):
        result = session.execute(delete(model).where(col(model.person).in_(persons)))
        deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted


__all__ = [
    "AUDIENCE_EVENTS",
    "AudienceStore",
    "Change",
    "Evaluated",
    "audiences_of",
    "describe_audience",
    "evaluated_at",
    "forget",
    "history",
    "mark_pending",
    "members",
    "sizes",
]
