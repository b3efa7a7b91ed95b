"""What the console's pages read: people, their timelines, a step's latest people and
messages, and the message log. Database only (never Temporal), each query on an index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import col, select

from channels import mask_address, mask_user_id
from nurture.engine.identity import Identifier
from nurture.storage.db import Database
from nurture.storage.identities import DbIdentities
from nurture.storage.models import EventRecord, MessageRecord, ProfileRecord, RunRecord, StepReach

PERSON_ROWS = 200
"""The newest events, messages and runs a person page shows of each."""
STEP_ROWS = 12
PAGE_ROWS = 50


LOOKUP_KINDS = ("user_id", "anonymous_id", "email", "phone", "wechat_openid", "person")
"""What a lookup may be: any identifier (normalised by the identity rules) or a person id."""


def find_people(db: Database, query: str, *, limit: int = 20) -> list[ProfileRecord]:
    """The persons ``query`` names as any identifier or as a person id, through the person store
    (emails in any case, phones with or without spacing, brackets or dashes)."""
    text = query.strip()
    if not text:
        return []
    store = DbIdentities(db)
    found = list(dict.fromkeys(p for kind in LOOKUP_KINDS if (p := store.resolve(kind, text)) is not None))
    if not found:
        return []
    with db.session() as session:
        rows = {row.user_id: row for row in session.exec(select(ProfileRecord).where(col(ProfileRecord.user_id).in_(found)))}
    return [rows[p] for p in found[:limit] if p in rows]


def person_id(db: Database, given: str) -> str:
    """The surviving person an id names (a userId or a person id); the id itself when no one has it."""
    return DbIdentities(db).lookup(given) or given


def identifiers(db: Database, person: str) -> list[Identifier]:
    return DbIdentities(db).identifiers_of(person)


@dataclass
class Moment:
    """One line of a person's timeline."""

    at: datetime
    kind: str
    """``event``, ``identify``, ``entered``, ``ended``, ``sent``, ``skipped``, ``failed``,
    ``deferred``, ``fallback``, ``converted``, ``sending``."""
    title: str
    detail: str = ""
    journey: str = ""


_ORDER = {"event": 0, "identify": 0, "entered": 1, "deferred": 2, "fallback": 4, "converted": 5, "ended": 6}
"""Of moments at the same instant, which came first (the event before the run it started)."""


@dataclass
class Person:
    profile: ProfileRecord | None
    user_id: str
    runs: list[RunRecord] = field(default_factory=list)
    messages: list[MessageRecord] = field(default_factory=list)
    timeline: list[Moment] = field(default_factory=list)


def _attempt_text(attempt: dict[str, Any]) -> str:
    reason = attempt.get("reason")
    return f"{attempt.get('channel')} {attempt.get('state')}" + (f" ({reason})" if reason else "")


def person(db: Database, user_id: str, *, reveal: bool) -> Person:
    """A person's profile, runs, messages and one timeline, newest first."""
    with db.session() as session:
        profile = session.get(ProfileRecord, user_id)
        runs = list(
            session.exec(
                select(RunRecord)
                .where(col(RunRecord.user_id) == user_id)
                .order_by(col(RunRecord.entered_at).desc())
                .limit(PERSON_ROWS)
            ).all()
        )
        messages = list(
            session.exec(
                select(MessageRecord)
                .where(col(MessageRecord.user_id) == user_id)
                .order_by(col(MessageRecord.id).desc())
                .limit(PERSON_ROWS)
            ).all()
        )
        events = list(
            session.exec(
                select(EventRecord)
                .where(col(EventRecord.user_id) == user_id)
                .order_by(col(EventRecord.id).desc())
                .limit(PERSON_ROWS)
            ).all()
        )
        run_ids = [run.run_id for run in runs]
        held = (
            list(
                session.exec(
                    select(StepReach).where(col(StepReach.run_id).in_(run_ids), col(StepReach.deferrals) > 0)
                ).all()
            )
            if run_ids
            else []
        )
    journey_of = {run.run_id: run.journey for run in runs}
    timeline: list[Moment] = []
    for event in events:
        if event.kind == "identify":
            names = ", ".join(sorted(event.properties)) or "no traits"
            timeline.append(Moment(event.timestamp, "identify", "identify", f"traits: {names}"))
        else:
            timeline.append(Moment(event.timestamp, "event", event.name or "event", _properties(event.properties)))
    for run in runs:
        timeline.append(Moment(run.entered_at, "entered", f"entered {run.journey}", f"version {run.version}", run.journey))
        if run.converted_at is not None:
            timeline.append(Moment(run.converted_at, "converted", "reached the goal", "", run.journey))
        if run.ended_at is not None:
            timeline.append(Moment(run.ended_at, "ended", f"left {run.journey}", f"reason: {run.end_reason}", run.journey))
    for reach in held:
        timeline.append(
            Moment(
                reach.reached_at,
                "deferred",
                f"{reach.step_id} held",
                f"deferred {reach.deferrals}× ({reach.deferral_reason or 'held'})",
                journey_of.get(reach.run_id, reach.journey),
            )
        )
    for message in messages:
        at = message.sent_at or message.created_at
        address = message.address or ""
        to = (address if reveal else mask_address(address)) if address else "no address"
        title = f"{message.status} {message.channel} {message.template}"
        detail = f"step {message.step_id} to {to}"
        if message.reason:
            detail += f"; reason: {message.reason}"
        timeline.append(Moment(at, message.status, title, detail, message.journey))
        failed = [a for a in message.attempts if a.get("state") == "failed"]
        if failed and len(message.attempts) > 1:
            tried = " → ".join(_attempt_text(a) for a in message.attempts)
            timeline.append(Moment(at, "fallback", f"fallback on {message.template}", tried, message.journey))
    timeline.sort(key=lambda m: (m.at, _ORDER.get(m.kind, 3)), reverse=True)
    return Person(profile, user_id, runs, messages, timeline)


def _properties(properties: dict[str, Any]) -> str:
    shown = [f"{key}={value}" for key, value in list(properties.items())[:6]]
    return ", ".join(shown)


@dataclass
class StepPeople:
    reaches: list[tuple[StepReach, RunRecord | None]]
    messages: list[MessageRecord]


def step_people(db: Database, journey: str, step_id: str) -> StepPeople:
    """The latest runs to reach a step, and the latest messages it sent."""
    with db.session() as session:
        reaches = list(
            session.exec(
                select(StepReach)
                .where(col(StepReach.journey) == journey, col(StepReach.step_id) == step_id)
                .order_by(col(StepReach.reached_at).desc())
                .limit(STEP_ROWS)
            ).all()
        )
        runs = {
            run.run_id: run
            for run in session.exec(
                select(RunRecord).where(col(RunRecord.run_id).in_([r.run_id for r in reaches]))
            ).all()
        } if reaches else {}
        messages = list(
            session.exec(
                select(MessageRecord)
                .where(col(MessageRecord.journey) == journey, col(MessageRecord.step_id) == step_id)
                .order_by(col(MessageRecord.id).desc())
                .limit(STEP_ROWS)
            ).all()
        )
    return StepPeople([(reach, runs.get(reach.run_id)) for reach in reaches], messages)


@dataclass(frozen=True)
class MessageFilter:
    journey: str | None = None
    channel: str | None = None
    status: str | None = None
    outbox: bool = False
    since: datetime | None = None
    until: datetime | None = None
    before: int | None = None
    """Keyset paging: messages with a smaller id."""


def message_log(db: Database, wanted: MessageFilter, *, limit: int = PAGE_ROWS) -> list[MessageRecord]:
    """Messages newest first (by id, so paging walks the primary key), filtered."""
    where: list[Any] = []
    if wanted.journey:
        where.append(col(MessageRecord.journey) == wanted.journey)
    if wanted.channel:
        where.append(col(MessageRecord.channel) == wanted.channel)
    if wanted.status:
        where.append(col(MessageRecord.status) == wanted.status)
    if wanted.outbox:
        where.append(col(MessageRecord.provider) == "outbox")
    if wanted.since:
        where.append(col(MessageRecord.created_at) >= wanted.since)
    if wanted.until:
        where.append(col(MessageRecord.created_at) < wanted.until)
    if wanted.before:
        where.append(col(MessageRecord.id) < wanted.before)
    with db.session() as session:
        return list(
            session.exec(select(MessageRecord).where(*where).order_by(col(MessageRecord.id).desc()).limit(limit)).all()
        )


def shown_user(user_id: str, *, reveal: bool) -> str:
    return user_id if reveal else mask_user_id(user_id)


def shown_address(address: str | None, *, reveal: bool) -> str:
    if not address:
        return ""
    return address if reveal else mask_address(address)


def masked_traits(traits: dict[str, Any], address_traits: Sequence[str], *, reveal: bool) -> list[tuple[str, str]]:
    """Traits as (name, text), address traits masked unless revealed."""
    shown = []
    for name in sorted(traits):
        value = traits[name]
        text = str(value)
        if not reveal and name in address_traits and isinstance(value, str):
            text = mask_address(value)
        shown.append((name, text))
    return shown
