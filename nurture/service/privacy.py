"""Forgetting and exporting a user (erasure and access requests), for the event API and the CLI.

:func:`forget` first ends the user's active runs on Temporal, through the workflow's own ``stop``
signal with reason ``forgotten`` (a run that does not end in time, e.g. with no worker polling, is
terminated), and deletes the run histories Temporal still holds, since they carry traits and
event payloads. Only then, in one transaction, it deletes the profile, events, routes and the
provider events about the user, anonymises the rows the statistics need and writes the audit
entry. If Temporal cannot be reached while runs are active, nothing changes and the caller can
retry.

What stays is anonymous: message rows keep journey, step, template, channel, provider and
provider id, status, reason, variant, category, topic, delivery status and times, but lose the
user id, address, subject, preview and rendered content; run rows keep journey, version, status,
dates, end reason, variants and conversion, but lose the user id, workflow id (it embeds the
user id) and key. Nothing else about the user is left, so a later event for the same id starts
from scratch.

A user is a person (docs/identity.md): both functions take a person id, resolved first to its
surviving person, and cover every person merged into it. Forgetting deletes every identifier
(user ids, anonymous ids, addresses) the person and those merged into it ever had, so a later call
naming one of them starts a new person.

:func:`export_user` returns everything the database holds about a user. Both are written to the
``audit_log`` table (:mod:`nurture.storage.audit`), under a hash of the user id.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import delete, func, update
from sqlmodel import Session, col, select
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import (
    Client,
    WorkflowContinuedAsNewError,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode

from nurture.language.ir import ADDRESS_TRAITS
from nurture.storage import audiences
from nurture.storage.audit import AuditAction, AuditRecord, subject_hash, subject_hashes
from nurture.storage.db import Database
from nurture.storage.identities import canonical, merged_persons
from nurture.storage.models import (
    DateTriggerRecord,
    EventRecord,
    IdentityRecord,
    MessageEvent,
    MessageRecord,
    ProfileRecord,
    Route,
    RunRecord,
    utcnow,
)

log = logging.getLogger("nurture.privacy")

FORGOTTEN = "forgotten"
"""The ``stop`` signal's reason, recorded as the run's end reason."""
STOP_TIMEOUT = 10.0
"""Seconds a stopped run gets to end itself before it is terminated."""
CLI_ACTOR = "cli"
"""The audit actor of the command line."""

_HANDOVERS = 3
"""A run that ends with a trigger pending hands over to a new run (continue-as-new): stop that
one too, this many times, before terminating whatever still runs."""
_CHUNK = 500
"""Values per ``IN (...)``: far below SQLite's and PostgreSQL's parameter limits."""
_UNSUPPORTED = (RPCStatusCode.UNIMPLEMENTED, RPCStatusCode.PERMISSION_DENIED)
"""Answers to a history deletion that leave the history to retention instead of failing."""

T = TypeVar("T")


class TemporalUnavailable(Exception):
    """Temporal is needed (the user has runs to end) but unreachable, or refused: nothing changed."""


def key_fingerprint(key: str) -> str:
    """The audit actor for an API write key: identifies which key without revealing it."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


# Answers -------------------------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    # Stored instants read back in UTC; an export states them in UTC whatever else made them.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Instant = Annotated[datetime, AfterValidator(_utc)]


class _Row(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ExportedProfile(_Row):
    traits: dict[str, Any]
    email: str | None
    phone: str | None
    wechat_openid: str | None
    opted_out: list[str] = Field(description="Channels the user opted out of.")
    created_at: Instant
    updated_at: Instant


class ExportedEvent(_Row):
    message_id: str
    kind: str = Field(description="`track` or `identify` (whose properties are the traits sent).")
    name: str | None
    properties: dict[str, Any]
    timestamp: Instant
    received_at: Instant


class ExportedRun(_Row):
    run_id: str
    workflow_id: str
    journey: str
    version: str
    key: str
    status: str
    entered_at: Instant
    ended_at: Instant | None
    end_reason: str | None
    variants: dict[str, str]
    converted_at: Instant | None


class ExportedRoute(_Row):
    workflow_id: str
    journey: str
    key: str
    listens: list[str] = Field(description="Event names the run listens for.")
    active: bool
    updated_at: Instant


class ExportedMessage(_Row):
    id: int
    run_id: str
    journey: str
    step_id: str
    channel: str
    template: str
    category: str | None
    topic: str | None
    provider: str | None
    provider_id: str | None
    status: str
    reason: str | None
    variant: str | None
    locale: str | None
    address: str | None
    subject: str | None
    preview: str | None
    content: dict[str, Any] | None = Field(description="The rendered message as sent.")
    attempts: list[dict[str, Any]]
    delivery_status: str | None
    sent_at: Instant | None
    created_at: Instant
    updated_at: Instant | None


class ExportedMessageEvent(_Row):
    id: int
    provider: str
    event: str
    provider_event_id: str | None
    idempotency_key: str | None
    provider_id: str | None
    at: Instant
    data: dict[str, Any] = Field(description="The provider's payload as received.")
    received_at: Instant


class ExportedAudit(_Row):
    id: int
    at: Instant
    action: str = Field(description="`forget` or `export`.")
    actor: str = Field(description="`key:<fingerprint>` of the API write key used, or `cli`.")
    details: dict[str, Any] = Field(description="Counts of what was exported or forgotten.")


class ExportedIdentifier(_Row):
    kind: str = Field(description="`user_id`, `anonymous_id`, `email`, `phone` or `wechat_openid`.")
    value: str
    created_at: Instant


class UserExport(BaseModel):
    """Everything the database holds about one user."""

    user_id: str = Field(description="The person id.")
    exported_at: Instant
    merged: list[str] = Field(default_factory=list, description="Person ids merged into this person.")
    identifiers: list[ExportedIdentifier] = Field(
        default_factory=list, description="Every identifier of the person."
    )
    profile: ExportedProfile | None = Field(description="`null` when there is no profile.")
    events: list[ExportedEvent]
    runs: list[ExportedRun]
    routes: list[ExportedRoute]
    messages: list[ExportedMessage] = Field(description="With addresses and rendered content.")
    message_events: list[ExportedMessageEvent] = Field(
        description="Provider feedback (delivered, open, click, inbound SMS, ...) about the user."
    )
    audit: list[ExportedAudit] = Field(
        description="Earlier exports and erasures of this user id, and this export."
    )


class TemporalCounts(BaseModel):
    stopped: int = Field(
        default=0, description="Active runs that ended on the stop signal (end reason `forgotten`)."
    )
    terminated: int = Field(
        default=0, description="Runs that did not end in time (no worker?) and were terminated."
    )
    histories_deleted: int = Field(default=0, description="Run histories deleted from Temporal.")
    histories_kept: int = Field(
        default=0,
        description="Histories of ended runs not deleted (Temporal unreachable, or deletion not "
        "allowed): Temporal drops them after the namespace's retention period.",
    )


class Deleted(BaseModel):
    profiles: int = Field(description="The person's profile, and those of the persons merged into it.")
    identifiers: int = 0
    events: int
    routes: int
    message_events: int


class Anonymized(BaseModel):
    messages: int = Field(description="Kept for counts without user id, address, subject or content.")
    runs: int = Field(description="Kept for counts without user id, workflow id or key.")


class ForgetReport(BaseModel):
    """What forgetting a user did; all zeros when nothing was held (a repeated request)."""

    temporal: TemporalCounts
    deleted: Deleted
    anonymized: Anonymized
    audit_id: int = Field(description="The `audit_log` entry of this request.")


# What is held --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holdings:
    """What the database holds about a user, and the workflows to end and delete."""

    profile: bool
    events: int
    messages: int
    runs: int
    active: list[str]
    """Workflow ids of the user's active runs (active routes, or runs not recorded as ended)."""
    executions: list[tuple[str, str]]
    """(workflow id, run id) of every recorded run, ended or not."""
    routes: list[str]
    """Workflow ids of every route, including runs whose start was never recorded."""


def persons(session: Session, user_id: str) -> list[str]:
    """The surviving person of ``user_id``, then every person merged into it."""
    return merged_persons(session, canonical(session, user_id))


def holdings(db: Database, user_id: str) -> Holdings:
    """What forgetting ``user_id`` would end, delete and anonymise."""
    with db.session() as session:
        ids = persons(session, user_id)
        runs = session.execute(
            select(col(RunRecord.workflow_id), col(RunRecord.run_id), col(RunRecord.status)).where(
                col(RunRecord.user_id).in_(ids)
            )
        ).all()
        routes = session.execute(
            select(col(Route.workflow_id), col(Route.active)).where(col(Route.user_id).in_(ids))
        ).all()
        dated = set(
            session.execute(
                select(col(DateTriggerRecord.workflow_id)).where(col(DateTriggerRecord.user_id).in_(ids))
            ).scalars()
        )
        active = (
            {wid for wid, _, status in runs if status == "active"}
            | {wid for wid, on in routes if on}
            | dated  # date trigger workflows: ended if still waiting
        )
        return Holdings(
            profile=session.get(ProfileRecord, ids[0]) is not None,
            events=_count(session, EventRecord, col(EventRecord.user_id).in_(ids)),
            messages=_count(session, MessageRecord, col(MessageRecord.user_id).in_(ids)),
            runs=len(runs),
            active=sorted(active),
            executions=sorted((wid, run_id) for wid, run_id, _ in runs if wid),
            routes=sorted({wid for wid, _ in routes} | dated),
        )


def _count(session: Session, model: type[Any], condition: Any) -> int:
    return int(session.execute(select(func.count()).select_from(model).where(condition)).scalar_one())


# Forget --------------------------------------------------------------------------------------


async def forget(
    db: Database,
    user_id: str,
    *,
    temporal: Client | None,
    actor: str,
    secret: str = "",
    stop_timeout: float = STOP_TIMEOUT,
) -> ForgetReport:
    """End ``user_id``'s runs, erase what is held about them and audit it (see the module doc).

    ``temporal`` may be ``None`` when Temporal is unreachable: that is enough for a user without
    active runs (their ended runs' histories are then left to Temporal's retention); with active
    runs it raises :class:`TemporalUnavailable` before anything changes.
    """
    held = await asyncio.to_thread(holdings, db, user_id)
    counts = TemporalCounts()
    if temporal is None:
        if held.active:
            raise TemporalUnavailable(
                f"the user has {len(held.active)} active run(s) to end and Temporal is unreachable"
            )
        counts.histories_kept = len(held.executions)
    else:
        try:
            counts.stopped, counts.terminated = await _end_runs(temporal, held.active, stop_timeout)
            counts.histories_deleted, counts.histories_kept = await _delete_histories(temporal, held)
        except RPCError as exc:
            # The status only: Temporal's messages quote workflow ids, which embed the user id.
            raise TemporalUnavailable(f"Temporal refused a call ({exc.status.name})") from exc
    report = await asyncio.to_thread(_erase, db, user_id, counts, actor, secret)
    log.info(
        "forgot a user (audit #%d): %s",
        report.audit_id,
        report.model_dump_json(exclude={"audit_id"}),
        extra={"nurture": {"audit_id": report.audit_id}},
    )
    return report


async def _end_runs(client: Client, workflow_ids: Sequence[str], timeout: float) -> tuple[int, int]:
    """(stopped, terminated) over every workflow id, ended concurrently."""
    ended = await asyncio.gather(*(_end_workflow(client, wid, timeout) for wid in workflow_ids))
    return sum(stopped for stopped, _ in ended), sum(terminated for _, terminated in ended)


async def _end_workflow(client: Client, workflow_id: str, timeout: float) -> tuple[int, int]:
    stopped = terminated = 0
    for attempt in range(_HANDOVERS + 1):
        run_id = await _running(client, workflow_id)
        if run_id is None:
            break
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        if attempt < _HANDOVERS:
            outcome = await _stop(handle, timeout)
            if outcome == "stopped":
                stopped += 1
            if outcome != "timeout":
                continue
        terminated += await _terminate(handle)
    return stopped, terminated


async def _running(client: Client, workflow_id: str) -> str | None:
    """The run id of the workflow's running run, if one runs."""
    try:
        description = await client.get_workflow_handle(workflow_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None  # a stale route: its run is gone (ended and past retention)
        raise
    return description.run_id if description.status == WorkflowExecutionStatus.RUNNING else None


async def _stop(handle: WorkflowHandle[Any, Any], timeout: float, reason: str = FORGOTTEN) -> str:
    """``stopped``, ``gone`` (it ended on its own meanwhile) or ``timeout``."""
    try:
        await handle.signal("stop", reason)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return "gone"
        raise
    try:
        await asyncio.wait_for(handle.result(follow_runs=False), timeout)
    except (WorkflowFailureError, WorkflowContinuedAsNewError):
        pass  # ended all the same: terminated by someone else, or handed over to a new run
    except TimeoutError:
        return "timeout"
    return "stopped"


async def _terminate(handle: WorkflowHandle[Any, Any], reason: str = FORGOTTEN) -> int:
    try:
        await handle.terminate(reason=f"{reason}: the run did not end on its stop signal")
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return 0  # it ended after all
        raise
    return 1


async def _delete_histories(client: Client, held: Holdings) -> tuple[int, int]:
    """(deleted, kept): delete every run's history, so Temporal keeps no trace of the user."""
    targets = set(held.executions)
    recorded = {wid for wid, _ in held.executions}
    for wid in held.routes:
        if wid not in recorded:  # a run whose start was never recorded: its latest run, if any
            try:
                targets.add((wid, (await client.get_workflow_handle(wid).describe()).run_id))
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
    deleted = kept = 0
    for wid, run_id in sorted(targets):
        request = DeleteWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=wid, run_id=run_id),
        )
        try:
            await client.workflow_service.delete_workflow_execution(request)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                continue  # already past retention
            if exc.status in _UNSUPPORTED:
                log.warning(
                    "temporal would not delete a run history (%s): left to retention", exc.status.name
                )
                kept += 1
                continue
            raise
        deleted += 1
    return deleted, kept


def _erase(db: Database, user_id: str, counts: TemporalCounts, actor: str, secret: str) -> ForgetReport:
    """Delete and anonymise in one transaction, with its audit entry."""
    with db.session() as session:
        ids = persons(session, user_id)
        messages = _messages(session, ids)
        profiles = _profiles(session, ids)
        identifiers = _identifier_rows(session, ids)
        feedback = _message_events(session, ids, messages, profiles, identifiers)
        deleted_feedback = 0
        for chunk in _chunks([row.id for row in feedback if row.id is not None]):
            deleted_feedback += _changed(
                session.execute(delete(MessageEvent).where(col(MessageEvent.id).in_(chunk)))
            )
        anonymized_messages = _changed(
            session.execute(
                update(MessageRecord)
                .where(col(MessageRecord.user_id).in_(ids))
                .values(
                    user_id="", address=None, subject=None, preview=None, content=None, updated_at=utcnow()
                )
            )
        )
        # A run that was terminated (or whose end was never recorded) ends here, as forgotten.
        session.execute(
            update(RunRecord)
            .where(col(RunRecord.user_id).in_(ids))
            .where(col(RunRecord.status) == "active")
            .values(status="ended", ended_at=utcnow(), end_reason=FORGOTTEN)
        )
        anonymized_runs = _changed(
            session.execute(
                update(RunRecord)
                .where(col(RunRecord.user_id).in_(ids))
                .values(user_id="", workflow_id="", key="")
            )
        )
        deleted = Deleted(
            profiles=_changed(
                session.execute(delete(ProfileRecord).where(col(ProfileRecord.user_id).in_(ids)))
            ),
            identifiers=_changed(
                session.execute(delete(IdentityRecord).where(col(IdentityRecord.person_id).in_(ids)))
            ),
            events=_changed(session.execute(delete(EventRecord).where(col(EventRecord.user_id).in_(ids)))),
            routes=_changed(session.execute(delete(Route).where(col(Route.user_id).in_(ids))))
            + _changed(
                session.execute(delete(DateTriggerRecord).where(col(DateTriggerRecord.user_id).in_(ids)))
            ),
            message_events=deleted_feedback,
        )
        audiences.forget(session, ids)  # memberships, their history and upkeep state
        anonymized = Anonymized(messages=anonymized_messages, runs=anonymized_runs)
        details = {
            "temporal": counts.model_dump(),
            "deleted": deleted.model_dump(),
            "anonymized": anonymized.model_dump(),
        }
        entry = _audit(session, "forget", ids[0], actor, secret, details)
        return ForgetReport(temporal=counts, deleted=deleted, anonymized=anonymized, audit_id=entry)


def _changed(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


# Export --------------------------------------------------------------------------------------


def export_user(db: Database, user_id: str, *, actor: str, secret: str = "") -> UserExport:
    """Everything the database holds about ``user_id`` (nothing is not an error), audited."""
    with db.session() as session:
        ids = persons(session, user_id)
        profiles = _profiles(session, ids)
        profile = profiles[0] if profiles and profiles[0].user_id == ids[0] else None
        identifiers = _identifier_rows(session, ids)
        events = (
            session.execute(
                select(EventRecord)
                .where(col(EventRecord.user_id).in_(ids))
                .order_by(col(EventRecord.timestamp), col(EventRecord.id))
            )
            .scalars()
            .all()
        )
        runs = (
            session.execute(
                select(RunRecord)
                .where(col(RunRecord.user_id).in_(ids))
                .order_by(col(RunRecord.entered_at), col(RunRecord.run_id))
            )
            .scalars()
            .all()
        )
        routes = (
            session.execute(select(Route).where(col(Route.user_id).in_(ids)).order_by(col(Route.workflow_id)))
            .scalars()
            .all()
        )
        messages = _messages(session, ids)
        feedback = sorted(
            _message_events(session, ids, messages, profiles, identifiers), key=lambda e: (e.at, e.id or 0)
        )
        export = UserExport(
            user_id=ids[0],
            exported_at=utcnow(),
            merged=ids[1:],
            identifiers=[ExportedIdentifier.model_validate(row) for row in identifiers],
            profile=None if profile is None else ExportedProfile.model_validate(profile),
            events=[ExportedEvent.model_validate(row) for row in events],
            runs=[ExportedRun.model_validate(row) for row in runs],
            routes=[ExportedRoute.model_validate(row) for row in routes],
            messages=[ExportedMessage.model_validate(row) for row in messages],
            message_events=[ExportedMessageEvent.model_validate(row) for row in feedback],
            audit=[],
        )
        details = {
            "profiles": int(profile is not None),
            **{
                name: len(getattr(export, name))
                for name in ("events", "runs", "routes", "messages", "message_events")
            },
        }
        _audit(session, "export", ids[0], actor, secret, details)
        entries = (
            session.execute(
                select(AuditRecord)
                .where(col(AuditRecord.subject).in_([h for i in ids for h in subject_hashes(i, secret)]))
                .order_by(col(AuditRecord.at), col(AuditRecord.id))
            )
            .scalars()
            .all()
        )
        export.audit = [ExportedAudit.model_validate(row) for row in entries]
        return export


# Shared --------------------------------------------------------------------------------------


def _profiles(session: Session, ids: Sequence[str]) -> list[ProfileRecord]:
    """The profiles of ``ids``, in that order (the survivor first)."""
    rows = {
        row.user_id: row
        for row in session.execute(select(ProfileRecord).where(col(ProfileRecord.user_id).in_(ids))).scalars()
    }
    return [rows[i] for i in ids if i in rows]


def _identifier_rows(session: Session, ids: Sequence[str]) -> list[IdentityRecord]:
    return list(
        session.execute(
            select(IdentityRecord)
            .where(col(IdentityRecord.person_id).in_(ids))
            .order_by(col(IdentityRecord.kind), col(IdentityRecord.value))
        ).scalars()
    )


def _messages(session: Session, ids: Sequence[str]) -> list[MessageRecord]:
    return list(
        session.execute(
            select(MessageRecord)
            .where(col(MessageRecord.user_id).in_(ids))
            .order_by(col(MessageRecord.created_at), col(MessageRecord.id))
        ).scalars()
    )


def _message_events(
    session: Session,
    ids: Sequence[str],
    messages: Sequence[MessageRecord],
    profiles: Sequence[ProfileRecord],
    identifiers: Sequence[IdentityRecord],
) -> list[MessageEvent]:
    """Provider events about the user: theirs by user id, about their messages (by idempotency key
    or provider id), and unattributed ones (an inbound SMS from a number several profiles share,
    a bounce for no known message) whose payload names the user or one of their addresses."""
    conditions: list[Any] = [col(MessageEvent.user_id).in_(ids)]
    keys = [m.idempotency_key for m in messages]
    provider_ids = [m.provider_id for m in messages if m.provider_id]
    conditions += [col(MessageEvent.idempotency_key).in_(chunk) for chunk in _chunks(keys)]
    conditions += [col(MessageEvent.provider_id).in_(chunk) for chunk in _chunks(provider_ids)]
    found: dict[int, MessageEvent] = {}
    for condition in conditions:
        for row in session.execute(select(MessageEvent).where(condition)).scalars():
            found[row.id or 0] = row
    needles = _identities(ids, messages, profiles, identifiers)
    unattributed = select(MessageEvent).where(col(MessageEvent.user_id).is_(None))
    for row in session.execute(unattributed.execution_options(yield_per=_CHUNK)).scalars():
        if row.id not in found and _mentions(row.data, needles):
            found[row.id or 0] = row
    return list(found.values())


def _identities(
    ids: Sequence[str],
    messages: Iterable[MessageRecord],
    profiles: Iterable[ProfileRecord],
    identifiers: Iterable[IdentityRecord],
) -> set[str]:
    """The person ids, every identifier and every address the user is known by, normalised for
    comparison."""
    values: list[Any] = [*ids, *(m.address for m in messages), *(i.value for i in identifiers)]
    for profile in profiles:
        values += [profile.email, profile.phone, profile.wechat_openid]
        values += [profile.traits.get(name) for name in ADDRESS_TRAITS.values()]
    return {_normal(v) for v in values if isinstance(v, str) and v.strip()}


def _mentions(data: Mapping[str, Any], needles: set[str]) -> bool:
    """Whether a top-level value of ``data`` (or an item of a list value) is one of ``needles``."""
    for value in data.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and _normal(item) in needles:
                return True
    return False


def _normal(value: str) -> str:
    text = value.strip().lower()
    if text[:1] == "+" or text[:1].isdigit():  # phone numbers arrive with and without spacing
        text = "".join(ch for ch in text if ch not in " -().")
    return text


def _audit(
    session: Session, action: AuditAction, user_id: str, actor: str, secret: str, details: dict[str, Any]
) -> int:
    entry = AuditRecord(action=action, subject=subject_hash(user_id, secret), actor=actor, details=details)
    session.add(entry)
    session.flush()
    assert entry.id is not None
    return entry.id


def audit(
    db: Database, action: AuditAction, *, actor: str, secret: str = "", user_id: str | None = None,
    journey: str | None = None, details: dict[str, Any] | None = None,
) -> int:
    """Write one audit entry about a user (under the hash of the id) or a journey; its id."""
    with db.session() as session:
        if user_id is not None:
            return _audit(session, action, user_id, actor, secret, details or {})
        assert journey is not None, "an audit entry is about a user or a journey"
        entry = AuditRecord(action=action, subject=f"journey:{journey}"[:64], actor=actor, details=details or {})
        session.add(entry)
        session.flush()
        assert entry.id is not None
        return entry.id


ENDED_BY_OPERATOR = "ended_by_operator"
"""The ``stop`` signal's reason when an operator ends one run from the console."""


async def end_run(
    db: Database,
    client: Client,
    run: RunRecord,
    *,
    actor: str,
    secret: str = "",
    stop_timeout: float = STOP_TIMEOUT,
) -> str:
    """End one active run through the workflow's ``stop`` signal (terminated when it does not end
    in time) and audit it; ``stopped``, ``terminated`` or ``gone`` (it had ended already)."""
    try:
        running = await _running(client, run.workflow_id)
        if running is None:
            outcome = "gone"
        else:
            handle = client.get_workflow_handle(run.workflow_id, run_id=running)
            outcome = await _stop(handle, stop_timeout, ENDED_BY_OPERATOR)
            if outcome == "timeout":
                outcome = "terminated" if await _terminate(handle, ENDED_BY_OPERATOR) else "gone"
    except RPCError as exc:
        raise TemporalUnavailable(f"Temporal refused a call ({exc.status.name})") from exc
    await asyncio.to_thread(
        audit, db, "end_run", actor=actor, secret=secret, user_id=run.user_id,
        details={"journey": run.journey, "outcome": outcome},
    )
    return outcome


def _chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]
