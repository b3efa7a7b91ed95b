"""The database behind the engine's protocols: profiles, run records, routes, events, outbox.

Calls are synchronous SQLAlchemy; the async methods used by activities run them in a thread so
the worker's event loop never blocks on the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from channels import DeliveryResult, Envelope
from channels.outbox import outbox_id
from nurture.delivery.deliverer import AttemptState, Claim, earlier_claim, with_attempt
from nurture.engine.clock import format_instant, parse_instant
from nurture.engine.model import EndedRun, Event, Profile, SendOutcome, SendRequest, record_rider
from nurture.language import ir
from nurture.language.templates import RenderedMessage

from .audiences import mark_pending
from .db import Database, upsert, upsert_statement
from .identities import ActiveRoute, active_routes, canonical, merged_persons, with_group
from .models import (
    DateTriggerRecord,
    EventRecord,
    IdentityRecord,
    JourneyVersion,
    MessageRecord,
    ProfileRecord,
    Route,
    RunRecord,
    StepReach,
    core_table,
    utcnow,
)

IDENTITY = ("email", "phone", "wechat_openid")

OptOuts = Sequence[str] | Callable[[set[str]], set[str]]
"""New opt-outs for a profile: the whole set, or a function of the stored one."""


class DbProfiles:
    """Profiles in the ``profiles`` table (the engine's ``ProfileStore``).

    Every id given is a person id, resolved to its surviving person: a run started under a
    person since merged away reads, and sends to, the merged profile."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def read(self, user_id: str) -> Profile:
        """The surviving person's profile, with ``group`` among its traits when it has one."""
        with self.db.session() as session:
            person = canonical(session, user_id)
            row = session.get(ProfileRecord, person)
            if row is None:
                return Profile(person)
            return with_group(session, row, person)

    def record(self, user_id: str) -> ProfileRecord | None:
        with self.db.session() as session:
            return session.get(ProfileRecord, user_id)

    def merge(self, user_id: str, traits: Mapping[str, Any], opted_out: OptOuts | None = None) -> Profile:
        """Merge ``traits`` into the person's profile (creating it, with its ``user_id``
        identifier); ``opted_out`` replaces the opt-outs, or changes them when it is a function
        (applied to the locked row, so changes don't race). Calls from clients go through
        :class:`~nurture.storage.identities.DbIdentities` instead, with their record in the same
        transaction: this is for the engine's profile updates and provider opt-outs."""
        for _ in range(3):
            try:
                with self.db.write_session() as session:
                    user_id = canonical(session, user_id)
                    row = session.get(ProfileRecord, user_id, with_for_update=True)
                    if row is None:
                        row = ProfileRecord(user_id=user_id)
                        session.add(row)
                        if session.get(IdentityRecord, ("user_id", user_id)) is None:
                            session.add(IdentityRecord(kind="user_id", value=user_id, person_id=user_id))
                    row.traits = {**row.traits, **traits}
                    for name in IDENTITY:
                        value = row.traits.get(name)
                        setattr(row, name, str(value) if value else None)
                    if callable(opted_out):
                        row.opted_out = sorted(opted_out(set(row.opted_out)))
                    elif opted_out is not None:
                        row.opted_out = sorted(set(opted_out))
                    row.updated_at = utcnow()
                    if traits or opted_out is not None:  # audiences: brought up to date by the sweep
                        mark_pending(session, user_id)
                    return Profile(user_id, dict(row.traits), frozenset(row.opted_out))
            except IntegrityError:  # the profile was stored concurrently: look again
                continue
        raise RuntimeError(f"could not update profile {user_id}")

    def set_opt_out(self, user_id: str, channel: str, opted_out: bool) -> Profile:
        """Opt the user out of ``channel`` (or back in)."""
        return self.merge(user_id, {}, lambda current: current | {channel} if opted_out else current - {channel})

    async def get(self, user_id: str) -> Profile:
        return await asyncio.to_thread(self.read, user_id)

    async def opt_out(self, user_id: str, name: str) -> None:
        await asyncio.to_thread(self.set_opt_out, user_id, name, True)

    async def update(self, user_id: str, traits: Mapping[str, Any]) -> Profile:
        return await asyncio.to_thread(self.merge, user_id, traits)


def _instant(value: str | None) -> datetime | None:
    return None if value is None else parse_instant(value)


def _reach_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "run_id": record["run_id"],
            "step_id": reach["step_id"],
            "journey": record["journey"],
            "version": record["version"],
            "variant": reach.get("variant"),
            "reached_at": parse_instant(reach["at"]),
        }
        for reach in record.get("reached") or ()
    ]


def _run_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A new run's row, from its start record."""
    return {
        "run_id": record["run_id"],
        "workflow_id": record["workflow_id"],
        "journey": record["journey"],
        "version": record["version"],
        "user_id": record["user_id"],
        "key": record.get("key", ""),
        "trigger_message_id": record.get("trigger_message_id"),
        "entered_at": parse_instant(record["at"]),
        "holdout": bool(record.get("holdout")),
    }


def _end_values(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "status": "ended",
        "ended_at": parse_instant(record["at"]),
        "end_reason": record["reason"],
        "variants": dict(record.get("variants") or {}),
        "step": None,
        "last_message_at": _instant(record.get("last_message_at")),
        "goal_until": _instant(record.get("goal_until")),
    }


def _conversion_values(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"converted_at": parse_instant(record["at"]), "conversion_value": record.get("value")}


def _message_values(request: SendRequest, outcome: SendOutcome) -> dict[str, Any]:
    return {
        "run_id": request.run_id,
        "user_id": request.user_id,
        "journey": request.journey,
        "step_id": request.step_id,
        "channel": outcome.channel,
        "template": outcome.template,
        "provider": outcome.provider,
        "provider_id": outcome.provider_id,
        "status": outcome.status,
        "reason": outcome.reason,
        "variant": outcome.variant,
        "locale": outcome.locale,
        "preview": outcome.preview or None,
        "category": request.category,
        "topic": request.topic,
        # What frequency caps count (DbHistory), on the run's clock.
        "sent_at": outcome.at if outcome.status == "sent" else None,
    }


_RUNS = core_table(RunRecord)
_REACHES = core_table(StepReach)
_MESSAGES = core_table(MessageRecord)
_ROUTES = core_table(Route)
# A run's records and its messages' outcomes, written with every send and wait: built once and run
# on the session's connection with each call's values (see ``upsert_statement``). Built per call,
# the ORM statements cost as much CPU as running them. Without ``values()``, an update sets the
# columns its call's values name.
_RUN_ROW: Any = update(_RUNS).where(_RUNS.c.run_id == bindparam("run"))
_ROUTE_ROW: Any = update(_ROUTES).where(_ROUTES.c.workflow_id == bindparam("workflow"))
_MESSAGE_ROW: Any = update(_MESSAGES).where(_MESSAGES.c.idempotency_key == bindparam("key"))
_DEFERRAL: Any = (
    update(_REACHES)
    .where(_REACHES.c.run_id == bindparam("run"), _REACHES.c.step_id == bindparam("step"))
    .values(deferrals=_REACHES.c.deferrals + 1, deferral_reason=bindparam("reason"))
)


def _insert_message(session: Session, values: Mapping[str, Any]) -> None:
    """A new ``messages`` row from ``values`` and the model's defaults; ``IntegrityError`` when its
    idempotency key is taken."""
    session.connection().execute(_MESSAGES.insert(), {**_defaults(MessageRecord), **values})


def _add_reaches(session: Session, record: Mapping[str, Any]) -> None:
    """Insert the record's ``reached`` steps, once each: a retried activity adds nothing."""
    rows = _reach_rows(record)
    if not rows:
        return
    statement = upsert_statement(session, _REACHES, ("run_id", "step_id"), ())
    if statement is not None:
        session.connection().execute(statement, rows)
        return
    for row in rows:  # other databases: one look-up per row
        if session.get(StepReach, (row["run_id"], row["step_id"])) is None:
            session.add(StepReach(**row))


def _write_steps(session: Session, record: Mapping[str, Any]) -> None:
    """Steps a run reached, and where it now waits (a deferred send counts a deferral)."""
    _add_reaches(session, record)
    waiting = record.get("waiting")
    if waiting is None:
        return
    connection = session.connection()
    # The version too: a run moved to a newer version records it with its first wait there.
    connection.execute(_RUN_ROW, {"run": record["run_id"], "step": waiting, "version": record["version"]})
    if record.get("deferred"):
        connection.execute(_DEFERRAL, {"run": record["run_id"], "step": waiting, "reason": record["deferred"]})


def _write_end(session: Session, record: Mapping[str, Any]) -> None:
    """A run's end: its last steps, its row's end values, and its route (see :meth:`DbRecorder.end`)."""
    _add_reaches(session, record)
    connection = session.connection()
    connection.execute(_RUN_ROW, {"run": record["run_id"], **_end_values(record)})
    if record.get("workflow_id"):
        # A run that continues as new keeps its route active; set again here because a record
        # written with the last send (``records_ride``) may have ended it first.
        connection.execute(
            _ROUTE_ROW,
            {"workflow": record["workflow_id"], "active": bool(record.get("continued")), "updated_at": utcnow()},
        )


def record_opening(session: Session, start: Mapping[str, Any], steps: Mapping[str, Any]) -> None:
    """A run's start record and the steps it reached before its first wait, written by the router
    that started it (:class:`~nurture.engine.interpreter.Opening`): its row, with the step it
    waits at, and those reaches, each only where absent. The run may have got further and
    written them first: its own records carry them again (``opened`` runs)."""
    _add_run(session, start, step=steps["waiting"])
    _add_reaches(session, steps)


def _add_run(session: Session, start: Mapping[str, Any], *, step: str | None = None) -> None:
    """A run's row from its start record (``step``: where it waits), unless it has one (a retried
    activity; an opened run's row, written by its router or by the run)."""
    if session.get(RunRecord, start["run_id"]) is not None:
        return  # the usual case for a retry or an opened run: no more statements
    row = {**_defaults(RunRecord), **_run_row(start), "step": step}
    row["user_id"] = canonical(session, row["user_id"])  # a run of a person merged since
    insert = upsert(session)
    if insert is not None:  # the other writer may insert it meanwhile
        session.execute(insert(RunRecord).values(**row).on_conflict_do_nothing())
    else:
        session.add(RunRecord(**row))


class DbRecorder:
    """Runs, routes and message outcomes, written by the workflow's activities."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def start(self, record: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self._start, record)

    def _start(self, record: Mapping[str, Any]) -> None:
        with self.db.session() as session:
            _add_run(session, record)

    async def end(self, record: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self._end, record)

    def _end(self, record: Mapping[str, Any]) -> None:
        with self.db.session() as session:
            _write_end(session, record)

    async def conversion(self, record: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self._conversion, record)

    def _conversion(self, record: Mapping[str, Any]) -> bool:
        with self.db.session() as session:
            changed = session.execute(
                update(RunRecord)
                .where(col(RunRecord.run_id) == record["run_id"])
                .where(col(RunRecord.converted_at).is_(None))
                .values(**_conversion_values(record))
            )
            return bool(getattr(changed, "rowcount", 0))

    async def steps(self, record: Mapping[str, Any]) -> None:
        """Steps a run reached, and where it now waits (a deferred send counts a deferral)."""
        await asyncio.to_thread(self._steps, record)

    def _steps(self, record: Mapping[str, Any]) -> None:
        with self.db.session() as session:
            _write_steps(session, record)

    def ended_runs_converting(self, user_id: str, journeys: Sequence[str], at: datetime) -> list[EndedRun]:
        """The user's ended, unconverted runs of ``journeys`` whose goal window is open at ``at``."""
        with self.db.session() as session:
            return ended_runs_converting(session, user_id, journeys, at)

    def convert(self, run_id: str, at: datetime, value: float | None) -> bool:
        """Record a conversion once; ``False`` when the run had converted already."""
        return self._conversion({"run_id": run_id, "at": format_instant(at), "value": value})

    async def send(self, request: SendRequest, outcome: SendOutcome, then: Mapping[str, Any] | None = None) -> None:
        await asyncio.to_thread(self._send, request, outcome, then)

    def _send(self, request: SendRequest, outcome: SendOutcome, then: Mapping[str, Any] | None = None) -> None:
        key = request.idempotency_key
        values = _message_values(request, outcome)
        for _ in range(3):
            try:
                with self.db.session() as session:
                    values["user_id"] = canonical(session, request.user_id)
                    connection = session.connection()
                    # The ledger wrote the row before the provider was called; a send that never
                    # reached a provider (skipped, held back) has none yet.
                    if connection.execute(_MESSAGE_ROW, {"key": key, **values}).rowcount == 0:
                        _insert_message(session, {"idempotency_key": key, **values})
                    if then is not None:  # the run's next record, in the same transaction
                        (_write_steps if then["kind"] == "steps" else _write_end)(session, then["record"])
                return
            except IntegrityError:
                continue


def _defaults(model: type[SQLModel]) -> dict[str, Any]:
    """The model's default column values, for rows inserted without making model objects."""
    return {
        name: field.get_default(call_default_factory=True)
        for name, field in model.model_fields.items()
        if not field.is_required() and name != "id"
    }


class BatchRecorder:
    """The rows :class:`DbRecorder` writes, kept in memory and written in one transaction by
    :meth:`flush`: a simulation records many thousands of runs in seconds, not one transaction
    per record. Each record changes the pending rows as DbRecorder's statement changes the table."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.runs: dict[str, dict[str, Any]] = {}
        self.reaches: dict[tuple[str, str], dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}

    def _reached(self, record: Mapping[str, Any]) -> None:
        for row in _reach_rows(record):
            self.reaches.setdefault((row["run_id"], row["step_id"]), row)

    async def start(self, record: Mapping[str, Any]) -> None:
        self.runs.setdefault(record["run_id"], _run_row(record))

    async def end(self, record: Mapping[str, Any]) -> None:
        self._reached(record)
        self.runs[record["run_id"]].update(_end_values(record))

    async def conversion(self, record: Mapping[str, Any]) -> None:
        run = self.runs[record["run_id"]]
        if run.get("converted_at") is None:
            run.update(_conversion_values(record))

    async def steps(self, record: Mapping[str, Any]) -> None:
        self._reached(record)
        waiting = record.get("waiting")
        if waiting is None:
            return
        self.runs[record["run_id"]]["step"] = waiting
        reach = self.reaches.get((record["run_id"], waiting))
        if record.get("deferred") and reach is not None:
            reach["deferrals"] = reach.get("deferrals", 0) + 1
            reach["deferral_reason"] = record["deferred"]

    async def send(self, request: SendRequest, outcome: SendOutcome, then: Mapping[str, Any] | None = None) -> None:
        key = request.idempotency_key
        self.messages[key] = {"idempotency_key": key, **_message_values(request, outcome)}
        if then is not None:
            await record_rider(self, then)

    def flush(self) -> None:
        """Write every pending row in one transaction, then forget them."""
        with self.db.session() as session:
            for model, rows in (
                (RunRecord, self.runs.values()),
                (StepReach, self.reaches.values()),
                (MessageRecord, self.messages.values()),
            ):
                # Plain multi-row INSERTs: model objects and the ORM's unit of work cost seconds here.
                defaults = _defaults(model)
                values = [{**defaults, **row} for row in rows]
                if values:
                    session.execute(core_table(model).insert(), values)
        self.runs, self.reaches, self.messages = {}, {}, {}


class DbOutbox:
    """The embedded channel: it sends nothing, and the message row is the record.

    :class:`DbLedger` writes every message, rendered, to the ``messages`` table before any
    channel is called; for the outbox that row *is* the delivery.
    """

    provider = "outbox"
    idempotent = True

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult:
        return DeliveryResult(provider=self.provider, provider_id=outbox_id(envelope.idempotency_key))


class _LedgerRow(NamedTuple):
    """What :class:`DbLedger` decides on: a message row's id, revision and attempts."""

    id: int
    revision: int
    attempts: list[dict[str, Any]]


# Every send claims its row and settles it (both by compare-and-set): built once, as the statements
# above, for the same reason.
_LEDGER_ROW: Any = select(_MESSAGES.c.id, _MESSAGES.c.revision, _MESSAGES.c.attempts).where(
    _MESSAGES.c.idempotency_key == bindparam("key")
)
_LEDGER_SWAP: Any = update(_MESSAGES).where(
    _MESSAGES.c.id == bindparam("row"), _MESSAGES.c.revision == bindparam("seen")
)


class DbLedger:
    """The engine's :class:`~nurture.delivery.deliverer.SendLedger` on the ``messages`` table.

    One row per (run, step), unique on the idempotency key, with one ``attempts`` entry per
    channel tried. The row is committed before the provider is called. Every change to the
    attempts is a compare-and-set on ``revision`` (``UPDATE ... WHERE revision = :seen``), and the
    first insert is guarded by the unique key, so of two concurrent attempts of one send exactly
    one gets ``new``, on SQLite and PostgreSQL alike.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    async def claim(
        self, request: SendRequest, channel: str, provider: str, address: str, message: RenderedMessage
    ) -> Claim:
        return await asyncio.to_thread(self._claim, request, channel, provider, address, message)

    def _claim(
        self, request: SendRequest, channel: str, provider: str, address: str, message: RenderedMessage
    ) -> Claim:
        key = request.idempotency_key
        attempt = {"provider": provider, "state": "pending", "reason": None, "at": utcnow().isoformat()}
        content: dict[str, Any] = {
            "channel": channel,
            "template": message.template,
            "provider": provider,
            "provider_id": None,
            "status": "sending",
            "locale": message.locale,
            "address": address,
            "subject": message.subject,
            "preview": message.preview(),
            "content": message.to_dict(),
            "category": request.category,
            "topic": request.topic,
            "updated_at": utcnow(),
        }
        for _ in range(20):
            row = self._read(key)
            if row is None:
                try:
                    with self.db.session() as session:
                        _insert_message(
                            session,
                            {
                                "idempotency_key": key,
                                "run_id": request.run_id,
                                "user_id": canonical(session, request.user_id),
                                "journey": request.journey,
                                "step_id": request.step_id,
                                "variant": request.variant,
                                "attempts": with_attempt([], channel, **attempt),
                                **content,
                            },
                        )
                    return Claim("new", channel)
                except IntegrityError:  # inserted concurrently: decide on that row
                    continue
            decided = earlier_claim(row.attempts, channel)
            if decided is not None:
                return decided
            if self._swap(row, with_attempt(row.attempts, channel, **attempt), content):
                return Claim("new", channel)
        raise RuntimeError(f"could not claim message {key}: too much contention")

    async def settle(
        self,
        request: SendRequest,
        channel: str,
        state: AttemptState,
        *,
        provider_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        await asyncio.to_thread(self._settle, request.idempotency_key, channel, state, provider_id, reason)

    def _settle(
        self, key: str, channel: str, state: AttemptState, provider_id: str | None, reason: str | None
    ) -> None:
        extra: dict[str, Any] = {"updated_at": utcnow()}
        if state == "sent":
            extra.update(status="sent", provider_id=provider_id, reason=None)
        for _ in range(20):
            row = self._read(key)
            if row is None:
                return
            attempts = with_attempt(row.attempts, channel, state=state, provider_id=provider_id, reason=reason)
            if self._swap(row, attempts, extra):
                return
        raise RuntimeError(f"could not record the attempt of message {key}: too much contention")

    def _read(self, key: str) -> _LedgerRow | None:
        with self.db.session() as session:
            found = session.connection().execute(_LEDGER_ROW, {"key": key}).first()
            return None if found is None else _LedgerRow(*found)

    def _swap(self, row: _LedgerRow, attempts: list[dict[str, Any]], values: Mapping[str, Any]) -> bool:
        """Write ``attempts`` (and ``values``) if nobody changed the row since it was read."""
        with self.db.session() as session:
            done = session.connection().execute(
                _LEDGER_SWAP,
                {"row": row.id, "seen": row.revision, "attempts": attempts, "revision": row.revision + 1, **values},
            )
            return bool(done.rowcount)


class DbHistory:
    """The engine's :class:`~nurture.delivery.deliverer.SendHistory` on the ``messages`` table.

    A marketing message counts from the moment its row is claimed (``sending``, by its creation
    time), before the provider is called, so a second journey sending to the same user a moment
    later sees it; once sent, by its ``sent_at``.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    async def sent(self, user_id: str, since: datetime) -> list[tuple[datetime, str]]:
        return await asyncio.to_thread(self._sent, user_id, since)

    def _sent(self, user_id: str, since: datetime) -> list[tuple[datetime, str]]:
        with self.db.session() as session:
            # The person's messages and those of people merged into it (a message recorded under
            # a merged-away id while the merge committed counts too).
            persons = merged_persons(session, canonical(session, user_id))
            rows = session.execute(
                select(col(MessageRecord.sent_at), col(MessageRecord.created_at), col(MessageRecord.channel))
                .where(col(MessageRecord.user_id).in_(persons))
                .where(col(MessageRecord.category) == "marketing")
                .where(col(MessageRecord.status).in_(("sent", "sending")))
                .where(or_(col(MessageRecord.sent_at) >= since, col(MessageRecord.created_at) >= since))
            ).all()
        return [(_aware(sent_at or created_at), channel) for sent_at, created_at, channel in rows]

    async def record(self, request: SendRequest, channel: str, at: datetime) -> None:
        """Nothing to do: the message row is the record, and :class:`DbRecorder` writes its
        ``sent_at`` with the outcome, in the same activity."""


def _aware(value: datetime) -> datetime:
    # SQLite hands timezone-aware columns back naive (in UTC).
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Unrouted(NamedTuple):
    """A stored call whose routing has not finished: a track event, or an identity call whose
    merge has runs to end."""

    user_id: str
    event: Event
    received_at: datetime
    kind: str = "track"


class Events:
    """The ``events`` table: accepted calls, de-duplicated on ``message_id``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(
        self,
        *,
        message_id: str,
        kind: str,
        user_id: str,
        name: str | None,
        properties: Mapping[str, Any],
        timestamp: datetime,
        routed: bool = False,
    ) -> bool:
        """Store an event (``routed`` when nothing is left to do with it); ``False`` when its
        ``message_id`` was seen before."""
        try:
            with self.db.session() as session:
                session.add(
                    EventRecord(
                        message_id=message_id,
                        kind=kind,
                        user_id=user_id,
                        name=name,
                        properties=dict(properties),
                        timestamp=timestamp.astimezone(UTC),
                        routed_at=utcnow() if routed else None,
                    )
                )
            return True
        except IntegrityError:
            return False

    def unrouted(
        self, *, before: datetime | None = None, message_id: str | None = None, names: Sequence[str] | None = None
    ) -> list[Unrouted]:
        """Calls whose routing never finished, oldest first: those received before ``before``,
        or the one with ``message_id``; only events named in ``names`` when given."""
        query = select(EventRecord).where(col(EventRecord.routed_at).is_(None)).order_by(col(EventRecord.id))
        if names is not None:
            query = query.where(col(EventRecord.name).in_(names))
        if before is not None:
            query = query.where(col(EventRecord.received_at) < before)
        if message_id is not None:
            query = query.where(col(EventRecord.message_id) == message_id)
        with self.db.session() as session:
            return [
                Unrouted(
                    row.user_id,
                    Event(row.name or "", _aware(row.timestamp), dict(row.properties), row.message_id),
                    _aware(row.received_at),
                    row.kind,
                )
                for row in session.execute(query).scalars()
            ]

    def routed(self, message_id: str) -> None:
        """Routing ``message_id`` finished: every route and journey has had it."""
        with self.db.session() as session:
            mark_routed(session, [message_id])


def mark_routed(session: Session, message_ids: Sequence[str]) -> None:
    """:meth:`Events.routed` for each of ``message_ids``, in the caller's session."""
    if message_ids:
        now = utcnow()
        session.connection().execute(_MARK_ROUTED, [{"event": message_id, "at": now} for message_id in message_ids])


_EVENTS = core_table(EventRecord)
"""The events table (and ``_ROUTES``, above), for the plain statements of the event API's hot
path: built once, run on the session's connection (no ORM step; SQLAlchemy reuses their compiled form)."""
# The event API's reads, with their parameters bound per call.
_CONVERTING: Any = (
    select(*(_RUNS.c[f.name] for f in fields(EndedRun)))
    .where(_RUNS.c.user_id == bindparam("user"), _RUNS.c.journey.in_(bindparam("journeys", expanding=True)))
    .where(_RUNS.c.status == "ended", _RUNS.c.converted_at.is_(None), _RUNS.c.goal_until >= bindparam("at"))
)
"""A person's ended runs whose goal window is open: :class:`EndedRun`'s fields are its columns."""
_HAD_RUN: Any = (
    select(_RUNS.c.run_id)
    .where(_RUNS.c.journey == bindparam("journey"), _RUNS.c.user_id == bindparam("user"))
    .where(_RUNS.c.key == bindparam("key"))
    .limit(1)
)
_MARK_ROUTED: Any = (
    update(_EVENTS)
    .where(_EVENTS.c.message_id == bindparam("event"))
    .where(_EVENTS.c.routed_at.is_(None))
    .values(routed_at=bindparam("at"))
)


class Routes:
    """Which workflows a user's events go to."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def activate(
        self, workflow_id: str, *, user_id: str, journey: str, key: str, listens: Sequence[str]
    ) -> None:
        """Mark the route active, creating it; one statement, so concurrent first triggers of one
        workflow id all succeed."""
        with self.db.session() as session:
            activate_route(session, workflow_id, user_id=user_id, journey=journey, key=key, listens=listens)

    def deactivate(self, workflow_id: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(Route).where(col(Route.workflow_id) == workflow_id).values(active=False, updated_at=utcnow())
            )

    def listen_also(self, workflow_ids: Sequence[str], names: Sequence[str]) -> None:
        """Add event ``names`` to these routes' (a run moving to a version that waits for more)."""
        with self.db.session() as session:
            for start in range(0, len(workflow_ids), 500):
                for route in session.execute(
                    select(Route).where(col(Route.workflow_id).in_(workflow_ids[start : start + 500]))
                ).scalars():
                    route.listens = sorted(set(route.listens) | set(names))
                    route.updated_at = utcnow()

    def active_for(self, user_id: str) -> list[ActiveRoute]:
        with self.db.session() as session:
            return active_routes(session, user_id)

    def is_active(self, workflow_id: str) -> bool:
        with self.db.session() as session:
            row = session.get(Route, workflow_id)
            return bool(row and row.active)


def activate_route(
    session: Session, workflow_id: str, *, user_id: str, journey: str, key: str, listens: Sequence[str]
) -> None:
    """:meth:`Routes.activate` in the caller's session."""
    activate_routes(
        session, [{"workflow_id": workflow_id, "user_id": user_id, "journey": journey, "key": key, "listens": listens}]
    )


def activate_routes(session: Session, routes: Sequence[Mapping[str, Any]]) -> None:
    """Routes made active, created where missing, in the caller's session: each of ``routes``
    names ``workflow_id``, ``user_id``, ``journey``, ``key`` and ``listens``. One statement, run
    with each route's values (on PostgreSQL the driver sends them in one pipeline)."""
    if not routes:
        return
    now = utcnow()
    values = [{**route, "listens": sorted(set(route["listens"])), "active": True, "updated_at": now} for route in routes]
    statement = upsert_statement(session, _ROUTES, ("workflow_id",), ("listens", "active", "updated_at"))
    if statement is None:
        for value in values:  # other engines: a merge by primary key, written before what follows
            session.merge(Route.model_validate(value))
        session.flush()
        return
    session.connection().execute(statement, values)


def ended_runs_converting(session: Session, user_id: str, journeys: Sequence[str], at: datetime) -> list[EndedRun]:
    """:meth:`DbRecorder.ended_runs_converting` in the caller's session."""
    rows = session.connection().execute(_CONVERTING, {"user": user_id, "journeys": list(journeys), "at": at})
    return [EndedRun(*row) for row in rows]


def run_started_by(db: Database, journey: str, message_id: str) -> str | None:
    """The status (``active``, ``ended``) of the run of ``journey`` that the event ``message_id``
    started, if one did."""
    with db.session() as session:
        return session.execute(
            select(col(RunRecord.status))
            .where(col(RunRecord.journey) == journey)
            .where(col(RunRecord.trigger_message_id) == message_id)
            .limit(1)
        ).scalar()


def has_run(db: Database, journey: str, user_id: str, key: str) -> bool:
    """Whether (journey, user, key) ever had a run (the ``once`` re-entry rule)."""
    with db.session() as session:
        return had_run(session, journey, user_id, key)


def had_run(session: Session, journey: str, user_id: str, key: str) -> bool:
    """:func:`has_run` in the caller's session."""
    return session.connection().execute(_HAD_RUN, {"journey": journey, "user": user_id, "key": key}).first() is not None


def last_entry(db: Database, journey: str, user_id: str, key: str) -> datetime | None:
    """When the latest run of (journey, user, key) entered (the ``re_entry: {after}`` rule)."""
    with db.session() as session:
        row = session.execute(
            select(func.max(col(RunRecord.entered_at)))
            .where(col(RunRecord.journey) == journey)
            .where(col(RunRecord.user_id) == user_id)
            .where(col(RunRecord.key) == key)
        ).first()
    value = None if row is None else row[0]
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class DateTriggers:
    """The ``date_triggers`` table: which date trigger workflows were started for whom."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, workflow_id: str, *, user_id: str, journey: str) -> None:
        """Record (or re-record) a started date trigger workflow."""
        values = {"workflow_id": workflow_id, "user_id": user_id, "journey": journey, "updated_at": utcnow()}
        with self.db.session() as session:
            insert = upsert(session)
            if insert is None:
                session.merge(DateTriggerRecord.model_validate(values))
                return
            statement = insert(DateTriggerRecord).values(**values)
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=["workflow_id"],
                    set_={"user_id": statement.excluded.user_id, "updated_at": statement.excluded.updated_at},
                )
            )
def store_versions(db: Database, journeys: Sequence[ir.Journey]) -> None:
    """Keep the compiled form of each journey version (once; the first start's time stays)."""
    rows: list[dict[str, Any]] = [
        {
            "journey": journey.id,
            "version": journey.version,
            "ir": ir.journey_to_dict(journey),
            "source": journey.source,
            "deployed_at": utcnow(),
        }
        for journey in journeys
    ]
    if not rows:
        return
    with db.session() as session:
        insert = upsert(session)
        if insert is not None:
            session.execute(insert(JourneyVersion).values(rows).on_conflict_do_nothing())
            return
        for row in rows:
            if session.get(JourneyVersion, (row["journey"], row["version"])) is None:
                session.add(JourneyVersion(**row))


def listened_events(db: Database) -> set[str]:
    """Every event name a stored journey version triggers on or its runs may wait for: runs in
    flight keep their version, so events an older version listens for still need routing."""
    names: set[str] = set()
    with db.session() as session:
        for stored in session.execute(select(col(JourneyVersion.ir))).scalars():
            journey = ir.journey_from_dict(stored)
            names.add(journey.trigger.event)
            names.update(journey.listens_for())
    return names


def stored_version_count(db: Database) -> int:
    """How many journey versions are stored: it grows when a process with a new version starts."""
    with db.session() as session:
        return int(session.execute(select(func.count()).select_from(JourneyVersion)).scalar_one())


def stored_version(db: Database, journey: str, version: str) -> ir.Journey | None:
    """A stored journey version (:func:`store_versions`), or ``None``."""
    with db.session() as session:
        row = session.get(JourneyVersion, (journey, version))
        return None if row is None else ir.journey_from_dict(row.ir)


def stored_versions(db: Database, journey: str) -> list[str]:
    """The stored versions of ``journey``, first deployed first."""
    with db.session() as session:
        return list(
            session.execute(
                select(col(JourneyVersion.version))
                .where(col(JourneyVersion.journey) == journey)
                .order_by(col(JourneyVersion.deployed_at))
            ).scalars()
        )
