"""The unknown outcome: the worker dies after the provider accepted a message, before hearing back.

A real worker process sends an SMS through the real Twilio SDK to a mock serving Twilio's own
OpenAPI spec. The mock records the message and holds its answer; the test kills the worker with
SIGKILL at that moment. The message row, written before the call, still says ``sending`` with a
pending attempt. A second worker picks the send up when its start-to-close timeout expires, finds
the pending attempt and records ``failed:unknown_outcome`` without calling Twilio again; the run
goes on and its next message is sent once.
"""

from __future__ import annotations

import os
import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path

from openapi_mock import OpenApiMock, provider_spec
from sqlmodel import select
from temporalio.client import Client
from test_crash import start_worker, wait_for

from nurture.compiler import load_project
from nurture.ingest import Ingest
from nurture.model import Event
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord, RunRecord

JOURNEY = """\
journey: held
trigger:
  event: Held Started
steps:
  - {id: first, send: sms, template: first, category: transactional}
  - {id: pause, wait: 1s}
  - {id: second, send: sms, template: second, category: transactional}
"""
PROJECT = """\
providers:
  sms: {provider: twilio, from: "+15005550006"}
"""


def write_project(root: Path) -> tuple[Path, Path]:
    journeys, templates = root / "journeys", root / "templates"
    (templates / "sms").mkdir(parents=True)
    journeys.mkdir()
    (journeys / "held.yaml").write_text(JOURNEY, encoding="utf-8")
    (root / "nurture.yaml").write_text(PROJECT, encoding="utf-8")
    (templates / "sms" / "first.txt").write_text("First for {{ user.first_name }}\n", encoding="utf-8")
    (templates / "sms" / "second.txt").write_text("Second for {{ user.first_name }}\n", encoding="utf-8")
    return journeys, templates


def message(db: Database, step: str) -> MessageRecord | None:
    with db.session() as session:
        return session.exec(select(MessageRecord).where(MessageRecord.step_id == step)).first()


async def test_worker_killed_while_the_provider_holds_the_message(dev_server: str, tmp_path: Path) -> None:
    journeys, templates = write_project(tmp_path)
    project = load_project(journeys, templates)
    queue = f"held-{uuid.uuid4().hex[:8]}"
    database = f"sqlite:///{tmp_path / 'nurture.db'}"
    db = Database(database)
    db.migrate()
    twilio = OpenApiMock(provider_spec("twilio_api_v2010.json")).start()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("NURTURE_", "TEMPORAL_", "TWILIO_")) and key != "DATABASE_URL"
    }
    env.update(
        TEMPORAL_ADDRESS=dev_server,
        NURTURE_TASK_QUEUE=queue,
        NURTURE_HOME=str(tmp_path / "home"),
        DATABASE_URL=database,
        NURTURE_JOURNEYS=str(journeys),
        NURTURE_TEMPLATES=str(templates),
        TWILIO_ACCOUNT_SID="AC" + "0" * 32,
        TWILIO_AUTH_TOKEN="test-token",
        TWILIO_API_URL=twilio.url,
    )
    log = tmp_path / "worker.log"
    workers = []
    try:
        twilio.hold_next()
        client = await Client.connect(dev_server)
        ingest = Ingest(project, db, client, queue)
        now = datetime.now(UTC)
        await ingest.identify(
            "u1",
            {"phone": "+15551230001", "first_name": "Li"},
            message_id=uuid.uuid4().hex,
            event=Event("identify", now),
        )
        routed = await ingest.track("u1", Event("Held Started", now, {}, uuid.uuid4().hex))
        assert len(routed.triggered) == 1

        workers.append(start_worker(env, log))
        await wait_for(lambda: len(twilio.accepted) == 1, 60, "Twilio to receive the first SMS")
        workers[0].send_signal(signal.SIGKILL)
        assert workers[0].wait(timeout=10) == -signal.SIGKILL

        held = message(db, "first")
        assert held is not None and held.status == "sending"
        assert [(a["channel"], a["provider"], a["state"]) for a in held.attempts] == [
            ("sms", "twilio", "pending")
        ]

        workers.append(start_worker(env, log))
        # The send is retried once its 30 s start-to-close timeout has passed.
        await wait_for(
            lambda: (row := message(db, "second")) is not None and row.status == "sent",
            120,
            "the run to go on to its second SMS",
        )
        await wait_for(lambda: any(r.status == "ended" for r in _runs(db)), 30, "the run to end")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        twilio.stop()

    first = message(db, "first")
    assert first is not None and (first.status, first.reason) == ("failed", "unknown_outcome")
    bodies = [request.body["Body"] for request in twilio.accepted]
    assert bodies == ["First for Li", "Second for Li"]  # the held SMS was not sent again
    assert twilio.rejected == []
    db.dispose()


def _runs(db: Database) -> list[RunRecord]:
    with db.session() as session:
        return list(session.exec(select(RunRecord)).all())
