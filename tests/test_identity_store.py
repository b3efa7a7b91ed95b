"""The person store (nurture.storage.identities) on SQLite and PostgreSQL: resolution, new persons,
identifiers, merges and what they move, against the in-memory reference; concurrency on PostgreSQL."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import select
from support import rows

from nurture.engine.identity import Identifier, Identities, call_identifiers
from nurture.storage.audit import AuditRecord
from nurture.storage.db import Database
from nurture.storage.identities import DbIdentities
from nurture.storage.models import (
    EventRecord,
    EventRow,
    IdentityRecord,
    MessageEvent,
    MessageRecord,
    ProfileRecord,
    Route,
    RunRecord,
)
from nurture.storage.stores import DbHistory, DbProfiles

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def ids(user: str | None = None, anon: str | None = None, **traits: Any) -> list[Identifier]:
    return call_identifiers(user, anon, traits)


def call(message_id: str, kind: str = "identify") -> EventRow:
    return EventRow(message_id=message_id, kind=kind, timestamp=T0, routed_at=T0)


def test_a_new_visitor_is_a_person_and_resolves_by_each_identifier(database: Database) -> None:
    store = DbIdentities(database)
    applied = store.apply(ids(anon="a-1"), at=at(0))
    assert applied is not None and applied.person == "anonymous_id:a-1"
    assert store.resolve("anonymous_id", "a-1") == "anonymous_id:a-1"
    assert store.resolve("person", "anonymous_id:a-1") == "anonymous_id:a-1"
    assert store.resolve("user_id", "a-1") is None
    known = store.apply(
        ids("u1", email="Li@Example.com", phone="+86 138 0013 8000"), at=at(1), traits={"x": 1}
    )
    assert known is not None and known.person == "u1"
    assert store.resolve("email", " li@example.COM") == "u1"
    assert store.resolve("phone", "0086 13800138000") == "u1"
    assert store.lookup("u1") == "u1"
    assert store.identifiers_of("u1") == sorted(ids("u1", email="li@example.com", phone="+8613800138000"))


def test_identify_with_both_ids_merges_everything_into_the_older_person(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids(anon="a-1"), at=at(0), traits={"cart": "c1", "plan": "free"}, opted_out=["sms"])
    store.apply(ids("u1"), at=at(1), traits={"plan": "pro"})
    visitor, known = "anonymous_id:a-1", "u1"
    with database.session() as session:
        session.add(EventRecord(message_id="e1", kind="track", user_id=visitor, properties={}, timestamp=T0))
        session.add(
            RunRecord(run_id="r1", workflow_id="w1", journey="j", version="1", user_id=visitor, entered_at=T0)
        )
        session.add(Route(workflow_id="w1", user_id=visitor, journey="j", key=""))
        session.add(
            MessageRecord(
                idempotency_key="k1",
                run_id="r1",
                user_id=visitor,
                step_id="s",
                channel="email",
                template="t",
                status="sent",
                category="marketing",
                sent_at=at(0),
            )
        )
        session.add(MessageEvent(provider="outbox", event="open", user_id=visitor, at=T0))
    applied = store.apply(ids(known, "a-1"), at=at(2), record=call("m1"))
    assert applied is not None
    assert applied.person == visitor  # seen first
    assert applied.plan.merges == ((visitor, known),)
    for model in (EventRecord, RunRecord, Route, MessageRecord, MessageEvent):
        assert {row.user_id for row in rows(database, model)} == {visitor}, model.__name__
    assert {row.person_id for row in rows(database, IdentityRecord)} == {visitor}
    profile = DbProfiles(database).read(known)  # a merged-away id reads the survivor
    assert profile.user_id == visitor
    assert profile.traits == {"cart": "c1", "plan": "pro"}  # the later call's plan wins
    assert profile.opted_out == {"sms"}
    assert store.resolve("person", known) == visitor
    assert store.persons(known) == [visitor, known]
    [merged] = rows(database, ProfileRecord, user_id=known)
    assert merged.merged_into == visitor
    [stored] = rows(database, EventRecord, message_id="m1")
    assert stored.user_id == visitor and stored.routed_at is not None
    with database.session() as session:
        actions = [a.action for a in session.execute(select(AuditRecord)).scalars()]
        assert actions == ["merge"]
        assert known not in str(session.execute(select(AuditRecord)).scalars().all()[0].details)


def test_the_newer_trait_wins_and_an_opt_out_is_never_lost(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids("u1"), at=at(5), traits={"plan": "pro", "name": "Li"})
    store.apply(ids(anon="a-2"), at=at(9), traits={"plan": "free"}, opted_out=["email"])
    store.apply(ids(anon="a-2"), at=at(10), opted_out=lambda current: current | {"promotions"})
    applied = store.apply(ids("u1", "a-2"), at=at(11))
    assert applied is not None and applied.person == "u1"
    profile = DbProfiles(database).read("anonymous_id:a-2")
    assert profile.traits == {"plan": "free", "name": "Li"}  # a-2's plan was set later
    assert profile.opted_out == {"email", "promotions"}


def test_repeating_a_call_changes_nothing(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids(anon="a-1"), at=at(0))
    first = store.apply(ids("u1", "a-1"), at=at(1), record=call("m1"), traits={"n": 1})
    assert first is not None
    assert store.apply(ids("u1", "a-1"), at=at(1), record=call("m1"), traits={"n": 2}) is None
    again = store.apply(ids("u1", "a-1"), at=at(1))
    assert again is not None and again.plan.merges == () and again.plan.attach == ()
    assert DbProfiles(database).read("anonymous_id:a-1").traits == {"n": 1}
    assert len(rows(database, ProfileRecord)) == 1  # u1 joined the visitor: no person of its own


def test_an_event_changes_no_person_and_a_change_is_written(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids("u1"), at=at(0), traits={"plan": "pro"}, group=("acme", {"seats": 5}), opted_out=["sms"])
    [before] = rows(database, ProfileRecord)

    event = store.apply(ids("u1"), at=at(1), record=call("m1", "track"))

    assert event is not None and event.plan.person == "u1" and event.plan.attach == ()
    assert event.profile.traits == {"plan": "pro", "group": {"id": "acme", "seats": 5}}
    assert event.profile.opted_out == {"sms"}
    [after] = rows(database, ProfileRecord)
    assert after.updated_at == before.updated_at and after.traits == before.traits
    assert [e.user_id for e in rows(database, EventRecord)] == ["u1"]

    # A new identifier on the same person: its row is changed (and only written), not read again.
    given = {"name": "Li", "email": "li@example.com"}
    changed = store.apply(ids("u1", **given), at=at(2), traits=given)

    assert changed is not None and [i.kind for i in changed.plan.attach] == ["email"]
    assert changed.profile.traits["name"] == "Li" and changed.profile.traits["plan"] == "pro"
    [written] = rows(database, ProfileRecord)
    assert written.updated_at > before.updated_at
    assert written.traits == {"plan": "pro", "name": "Li", "email": "li@example.com"}
    assert written.email == "li@example.com" and written.opted_out == ["sms"] and written.group_id == "acme"
    assert DbIdentities(database).resolve("email", "li@example.com") == "u1"


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_merges_are_commutative(database: Database, order: Sequence[str]) -> None:
    store = DbIdentities(database)
    store.apply(ids(anon="a-1"), at=at(0), traits={"x": "first"})
    store.apply(ids("u1"), at=at(1), traits={"y": "second"})
    calls = {"a": ids("u1", "a-1"), "b": ids(anon="a-1", email="li@example.com")}
    for name in order:
        store.apply(calls[name], at=at(2))
    assert store.resolve("email", "li@example.com") == "anonymous_id:a-1"
    assert store.resolve("user_id", "u1") == "anonymous_id:a-1"
    assert DbProfiles(database).read("u1").traits == {"x": "first", "y": "second"}  # u1 merged away


def test_three_people_merged_by_one_call_point_straight_at_the_survivor(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids(anon="a-old", email="li@example.com"), at=at(0))
    store.apply(ids(anon="a-2"), at=at(1))
    store.apply(ids("u1"), at=at(2))

    # u1's person (the newest) first joins a-2's, which then joins the oldest: a chain of two.
    applied = store.apply(ids("u1", "a-2", email="li@example.com"), at=at(3))

    assert applied is not None and applied.person == "anonymous_id:a-old"
    assert applied.plan.merges == (("anonymous_id:a-2", "u1"), ("anonymous_id:a-old", "anonymous_id:a-2"))
    merged = {row.user_id: row.merged_into for row in rows(database, ProfileRecord)}
    assert merged == {"anonymous_id:a-old": None, "anonymous_id:a-2": "anonymous_id:a-old", "u1": "anonymous_id:a-old"}
    assert {store.resolve("user_id", "u1"), store.resolve("anonymous_id", "a-2")} == {"anonymous_id:a-old"}


def test_two_known_users_stay_apart_unless_aliased(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids("mum", email="family@example.com"), at=at(0))
    applied = store.apply(
        ids("kid", email="family@example.com"), at=at(1), traits={"email": "family@example.com"}
    )
    assert applied is not None and applied.person == "kid" and applied.plan.conflicts
    assert store.resolve("email", "family@example.com") == "mum"
    assert DbProfiles(database).read("kid").traits["email"] == "family@example.com"
    assert [a.action for a in rows(database, AuditRecord)] == ["conflict"]
    aliased = store.apply(
        [Identifier("user_id", "kid"), Identifier("user_id", "mum")], at=at(2), explicit=True
    )
    assert aliased is not None and aliased.person == "mum"
    assert store.resolve("user_id", "kid") == "mum"


def test_the_newer_of_two_active_runs_of_one_journey_and_key_is_merged_away(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids("u1"), at=at(0))
    store.apply(ids(anon="a-1"), at=at(1))
    with database.session() as session:
        for run_id, wid, user, entered in (
            ("r-old", "j:u1:", "u1", at(3)),
            ("r-new", "j:anon:", "anonymous_id:a-1", at(4)),
            ("r-other", "k:anon:", "anonymous_id:a-1", at(5)),
        ):
            session.add(
                RunRecord(
                    run_id=run_id,
                    workflow_id=wid,
                    journey=wid[0],
                    version="1",
                    user_id=user,
                    entered_at=entered,
                )
            )
            session.add(Route(workflow_id=wid, user_id=user, journey=wid[0], key=""))
        # A route whose run start is not recorded yet counts from the route's time.
        session.add(
            Route(workflow_id="j:late:", user_id="anonymous_id:a-1", journey="j", key="", updated_at=at(9))
        )
    applied = store.apply(ids("u1", "a-1"), at=at(6), record=call("m1"))
    assert applied is not None and applied.person == "u1"
    assert applied.merged_away == ["j:anon:", "j:late:"]
    [stored] = rows(database, EventRecord, message_id="m1")
    assert stored.routed_at is None  # routed once the stops are delivered
    assert store.merged_away("anonymous_id:a-1") == ["j:anon:", "j:late:"]


def test_caps_count_both_peoples_messages(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids("u1"), at=at(0))
    store.apply(ids("u2"), at=at(1))
    with database.session() as session:
        for key, user in (("k1", "u1"), ("k2", "u2")):
            session.add(
                MessageRecord(
                    idempotency_key=key,
                    run_id="r",
                    user_id=user,
                    step_id="s",
                    channel="email",
                    template="t",
                    status="sent",
                    category="marketing",
                    sent_at=at(2),
                )
            )
    store.apply([Identifier("user_id", "u2"), Identifier("user_id", "u1")], at=at(3), explicit=True)
    import asyncio

    sent = asyncio.run(DbHistory(database).sent("u2", at(0)))
    assert len(sent) == 2


def test_a_merge_keeps_the_later_group_call(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids("u1"), at=at(0), group=("acme", {"plan": "team"}))
    store.apply(ids(anon="a-1"), at=at(5), group=("globex", {"plan": "enterprise"}))
    store.apply(ids("u2"), at=at(6), group=("initech", {}))
    store.apply(ids(anon="a-2"), at=at(1), group=("hooli", {}))
    store.apply(ids("u1", "a-1"), at=at(7))  # u1 survives, a-1's group call was later
    store.apply(ids("u2", "a-2"), at=at(8))  # u2 survives and keeps its own, later, group
    assert DbProfiles(database).read("u1").traits["group"] == {"id": "globex", "plan": "enterprise"}
    assert DbProfiles(database).read("u2").traits["group"] == {"id": "initech"}


def test_groups_are_shared_and_readable_as_user_group(database: Database) -> None:
    store = DbIdentities(database)
    store.apply(ids("u1"), at=at(0), group=("acme", {"plan": "enterprise", "seats": 5}))
    store.apply(ids("u2"), at=at(1), group=("acme", {"seats": 9}))
    assert DbProfiles(database).read("u1").traits["group"] == {"id": "acme", "plan": "enterprise", "seats": 9}


def test_the_store_agrees_with_the_in_memory_reference(database: Database) -> None:
    store, reference = DbIdentities(database), Identities()
    calls = [
        (ids(anon="a1"), False),
        (ids(anon="a2", email="x@example.com"), False),
        (ids("u1", "a1"), False),
        (ids("u2", "a2"), False),
        (ids("u1", email="x@example.com"), False),  # two known users: a conflict
        (ids(anon="a3", phone="+8613800138000"), False),
        (ids("u2", phone="+8613800138000"), False),
        ([Identifier("user_id", "u1"), Identifier("user_id", "u2")], True),
    ]
    for minute, (named, explicit) in enumerate(calls):
        applied = store.apply(named, at=at(minute), explicit=explicit)
        expected = reference.apply(named, at(minute), explicit=explicit)
        assert applied is not None
        assert (applied.person, applied.plan.merges, applied.plan.attach, applied.plan.conflicts) == (
            expected.person,
            expected.merges,
            expected.attach,
            expected.conflicts,
        )
    for ident in reference.owner:
        assert store.resolve(ident.kind, ident.value) == reference.resolve(ident)


def _merge_worker(url: str, user: str, anon: str, barrier: Any) -> None:
    db = Database(url)
    barrier.wait()
    DbIdentities(db).apply(call_identifiers(user, anon), at=T0)
    db.dispose()


def test_concurrent_merges_end_with_one_survivor(database: Database) -> None:
    """Threads and processes merging the same people at once (SQLite runs them one at a time;
    PostgreSQL for real, on row locks and retries)."""
    store = DbIdentities(database)
    # Four visitors and two sign-ins; every call joins two of them, all at once.
    for anon in ("a1", "a2", "a3", "a4"):
        store.apply(ids(anon=anon), at=at(0))
    pairs = [("u1", "a1"), ("u1", "a2"), ("u1", "a3"), ("u1", "a4"), (None, "a1"), ("u1", "a1")]
    barrier = threading.Barrier(len(pairs))
    errors: list[BaseException] = []

    def merge(user: str | None, anon: str) -> None:
        try:
            barrier.wait()
            store.apply(ids(user, anon), at=at(1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=merge, args=pair) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    survivors = {store.resolve(i.kind, i.value) for i in ids("u1", "a1") + ids(anon="a2") + ids(anon="a3")}
    survivors.add(store.resolve("anonymous_id", "a4"))
    assert survivors == {"anonymous_id:a1"}
    assert len(store.identifiers_of("anonymous_id:a1")) == 5
    # Two processes at once, as two API processes would.
    url = database.url
    context = multiprocessing.get_context("spawn")
    store.apply(ids(anon="b1"), at=at(2))
    store.apply(ids("v1"), at=at(3))
    process_barrier = context.Barrier(2)
    processes = [
        context.Process(target=_merge_worker, args=(url, "v1", "b1", process_barrier)),
        context.Process(target=_merge_worker, args=(url, "v1", "b1", process_barrier)),
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert store.resolve("user_id", "v1") == store.resolve("anonymous_id", "b1") == "anonymous_id:b1"
    assert [r.merged_into for r in rows(database, ProfileRecord, user_id="v1")] == ["anonymous_id:b1"]


def test_the_upgrade_makes_every_known_user_a_person(database: Database) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from nurture.storage.db import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = database.engine
    command.downgrade(config, "0009")
    with database.engine.begin() as connection:
        for user, email, phone in (
            ("u1", "Li@Example.com", "+86 138 0013 8000"),
            ("u2", "li@example.com", "12345"),
        ):
            connection.execute(
                text(
                    "INSERT INTO profiles (user_id, traits, email, phone, opted_out, created_at, updated_at) "
                    "VALUES (:user, '{}', :email, :phone, '[]', :at, :at)"
                ),
                {"user": user, "email": email, "phone": phone, "at": T0 if user == "u1" else at(1)},
            )
        connection.execute(
            text(
                "INSERT INTO events (message_id, kind, user_id, properties, timestamp, received_at) "
                "VALUES ('m1', 'track', 'u3', '{}', :at, :at)"
            ),
            {"at": T0},
        )
    command.upgrade(config, "head")
    store = DbIdentities(database)
    assert store.resolve("user_id", "u3") == "u3"
    assert store.resolve("email", "li@example.com") == "u1"  # first come
    assert store.resolve("phone", "+8613800138000") == "u1"
    assert store.identifiers_of("u2") == [Identifier("user_id", "u2")]  # no E.164, a taken email
    assert {r.user_id for r in rows(database, ProfileRecord)} == {"u1", "u2", "u3"}
