"""Broadcasts in the service, with a real Temporal dev server, a worker, and SQLite or PostgreSQL:
starting twice sends once, a driver killed between pages is resumed from its cursor, two drivers
cannot both drive an occurrence, cancelling stops starts and ends runs in flight, starts are
paced, each person's quiet hours hold, and the API starts, cancels and reports them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner, Result
from support import eventually, messages, new_user, rows
from temporalio.client import Client
from test_api import READ_KEY, serving

from nurture.cli.main import main
from nurture.language.compiler import Project, load_project
from nurture.service.broadcasts import LEASE, PAGE, Broadcaster, Busy
from nurture.service.worker import build_worker
from nurture.storage.broadcasts import Progress
from nurture.storage.db import Database
from nurture.storage.models import AudienceMember, BroadcastOccurrence, MessageRecord, RunRecord
from nurture.storage.stores import DbProfiles

ROOT = Path(__file__).resolve().parents[1]
BROADCASTS = {
    "launch": "name: Course launch\naudience: fans\nsteps:\n  - send: email\n    template: course_launch\n    topic: courses\n",
    "series": (
        "audience: fans\nsteps:\n  - send: email\n    template: course_launch\n  - wait: 1d\n"
        "  - send: email\n    template: course_last_chance\n"
    ),
    "paced": "audience: fans\nrate: 10/s\nsteps:\n  - send: email\n    template: course_launch\n",
    "slow": "audience: fans\nrate: 4/s\nsteps:\n  - send: email\n    template: course_launch\n",
    "minutely": "audience: fans\nschedule: {cron: \"* * * * *\"}\nsteps:\n  - send: email\n    template: course_launch\n",
    "offer": (
        "audience: fans\ngoal: {event: Order Completed, within: 7d}\nsteps:\n  - send: email\n"
        "    template: course_launch\n  - wait: 1d\n  - send: email\n    template: course_last_chance\n"
    ),
    "later": (
        'audience: fans\nschedule: {at: "2030-01-07 09:00", timezone: person}\n'
        "steps:\n  - send: email\n    template: course_launch\n"
    ),
}


def zone_at(hour: int) -> str:
    """A fixed-offset zone where the local hour is now about ``hour``."""
    offset = (hour - datetime.now(UTC).hour + 12) % 24 - 12
    return f"Etc/GMT{-offset:+d}"


@pytest.fixture(scope="module")
def broadcast_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    folder = tmp_path_factory.mktemp("broadcasts")
    for name, text in BROADCASTS.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    audiences = tmp_path_factory.mktemp("audiences")
    # Members are written straight into audience_members by the tests; the file only has to exist.
    (audiences / "fans.yaml").write_text("name: Fans\n", encoding="utf-8")
    return load_project(
        ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml", audiences_dir=audiences, broadcasts_dir=folder
    )


@pytest.fixture(scope="module")
async def temporal_client(dev_server: str) -> Client:
    return await Client.connect(dev_server)


@dataclass
class Stack:
    project: Project
    db: Database
    temporal: Client
    queue: str

    def broadcaster(self, *, page: int = PAGE, lease: timedelta = LEASE) -> Broadcaster:
        return Broadcaster(self.project, self.db, self.temporal, self.queue, page=page, lease=lease)


@pytest.fixture
async def stack(broadcast_project: Project, database: Database, temporal_client: Client) -> AsyncIterator[Stack]:
    queue = f"test-broadcast-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal_client, broadcast_project, database, queue):
        yield Stack(broadcast_project, database, temporal_client, queue)


def audience(db: Database, count: int, zone: str | None = None, name: str = "fans") -> list[str]:
    """``count`` new people with an email address (in ``zone``: daytime by default), all in ``name``."""
    people = sorted(new_user() for _ in range(count))
    profiles = DbProfiles(db)
    for person in people:
        profiles.merge(person, {"email": f"{person}@example.com", "timezone": zone or zone_at(12)})
    with db.session() as session:
        for person in people:
            session.add(AudienceMember(audience=name, person=person, entered_at=datetime.now(UTC)))
    return people


def sent(db: Database, journey: str) -> list[MessageRecord]:
    return [m for m in messages(db, journey=journey) if m.status == "sent"]


def occurrence(db: Database, broadcast: str) -> BroadcastOccurrence:
    [row] = rows(db, BroadcastOccurrence, broadcast=broadcast)
    assert isinstance(row, BroadcastOccurrence)
    return row


def runs_of(db: Database, journey: str, count: int, step: str | None = None) -> Callable[[], list[RunRecord]]:
    """A check for ``eventually``: the journey's runs once ``count`` of them (waiting at ``step``) are recorded."""

    def check() -> list[RunRecord]:
        found: list[RunRecord] = rows(db, RunRecord, journey=journey)
        there = [r for r in found if step is None or r.step == step]
        return found if len(there) >= count else []

    return check


async def test_starting_twice_sends_once(stack: Stack) -> None:
    people = audience(stack.db, 23)
    broadcaster = stack.broadcaster(page=5)
    first = await broadcaster.start("launch")
    assert (first.occurrence, first.status, first.started, first.existing) == ("once", "done", 23, 0)
    again = await broadcaster.start("launch")
    assert (again.status, again.started) == ("done", 0), "a done occurrence starts nothing"
    found = await eventually(lambda: len(sent(stack.db, "broadcast:launch")) >= 23 and sent(stack.db, "broadcast:launch"), timeout=30, what="23 sends")
    await asyncio.sleep(1)
    found = sent(stack.db, "broadcast:launch")
    assert Counter(m.user_id for m in found) == Counter(people), "each person one message"
    runs = rows(stack.db, RunRecord, journey="broadcast:launch")
    assert Counter(r.user_id for r in runs) == Counter(people), "each person one run"
    assert {(r.key, r.status, r.end_reason) for r in runs} == {("once", "ended", "completed")}
    row = occurrence(stack.db, "launch")
    assert (row.status, row.selected, row.started, row.cursor, row.lease_owner) == ("done", 23, 23, people[-1], None)
    status = broadcaster.status("launch")
    assert (status.selected, status.started, status.runs, status.sent, status.ended) == (23, 23, 23, 23, {"completed": 23})


class Crash(Exception):
    """The driver dies between two pages."""


async def test_a_driver_killed_between_pages_is_resumed_from_its_cursor_and_holds_its_lease_until_then(
    stack: Stack,
) -> None:
    people = audience(stack.db, 12)
    pages = 0

    def die_after_first_page(row: BroadcastOccurrence) -> None:
        nonlocal pages
        pages += 1
        raise Crash

    broadcaster = stack.broadcaster(page=5, lease=timedelta(seconds=2))
    with pytest.raises(Crash):
        await broadcaster.start("launch", on_page=die_after_first_page)
    row = occurrence(stack.db, "launch")
    assert (row.status, row.started, row.cursor) == ("running", 5, people[4])
    assert row.lease_owner is not None, "a driver that dies keeps its lease until it runs out"
    with pytest.raises(Busy):
        await stack.broadcaster(page=5).start("launch")
    await asyncio.sleep(2.2)
    resumed = await stack.broadcaster(page=5).start("launch")
    assert (resumed.status, resumed.started, resumed.existing) == ("done", 7, 0), "on from the cursor"
    await eventually(lambda: len(sent(stack.db, "broadcast:launch")) >= 12, timeout=30, what="12 sends")
    await asyncio.sleep(1)
    assert Counter(m.user_id for m in sent(stack.db, "broadcast:launch")) == Counter(people)
    assert occurrence(stack.db, "launch").started == 12


async def test_a_restart_within_a_page_starts_no_second_run(stack: Stack) -> None:
    people = audience(stack.db, 6)
    broadcaster = stack.broadcaster(page=10)
    await broadcaster.start("launch")
    # As if the driver had died before writing its cursor: the page is started again.
    with stack.db.session() as session:
        row = session.get(BroadcastOccurrence, ("launch", "once"))
        assert row is not None
        row.status, row.cursor = "running", None
        session.add(row)
    again = await broadcaster.start("launch")
    assert (again.status, again.started, again.existing) == ("done", 0, 6)
    await eventually(lambda: len(sent(stack.db, "broadcast:launch")) >= 6, timeout=30, what="6 sends")
    await asyncio.sleep(1)
    assert Counter(m.user_id for m in sent(stack.db, "broadcast:launch")) == Counter(people)
    assert len(rows(stack.db, RunRecord, journey="broadcast:launch")) == 6


async def test_two_drivers_at_once_start_each_person_once(stack: Stack) -> None:
    people = audience(stack.db, 20)
    first, second = stack.broadcaster(page=4), stack.broadcaster(page=4)
    outcomes = await asyncio.gather(first.start("paced"), second.start("paced"), return_exceptions=True)
    busy = [o for o in outcomes if isinstance(o, Busy)]
    done = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(busy) == 1 and len(done) == 1, outcomes
    assert done[0].started == 20
    await eventually(lambda: len(sent(stack.db, "broadcast:paced")) >= 20, timeout=30, what="20 sends")
    await asyncio.sleep(1)
    assert Counter(m.user_id for m in sent(stack.db, "broadcast:paced")) == Counter(people)


async def test_starts_are_paced_by_the_rate(stack: Stack) -> None:
    audience(stack.db, 16)
    began = time.monotonic()
    done = await stack.broadcaster(page=5).start("paced")  # 10/s: one start every 0.1 s
    took = time.monotonic() - began
    assert done.started == 16
    assert took >= 1.5, f"16 starts at 10/s took {took:.2f}s"
    runs = await eventually(runs_of(stack.db, "broadcast:paced", 16), timeout=30, what="16 runs")
    entered = sorted(r.entered_at for r in runs)
    assert entered[-1] - entered[0] >= timedelta(seconds=1.2), "the runs began spread out"


async def test_cancelling_stops_starts_and_ends_runs_in_flight(stack: Stack) -> None:
    audience(stack.db, 8)
    done = await stack.broadcaster(page=4).start("series")
    assert done.started == 8
    await eventually(runs_of(stack.db, "broadcast:series", 8, "s2"), timeout=30, what="8 runs waiting a day")
    row, stopped = await stack.broadcaster().cancel("series")
    assert (row.status, stopped) == ("cancelled", 8)

    def ended() -> list[RunRecord]:
        found: list[RunRecord] = rows(stack.db, RunRecord, journey="broadcast:series")
        return found if all(r.status == "ended" for r in found) else []

    runs = await eventually(ended, timeout=30, what="8 runs ended")
    assert {r.end_reason for r in runs} == {"broadcast_cancelled"}
    assert len(sent(stack.db, "broadcast:series")) == 8, "the first email went; the second never will"
    later = await stack.broadcaster().start("series")
    assert (later.status, later.started) == ("cancelled", 0), "a cancelled occurrence is not started again"


async def test_cancelling_mid_stream_stops_the_driver(stack: Stack) -> None:
    audience(stack.db, 40)
    broadcaster = stack.broadcaster(page=4, lease=timedelta(seconds=1.5))
    driving = asyncio.create_task(broadcaster.start("slow"))  # 4/s: 10 s for all
    await eventually(
        lambda: [r for r in rows(stack.db, BroadcastOccurrence, broadcast="slow") if r.started >= 4],
        timeout=10,
        what="a first page",
    )
    _, _ = await stack.broadcaster(lease=timedelta(seconds=1.5)).cancel("slow")
    outcome = await asyncio.wait_for(driving, 5)
    assert outcome.status == "cancelled" and outcome.started < 40
    row = occurrence(stack.db, "slow")
    assert row.status == "cancelled" and row.lease_owner is None
    await asyncio.sleep(1.5)
    recorded = len(rows(stack.db, RunRecord, journey="broadcast:slow"))
    assert recorded <= row.started + 1 and recorded < 40, "no run starts after the cancel"


async def test_each_persons_quiet_hours_hold(stack: Stack) -> None:
    [awake] = audience(stack.db, 1, zone=zone_at(12))
    [asleep] = audience(stack.db, 1, zone=zone_at(3))
    assert 8 <= datetime.now(ZoneInfo(zone_at(12))).hour < 21
    assert not 8 <= datetime.now(ZoneInfo(zone_at(3))).hour < 21
    await stack.broadcaster().start("launch")
    [message] = await eventually(lambda: sent(stack.db, "broadcast:launch"), timeout=30, what="the daytime send")
    assert message.user_id == awake
    def held() -> Progress | None:
        found = stack.broadcaster().status("launch")
        return found if found.deferred else None

    status = await eventually(held, timeout=30, what="a held send")
    assert status is not None and status.deferred == {"quiet_hours": 1} and status.sent == 1
    [waiting] = [r for r in rows(stack.db, RunRecord, journey="broadcast:launch") if r.user_id == asleep]
    assert waiting.status == "active" and not messages(stack.db, user_id=asleep)


async def test_a_person_time_occurrence_waits_for_the_moment_in_each_zone(stack: Stack) -> None:
    audience(stack.db, 3)
    done = await stack.broadcaster().start("later")
    assert (done.occurrence, done.started) == ("2030-01-07T09:00", 3)
    runs = await eventually(runs_of(stack.db, "broadcast:later", 3, "scheduled"), timeout=30, what="3 runs waiting for 2030")
    assert {r.key for r in runs} == {"2030-01-07T09:00"} and not messages(stack.db, journey="broadcast:later")


async def test_the_api_starts_reports_and_cancels(broadcast_project: Project, database: Database, temporal_client: Client) -> None:
    people = audience(database, 5)
    async with serving(broadcast_project, database, temporal_client) as api:
        anonymous = await api.http.post("/v1/broadcasts/launch/start", auth=None)  # type: ignore[arg-type]
        assert anonymous.status_code == 401, "no key and no body: a 401, not a 5xx"
        refused = await api.http.post("/v1/broadcasts/launch/start", auth=(READ_KEY, ""))
        assert refused.status_code == 403
        unknown = await api.http.post("/v1/broadcasts/lunch/start")
        assert unknown.status_code == 404 and "did you mean 'launch'" in unknown.json()["message"]
        none_yet = await api.get("/v1/broadcasts/launch")
        assert none_yet.status_code == 404
        started = await api.http.post("/v1/broadcasts/launch/start")
        assert started.status_code == 202 and started.json()["selected"] == 5

        async def finished() -> dict[str, object] | None:
            body: dict[str, object] = (await api.get("/v1/broadcasts/launch")).json()
            over = body["status"] == "done" and body["sent"] == 5 and body["ended"] == {"completed": 5}
            return body if over else None

        deadline = time.monotonic() + 30
        while (body := await finished()) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert body is not None and (body["started"], body["runs"]) == (5, 5)
        again = await api.http.post("/v1/broadcasts/launch/start")
        assert again.status_code == 202 and again.json()["started"] == 5
        cancelled = await api.http.post("/v1/broadcasts/launch/cancel")
        assert cancelled.status_code == 200
        assert (cancelled.json()["status"], cancelled.json()["stopped"]) == ("cancelled", 0), "every run had ended"
    assert Counter(m.user_id for m in sent(database, "broadcast:launch")) == Counter(people)


async def test_the_scheduler_starts_each_due_occurrence_once(stack: Stack) -> None:
    people = audience(stack.db, 4)
    broadcaster = stack.broadcaster()
    now = datetime.now(UTC)
    [spawned] = await broadcaster.start_due(now)
    key = now.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%dT%H:%M")
    assert spawned == f"minutely/{key}", "only the cron broadcast is due; the others have no schedule or wait"
    assert await broadcaster.start_due(now) == [], "this process drives it already"
    while broadcaster.drives("minutely", key):
        await asyncio.sleep(0.1)
    assert await broadcaster.start_due(now) == [], "done"
    assert await stack.broadcaster().start_due(now) == [], "done, for another process too"
    await eventually(lambda: len(sent(stack.db, "broadcast:minutely")) >= 4, timeout=30, what="4 sends")
    runs = rows(stack.db, RunRecord, journey="broadcast:minutely")
    assert Counter(r.user_id for r in runs) == Counter(people) and {r.key for r in runs} == {key}


def cli(stack: Stack, dev_server: str, *argv: str) -> Result:
    """``nurture broadcast ...`` on the stack's database, Temporal and queue."""
    folder = Path(stack.project.broadcasts["launch"].source).parent
    env = {"DATABASE_URL": stack.db.url, "TEMPORAL_ADDRESS": dev_server, "NURTURE_TASK_QUEUE": stack.queue}
    audiences = Path(stack.project.audiences["fans"].source).parent
    options = ["--journeys", str(ROOT / "journeys"), "--templates", str(ROOT / "templates")]
    options += ["--broadcasts", str(folder), "--audiences", str(audiences)]
    return CliRunner().invoke(main, ["broadcast", *argv, *options], env=env)


async def test_the_commands_start_show_and_cancel(stack: Stack, dev_server: str) -> None:
    audience(stack.db, 6)
    missing = await asyncio.to_thread(cli, stack, dev_server, "status", "series")
    assert missing.exit_code == 1 and "broadcast 'series' has not been started" in missing.output
    started = await asyncio.to_thread(cli, stack, dev_server, "start", "series")
    assert started.exit_code == 0, started.output
    assert "[##############################] 100%  started 6 of 6" in started.output
    await eventually(runs_of(stack.db, "broadcast:series", 6, "s2"), timeout=30, what="6 runs waiting a day")
    shown = await asyncio.to_thread(cli, stack, dev_server, "status", "series")
    assert "series (once): done" in shown.output and "messages: sent 6, sending 0" in shown.output
    assert "runs: 6 (6 active; ended: none)" in shown.output
    again = await asyncio.to_thread(cli, stack, dev_server, "start", "series")
    assert "occurrence once was already done: nothing was started" in again.output
    cancelled = await asyncio.to_thread(cli, stack, dev_server, "cancel", "series")
    assert "series (once) is cancelled: 6 run(s) in flight stopped" in cancelled.output
    unknown = await asyncio.to_thread(cli, stack, dev_server, "start", "serie")
    assert unknown.exit_code == 1 and "unknown broadcast 'serie' (did you mean 'series'?)" in unknown.output


async def test_a_members_goal_event_reaches_their_broadcast_run(
    broadcast_project: Project, database: Database, temporal_client: Client
) -> None:
    buyer, other = audience(database, 2)
    async with serving(broadcast_project, database, temporal_client) as api:
        assert (await api.http.post("/v1/broadcasts/offer/start")).status_code == 202
        await eventually(runs_of(database, "broadcast:offer", 2, "s2"), timeout=30, what="2 runs waiting a day")
        order = {"userId": buyer, "event": "Order Completed", "properties": {"order_id": "o-1", "total": 49}}
        answer = (await api.post("/v1/track", order)).json()
        assert answer["signalled"] == [f"nurture/broadcast:offer/{buyer}/once"]

        def converted() -> list[RunRecord]:
            found: list[RunRecord] = rows(database, RunRecord, journey="broadcast:offer", user_id=buyer)
            return found if found and found[0].end_reason == "goal" else []

        [run] = await eventually(converted, timeout=30, what="the buyer's run ending at its goal")
        assert run.converted_at is not None
        report = (await api.get("/v1/journeys/broadcast:offer/report")).json()
        assert report["journey"] == "broadcast:offer" and report["totals"]["entered"] == 2
        assert report["totals"]["ended"] == {"goal": 1}
    [still] = rows(database, RunRecord, journey="broadcast:offer", user_id=other)
    assert still.status == "active"
