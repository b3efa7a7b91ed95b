"""More than one machine: two event API processes and two workers against one Temporal dev server
and one PostgreSQL database, all on loopback; ``kill -9`` one API and one worker mid-load.

Each API is served the way operators serve it (``uvicorn nurture.service.api:app_from_env
--factory``) and each worker is ``python worker.py``. The client spreads its calls over both APIs,
as a load balancer would, and retries a call that met a dropped connection or a 5xx on the next
API with the same ``messageId``, as tracking libraries do. Mid-stream, one API is killed (and,
as a supervisor would, started again: its start-up sweep routes what the dead one left while the
other API is still serving) and one worker is killed for good: its runs, its workflow caches and a
send it may have had in flight are taken over by the other worker.

Every call must end accepted; every event is then stored once and routed, every user has exactly
one run, and every message was sent exactly once: the ``messages`` table (the outbox) holds two
per user, one per step, and nothing else.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT
from sqlalchemy import text
from support import (
    DRILL_TEMPLATES,
    clean_env,
    eventually,
    fresh_postgres,
    rows,
    served_settings,
    uvicorn_thread,
    write_project,
)
from temporalio.client import Client

from nurture.engine.identity import call_identifiers
from nurture.engine.interpreter import workflow_id
from nurture.engine.model import Event
from nurture.language.compiler import Project, load_project
from nurture.service.api import LeftOver, create_app
from nurture.service.devserver import free_port, stop, wait_for_port
from nurture.service.ingest import ROUTABLE_FRESH, ROUTING_GRACE, Ingest
from nurture.storage.db import Database, database_url
from nurture.storage.identities import DbIdentities
from nurture.storage.models import EventRecord, Route, utcnow
from nurture.storage.stores import Routes, store_versions

USERS = 120
KEY = "scale-out-write-key"
STEPS = ("first_email", "middle_sms")

JOURNEY = """\
journey: scale_drill
trigger:
  event: Drill Started
steps:
  - {id: first_email, send: email, template: drill, category: transactional}
  - {id: hold, wait_for: Drill Resumed, timeout: 10m}
  - {id: middle_sms, send: sms, template: drill, category: transactional}
"""


def write_drill(root: Path) -> tuple[Path, Path]:
    return write_project(root, {"scale_drill": JOURNEY}, DRILL_TEMPLATES)


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    """A fresh PostgreSQL database, not migrated; its URL."""
    with fresh_postgres() as url:
        yield url


@pytest.fixture
def postgres_url(empty_postgres: str) -> str:
    """A fresh, migrated PostgreSQL database."""
    db = Database(database_url({"DATABASE_URL": empty_postgres}))
    db.migrate()
    db.dispose()
    return empty_postgres


def test_processes_starting_together_on_an_empty_database_all_migrate_it(empty_postgres: str) -> None:
    """API processes and workers of a new deployment start at once, each migrating the database
    first: they take turns, and the ones after the first find it done."""
    code = "from nurture.storage.db import Database, database_url; Database(database_url()).migrate()"
    env = {**clean_env(), "DATABASE_URL": empty_postgres}
    starting = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(3)
    ]
    outcomes = [(process.wait(timeout=120), process.stdout.read().decode()[-600:]) for process in starting if process.stdout]
    assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
    db = Database(database_url({"DATABASE_URL": empty_postgres}))
    try:
        assert scalar(db, "SELECT count(*) FROM alembic_version") == 1
        assert scalar(db, "SELECT count(*) FROM events") == 0
    finally:
        db.dispose()


@dataclass
class Processes:
    """The service processes of the test, started and stopped by it."""

    env: dict[str, str]
    logs: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def api(self, name: str, port: int) -> subprocess.Popen[bytes]:
        """The event API as operators serve it, once it listens."""
        process = self._spawn(
            name,
            [
                sys.executable, "-m", "uvicorn", "nurture.service.api:app_from_env", "--factory",
                "--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "75",
            ],
        )  # fmt: skip
        wait_for_port(port, process)
        return process

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        """``python worker.py``, once it polls its queue."""
        process = self._spawn(name, [sys.executable, str(ROOT / "worker.py")])
        log = self.logs / f"{name}.log"
        deadline = time.monotonic() + 60
        while "worker ready" not in log.read_text(errors="replace"):
            assert process.poll() is None, f"{name} exited: {log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, f"{name} not ready after 60 s"
            time.sleep(0.1)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            stop(process)


def kill_9(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL


class Balancer:
    """Calls spread over the APIs in turn; a call that meets a dropped connection or a 5xx is sent
    again, with the same body (so the same ``messageId``), to the next API, with a growing pause."""

    def __init__(self, http: httpx.AsyncClient, urls: list[str]) -> None:
        self.http = http
        self.urls = urls
        self.turn = itertools.count()
        self.retried = 0
        self.refused: list[str] = []

    async def call(self, path: str, body: dict[str, Any], deadline: float = 60.0) -> dict[str, Any]:
        give_up = time.monotonic() + deadline
        for attempt in itertools.count():
            url = self.urls[next(self.turn) % len(self.urls)]
            try:
                response = await self.http.post(f"{url}{path}", json=body)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    answer: dict[str, Any] = response.json()
                    return answer
                if response.status_code < 500:  # a refusal is a bug: no retry makes it right
                    self.refused.append(f"{path} {response.status_code} {response.text[:300]}")
                    return {}
                failure = f"{response.status_code} {response.text[:200]}"
            self.retried += 1
            if time.monotonic() > give_up:
                raise AssertionError(f"{path} {body.get('messageId')} still failing after {deadline} s: {failure}")
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.2)


def scalar(db: Database, sql: str, **params: Any) -> int:
    with db.engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one() or 0)


def sent(db: Database, step: str) -> int:
    return scalar(
        db,
        "SELECT count(*) FROM messages WHERE step_id = :step AND journey = 'scale_drill' AND status = 'sent'",
        step=step,
    )


@pytest.fixture
async def balanced(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(
        headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=httpx.Timeout(30.0)
    ) as http:
        yield http


async def test_two_apis_and_two_workers_lose_and_repeat_nothing_when_one_of_each_is_killed(
    dev_server: str, postgres_url: str, tmp_path: Path, balanced: httpx.AsyncClient
) -> None:
    journeys, templates = write_drill(tmp_path)
    queue = f"scale-{uuid.uuid4().hex[:8]}"
    env = clean_env()
    env.update(
        TEMPORAL_ADDRESS=dev_server,
        NURTURE_TASK_QUEUE=queue,
        NURTURE_HOME=str(tmp_path / "home"),
        DATABASE_URL=postgres_url,
        NURTURE_JOURNEYS=str(journeys),
        NURTURE_TEMPLATES=str(templates),
        NURTURE_WRITE_KEYS=KEY,
        PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"),
    )
    db = Database(database_url({"DATABASE_URL": postgres_url}))
    processes = Processes(env, tmp_path)
    ports = [free_port(), free_port()]
    users = [f"{queue}-user-{index:03d}" for index in range(USERS)]
    ids: dict[str, str] = {}  # every messageId the client sent, and its kind

    def body(kind: str, user: str, **fields: Any) -> dict[str, Any]:
        message_id = f"{kind}-{user}-{uuid.uuid4().hex[:8]}"
        ids[message_id] = kind
        return {"userId": user, "messageId": message_id, **fields}

    try:
        apis = [processes.api("api-0", ports[0]), processes.api("api-1", ports[1])]
        workers = [processes.worker("worker-0"), processes.worker("worker-1")]
        lb = Balancer(balanced, [f"http://127.0.0.1:{port}" for port in ports])
        gate = asyncio.Semaphore(16)

        async def call(path: str, payload: dict[str, Any]) -> dict[str, Any]:
            async with gate:
                return await lb.call(path, payload)

        await asyncio.gather(
            *(
                call(
                    "/v1/identify",
                    body(
                        "identify",
                        user,
                        traits={"email": f"d{i}@example.com", "phone": f"+1555{i:07d}", "first_name": f"U{i}"},
                    ),
                )
                for i, user in enumerate(users)
            )
        )

        async def kill_worker_mid_sends() -> None:
            await wait_until(lambda: sent(db, "first_email") >= USERS // 4, 60, "a quarter of the first emails")
            kill_9(workers[0])

        async def kill_api_mid_calls(issued: asyncio.Event) -> None:
            await issued.wait()
            kill_9(apis[0])
            await asyncio.sleep(1.0)
            apis[0] = await asyncio.to_thread(processes.api, "api-0-again", ports[0])

        third = asyncio.Event()
        started = 0

        async def start(user: str) -> dict[str, Any]:
            nonlocal started
            started += 1
            if started == USERS // 3:
                third.set()
            await call("/v1/track", body("track", user, event="Page Viewed", properties={"path": "/drill"}))
            return await call("/v1/track", body("track", user, event="Drill Started"))

        killers = [asyncio.create_task(kill_worker_mid_sends()), asyncio.create_task(kill_api_mid_calls(third))]
        answers = await asyncio.gather(*(start(user) for user in users))
        await asyncio.gather(*killers)
        assert workers[0].poll() == -signal.SIGKILL and apis[0].poll() is None
        assert lb.refused == []
        assert all(len(answer["triggered"]) == 1 or answer.get("duplicate") for answer in answers), answers

        # A send in flight on the dead worker is retried when its 30 s start-to-close timeout ends.
        await wait_until(lambda: sent(db, "first_email") == USERS, 75, "every first email")
        await asyncio.gather(*(call("/v1/track", body("track", user, event="Drill Resumed")) for user in users))
        await wait_until(
            lambda: scalar(db, "SELECT count(*) FROM runs WHERE status = 'ended'") == USERS,
            45,
            "every run to end",
        )
        await wait_until(
            lambda: scalar(db, "SELECT count(*) FROM events WHERE routed_at IS NULL") == 0,
            15,
            "every event routed",
        )
        assert lb.refused == []
        assert lb.retried > 0, "no call met the killed API: the kill came too late to test anything"

        with db.engine.connect() as connection:
            stored = connection.execute(text("SELECT message_id, kind FROM events")).all()
            runs = connection.execute(
                text("SELECT user_id, count(*), min(end_reason), max(end_reason) FROM runs GROUP BY user_id")
            ).all()
            per_user = connection.execute(
                text(
                    "SELECT user_id, count(*), count(DISTINCT step_id), "
                    "sum(CASE WHEN status = 'sent' THEN 1 ELSE 0 END) FROM messages GROUP BY user_id"
                )
            ).all()
            steps = connection.execute(
                text("SELECT step_id, channel, provider, count(*) FROM messages GROUP BY step_id, channel, provider")
            ).all()
        assert len(stored) == len(ids) and dict(stored) == ids  # each event once, none lost
        assert sorted(runs) == [(user, 1, "completed", "completed") for user in users]
        assert sorted(per_user) == [(user, 2, 2, 2) for user in users]
        assert sorted(steps) == [("first_email", "email", "outbox", USERS), ("middle_sms", "sms", "outbox", USERS)]
        # A run's end is recorded just before its workflow completes, and visibility follows later.
        client = await Client.connect(dev_server)

        async def counts() -> tuple[int, int]:
            completed = await client.count_workflows(f'TaskQueue = "{queue}" AND ExecutionStatus = "Completed"')
            everything = await client.count_workflows(f'TaskQueue = "{queue}"')
            return completed.count, everything.count

        deadline = time.monotonic() + 20
        while (found := await counts()) != (USERS, USERS) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert found == (USERS, USERS)
    finally:
        processes.stop_all()
        db.dispose()


async def test_an_event_a_dead_api_left_unrouted_is_routed_by_one_still_running(
    dev_server: str, database: Database, project: Project
) -> None:
    """An API process killed between storing an event and routing it, whose client never retries
    (a webhook's event, say), and which is never started again: another API process, running since
    before the event came, routes it once it is ``age`` seconds old."""
    settings = served_settings(dev_server, database.url, "left-over", write_keys=(KEY,))
    temporal = await Client.connect(dev_server)
    app = create_app(settings, project=project, db=database, client=temporal, left_over=LeftOver(every=0.2, age=1.0))
    user = f"left-{uuid.uuid4().hex[:10]}"
    with uvicorn_thread(app) as url:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30.0) as http:
            identified = await http.post("/v1/identify", json={"userId": user, "traits": {"email": "l@example.com"}})
        person = identified.json()["person"]
        left = EventRecord(
            message_id=f"left-{uuid.uuid4().hex}",
            kind="track",
            user_id=person,
            name="Signed Up",
            properties={},
            timestamp=utcnow(),
            received_at=utcnow(),  # after this process started: its start-up sweep does not see it
            routed_at=None,
        )
        with database.session() as session:
            session.add(left)

        def routed() -> bool:
            return rows(database, EventRecord, message_id=left.message_id)[0].routed_at is not None

        await eventually(routed, timeout=ROUTING_GRACE + 15, what="the left-over event routed")
    wid = workflow_id("welcome_series", person, "")
    assert [route.workflow_id for route in rows(database, Route, user_id=person)] == [wid]
    started = await temporal.get_workflow_handle(wid).describe()
    assert started.id == wid


NEW_VERSION = JOURNEY.replace("wait_for: Drill Resumed", "wait_for: Drill Escalated")

async def test_an_older_api_process_routes_an_event_only_a_newer_version_listens_for(
    dev_server: str, tmp_path: Path, project: Project
) -> None:
    """A rolling upgrade: an API process still on the old journeys takes an event that only the
    version a newer process stored waits for; the run of the new version gets it."""
    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    client = await Client.connect(dev_server)
    older = Ingest(project, db, client, f"older-{uuid.uuid4().hex[:8]}")
    journeys, templates = write_drill(tmp_path)
    (journeys / "scale_drill.yaml").write_text(NEW_VERSION, encoding="utf-8")
    store_versions(db, list(load_project(journeys, templates).journeys.values()))  # the newer process
    person = DbIdentities(db).apply(call_identifiers("upgrading-user", None), at=utcnow())
    assert person is not None
    # The new version's run waits for the event (a workflow no worker runs: its history shows the signal).
    wid = f"nurture/scale_drill/{person.person}/{uuid.uuid4().hex[:6]}"
    await client.start_workflow("JourneyRun", {}, id=wid, task_queue=f"nobody-{uuid.uuid4().hex[:8]}")
    Routes(db).activate(wid, user_id=person.person, journey="scale_drill", key="", listens=["Drill Escalated"])
    await asyncio.sleep(ROUTABLE_FRESH)

    routed = await older.track("upgrading-user", Event("Drill Escalated", utcnow(), {}, uuid.uuid4().hex))

    assert routed.signalled == [wid]
    history = await client.get_workflow_handle(wid).fetch_history()
    signals = [e.workflow_execution_signaled_event_attributes.signal_name for e in history.events if e.HasField(
        "workflow_execution_signaled_event_attributes"
    )]
    assert signals == ["event"]
    db.dispose()
