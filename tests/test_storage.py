"""Storage on SQLite and PostgreSQL: migrations, profiles, events, routes, runs and messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from conftest import POSTGRES
from sqlalchemy import insert, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import select
from support import fresh_postgres, rows, send_request

from nurture.delivery.deliverer import Claim
from nurture.engine.identity import call_identifiers
from nurture.engine.model import SendOutcome, SendRequest
from nurture.language.templates import RenderedMessage
from nurture.storage.db import Database, Pool, database_url
from nurture.storage.identities import DbIdentities
from nurture.storage.models import (
    EventRecord,
    EventRow,
    MessageRecord,
    Route,
    RunRecord,
    StepReach,
    core_table,
)
from nurture.storage.stores import (
    DbHistory,
    DbLedger,
    DbProfiles,
    DbRecorder,
    Events,
    Routes,
    activate_route,
    has_run,
    record_opening,
)

NOW = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


def test_migration_creates_every_table(database: Database) -> None:
    tables = set(inspect(database.engine).get_table_names())
    assert {
        "profiles",
        "events",
        "runs",
        "routes",
        "messages",
        "message_events",
        "provider_tokens",
        "used_nonces",
        "alembic_version",
    } <= tables
    database.migrate()  # idempotent


def test_profiles_merge_traits_and_opt_outs(database: Database) -> None:
    profiles = DbProfiles(database)
    assert profiles.read("u1").traits == {}
    profiles.merge("u1", {"email": "li@example.com", "vip": False})
    profile = profiles.merge("u1", {"vip": True, "plan": "pro"}, ["sms"])
    assert profile.traits == {"email": "li@example.com", "vip": True, "plan": "pro"}
    assert profile.opted_out == {"sms"}
    record = profiles.record("u1")
    assert record is not None and record.email == "li@example.com" and record.phone is None
    assert profiles.set_opt_out("u1", "sms", False).opted_out == frozenset()
    assert asyncio.run(profiles.get("u1")).traits["plan"] == "pro"


def test_an_identify_call_and_its_merge_are_kept_together_or_not_at_all(database: Database) -> None:
    store, profiles = DbIdentities(database), DbProfiles(database)

    def call() -> EventRow:
        return EventRow(message_id="id-1", kind="identify", timestamp=NOW)

    def crash(current: set[str]) -> set[str]:
        raise RuntimeError("the process died here")

    named = call_identifiers("u1", None, {"email": "li@example.com"})
    with pytest.raises(RuntimeError):
        store.apply(named, at=NOW, record=call(), traits={"email": "li@example.com"}, opted_out=crash)
    # Neither the call, the person nor the traits were kept, so the client's retry is applied, once.
    assert store.resolve("user_id", "u1") is None and profiles.read("u1").traits == {}
    assert store.apply(named, at=NOW, record=call(), traits={"email": "li@example.com"}, opted_out=["sms"])
    assert store.apply(named, at=NOW, record=call(), traits={"email": "other@example.com"}, opted_out=[]) is None
    profile = profiles.read("u1")
    assert (profile.traits, profile.opted_out) == ({"email": "li@example.com"}, {"sms"})
    with database.session() as session:
        assert [(row.message_id, row.user_id) for row in session.exec(select(EventRecord)).all()] == [("id-1", "u1")]


def test_events_deduplicate_on_message_id(database: Database) -> None:
    events = Events(database)
    first = events.add(
        message_id="m1", kind="track", user_id="u1", name="A", properties={"n": 1}, timestamp=NOW
    )
    again = events.add(
        message_id="m1", kind="track", user_id="u1", name="A", properties={"n": 2}, timestamp=NOW
    )
    assert (first, again) == (True, False)


def test_routes_and_runs(database: Database) -> None:
    routes = Routes(database)
    routes.activate("wf1", user_id="u1", journey="j", key="", listens=["B", "A"])
    routes.activate("wf2", user_id="u2", journey="j", key="", listens=["A"])
    assert [r.workflow_id for r in routes.active_for("u1")] == ["wf1"]
    assert routes.active_for("u1")[0].listens == ["A", "B"]
    recorder = DbRecorder(database)
    record = {
        "run_id": "r1",
        "workflow_id": "wf1",
        "journey": "j",
        "version": "v",
        "user_id": "u1",
        "key": "",
        "at": "2026-03-02T02:00:00Z",
    }
    asyncio.run(recorder.start(record))
    asyncio.run(recorder.start(record))  # a retried activity changes nothing
    assert has_run(database, "j", "u1", "") and not has_run(database, "j", "u1", "other")
    asyncio.run(
        recorder.end({**record, "reason": "restarted", "at": "2026-03-02T03:00:00Z", "continued": True})
    )
    assert routes.is_active("wf1"), "a restarted run keeps its route for the run that replaces it"
    asyncio.run(
        recorder.end({**record, "reason": "goal", "at": "2026-03-02T04:00:00Z", "variants": {"x": "a"}})
    )
    assert not routes.is_active("wf1")
    with database.session() as session:
        run = session.get(RunRecord, "r1")
        assert (
            run is not None
            and run.status == "ended"
            and run.end_reason == "goal"
            and run.variants == {"x": "a"}
        )


def test_an_autocommit_session_commits_each_statement_on_its_own(database: Database) -> None:
    routes = Routes(database)
    with database.autocommit() as session:
        activate_route(session, "wf1", user_id="u1", journey="j", key="", listens=["A"])
        # Read on another connection while the session is open: the write committed by itself.
        assert [r.workflow_id for r in routes.active_for("u1")] == ["wf1"]
    with pytest.raises(IntegrityError), database.autocommit() as session:
        activate_route(session, "wf2", user_id="u2", journey="j", key="", listens=["A"])
        session.connection().execute(insert(core_table(Route)), {"workflow_id": "wf2", "user_id": "u2", "journey": "j"})
    assert routes.is_active("wf2"), "the statement before the failed one stays"
    with pytest.raises(IntegrityError), database.session() as session:  # a transaction, for contrast
        activate_route(session, "wf3", user_id="u3", journey="j", key="", listens=["A"])
        session.connection().execute(insert(core_table(Route)), {"workflow_id": "wf3", "user_id": "u3", "journey": "j"})
    assert not routes.is_active("wf3")


def test_a_routers_opening_is_written_once_and_never_over_what_the_run_wrote(database: Database) -> None:
    """``record_opening``: the run's row waiting at its first wait, with the steps up to it. Written
    again (a retry), or after the run got further and wrote its own records (a router slower
    than a short first wait), it changes nothing."""
    start = {"run_id": "r9", "workflow_id": "wf9", "journey": "j", "version": "v", "user_id": "u9", "key": "k",
             "trigger_message_id": "m9", "at": "2026-03-02T02:00:00Z", "holdout": False}  # fmt: skip
    steps = {"run_id": "r9", "journey": "j", "version": "v", "waiting": "pause", "deferred": None,
             "reached": [{"step_id": "pause", "at": "2026-03-02T02:00:00Z"}]}  # fmt: skip
    for _ in range(2):
        with database.session() as session:
            record_opening(session, start, steps)
    (run,) = rows(database, RunRecord, run_id="r9")
    assert (run.status, run.step, run.user_id, run.key, run.trigger_message_id, run.variants) == (
        "active", "pause", "u9", "k", "m9", {}
    )
    assert [(r.step_id, r.deferrals) for r in rows(database, StepReach, run_id="r9")] == [("pause", 0)]

    later = {**start, "run_id": "r10"}
    recorder = DbRecorder(database)
    asyncio.run(recorder.start(later))
    asyncio.run(recorder.end({**later, "reason": "completed", "at": "2026-03-02T02:00:05Z",
                              "reached": [{"step_id": "pause", "at": "2026-03-02T02:00:00Z"},
                                          {"step_id": "hi", "at": "2026-03-02T02:00:05Z"}]}))  # fmt: skip
    with database.session() as session:
        record_opening(session, later, {**steps, "run_id": "r10"})
    (ended,) = rows(database, RunRecord, run_id="r10")
    assert (ended.status, ended.end_reason, ended.step) == ("ended", "completed", None)
    assert sorted(r.step_id for r in rows(database, StepReach, run_id="r10")) == ["hi", "pause"]


def _request(step: str = "s1") -> SendRequest:
    return send_request(run_id="run1", journey="j", version="v", step_id=step, template="coupon", variant="a")  # type: ignore[no-any-return]


SMS = RenderedMessage(channel="sms", template="coupon", locale=None, text="Hi Li")


def test_ledger_row_is_written_before_delivery_and_outcome_joins_it(database: Database) -> None:
    ledger, request = DbLedger(database), _request()
    claim = asyncio.run(ledger.claim(request, "sms", "twilio", "+8613800138000", SMS))
    assert claim == Claim("new", "sms")
    with database.session() as session:
        row = session.exec(select(MessageRecord)).one()
        assert (row.status, row.address, row.content, row.provider) == (
            "sending",
            "+8613800138000",
            SMS.to_dict(),
            "twilio",
        )
        assert [a["state"] for a in row.attempts] == ["pending"]
    # A second attempt while the first never answered: the outcome is unknown, not "go ahead".
    assert asyncio.run(ledger.claim(request, "sms", "twilio", "+8613800138000", SMS)).state == "unknown"
    asyncio.run(ledger.settle(request, "sms", "sent", provider_id="SM1"))
    assert asyncio.run(ledger.claim(request, "sms", "twilio", "+8613800138000", SMS)) == Claim(
        "sent", "sms", provider_id="SM1"
    )
    outcome = SendOutcome(
        step_id="s1",
        channel="sms",
        template="coupon",
        status="sent",
        at=NOW,
        provider="twilio",
        provider_id="SM1",
        variant="a",
    )
    asyncio.run(DbRecorder(database).send(request, outcome))
    # Frequency caps count it at the outcome's instant, on the run's clock.
    assert asyncio.run(DbHistory(database).sent("u1", NOW)) == [(NOW, "sms")]
    with database.session() as session:
        rows = session.exec(select(MessageRecord)).all()
    assert len(rows) == 1
    assert (rows[0].status, rows[0].user_id, rows[0].variant, rows[0].content["text"]) == (
        "sent",
        "u1",
        "a",
        "Hi Li",
    )


def test_ledger_retry_failure_and_fallback_attempts(database: Database) -> None:
    ledger, request = DbLedger(database), _request()
    asyncio.run(ledger.claim(request, "sms", "twilio", "+8613800138000", SMS))
    asyncio.run(ledger.settle(request, "sms", "retry", reason="rate_limited"))
    # A transient failure leaves the way open: the retry calls the provider again.
    assert asyncio.run(ledger.claim(request, "sms", "twilio", "+8613800138000", SMS)) == Claim("new", "sms")
    asyncio.run(ledger.settle(request, "sms", "failed", reason="invalid_number"))
    assert asyncio.run(ledger.claim(request, "sms", "twilio", "+8613800138000", SMS)) == Claim(
        "failed", "sms", reason="invalid_number"
    )
    email = RenderedMessage(channel="email", template="coupon", locale=None, subject="Hi", html="<p>Hi</p>")
    assert asyncio.run(ledger.claim(request, "email", "sendgrid", "li@example.com", email)) == Claim(
        "new", "email"
    )
    # While email is in flight, nothing else may go out for this step: not even SMS again.
    assert asyncio.run(ledger.claim(request, "sms", "twilio", "+8613800138000", SMS)) == Claim(
        "unknown", "email"
    )
    with database.session() as session:
        row = session.exec(select(MessageRecord)).one()
    assert [(a["channel"], a["state"], a.get("reason")) for a in row.attempts] == [
        ("sms", "failed", "invalid_number"),
        ("email", "pending", None),
    ]
    assert (row.channel, row.address, row.subject) == ("email", "li@example.com", "Hi")


def test_concurrent_claims_let_exactly_one_attempt_through(database: Database) -> None:
    ledger, request = DbLedger(database), _request("s9")

    async def race() -> list[Claim]:
        return list(
            await asyncio.gather(
                *(ledger.claim(request, "sms", "twilio", "+8613800138000", SMS) for _ in range(8))
            )
        )

    states = sorted(claim.state for claim in asyncio.run(race()))
    assert states == ["new"] + ["unknown"] * 7


def test_database_url_from_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert database_url({"DATABASE_URL": "postgresql://u@h/db"}) == "postgresql+psycopg://u@h/db"
    assert database_url({"DATABASE_URL": "postgres://u@h/db"}) == "postgresql+psycopg://u@h/db"
    assert database_url({}, home=tmp_path) == f"sqlite:///{tmp_path / 'nurture.db'}"


def test_concurrent_opt_out_changes_are_all_kept(database: Database) -> None:
    """Read-modify-write of one profile from many threads loses nothing, on SQLite too."""
    from concurrent.futures import ThreadPoolExecutor

    profiles = DbProfiles(database)
    names = [f"topic{n}" for n in range(16)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: profiles.set_opt_out("u-race", name, True), names))
    assert profiles.read("u-race").opted_out == frozenset(names)


def test_the_migrations_build_exactly_the_tables_the_models_describe(database: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_the_upgrade_marks_the_feedback_messages_already_had(database: Database) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from nurture.storage.db import MIGRATIONS
    from nurture.storage.models import feedback_bit

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = database.engine
    command.downgrade(config, "0008")
    with database.engine.begin() as connection:
        for key in ("r1:s1", "r2:s1"):
            connection.execute(
                text(
                    "INSERT INTO messages (idempotency_key, run_id, user_id, journey, step_id, channel, template, "
                    "status, attempts, revision, created_at) VALUES (:key, 'r', 'u', 'j', 's1', 'email', 't', 'sent', "
                    "'[]', 0, :at)"
                ),
                {"key": key, "at": NOW},
            )
        for event in ("delivered", "open", "processed"):
            connection.execute(
                text(
                    "INSERT INTO message_events (provider, event, idempotency_key, at, data, received_at) "
                    "VALUES ('sendgrid', :event, 'r1:s1', :at, '{}', :at)"
                ),
                {"event": event, "at": NOW},
            )

    database.migrate()

    bits = {row.idempotency_key: row.feedback for row in rows(database, MessageRecord)}
    assert bits == {"r1:s1": feedback_bit("delivered") | feedback_bit("open"), "r2:s1": 0}


# -- pooled PostgreSQL connections ----------------------------------------------------------------


IDLE = 2.0
"""The idle time after which these tests' pools check a connection before handing it out: long
enough that a loaded machine never pauses that long between two back-to-back sessions."""


def backend_pid(db: Database) -> int:
    with db.session() as session:
        return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def terminate(pid: int) -> None:
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.fixture
def pinged(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Database, list[object]]]:
    """A PostgreSQL database with a pool of one connection, checked after ``IDLE`` seconds idle,
    and the list of the pings its dialect made."""
    with fresh_postgres() as url:
        db = Database(database_url({"DATABASE_URL": url}), pool=Pool(size=1, overflow=0), idle_check=IDLE)
        pings: list[object] = []
        ping = db.engine.dialect.do_ping

        def counted(connection: Any) -> bool:
            pings.append(connection)
            return ping(connection)

        monkeypatch.setattr(db.engine.dialect, "do_ping", counted)
        try:
            yield db, pings
        finally:
            db.dispose()


def test_a_connection_returned_moments_ago_is_handed_out_unchecked(pinged: tuple[Database, list[object]]) -> None:
    db, pings = pinged
    pids = {backend_pid(db) for _ in range(20)}
    assert len(pids) == 1 and pings == []  # one connection, twenty checkouts, no round trip added
    time.sleep(IDLE * 2)
    assert backend_pid(db) in pids and len(pings) == 1  # idle past the limit: checked once, kept


def test_an_idle_connection_the_server_closed_is_replaced_unseen(pinged: tuple[Database, list[object]]) -> None:
    db, pings = pinged
    first = backend_pid(db)
    terminate(first)
    time.sleep(IDLE * 2)
    assert backend_pid(db) != first  # the ping failed, so a new connection served the session
    assert len(pings) == 1


def test_a_busy_connection_the_server_closed_fails_once_as_a_transient_error(
    pinged: tuple[Database, list[object]],
) -> None:
    db, pings = pinged
    first = backend_pid(db)
    terminate(first)
    with pytest.raises(OperationalError) as failed:  # what callers treat as transient (a retry)
        backend_pid(db)
    assert failed.value.connection_invalidated
    assert backend_pid(db) != first and pings == []  # the retry gets a new connection
