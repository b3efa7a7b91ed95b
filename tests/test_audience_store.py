"""Audience membership in the database (nurture.storage.audiences) on SQLite and PostgreSQL, kept
by the event API's calls (nurture.service.ingest, without Temporal: no journey listens for the
events used here): upkeep, the time sweep and the evaluation from scratch agree with the pure
rules; concurrency, merges, changes outside the API and forgetting."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import select
from support import rows

from nurture.engine.audience import Tally, empty_tallies, evaluate, event_matches, note
from nurture.engine.identity import Identifier
from nurture.engine.model import Event
from nurture.language.audiences import ENTERED, EXITED, Activity, Audience
from nurture.language.compiler import Project
from nurture.language.expressions import compile_expression
from nurture.service import privacy
from nurture.service.ingest import Ingest
from nurture.storage.audiences import AudienceStore, Evaluated, audiences_of
from nurture.storage.db import Database
from nurture.storage.models import AudienceChange, AudienceMember, AudiencePending, AudienceState, EventRecord
from nurture.storage.stores import DbProfiles

DAY = 86400
BOUGHT = "Zz Bought"
VIEWED = "Zz Viewed"


def audiences() -> dict[str, Audience]:
    bought = Activity(BOUGHT)
    recent = Activity(BOUGHT, within=3 * DAY, within_written="3d")
    found = [
        Audience("buyers", did=(bought,)),
        Audience("recent", did=(recent,)),
        Audience("lapsed", did=(bought,), not_did=(recent,)),
        Audience("browsers", did=(Activity(VIEWED, at_least=3, within=5 * DAY),)),
        Audience("big", did=(Activity(BOUGHT, compile_expression("event.properties.total > 50")),)),
        Audience("py", where=compile_expression('user.interest == "python"'), subscribed=("news",)),
        Audience("py_buyers", where=compile_expression('user.interest == "python"'), did=(bought,)),
    ]
    return {a.id: a for a in found}


def ingest_for(project: Project, db: Database, found: dict[str, Audience]) -> Ingest:
    return Ingest(dataclasses.replace(project, audiences=found), db, None, "unused")


def members(db: Database, audience: str) -> set[str]:
    return {row.person for row in rows(db, AudienceMember, audience=audience)}


def pure(audience: Audience, log: list[tuple[str, datetime, dict[str, Any]]], traits: dict[str, Any], opted: set[str], now: datetime) -> bool:
    """The pure rules over one person's whole log (every event noted at its time, none future)."""
    tallies: list[Tally] = list(empty_tallies(audience))
    for name, at, properties in log:
        scope = {"user": traits, "event": Event(name, at, properties).scope()}
        for index, clause in enumerate(audience.clauses):
            if event_matches(clause, name, scope):
                tallies[index] = note(clause, tallies[index], at)
    return evaluate(audience, traits, frozenset(opted), tallies, now).member


async def test_upkeep_sweep_and_from_scratch_agree_with_the_rules(database: Database, project: Project) -> None:
    found = audiences()
    ingest = ingest_for(project, database, found)
    rng = random.Random(13)
    start = datetime.now(UTC) - timedelta(days=8)
    people = [f"user-{n}" for n in range(12)]
    logs: dict[str, list[tuple[str, datetime, dict[str, Any]]]] = {p: [] for p in people}
    traits: dict[str, dict[str, Any]] = {p: {} for p in people}
    opted: dict[str, set[str]] = {p: set() for p in people}
    for step in range(160):
        person = rng.choice(people)
        roll = rng.random()
        at = start + timedelta(seconds=rng.randrange(8 * DAY))  # arrival order is not time order
        if roll < 0.65:
            name = rng.choice([BOUGHT, VIEWED, VIEWED, "Zz Other"])
            properties = {"total": rng.randrange(100)}
            await ingest.track(person, Event(name, at, properties, f"m{step}"))
            logs[person].append((name, at, properties))
        elif roll < 0.85:
            interest = rng.choice(["python", "go"])
            await ingest.identify(person, {"interest": interest}, message_id=f"m{step}", event=Event("identify", at))
            traits[person]["interest"] = interest
        else:
            out = rng.random() < 0.5
            change = (lambda current: current | {"news"}) if out else (lambda current: current - {"news"})
            await ingest.identify(
                person, {}, message_id=f"m{step}", event=Event("identify", at), opted_out=change
            )
            opted[person] = opted[person] | {"news"} if out else opted[person] - {"news"}
    now = datetime.now(UTC)
    await asyncio.to_thread(ingest.audiences.sweep, now)
    # The same audiences under new ids, evaluated from scratch over what is stored.
    copies = {f"{a.id}_2": dataclasses.replace(a, id=f"{a.id}_2") for a in found.values()}
    fresh = AudienceStore(database, copies)
    assert {a.id for a in fresh.deploy()} == set(copies)
    for copy in copies:
        await asyncio.to_thread(fresh.evaluate_all, copy, now)
    assert fresh.deploy() == []  # every version evaluated now
    for audience in found.values():
        expected = {p for p in people if pure(audience, logs[p], traits[p], opted[p], now)}
        assert members(database, audience.id) == expected, audience.id
        assert members(database, f"{audience.id}_2") == expected, audience.id
    assert members(database, "buyers")  # the history was not trivial
    assert members(database, "lapsed")
    # Each entry and exit is in the history and has its event, stored for the person.
    changes = rows(database, AudienceChange, audience="buyers")
    entered = [e for e in rows(database, EventRecord, name=ENTERED) if e.properties == {"audience": "buyers"}]
    assert len(changes) == len(entered) == len(members(database, "buyers"))


async def test_a_person_leaves_on_the_day_the_window_ends_with_no_event(database: Database, project: Project) -> None:
    found = {"recent": Audience("recent", did=(Activity(BOUGHT, within=30 * DAY),))}
    ingest = ingest_for(project, database, found)
    bought = datetime.now(UTC) - timedelta(days=29, hours=23)
    await ingest.track("ann", Event(BOUGHT, bought, {}, "m1"))
    assert members(database, "recent") == {"ann"}
    [state] = rows(database, AudienceState, person="ann")
    assert abs(state.changes_at - (bought + timedelta(days=30))) < timedelta(milliseconds=1)
    assert await asyncio.to_thread(ingest.audiences.sweep) == []  # not due yet
    later = datetime.now(UTC) + timedelta(hours=2)
    [change] = await asyncio.to_thread(ingest.audiences.sweep, later)
    assert (change.person, change.audience, change.entered) == ("ann", "recent", False)
    assert members(database, "recent") == set()
    assert [c.change for c in rows(database, AudienceChange, person="ann")] == ["entered", "exited"]
    [exit_event] = rows(database, EventRecord, name=EXITED)
    assert exit_event.user_id == "ann" and exit_event.properties == {"audience": "recent"}
    [state] = rows(database, AudienceState, person="ann")
    assert state.changes_at is None  # the tally stays cached; no timer is left


async def test_concurrent_events_for_one_person_count_each_once(database: Database, project: Project) -> None:
    found = {"fans": Audience("fans", did=(Activity(VIEWED, at_least=12),))}
    ingest = ingest_for(project, database, found)
    await ingest.track("bo", Event(VIEWED, datetime.now(UTC), {}, "first"))
    at = datetime.now(UTC)
    await asyncio.gather(*(ingest.track("bo", Event(VIEWED, at, {}, f"m{n}")) for n in range(11)))
    assert members(database, "fans") == {"bo"}
    [state] = rows(database, AudienceState, person="bo")
    assert len(state.tallies[0]) == 12
    assert [c.change for c in rows(database, AudienceChange, person="bo")] == ["entered"]
    assert len(rows(database, EventRecord, name=ENTERED)) == 1


async def test_a_merge_counts_both_peoples_events(database: Database, project: Project) -> None:
    found = {"twice": Audience("twice", did=(Activity(BOUGHT, at_least=2),))}
    ingest = ingest_for(project, database, found)
    now = datetime.now(UTC)
    await ingest.track([Identifier("anonymous_id", "anon-1")], Event(BOUGHT, now, {}, "a"))
    await ingest.track("cy", Event(BOUGHT, now, {}, "b"))
    assert members(database, "twice") == set()
    applied = await ingest.identify(
        [Identifier("user_id", "cy"), Identifier("anonymous_id", "anon-1")],
        {},
        message_id="merge",
        event=Event("identify", now),
    )
    assert applied is not None and applied.plan.merges
    survivor = applied.person
    assert members(database, "twice") == {survivor}
    gone = applied.plan.merges[0][1]
    assert rows(database, AudienceMember, person=gone) == [] and rows(database, AudienceState, person=gone) == []


async def test_changes_outside_the_api_wait_for_the_sweep(database: Database, project: Project) -> None:
    found = {"news": Audience("news", subscribed=("news",), where=compile_expression("user.vip"))}
    ingest = ingest_for(project, database, found)
    await ingest.identify("di", {"vip": True}, message_id="i1", event=Event("identify", datetime.now(UTC)))
    assert members(database, "news") == {"di"}
    DbProfiles(database).set_opt_out("di", "news", True)  # a provider's unsubscribe, say
    assert rows(database, AudiencePending, person="di")
    [change] = await asyncio.to_thread(ingest.audiences.sweep)
    assert not change.entered and members(database, "news") == set()
    assert rows(database, AudiencePending) == []


async def test_forgetting_a_person_erases_their_audience_rows(database: Database, project: Project) -> None:
    found = {"recent": Audience("recent", did=(Activity(BOUGHT, within=3 * DAY),))}
    ingest = ingest_for(project, database, found)
    await ingest.track("ed", Event(BOUGHT, datetime.now(UTC), {}, "m1"))
    with database.session() as session:
        assert audiences_of(session, "ed") == ["recent"]
    await privacy.forget(database, "ed", temporal=None, actor="test")
    for model in (AudienceMember, AudienceState, AudienceChange):
        with database.session() as session:
            assert session.execute(select(model)).all() == []


async def test_a_new_version_re_evaluates_and_old_members_leave(database: Database, project: Project) -> None:
    old = {"big": Audience("big", did=(Activity(BOUGHT, compile_expression("event.properties.total > 10")),))}
    ingest = ingest_for(project, database, old)
    now = datetime.now(UTC)
    await ingest.track("fi", Event(BOUGHT, now, {"total": 20}, "m1"))
    await ingest.track("gu", Event(BOUGHT, now, {"total": 90}, "m2"))
    assert members(database, "big") == {"fi", "gu"}
    new = {"big": Audience("big", did=(Activity(BOUGHT, compile_expression("event.properties.total > 50")),))}
    store = AudienceStore(database, new)
    [pending] = store.deploy()
    evaluated = store.evaluate_all(pending.id)
    assert members(database, "big") == {"gu"} and evaluated.members == 1
    assert [(c.person, c.entered) for c in evaluated.changes] == [("fi", False)]
    # Upkeep with the new version counts the person's stored events again (another version's tallies).
    await ingest_for(project, database, new).track("fi", Event(BOUGHT, now, {"total": 70}, "m3"))
    assert members(database, "big") == {"fi", "gu"}


async def test_people_who_changed_while_the_events_were_read_are_counted_again(
    database: Database, project: Project
) -> None:
    """The evaluation from scratch reads the events in one pass, then writes under the people's
    locks: someone with an event stored after the pass began is counted again there, so the pass's
    stale view (here: no events at all) decides nothing for them."""
    found = {"buyers": Audience("buyers", did=(Activity(BOUGHT),))}
    await ingest_for(project, database, {}).track("hal", Event(BOUGHT, datetime.now(UTC), {}, "m1"))
    store = AudienceStore(database, found)
    store.deploy()
    evaluated = Evaluated("buyers", found["buyers"].version)
    stale: tuple[Tally, ...] = ((),)
    store._write(found["buyers"], [("hal", stale)], 0, datetime.now(UTC), evaluated)  # read before event 1
    assert evaluated.recounted == 1 and members(database, "buyers") == {"hal"}
