"""Persons and their identifiers in the database: the rules of :mod:`nurture.engine.identity`
carried out in one transaction per call.

A person is a ``profiles`` row (its ``user_id`` is the person id); each identifier is an
``identities`` row naming the surviving person it belongs to. :meth:`DbIdentities.apply` resolves
a call's identifiers, plans it with :func:`~nurture.engine.identity.plan_call` and carries the
plan out together with the call's own record, its traits, opt-outs and group: a crash keeps all
of it or none.

Concurrency: the persons a call touches are locked (``SELECT ... FOR UPDATE``, in person-id
order, so two calls never wait on each other in a circle); a person found merged once locked,
an identifier or person id taken by a concurrent call (unique constraints), or PostgreSQL
reporting a deadlock or a serialization failure, all start the transaction again. SQLite takes
its write lock first (``BEGIN IMMEDIATE``), so its calls simply run one after the other. Two API
processes merging the same people at once thus end with one survivor and every identifier kept.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Row, bindparam, insert, tuple_, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, col, select

from nurture.engine.identity import (
    ADDRESS_KINDS,
    MERGED,
    Identifier,
    Person,
    Plan,
    RunSlot,
    identifier,
    merge_traits,
    merged_away,
    plan_call,
    stamp,
)
from nurture.engine.model import Event, Profile

from .audit import AuditRecord, subject_hash
from .db import Database
from .models import (
    DateTriggerRecord,
    EventRecord,
    EventRow,
    GroupRecord,
    IdentityRecord,
    MessageEvent,
    MessageRecord,
    ProfileRecord,
    Route,
    RunRecord,
    core_table,
    utcnow,
)

ATTEMPTS = 20
"""Times a call's transaction is started again after losing a race before it gives up."""
IDENTIFIER_LIMIT = 320
"""Characters an identifier may have; a longer value (no real address is) identifies no one."""
_RETRY_CODES = frozenset({"40001", "40P01"})
"""PostgreSQL's serialization failure and deadlock: the transaction may simply run again."""
PERSON_TABLES: tuple[Any, ...] = (
    EventRecord,
    MessageRecord,
    MessageEvent,
    RunRecord,
    Route,
    DateTriggerRecord,
)
"""Tables whose ``user_id`` is a person id, moved to the survivor by a merge."""

GROUP_TIME = "$group"
"""The key of ``trait_times`` that keeps when the person's latest ``group`` call was made: of two
merging persons, the later call's group is kept."""

OptOutChange = Sequence[str] | Callable[[set[str]], set[str]]
"""New opt-outs: the whole set, or a function of the stored one."""


class _Moved(Exception):
    """A person the call locked was merged meanwhile: plan again."""


@dataclass
class Applied:
    """What one call did to persons."""

    plan: Plan
    merged_away: list[str] = field(default_factory=list)
    """Workflow ids of the survivor's active runs the merge ends (reason ``merged``)."""
    profile: Profile | None = None
    events: list[Event] = field(default_factory=list)
    """Events the call's upkeep stored for the person (``Audience Entered`` ...), to route."""

    @property
    def person(self) -> str:
        return self.plan.person


class Upkeep(Protocol):
    """What :meth:`DbIdentities.apply` runs last in a call's transaction, with the person locked
    and the call's record stored: the events it stores for them (audience upkeep)."""

    def __call__(
        self, session: Session, applied: Applied, record: EventRow | None, *, traits: bool, opt_outs: bool
    ) -> list[Event]: ...


def usable(identifiers: Iterable[Identifier]) -> list[Identifier]:
    """``identifiers`` without those too long to keep (no real address or id is)."""
    return [i for i in identifiers if len(i.value) <= IDENTIFIER_LIMIT]


def canonical(session: Session, person_id: str) -> str:
    """The surviving person of ``person_id`` (itself when it is not merged, or unknown). A merge
    keeps chains one link long, so this is one or two primary-key look-ups."""
    seen = {person_id}
    while True:
        into = session.execute(_MERGED_INTO, {"person": person_id}).scalar()
        if into is None or into in seen:
            return person_id
        seen.add(into)
        person_id = into


def merged_persons(session: Session, person_id: str) -> list[str]:
    """``person_id`` and every person merged into it."""
    merged = session.execute(
        select(col(ProfileRecord.user_id)).where(col(ProfileRecord.merged_into) == person_id)
    ).scalars()
    return [person_id, *sorted(merged)]


def with_group(session: Session, row: ProfileRecord, person_id: str) -> Profile:
    """The engine's profile of ``row``: its traits with ``group`` (``id`` and the group's traits)."""
    return profile_of(session, row.traits, row.group_id, row.opted_out, person_id)


def profile_of(
    session: Session, traits: Mapping[str, Any], group_id: str | None, opted_out: Iterable[str], person_id: str
) -> Profile:
    """The engine's profile of a person's stored ``traits``, group and opt-outs (see :func:`with_group`)."""
    given = dict(traits)
    if group_id is not None:
        group = session.get(GroupRecord, group_id)
        given["group"] = {**(group.traits if group is not None else {}), "id": group_id}
    return Profile(person_id, given, frozenset(opted_out))


def _retryable(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return isinstance(exc, IntegrityError) or code in _RETRY_CODES


class DbIdentities:
    """The ``identities``, ``profiles`` and ``groups`` tables as one person store."""

    def __init__(self, db: Database, *, secret: str = "") -> None:
        self.db = db
        self.secret = secret
        """Keys the audit log's person hashes (``NURTURE_SECRET``)."""

    # Reading ---------------------------------------------------------------------------------

    def resolve(self, kind: str, raw: Any) -> str | None:
        """The surviving person an identifier (as written) belongs to; for kind ``person``, the
        survivor of that person id; ``None`` when nobody has it."""
        with self.db.session() as session:
            return self._resolve(session, kind, raw)

    def _resolve(self, session: Session, kind: str, raw: Any) -> str | None:
        if kind == "person":
            person = str(raw)
            if session.get(ProfileRecord, person) is None:
                return None
            return canonical(session, person)
        ident = identifier(kind, raw)
        if ident is None:
            return None
        row = session.get(IdentityRecord, (ident.kind, ident.value))
        return None if row is None else canonical(session, row.person_id)

    def known(self, ident: Identifier) -> bool:
        """Whether someone has the identifier."""
        with self.db.session() as session:
            return session.get(IdentityRecord, (ident.kind, ident.value)) is not None

    def survivor(self, person_id: str) -> str:
        """The surviving person of ``person_id`` (itself when it is not merged, or unknown)."""
        with self.db.session() as session:
            return canonical(session, person_id)

    def lookup(self, raw: str) -> str | None:
        """An id as the per-user routes take it: a ``userId``, else a person id."""
        with self.db.session() as session:
            return self._resolve(session, "user_id", raw) or self._resolve(session, "person", raw)

    def identifiers_of(self, person_id: str) -> list[Identifier]:
        """Every identifier of the person (and so of every person merged into it)."""
        with self.db.session() as session:
            persons = merged_persons(session, canonical(session, person_id))
            rows = session.execute(select(IdentityRecord).where(col(IdentityRecord.person_id).in_(persons)))
            return sorted(Identifier(r.kind, r.value) for r in rows.scalars())

    def persons(self, person_id: str) -> list[str]:
        """The surviving person of ``person_id`` first, then every person merged into it."""
        with self.db.session() as session:
            return merged_persons(session, canonical(session, person_id))

    def merged_away(self, person_id: str) -> list[str]:
        """Workflow ids of the person's active runs that a merge ends (see :func:`merged_away`)."""
        with self.db.session() as session:
            return _merged_away(session, canonical(session, person_id))

    # Writing ---------------------------------------------------------------------------------

    def apply(
        self,
        identifiers: Sequence[Identifier],
        *,
        at: datetime,
        explicit: bool = False,
        record: EventRow | None = None,
        traits: Mapping[str, Any] | None = None,
        opted_out: OptOutChange | None = None,
        group: tuple[str, Mapping[str, Any]] | None = None,
        upkeep: Upkeep | None = None,
    ) -> Applied | None:
        """Carry out one call naming ``identifiers`` (at the call's time ``at``) in one
        transaction: create, attach, merge; store ``record`` (its ``user_id`` set to the person),
        merge ``traits`` (stamped ``at``), change the opt-outs, set the group, then ``upkeep``.
        ``None`` (and nothing changed) when ``record``'s ``message_id`` was stored before."""
        identifiers = usable(identifiers)
        for attempt in range(ATTEMPTS):
            # A repeated message id fails the event's insert (it is unique): only then, and on
            # the other retries, is it worth a look-up first.
            if attempt and record is not None and _stored(self.db, record.message_id):
                return None
            try:
                with self.db.write_session() as session:
                    applied = self._apply(
                        session, identifiers, at, explicit, record, traits, opted_out, group, first=not attempt
                    )
                    if upkeep is not None:
                        applied.events = upkeep(
                            session,
                            applied,
                            record,
                            traits=bool(traits) or group is not None,
                            opt_outs=opted_out is not None,
                        )
                    return applied
            except _Moved:
                continue
            except DBAPIError as exc:
                if not _retryable(exc):
                    raise
                continue
        raise RuntimeError(
            f"could not apply a call naming {len(identifiers)} identifier(s): too much contention"
        )

    def _apply(
        self,
        session: Session,
        identifiers: Sequence[Identifier],
        at: datetime,
        explicit: bool,
        record: EventRow | None,
        traits: Mapping[str, Any] | None,
        opted_out: OptOutChange | None,
        group: tuple[str, Mapping[str, Any]] | None,
        *,
        first: bool,
    ) -> Applied:
        """``first``: the first attempt assumes what is almost always true and costs a query
        each when checked: that identifiers point at surviving persons (a merge re-points them;
        :func:`_owned` finds out otherwise) and that a new person's id is free (its insert finds
        out otherwise). A retry checks both."""
        now = utcnow()
        if first:
            owners, rows = _owned(session, identifiers)
            survivors = {p: p for p in rows}
        else:
            owners = self._owners(session, identifiers)
            survivors = {p: canonical(session, p) for p in set(owners.values())}
            rows = _lock(session, set(survivors.values()))
        # The userIds only decide conflicts between persons: a call naming one known person and
        # nothing new (most calls) needs no look-up of them.
        simple = len(rows) == 1 and len(owners) == len(identifiers)
        user_ids = {} if simple else _user_ids(session, rows)
        found = {
            ident: Person(survivors[p], rows[survivors[p]].created_at, user_ids.get(survivors[p], frozenset()))
            for ident, p in owners.items()
        }

        def taken(person_id: str) -> bool:
            return not first and session.get(ProfileRecord, person_id) is not None

        plan = plan_call(identifiers, found, now=now, taken=taken, explicit=explicit)
        if plan.created is not None:
            rows[plan.created.id] = _Person(plan.created.id, {}, [], {}, now, now)
        for kept, merged in plan.merges:
            _merge(session, rows, rows[kept], rows[merged])
            self._audit(session, "merge", kept, {"merged": subject_hash(merged, self.secret)})
        if plan.conflicts:
            self._audit(session, "conflict", plan.person, {"kinds": sorted({i.kind for i in plan.conflicts})})
        row = rows[plan.person]
        if traits:
            row.traits = {**row.traits, **traits}
            row.trait_times = stamp(traits, at, row.trait_times)
            _mirror(row)
        if callable(opted_out):
            row.opted_out = sorted(opted_out(set(row.opted_out)))
        elif opted_out is not None:
            row.opted_out = sorted(set(opted_out))
        if group is not None:
            group_id, group_traits = group
            stored = session.get(GroupRecord, group_id, with_for_update=True)
            if stored is None:
                session.add(GroupRecord(group_id=group_id, traits=dict(group_traits), updated_at=now))
            else:
                stored.traits = {**stored.traits, **group_traits}
                stored.updated_at = now
            row.group_id = group_id
            row.trait_times = stamp([GROUP_TIME], at, row.trait_times)
        # The persons' rows are written with plain statements built once, not by the unit of
        # work: a call that changes no person (an event of a known one) writes none. A person id
        # or identifier taken concurrently fails its insert here: plan again.
        connection = session.connection()
        changed = {p for pair in plan.merges for p in pair}
        if plan.merges or plan.attach or traits or opted_out is not None or group is not None:
            row.updated_at = now
            changed.add(plan.person)
        if plan.created is not None:
            connection.execute(_INSERT_PROFILE, vars(row))
            changed.discard(plan.person)
        for person in sorted(changed):
            written = vars(rows[person])
            connection.execute(_UPDATE_PROFILE, {"person": person, **{f"new_{n}": written[n] for n in _WRITTEN}})
        if plan.attach:
            attached = [{"kind": i.kind, "value": i.value, "person_id": plan.person, "created_at": now} for i in plan.attach]
            connection.execute(_INSERT_IDENTITY, attached[0] if len(attached) == 1 else attached)
        session.flush()
        ending = _merged_away(session, plan.person) if plan.merges else []
        if record is not None:
            values = record.values(plan.person)
            if ending:
                values["routed_at"] = None  # routed once the runs it ends have had their stop
            connection.execute(_INSERT_EVENT, values)
        return Applied(plan, ending, profile_of(session, row.traits, row.group_id, row.opted_out, plan.person))

    def _owners(self, session: Session, identifiers: Sequence[Identifier]) -> dict[Identifier, str]:
        if not identifiers:
            return {}
        found = session.connection().execute(_OWNERS, _pairs(identifiers))
        return {Identifier(kind, value): person for kind, value, person in found}

    def _audit(self, session: Session, action: str, person_id: str, details: dict[str, Any]) -> None:
        session.add(
            AuditRecord(
                action=action, subject=subject_hash(person_id, self.secret), actor="api", details=details
            )
        )


_PROFILES = core_table(ProfileRecord)
_WRITTEN = tuple(column.name for column in _PROFILES.columns if column.name != "user_id")
_INSERT_PROFILE = insert(_PROFILES)
_UPDATE_PROFILE = (
    update(_PROFILES)
    .where(_PROFILES.c.user_id == bindparam("person"))
    .values({name: bindparam(f"new_{name}") for name in _WRITTEN})
)
"""A person's row inserted, and written back, as :class:`_Person` holds it (every column), built once."""
_INSERT_IDENTITY = insert(core_table(IdentityRecord))
_INSERT_EVENT = insert(core_table(EventRecord))
"""An event's insert, built once and run on the session's connection (the event API's hot path)."""
_MERGED_INTO: Any = select(col(ProfileRecord.merged_into)).where(col(ProfileRecord.user_id) == bindparam("person"))
"""Who a person was merged into (:func:`canonical`: every send and every event asks)."""
# Built once, run with their parameters bound (see ``upsert_statement``): the owners of a call's
# identifiers; the persons' rows locked in id order; both at once, for a call's first attempt.
_IDENTITIES = core_table(IdentityRecord)
_NAMED = tuple_(_IDENTITIES.c.kind, _IDENTITIES.c.value).in_(bindparam("pairs", expanding=True))
_OWNERS = select(_IDENTITIES.c.kind, _IDENTITIES.c.value, _IDENTITIES.c.person_id).where(_NAMED)
_OWNED = (
    select(_IDENTITIES.c.kind, _IDENTITIES.c.value, *_PROFILES.columns)
    .join(_PROFILES, _PROFILES.c.user_id == _IDENTITIES.c.person_id)
    .where(_NAMED)
    .order_by(_PROFILES.c.user_id)
    .with_for_update(of=_PROFILES)
)
_LOCK = (
    select(*_PROFILES.columns)
    .where(_PROFILES.c.user_id.in_(bindparam("persons", expanding=True)))
    .order_by(_PROFILES.c.user_id)
    .with_for_update()
)
class ActiveRoute(NamedTuple):
    """An active route as routing reads it: where a person's events go (the fields are its columns)."""

    workflow_id: str
    journey: str
    key: str
    listens: list[str]
    """The event names the run waits for."""
    updated_at: datetime


_ROUTES = core_table(Route)
ACTIVE_ROUTES: Any = select(*(_ROUTES.c[name] for name in ActiveRoute._fields)).where(
    _ROUTES.c.user_id == bindparam("user"), _ROUTES.c.active.is_(True)
)
"""A person's active routes (parameter ``user``), built once and run on the session's connection:
the event API reads them for every event it routes."""


def active_routes(session: Session, user_id: str) -> list[ActiveRoute]:
    """The person's active routes, read in the caller's session."""
    return [ActiveRoute(*row) for row in session.connection().execute(ACTIVE_ROUTES, {"user": user_id})]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass
class _Person:
    """A person's ``profiles`` row as the identity transaction reads and changes it (the fields
    are its columns); written back by :data:`_UPDATE_PROFILE`, or :data:`_INSERT_PROFILE` when new."""

    user_id: str
    traits: dict[str, Any]
    opted_out: list[str]
    trait_times: dict[str, str]
    created_at: datetime
    updated_at: datetime
    group_id: str | None = None
    merged_into: str | None = None
    email: str | None = None
    phone: str | None = None
    wechat_openid: str | None = None


def _person(row: Row[Any]) -> _Person:
    return _Person(
        row.user_id,
        row.traits,
        row.opted_out,
        row.trait_times,
        _aware(row.created_at),
        _aware(row.updated_at),
        row.group_id,
        row.merged_into,
        row.email,
        row.phone,
        row.wechat_openid,
    )


def _owned(session: Session, identifiers: Sequence[Identifier]) -> tuple[dict[Identifier, str], dict[str, _Person]]:
    """The owners of ``identifiers`` and their rows, locked in id order, in one statement;
    :class:`_Moved` if one was merged meanwhile."""
    if not identifiers:
        return {}, {}
    owners: dict[Identifier, str] = {}
    locked: dict[str, _Person] = {}
    for row in session.connection().execute(_OWNED, _pairs(identifiers)):
        if row.merged_into is not None:
            raise _Moved
        if row.user_id not in locked:
            locked[row.user_id] = _person(row)
        owners[Identifier(row.kind, row.value)] = row.user_id
    return owners, locked


def _pairs(identifiers: Sequence[Identifier]) -> dict[str, list[tuple[str, str]]]:
    """The parameters of :data:`_NAMED`."""
    return {"pairs": [(i.kind, i.value) for i in identifiers]}


def _lock(session: Session, persons: set[str]) -> dict[str, _Person]:
    """Lock the persons' rows, in id order; :class:`_Moved` if one was merged meanwhile."""
    if not persons:
        return {}
    locked = {row.user_id: _person(row) for row in session.connection().execute(_LOCK, {"persons": list(persons)})}
    if set(locked) != persons or any(row.merged_into is not None for row in locked.values()):
        raise _Moved
    return locked


def _user_ids(session: Session, persons: Collection[str]) -> dict[str, frozenset[str]]:
    if not persons:
        return {}
    found: dict[str, set[str]] = {}
    for person, value in session.execute(
        select(col(IdentityRecord.person_id), col(IdentityRecord.value))
        .where(col(IdentityRecord.kind) == "user_id")
        .where(col(IdentityRecord.person_id).in_(sorted(persons)))
    ):
        found.setdefault(person, set()).add(value)
    return {person: frozenset(values) for person, values in found.items()}


def _mirror(row: _Person) -> None:
    """The address traits mirrored into their indexed columns."""
    for name in ADDRESS_KINDS:
        value = row.traits.get(name)
        setattr(row, name, str(value)[:320] if value else None)


def _merge(session: Session, held: Mapping[str, _Person], kept: _Person, merged: _Person) -> None:
    """Join ``merged`` into ``kept``: traits (the later wins), opt-outs (joined), group (the
    later group call's), identifiers, and every row of the person tables. Whoever was merged
    into ``merged`` now names ``kept``, both stored and among the call's ``held`` rows (which it
    writes back later), so a chain merged in one call stays one link long."""
    ours, theirs = kept.trait_times.get(GROUP_TIME, ""), merged.trait_times.get(GROUP_TIME, "")
    kept.traits, kept.trait_times = merge_traits(
        kept.traits, kept.trait_times, merged.traits, merged.trait_times
    )
    kept.opted_out = sorted(set(kept.opted_out) | set(merged.opted_out))
    if merged.group_id is not None and (kept.group_id is None or theirs > ours):
        kept.group_id = merged.group_id
        kept.trait_times = {**kept.trait_times, GROUP_TIME: theirs}
    _mirror(kept)
    merged.merged_into = kept.user_id
    for row in held.values():
        if row.merged_into == merged.user_id:
            row.merged_into = kept.user_id
    session.execute(
        update(ProfileRecord)
        .where(col(ProfileRecord.merged_into) == merged.user_id)
        .values(merged_into=kept.user_id)
    )
    session.execute(
        update(IdentityRecord)
        .where(col(IdentityRecord.person_id) == merged.user_id)
        .values(person_id=kept.user_id)
    )
    for table in PERSON_TABLES:
        session.execute(
            update(table).where(col(table.user_id) == merged.user_id).values(user_id=kept.user_id)
        )


def _merged_away(session: Session, person_id: str) -> list[str]:
    """Workflow ids of ``person_id``'s active runs that lose to an older run of the same journey
    and key: each active route (or run) with its run's entry time, or the route's time when the
    run's start is not recorded yet."""
    slots: dict[str, RunSlot] = {}
    for route in active_routes(session, person_id):
        slots[route.workflow_id] = RunSlot(
            route.journey, route.key, route.workflow_id, _aware(route.updated_at)
        )
    workflows: dict[str, str] = {}
    for run in session.execute(
        select(RunRecord).where(col(RunRecord.user_id) == person_id).where(col(RunRecord.status) == "active")
    ).scalars():
        slots[run.workflow_id] = RunSlot(run.journey, run.key, run.run_id, _aware(run.entered_at))
        workflows[run.run_id] = run.workflow_id
    return sorted({workflows.get(slot.run_id, slot.run_id) for slot in merged_away(slots.values())})


def _stored(db: Database, message_id: str) -> bool:
    with db.session() as session:
        found = session.execute(
            select(EventRecord.id).where(col(EventRecord.message_id) == message_id)
        ).first()
        return found is not None


__all__ = ["MERGED", "Applied", "DbIdentities", "canonical", "merged_persons", "usable", "with_group"]
