"""Routing on SQLite and PostgreSQL with a real Temporal dev server: every stored event is routed
at least once, concurrent first triggers all succeed, one journey's failure leaves the others
routed, and workflow ids fit Temporal's limit whatever the user id and key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text, update
from sqlalchemy.exc import OperationalError
from sqlmodel import col
from support import eventually, new_user, rows
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode
from test_api import KEY, Api, serving, utc

import nurture.service.ingest as ingest_module
from nurture.engine.clock import parse_instant
from nurture.engine.identity import call_identifiers
from nurture.engine.interpreter import WORKFLOW_ID_LIMIT, workflow_id
from nurture.engine.model import Event
from nurture.language import ir
from nurture.language.compiler import Project, load_project
from nurture.service.api import create_app
from nurture.service.ingest import Ingest, NotRouted, start_run
from nurture.service.settings import Settings
from nurture.service.worker import build_worker
from nurture.storage.console import PausedJourneys
from nurture.storage.db import MIGRATIONS, Database
from nurture.storage.models import EventRecord, Route, RunRecord, StepReach
from nurture.storage.stores import DbProfiles, Events, Routes, store_versions
from workflows.journey import OPENED, run_input


@pytest.fixture(scope="module")
async def temporal_client(dev_server: str) -> Client:
    return await Client.connect(dev_server)


@pytest.fixture
async def api(project: Project, database: Database, temporal_client: Client) -> AsyncIterator[Api]:
    async with serving(project, database, temporal_client) as api:
        yield api


def store(db: Database, user: str, name: str, message_id: str, **properties: Any) -> None:
    """What a process killed a minute ago between storing an event and routing it left behind."""
    fresh = Events(db).add(
        message_id=message_id,
        kind="track",
        user_id=user,
        name=name,
        properties=properties,
        timestamp=datetime.now(UTC),
    )
    assert fresh
    age(db, message_id)


def age(db: Database, message_id: str | None) -> None:
    """The stored event as if received a minute ago: a retry routes it at once (no routing grace)."""
    with db.session() as session:
        session.execute(
            update(EventRecord)
            .where(col(EventRecord.message_id) == message_id)
            .values(received_at=datetime.now(UTC) - timedelta(minutes=1))
        )


async def status(client: Client, wid: str) -> WorkflowExecutionStatus | None:
    try:
        return (await client.get_workflow_handle(wid).describe()).status
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return None


# At least once ----------------------------------------------------------------------------------


async def test_a_retry_of_an_event_stored_but_not_routed_routes_it(api: Api) -> None:
    user, message_id = new_user(), f"m-{uuid.uuid4().hex}"
    store(api.db, user, "Signed Up", message_id)
    wid = workflow_id("welcome_series", user, "")

    retried = await api.post("/v1/track", {"userId": user, "event": "Signed Up", "messageId": message_id})

    assert retried.status_code == 200, retried.text
    body = retried.json()
    assert (body["duplicate"], body["rerouted"], body["triggered"]) == (False, True, [wid])
    assert await status(api.temporal, wid) == WorkflowExecutionStatus.RUNNING
    [event] = rows(api.db, EventRecord, message_id=message_id)
    assert event.routed_at is not None
    again = (await api.post("/v1/track", {"userId": user, "event": "Signed Up", "messageId": message_id})).json()
    assert (again["duplicate"], again["rerouted"], again["triggered"]) == (True, False, [])


async def test_rerouting_an_event_whose_run_ended_starts_no_second_run(api: Api) -> None:
    """Runs ignore a repeated trigger while active; once ended, the runs table says it happened."""
    user = new_user()
    call = {"userId": user, "event": "Cart Updated", "messageId": f"m-{user}",
            "properties": {"cart_id": "c-1", "item_count": 1}}  # fmt: skip
    wid = workflow_id("cart_abandonment", user, "c-1")
    assert (await api.post("/v1/track", call)).json()["triggered"] == [wid]
    emptied = {"userId": user, "event": "Cart Emptied", "properties": {"cart_id": "c-1"}}
    assert (await api.post("/v1/track", emptied)).json()["signalled"] == [wid]
    await eventually(lambda: rows(api.db, RunRecord, workflow_id=wid, status="ended"), what="the run's end")
    with api.db.session() as session:  # as if the process died before it marked the event routed
        session.execute(
            update(EventRecord)
            .where(col(EventRecord.message_id) == call["messageId"])
            .values(routed_at=None, received_at=datetime.now(UTC) - timedelta(minutes=1))
        )

    retried = (await api.post("/v1/track", call)).json()

    assert (retried["rerouted"], retried["triggered"]) == (True, [wid])
    assert await status(api.temporal, wid) == WorkflowExecutionStatus.COMPLETED
    assert len(rows(api.db, RunRecord, workflow_id=wid)) == 1


async def test_start_up_routes_the_events_a_crash_left_unrouted(
    project: Project, database: Database, temporal_client: Client
) -> None:
    users = [new_user() for _ in range(3)]
    for user in users:
        store(database, user, "Signed Up", f"m-{user}")
    settings = Settings(write_keys=(KEY,), task_queue=f"test-routing-{uuid.uuid4().hex[:8]}", database=database.url)
    app = create_app(settings, project=project, db=database, client=temporal_client)

    async with app.router.lifespan_context(app):
        await eventually(
            lambda: all(e.routed_at for e in rows(database, EventRecord, kind="track")),
            timeout=30,
            what="the left-over events routed",
        )
    for user in users:
        assert await status(temporal_client, workflow_id("welcome_series", user, "")) is not None


# Concurrent first triggers ------------------------------------------------------------------


def test_concurrent_route_activations_of_one_workflow_all_succeed(database: Database) -> None:
    routes, errors = Routes(database), []
    barrier = threading.Barrier(12)

    def activate(index: int) -> None:
        barrier.wait()
        try:
            routes.activate("wf-1", user_id="u1", journey="j", key="", listens=[f"E{index % 2}"])
        except Exception as exc:  # collected: the assertion below names them
            errors.append(exc)

    threads = [threading.Thread(target=activate, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    [route] = rows(database, Route, workflow_id="wf-1")
    assert route.active and route.listens in (["E0"], ["E1"])


async def test_concurrent_first_triggers_of_one_run_all_succeed(api: Api) -> None:
    user = new_user()
    wid = workflow_id("cart_abandonment", user, "c-1")

    async def update_cart(count: int) -> httpx.Response:
        return await api.post(
            "/v1/track",
            {"userId": user, "event": "Cart Updated", "properties": {"cart_id": "c-1", "item_count": count}},
        )

    answers = await asyncio.gather(*(update_cart(count) for count in range(1, 17)))

    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200]
    assert all(a.json()["triggered"] == [wid] for a in answers)
    assert [r.workflow_id for r in rows(api.db, Route, user_id=user)] == [wid]


def signals(history: WorkflowHistory) -> list[str]:
    return [
        e.workflow_execution_signaled_event_attributes.signal_name
        for e in history.events
        if e.HasField("workflow_execution_signaled_event_attributes")
    ]


async def test_a_first_trigger_starts_plainly_and_a_trigger_for_an_active_run_reaches_it(api: Api) -> None:
    """No active run: a plain start, the trigger in the input alone (no ``trigger`` signal in the
    history). An active run (``re_entry: restart``): a signal-with-start, which the run gets."""
    user = new_user()
    wid = workflow_id("cart_abandonment", user, "c-1")

    def cart(count: int) -> dict[str, Any]:
        return {"userId": user, "event": "Cart Updated", "properties": {"cart_id": "c-1", "item_count": count}}

    first = await api.post("/v1/track", cart(1))
    assert first.json()["triggered"] == [wid], first.text
    started = await api.temporal.get_workflow_handle(wid).describe()
    assert signals(await api.temporal.get_workflow_handle(wid, run_id=started.run_id).fetch_history()) == []

    second = await api.post("/v1/track", cart(2))

    assert second.json()["triggered"] == [wid], second.text
    restarted = api.temporal.get_workflow_handle(wid, run_id=started.run_id)
    for _ in range(300):
        if (await restarted.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW:
            break
        await asyncio.sleep(0.1)
    assert (await restarted.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    assert signals(await restarted.fetch_history()) == ["trigger"]


async def test_a_plain_start_that_finds_a_run_in_flight_signals_the_trigger_to_it(
    temporal_client: Client, project: Project
) -> None:
    """The routes have not shown a run another process started a moment ago: the plain start
    fails, and the signal-with-start after it reaches that run."""
    wid = f"nurture/cart_abandonment/{new_user()}/c-1"
    queue = f"nobody-{uuid.uuid4().hex[:8]}"  # no worker: the history shows what reached the run
    journey = ir.journey_to_dict(project.journeys["cart_abandonment"])
    event = Event("Cart Updated", datetime.now(UTC), {"cart_id": "c-1"}, uuid.uuid4().hex).to_dict()
    params = {"journey": journey, "user_id": "u", "key": "c-1", "event": event}
    await start_run(temporal_client, params, wid=wid, task_queue=queue, once=False, running=False)

    await start_run(temporal_client, params, wid=wid, task_queue=queue, once=False, running=False)

    history = await temporal_client.get_workflow_handle(wid).fetch_history()
    assert signals(history) == ["trigger"]
    await temporal_client.get_workflow_handle(wid).terminate("test over")


DUE = """\
journey: {name}
trigger: {{event: Booked}}
steps:
  - {{id: until_due, wait_until: {{date: event.properties.due_at, at: "09:00"}}}}
  - {{id: remind, send: sms, template: hello, category: transactional}}
"""


def local_activities(history: WorkflowHistory) -> list[str]:
    """The local activities a history ran, in order (their markers)."""
    return [
        json.loads(e.marker_recorded_event_attributes.details["data"].payloads[0].data)["activity_type"]
        for e in history.events
        if e.HasField("marker_recorded_event_attributes")
        and e.marker_recorded_event_attributes.marker_name == "core_local_activity"
    ]


def profile_reads(history: WorkflowHistory) -> int:
    """The ``nurture.read_profile`` local activities in the history."""
    return local_activities(history).count("nurture.read_profile")


async def test_a_run_whose_first_step_reads_the_profile_gets_the_traits_routing_read(
    tmp_path: Path, database: Database, temporal_client: Client
) -> None:
    """A first ``wait_until`` in the person's time zone: the start carries the traits the router
    read, and the run waits without a profile read of its own. A run that starts with a send
    carries no traits (its send reads the profile inside the activity, out of the history)."""
    (tmp_path / "journeys").mkdir()
    (tmp_path / "journeys" / "due.yaml").write_text(DUE.format(name="due"))
    (tmp_path / "journeys" / "hello_first.yaml").write_text(TWIN.format(name="hello_first").replace("Joined", "Booked"))
    (tmp_path / "templates" / "sms").mkdir(parents=True)
    (tmp_path / "templates" / "sms" / "hello.txt").write_text("Hello")
    project = load_project(tmp_path / "journeys", tmp_path / "templates")
    user = new_user()
    async with serving(project, database, temporal_client) as api:
        identified = await api.post(
            "/v1/identify", {"userId": user, "traits": {"timezone": "Asia/Tokyo", "phone": "+15555550100"}}
        )
        assert identified.status_code == 200, identified.text
        booked = await api.post(
            "/v1/track", {"userId": user, "event": "Booked", "properties": {"due_at": "2099-01-02"}}
        )
        assert booked.status_code == 200, booked.text
        due, hello = workflow_id("due", user, ""), workflow_id("hello_first", user, "")
        assert sorted(booked.json()["triggered"]) == sorted([due, hello])

        def waiting() -> bool:
            return sorted(str(r.step) for r in rows(database, RunRecord, user_id=user)) == ["pause", "until_due"]

        await eventually(waiting, timeout=30, what="both runs waiting")
        due_history = await temporal_client.get_workflow_handle(due).fetch_history()
        hello_history = await temporal_client.get_workflow_handle(hello).fetch_history()

    started = due_history.events[0].workflow_execution_started_event_attributes.input.payloads[0].data
    assert json.loads(started)["traits"] == {"timezone": "Asia/Tokyo", "phone": "+15555550100"}
    assert profile_reads(due_history) == 0
    timers = [e.timer_started_event_attributes for e in due_history.events if e.HasField("timer_started_event_attributes")]
    assert len(timers) == 1  # 2099-01-02 09:00 in Tokyo, not in UTC: the traits were read
    fired_at = due_history.events[0].event_time.ToDatetime(UTC) + timers[0].start_to_fire_timeout.ToTimedelta()
    assert abs(fired_at - datetime(2099, 1, 2, 0, 0, tzinfo=UTC)) < timedelta(minutes=5)
    assert "traits" not in json.loads(hello_history.events[0].workflow_execution_started_event_attributes.input.payloads[0].data)


TWIN = """\
journey: {name}
trigger: {{event: Joined}}
steps:
  - {{id: hello, send: sms, template: hello, category: transactional}}
  - {{id: pause, wait: 1d}}
"""


@pytest.fixture
def twins(tmp_path: Path) -> Project:
    """Two journeys that one event triggers."""
    (tmp_path / "journeys").mkdir()
    for name in ("first_twin", "second_twin"):
        (tmp_path / "journeys" / f"{name}.yaml").write_text(TWIN.format(name=name))
    (tmp_path / "templates" / "sms").mkdir(parents=True)
    (tmp_path / "templates" / "sms" / "hello.txt").write_text("Hello")
    return load_project(tmp_path / "journeys", tmp_path / "templates")


class FailingOnce:
    """A real Temporal client whose first start of one workflow id fails as an outage would."""

    def __init__(self, client: Client, refused: str) -> None:
        self.client = client
        self.refused: str | None = refused

    async def start_workflow(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs["id"] == self.refused:
            self.refused = None
            raise RPCError("frontend unavailable", RPCStatusCode.UNAVAILABLE, b"")
        return await self.client.start_workflow(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


async def test_one_journeys_failure_leaves_the_others_routed_and_the_retry_routes_it(
    twins: Project, database: Database, temporal_client: Client
) -> None:
    user = new_user()
    first, second = workflow_id("first_twin", user, ""), workflow_id("second_twin", user, "")
    client = FailingOnce(temporal_client, refused=first)
    ingest = Ingest(twins, database, client, f"test-routing-{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    event = Event("Joined", datetime.now(UTC), {}, f"m-{user}")

    with pytest.raises(NotRouted):
        await ingest.track(call_identifiers(user, None), event)
    assert await status(temporal_client, first) is None
    assert await status(temporal_client, second) == WorkflowExecutionStatus.RUNNING

    routed = await ingest.track(call_identifiers(user, None), event)

    assert routed.rerouted and sorted(routed.triggered) == [first, second]
    assert await status(temporal_client, first) == WorkflowExecutionStatus.RUNNING
    assert [e.routed_at is not None for e in rows(database, EventRecord, user_id=user)] == [True]


async def test_events_finishing_together_write_their_routes_and_marks_together(
    project: Project, database: Database, temporal_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routing's last writes of events whose runs started while another event's writes were
    being made go together in one write, routes before marks; every route is active and every
    event routed."""
    ingest = Ingest(project, database, temporal_client, f"test-routing-{uuid.uuid4().hex[:8]}")
    users = [new_user() for _ in range(12)]
    batches: list[list[str]] = []
    write, statements = ingest._finishing._write, list[tuple[str, int]]()

    def recording(name: str) -> Any:
        real = getattr(ingest_module, name)

        def recorded(session: Any, values: Any) -> None:
            statements.append((name, len(values)))
            real(session, values)

        return recorded

    for name in ("activate_routes", "mark_routed"):
        monkeypatch.setattr(ingest_module, name, recording(name))

    def held(finished: Any) -> None:
        batches.append(sorted(message_id for _, message_id in finished))
        if len(batches) == 1:  # the first write waits until every other event is waiting for one
            for _ in range(3000):
                if len(finished) + len(ingest._finishing._waiting) == len(users):
                    break
                threading.Event().wait(0.01)
        write(finished)

    ingest._finishing._write = held
    routed = await asyncio.gather(
        *(
            ingest.track(
                call_identifiers(user, None),
                Event("Order Completed", datetime.now(UTC), {"order_id": f"o-{user}", "total": 20}, f"m-{user}"),
            )
            for user in users
        )
    )

    assert [r.triggered for r in routed] == [[workflow_id("post_purchase", user, f"o-{user}")] for user in users]
    assert len(batches) == 2  # the first event's write (with any that came at once), then all the others'
    assert [name for name, _ in statements] == ["activate_routes", "mark_routed"] * 2
    assert [size for _, size in statements] == [len(batch) for batch in batches for _ in (1, 2)]
    assert sorted(m for batch in batches for m in batch) == sorted(f"m-{user}" for user in users)
    for user in users:
        [route] = rows(database, Route, user_id=user)
        assert route.active and route.workflow_id == workflow_id("post_purchase", user, f"o-{user}")
        assert [e.routed_at is not None for e in rows(database, EventRecord, user_id=user)] == [True]


async def test_events_whose_last_writes_fail_stay_unrouted_and_their_retries_route_them(
    project: Project, database: Database, temporal_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage through every write of events finishing together (written together, then one by
    one): each call fails (503 at the API) and its event stays unrouted; the retries route them."""
    ingest = Ingest(project, database, temporal_client, f"test-routing-{uuid.uuid4().hex[:8]}")
    users = [new_user() for _ in range(6)]
    write, tried = ingest._finishing._write, list[int]()

    def outage(finished: Any) -> None:
        tried.append(len(finished))
        raise OperationalError("UPDATE events", {}, Exception("the server closed the connection"))

    def order(user: str) -> Event:
        return Event("Order Completed", datetime.now(UTC), {"order_id": f"o-{user}", "total": 20}, f"m-{user}")

    ingest._finishing._write = outage
    first = await asyncio.gather(
        *(ingest.track(call_identifiers(user, None), order(user)) for user in users), return_exceptions=True
    )
    assert [type(result) for result in first] == [NotRouted] * len(users)
    assert sum(size for size in tried if size == 1) == len(users)  # each was tried on its own too
    for user in users:
        assert [e.routed_at for e in rows(database, EventRecord, user_id=user)] == [None]

    ingest._finishing._write = write
    monkeypatch.setattr(ingest_module, "ROUTING_GRACE", 0.0)  # the retries come at once
    again = [await ingest.track(call_identifiers(user, None), order(user)) for user in users]

    for user, retried in zip(users, again, strict=True):
        assert retried.rerouted and retried.triggered == [workflow_id("post_purchase", user, f"o-{user}")]
        assert [e.routed_at is not None for e in rows(database, EventRecord, user_id=user)] == [True]
        assert [r.active for r in rows(database, Route, user_id=user)] == [True]


# Workflow ids ---------------------------------------------------------------------------------


async def test_a_persons_first_event_reads_only_the_paused_journeys_and_their_next_reads_all(
    project: Project, database: Database, temporal_client: Client
) -> None:
    """A person created by the call that stored their event has no routes or runs to read: routing
    reads only the paused journeys, and starts the run; the same person's next trigger reads their
    routes, the ended runs it may convert and whether they had the run. A paused journey keeps a
    new person out as it keeps a known one."""
    ingest = Ingest(project, database, temporal_client, f"test-routing-{uuid.uuid4().hex[:8]}")
    user, other = new_user(), new_user()
    selects: list[str] = []

    def seen(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(" ".join(statement.split()))

    async def order(person: str, order_id: str) -> tuple[list[str], list[str]]:
        selects.clear()
        routed = await ingest.track(
            call_identifiers(person, None),
            Event("Order Completed", datetime.now(UTC), {"order_id": order_id, "total": 20}, f"m-{person}-{order_id}"),
        )
        return routed.triggered, [s for s in selects if "FROM identities" not in s]  # the identity look-up

    event.listen(database.engine, "before_cursor_execute", seen)
    try:
        first_triggered, first_reads = await order(user, "o-1")
        next_triggered, next_reads = await order(user, "o-2")
        PausedJourneys(database).pause("post_purchase", by="test")
        paused_triggered, paused_reads = await order(other, "o-1")
    finally:
        event.remove(database.engine, "before_cursor_execute", seen)

    assert first_triggered == [workflow_id("post_purchase", user, "o-1")]
    assert [" FROM paused_journeys" in s for s in first_reads] == [True], first_reads
    assert next_triggered == [workflow_id("post_purchase", user, "o-2")]
    assert sorted(s.split(" FROM ")[1].split()[0] for s in next_reads) == ["paused_journeys", "routes", "runs", "runs"]
    assert paused_triggered == [] and len(paused_reads) == 1
    assert [r.workflow_id for r in rows(database, Route, user_id=other)] == []


def test_workflow_ids_are_readable_when_they_fit_and_always_fit() -> None:
    assert workflow_id("welcome_series", "ada@example.com", "") == "nurture/welcome_series/ada%40example.com/"
    long_key, accents = "k" * 1500, "é" * 163
    for user, key in ((accents, ""), ("u1", long_key), (accents * 2, long_key), ("a/b", "é" * 600)):
        wid = workflow_id("cart_abandonment", user, key)
        assert len(wid.encode()) <= WORKFLOW_ID_LIMIT, (len(wid), user[:5], key[:5])
        assert wid.startswith("nurture/cart_abandonment/") and wid == workflow_id("cart_abandonment", user, key)
    # The hash keeps ids of values that share their kept prefix apart.
    assert workflow_id("j", "u", long_key + "1") != workflow_id("j", "u", long_key + "2")
    assert workflow_id("j", accents + "a", "") != workflow_id("j", accents + "b", "")
    short = workflow_id("j", "u", long_key)
    assert short.startswith("nurture/j/u/kkkk") and "#" in short


async def test_long_user_ids_and_keys_start_runs_that_keep_them_in_full(api: Api) -> None:
    accents = "é" * 163 + uuid.uuid4().hex[:8]
    long_order = "o-" + "9" * 1500 + uuid.uuid4().hex
    identify = await api.post("/v1/identify", {"userId": accents, "traits": {"email": "e@example.com"}})
    assert identify.status_code == 200, identify.text

    signed_up = await api.post("/v1/track", {"userId": accents, "event": "Signed Up"})
    ordered = await api.post(
        "/v1/track", {"userId": accents, "event": "Order Completed", "properties": {"order_id": long_order}}
    )

    assert (signed_up.status_code, ordered.status_code) == (200, 200), (signed_up.text, ordered.text)
    welcome, purchase = workflow_id("welcome_series", accents, ""), workflow_id("post_purchase", accents, long_order)
    assert signed_up.json()["triggered"] == [welcome] and ordered.json()["triggered"] == [purchase]
    for wid in (welcome, purchase):
        assert len(wid) <= WORKFLOW_ID_LIMIT
        assert await status(api.temporal, wid) is not None
    [run] = await eventually(lambda: rows(api.db, RunRecord, workflow_id=purchase), timeout=10, what="run record")
    assert (run.user_id, run.key) == (accents, long_order)
    assert [r.key for r in rows(api.db, Route, workflow_id=purchase)] == [long_order]


def test_the_upgrade_counts_every_event_stored_before_it_as_routed(database: Database) -> None:
    """Start-up routes only what a crash left behind, not the history from before the upgrade."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = database.engine
    command.downgrade(config, "0005")
    with database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO events (message_id, kind, user_id, name, properties, timestamp, received_at) "
                "VALUES ('m-old', 'track', 'u1', 'Signed Up', '{}', :at, :at)"
            ),
            {"at": datetime(2026, 1, 1, tzinfo=UTC)},
        )

    database.migrate()

    [event] = rows(database, EventRecord)
    assert event.routed_at is not None and event.routed_at == event.received_at
    assert Events(database).unrouted(before=datetime.now(UTC)) == []


async def test_an_event_no_journey_reacts_to_is_stored_routed_with_nothing_to_route(
    api: Api, project: Project
) -> None:
    """Most traffic (page views, say) starts and reaches nothing: it is stored as routed in the
    call's own transaction, and a repeat of it is a duplicate, not a reroute."""
    user, message_id = new_user(), f"m-{uuid.uuid4().hex}"
    journeys = project.journeys.values()
    listened = {j.trigger.event for j in journeys} | {name for j in journeys for name in j.listens_for()}
    assert "Product Viewed" not in listened
    call = {"userId": user, "event": "Product Viewed", "messageId": message_id, "properties": {"sku": "p1"}}

    first = await api.post("/v1/track", call)

    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["duplicate"], body["rerouted"], body["triggered"], body["signalled"]) == (
        False,
        False,
        [],
        [],
    )
    [event] = rows(api.db, EventRecord, message_id=message_id)
    assert event.routed_at is not None and event.name == "Product Viewed"
    again = (await api.post("/v1/track", call)).json()
    assert (again["duplicate"], again["rerouted"]) == (True, False)
    assert len(rows(api.db, EventRecord, message_id=message_id)) == 1


def test_events_an_older_stored_version_waits_for_are_routed(project: Project, database: Database) -> None:
    """Runs in flight keep their version: an event only an older version's runs wait for is not
    taken for one that nothing listens for (and so is routed, not stored as routed)."""
    current = project.journeys["chat_recovery"]
    older = dataclasses.replace(
        current,
        version="older-1",
        steps=(ir.WaitFor(id="legacy_wait", event="Legacy Clicked", timeout=3600, cond=None),),
    )
    assert "Legacy Clicked" not in Ingest(project, database, None, "q")._routable
    store_versions(database, [older])

    assert "Legacy Clicked" in Ingest(project, database, None, "q")._routable


SERIES = """\
journey: series
trigger: {event: Joined}
steps:
  - {id: hello, send: sms, template: hello, category: transactional}
  - {id: pause, wait: 2s}
  - {id: again, send: sms, template: hello, category: transactional}
"""


async def test_the_records_after_a_send_ride_on_it_and_a_send_that_goes_nowhere_falls_back(
    tmp_path: Path, database: Database, temporal_client: Client
) -> None:
    """``records_ride``: the record before the wait rides on the send before it and the end record on
    the last send, so a run of send, wait, send runs no local activity at all, and its records are
    those of a run that wrote them itself: the wait while it waits, then every step, the end and
    its last message. A person without a phone gets no message: the run records as before."""
    (tmp_path / "journeys").mkdir()
    (tmp_path / "journeys" / "series.yaml").write_text(SERIES)
    (tmp_path / "templates" / "sms").mkdir(parents=True)
    (tmp_path / "templates" / "sms" / "hello.txt").write_text("Hello")
    project = load_project(tmp_path / "journeys", tmp_path / "templates")
    texted, unreachable = new_user(), new_user()
    async with serving(project, database, temporal_client) as api:
        identified = await api.post("/v1/identify", {"userId": texted, "traits": {"phone": "+15555550100"}})
        assert identified.status_code == 200, identified.text
        for user in (texted, unreachable):
            joined = await api.post("/v1/track", {"userId": user, "event": "Joined"})
            assert joined.status_code == 200, joined.text
        await eventually(
            lambda: {str(r.step) for r in rows(database, RunRecord, user_id=texted)} == {"pause"},
            timeout=30,
            what="the run waiting at pause",
        )

        def ended() -> bool:
            return all(r.status == "ended" for u in (texted, unreachable) for r in rows(database, RunRecord, user_id=u))

        await eventually(ended, timeout=60, what="both runs ended")
        handles = [temporal_client.get_workflow_handle(workflow_id("series", user, "")) for user in (texted, unreachable)]
        # A local activity writes its record before the workflow task that ran it completes and
        # puts its marker in the history: the history is read once each run has completed.
        await asyncio.wait_for(asyncio.gather(*(handle.result() for handle in handles)), timeout=30)
        histories = {user: await handle.fetch_history() for user, handle in zip((texted, unreachable), handles, strict=True)}

    assert local_activities(histories[texted]) == []
    assert local_activities(histories[unreachable]) == ["nurture.record_steps", "nurture.record_end"]
    sends = [
        json.loads(e.activity_task_scheduled_event_attributes.input.payloads[0].data)
        for e in histories[texted].events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert [s["after"]["kind"] for s in sends] == ["steps", "end"]
    for user in (texted, unreachable):
        (run,) = rows(database, RunRecord, user_id=user)
        assert (run.status, run.end_reason, run.step) == ("ended", "completed", None)
        reached = {r.step_id: r.reached_at for r in rows(database, StepReach, run_id=run.run_id)}
        assert set(reached) == {"hello", "pause", "again"}
        assert reached["hello"] <= reached["pause"] < reached["again"] - timedelta(seconds=1)
        (route,) = rows(database, Route, user_id=user)
        assert route.active is False
        assert (run.last_message_at is not None) == (user == texted)


OPENS = """\
journey: opens
trigger: {event: Joined}
steps:
  - {id: settle, wait: 2s}
  - {id: hello, send: sms, template: hello, category: transactional}
"""


async def test_a_run_that_waits_first_is_opened_by_its_router_and_a_lost_opening_rides_on_its_send(
    tmp_path: Path, database: Database, temporal_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``opened``: the router writes the start and first wait of a run that waits first with its
    route, before the call is answered, and the run only starts its timer: no local activity in
    its whole history (its end rides on its send). When the router's write fails after the start
    (the call then fails and is retried), nothing is lost: the retry finds the run in flight, and
    the run's send writes its start and first steps where absent."""
    (tmp_path / "journeys").mkdir()
    (tmp_path / "journeys" / "opens.yaml").write_text(OPENS)
    (tmp_path / "templates" / "sms").mkdir(parents=True)
    (tmp_path / "templates" / "sms" / "hello.txt").write_text("Hello")
    project = load_project(tmp_path / "journeys", tmp_path / "templates")
    queue = f"test-opens-{uuid.uuid4().hex[:8]}"
    ingest = Ingest(project, database, temporal_client, queue)
    opened, lost = new_user(), new_user()
    for user in (opened, lost):
        DbProfiles(database).merge(user, {"phone": "+15555550100"})
    writes: list[str] = []
    real = ingest_module.record_opening

    def failing_once(session: Any, start: dict[str, Any], steps: dict[str, Any]) -> None:
        writes.append(start["user_id"])
        if start["user_id"] == lost and writes.count(lost) == 1:
            raise OperationalError("INSERT INTO runs", {}, Exception("connection lost"))
        real(session, start, steps)

    monkeypatch.setattr(ingest_module, "record_opening", failing_once)
    async with build_worker(temporal_client, project, database, queue):
        routed = await ingest.track(call_identifiers(opened, None), Event("Joined", datetime.now(UTC), {}, f"m-{opened}"))
        assert routed.triggered == [workflow_id("opens", opened, "")]
        (run,) = rows(database, RunRecord, user_id=opened)  # written before the call is answered
        assert (run.status, run.step) == ("active", "settle")
        described = await temporal_client.get_workflow_handle(workflow_id("opens", opened, "")).describe()
        assert run.run_id == described.run_id  # Temporal's own run id (what a deletion of the person names)
        assert [r.step_id for r in rows(database, StepReach, run_id=run.run_id)] == ["settle"]

        joined = Event("Joined", datetime.now(UTC), {}, f"m-{lost}")
        with pytest.raises(NotRouted):
            await ingest.track(call_identifiers(lost, None), joined)
        assert rows(database, RunRecord, user_id=lost) == []  # the opening and the route rolled back
        age(database, joined.message_id)  # a client's retry a minute later
        retried = await ingest.track(call_identifiers(lost, None), joined)
        assert retried.rerouted and retried.triggered == [workflow_id("opens", lost, "")]

        def ended() -> bool:
            return [r.status for u in (opened, lost) for r in rows(database, RunRecord, user_id=u)] == ["ended"] * 2

        await eventually(ended, timeout=60, what="both runs ended")
        histories = {
            user: await temporal_client.get_workflow_handle(workflow_id("opens", user, "")).fetch_history()
            for user in (opened, lost)
        }

    assert writes == [opened, lost]  # the retry started nothing, so it wrote no opening
    assert local_activities(histories[opened]) == []
    assert local_activities(histories[lost]) == []
    started = json.loads(histories[opened].events[0].workflow_execution_started_event_attributes.input.payloads[0].data)
    assert started["opened"]["waiting"] == "settle"
    (first,) = rows(database, RunRecord, user_id=opened)
    assert utc(first.entered_at) == parse_instant(started["opened"]["entered_at"])
    for user in (opened, lost):
        (run,) = rows(database, RunRecord, user_id=user)
        assert (run.status, run.end_reason, run.step) == ("ended", "completed", None)
        reached = {r.step_id: utc(r.reached_at) for r in rows(database, StepReach, run_id=run.run_id)}
        assert set(reached) == {"settle", "hello"}
        assert reached["settle"] == utc(run.entered_at)
        assert reached["hello"] - reached["settle"] >= timedelta(seconds=2)
        routes = [route.active for route in rows(database, Route, user_id=user)]
        # (A retry that came after the run ended would find it ended, and make no route.)
        assert routes == [False] or (user == lost and routes == [])


async def test_a_signal_with_start_never_carries_an_opening(temporal_client: Client, project: Project) -> None:
    """A start that goes through signal-with-start may start nothing (a run in flight takes the
    trigger), so the router writes no opening for it, and a run it does start records its own."""
    wid = f"nurture/cart_abandonment/{new_user()}/c-1"
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    journey = ir.journey_to_dict(project.journeys["cart_abandonment"])
    event = Event("Cart Updated", datetime.now(UTC), {"cart_id": "c-1"}, uuid.uuid4().hex).to_dict()
    params = {**run_input(journey, "u", "c-1", event), OPENED: {"entered_at": "2026-01-01T00:00:00Z", "waiting": "w"}}

    assert await start_run(temporal_client, params, wid=wid, task_queue=queue, once=False, running=True) is None

    history = await temporal_client.get_workflow_handle(wid).fetch_history()
    started = json.loads(history.events[0].workflow_execution_started_event_attributes.input.payloads[0].data)
    assert OPENED not in started and started["records_ride"] is True
    await temporal_client.get_workflow_handle(wid).terminate("test over")
