"""The crash test: ``kill -9`` the worker in the middle of 200 runs; every message goes out once.

200 runs of a short, all-transactional journey are started through the service's router
(:class:`nurture.service.ingest.Ingest`, signal-with-start). A worker process sends every run's first
email and is killed with SIGKILL; a new worker process takes over and, once the runs are
released, sends the rest. The messages table must then hold exactly three sent messages per run.

Why the kill lands while every run is parked at a ``wait_for`` with no send in flight: a send
activity that is running when its worker dies is only retried after its start-to-close timeout
(2 minutes for ``nurture.send``), which would make the test take minutes. Killing between sends
still loses the worker's sticky workflow caches and its pollers, so the second worker must rebuild
every run from history, and the events that release the runs must reach it.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import ROOT
from sqlalchemy import text
from support import DRILL_TEMPLATES, clean_env, write_project
from temporalio.client import Client

from nurture.engine.interpreter import workflow_id
from nurture.engine.model import Event
from nurture.language.compiler import load_project
from nurture.service.ingest import Ingest
from nurture.storage.db import Database

RUNS = 200
STEPS = ("first_email", "middle_sms", "last_email")

JOURNEY = """\
journey: crash_drill
trigger:
  event: Drill Started
steps:
  - {id: first_email, send: email, template: drill, category: transactional}
  - {id: hold, wait_for: Drill Resumed, timeout: 10m}
  - {id: middle_sms, send: sms, template: drill, category: transactional}
  - {id: pause, wait: 2s}
  - {id: last_email, send: email, template: drill_over, category: transactional}
"""
TEMPLATES = {
    **DRILL_TEMPLATES,
    "email/drill_over.mjml": """\
---
subject: "The drill is over, {{ user.first_name }}"
---
<mjml><mj-body><mj-section><mj-column><mj-text>Thank you.</mj-text></mj-column></mj-section></mj-body></mjml>
""",
}

def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py")], env=env, stdout=output, stderr=output
        )


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def scalar(db: Database, sql: str, **params: Any) -> int:
    with db.engine.connect() as connection:
        return int(connection.execute(text(sql), params).scalar_one())


def recorded(db: Database, step: str) -> int:
    """Sends of ``step`` whose outcome the activity recorded (the recorder fills in the journey)."""
    return scalar(
        db, "SELECT count(*) FROM messages WHERE step_id = :step AND journey = 'crash_drill'", step=step
    )


async def test_kill_9_mid_journey_sends_every_message_exactly_once(dev_server: str, tmp_path: Path) -> None:
    journeys, templates = write_project(tmp_path, {"crash_drill": JOURNEY}, TEMPLATES)
    project = load_project(journeys, templates)
    queue = f"crash-{uuid.uuid4().hex[:8]}"
    database = f"sqlite:///{tmp_path / 'nurture.db'}"
    db = Database(database)
    db.migrate()
    env = clean_env()
    env.update(
        TEMPORAL_ADDRESS=dev_server,
        NURTURE_TASK_QUEUE=queue,
        NURTURE_HOME=str(tmp_path / "home"),
        DATABASE_URL=database,
        NURTURE_JOURNEYS=str(journeys),
        NURTURE_TEMPLATES=str(templates),
    )
    client = await Client.connect(dev_server)
    ingest = Ingest(project, db, client, queue)
    users = [f"{queue}-user-{index}" for index in range(RUNS)]
    gate = asyncio.Semaphore(16)

    async def track(user: str, name: str) -> int:
        async with gate:
            routed = await ingest.track(user, Event(name, datetime.now(UTC), {}, uuid.uuid4().hex))
            return len(routed.triggered) + len(routed.signalled)

    async def enter(index: int, user: str) -> int:
        async with gate:
            traits = {
                "email": f"drill{index}@example.com",
                "phone": f"+1555{index:07d}",
                "first_name": f"U{index}",
            }
            await ingest.identify(
                user, traits, message_id=uuid.uuid4().hex, event=Event("identify", datetime.now(UTC))
            )
        return await track(user, "Drill Started")

    async def pending(user: str) -> int:
        async with gate:
            described = await client.get_workflow_handle(workflow_id("crash_drill", user, "")).describe()
            return len(described.raw_description.pending_activities)

    async def in_flight_sends() -> int:
        return sum(await asyncio.gather(*(pending(user) for user in users)))

    assert sum(await asyncio.gather(*(enter(i, user) for i, user in enumerate(users)))) == RUNS

    log = tmp_path / "worker.log"
    first = start_worker(env, log)
    try:
        await wait_for(lambda: recorded(db, "first_email") == RUNS, 60, "every run's first email")
        deadline = time.monotonic() + 30
        while await in_flight_sends() and time.monotonic() < deadline:  # completions still on the wire
            await asyncio.sleep(0.2)
        assert await in_flight_sends() == 0, "the runs did not park at `hold`"
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    sent_before = scalar(db, "SELECT count(*) FROM messages WHERE status = 'sent'")
    assert sent_before == RUNS  # some, not all: the first email of every run

    second = start_worker(env, log)
    try:
        # Release the parked runs: the events reach them through the routes table, as in service.
        assert sum(await asyncio.gather(*(track(user, "Drill Resumed") for user in users))) == RUNS
        await wait_for(
            lambda: scalar(db, "SELECT count(*) FROM runs WHERE status = 'ended'") == RUNS,
            90,
            "every run to end after the restart",
        )
        # A run's end record rides on its last send, so the database can say "ended" a workflow
        # task before the run completes in Temporal; the worker must finish that task first.
        await asyncio.wait_for(
            asyncio.gather(
                *(client.get_workflow_handle(workflow_id("crash_drill", user, "")).result() for user in users)
            ),
            60,
        )
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()

    with db.engine.connect() as connection:
        ends = connection.execute(text("SELECT end_reason, count(*) FROM runs GROUP BY end_reason")).all()
        per_run = connection.execute(
            text(
                "SELECT run_id, count(*), sum(status = 'sent'), count(DISTINCT step_id) "
                "FROM messages GROUP BY run_id"
            )
        ).all()
        repeated = connection.execute(
            text("SELECT idempotency_key FROM messages GROUP BY idempotency_key HAVING count(*) > 1")
        ).all()
        steps = connection.execute(
            text("SELECT step_id, channel, count(*) FROM messages GROUP BY step_id, channel")
        ).all()
    assert dict(ends) == {"completed": RUNS}
    assert len(per_run) == RUNS
    assert all(tuple(row[1:]) == (3, 3, 3) for row in per_run), [
        row for row in per_run if tuple(row[1:]) != (3, 3, 3)
    ]
    assert repeated == []
    assert sorted(steps) == [
        ("first_email", "email", RUNS),
        ("last_email", "email", RUNS),
        ("middle_sms", "sms", RUNS),
    ]
    assert scalar(db, "SELECT count(*) FROM messages WHERE provider = 'outbox'") == len(STEPS) * RUNS
    query = f'TaskQueue = "{queue}" AND ExecutionStatus = "Completed"'
    deadline = time.monotonic() + 20  # every run completed (awaited above); visibility follows
    while (completed := (await client.count_workflows(query)).count) != RUNS and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert completed == RUNS
    db.dispose()
