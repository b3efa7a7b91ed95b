"""The unknown outcome: the worker dies after the provider accepted a message, before hearing back.

A real worker process sends an email through the real SendGrid SDK and an SMS through the real
Twilio SDK, to mocks serving the providers' own OpenAPI specs. Each mock records its message and
holds the answer; the test kills the worker with SIGKILL at that moment. The message rows, written
before the calls, still say ``sending`` with a pending attempt. A second worker picks the sends up
when their start-to-close timeout expires:

- Twilio can be asked (its message list): the SMS is found and recorded ``sent`` with the SID
  Twilio gave it, and not sent again;
- SendGrid cannot: the email is recorded ``failed:unknown_outcome`` and not sent again.

Both runs go on, and their next messages are sent once.
"""

from __future__ import annotations

import signal
import uuid
from datetime import UTC, datetime
from pathlib import Path

from openapi_mock import OpenApiMock, provider_spec
from sqlmodel import select
from support import clean_env
from temporalio.client import Client
from test_crash import start_worker, wait_for

from nurture.engine.model import Event
from nurture.language.compiler import load_project
from nurture.service.ingest import Ingest
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord, RunRecord

JOURNEY = """\
journey: held_{channel}
trigger:
  event: Held {channel}
steps:
  - {{id: first, send: {channel}, template: first, category: transactional}}
  - {{id: pause, wait: 1s}}
  - {{id: second, send: {channel}, template: second, category: transactional}}
"""
PROJECT = """\
providers:
  sms: {provider: twilio, from: "+15005550006"}
  email: {provider: sendgrid, from: "Nurture <hello@example.com>"}
"""
EMAIL = """\
---
subject: "{what} for {{{{ user.first_name }}}}"
---
<mjml><mj-body><mj-section><mj-column><mj-text>{what}</mj-text></mj-column></mj-section></mj-body></mjml>
"""


def write_project(root: Path) -> tuple[Path, Path]:
    journeys, templates = root / "journeys", root / "templates"
    (templates / "sms").mkdir(parents=True)
    (templates / "email").mkdir(parents=True)
    journeys.mkdir()
    for channel in ("sms", "email"):
        (journeys / f"held_{channel}.yaml").write_text(JOURNEY.format(channel=channel), encoding="utf-8")
    (root / "nurture.yaml").write_text(PROJECT, encoding="utf-8")
    for name in ("first", "second"):
        (templates / "sms" / f"{name}.txt").write_text(
            f"{name.title()} for {{{{ user.first_name }}}}\n", encoding="utf-8"
        )
        (templates / "email" / f"{name}.mjml").write_text(EMAIL.format(what=name.title()), encoding="utf-8")
    return journeys, templates


def message(db: Database, step: str, channel: str) -> MessageRecord | None:
    with db.session() as session:
        return session.exec(
            select(MessageRecord)
            .where(MessageRecord.step_id == step)
            .where(MessageRecord.journey == f"held_{channel}")
        ).first()


async def test_worker_killed_while_the_provider_holds_the_message(dev_server: str, tmp_path: Path) -> None:
    journeys, templates = write_project(tmp_path)
    project = load_project(journeys, templates)
    queue = f"held-{uuid.uuid4().hex[:8]}"
    database = f"sqlite:///{tmp_path / 'nurture.db'}"
    db = Database(database)
    db.migrate()
    twilio = OpenApiMock(provider_spec("twilio_api_v2010.json")).start()
    sendgrid = OpenApiMock(provider_spec("sendgrid_mail_v3.json")).start()
    env = clean_env()
    env.update(
        TEMPORAL_ADDRESS=dev_server,
        NURTURE_TASK_QUEUE=queue,
        NURTURE_HOME=str(tmp_path / "home"),
        DATABASE_URL=database,
        NURTURE_JOURNEYS=str(journeys),
        NURTURE_TEMPLATES=str(templates),
        NURTURE_PUBLIC_URL="https://nurture.example",
        NURTURE_SECRET="held-secret-0123456789",
        TWILIO_ACCOUNT_SID="AC" + "0" * 32,
        TWILIO_AUTH_TOKEN="test-token",
        TWILIO_API_URL=twilio.url,
        SENDGRID_API_KEY="SG.test",
        SENDGRID_API_URL=sendgrid.url,
    )
    log = tmp_path / "worker.log"
    workers = []
    try:
        twilio.hold_next()
        sendgrid.hold_next()
        client = await Client.connect(dev_server)
        ingest = Ingest(project, db, client, queue)
        now = datetime.now(UTC)
        traits = {"phone": "+15551230001", "email": "li@example.com", "first_name": "Li"}
        await ingest.identify("u1", traits, message_id=uuid.uuid4().hex, event=Event("identify", now))
        for channel in ("sms", "email"):
            routed = await ingest.track("u1", Event(f"Held {channel}", now, {}, uuid.uuid4().hex))
            assert len(routed.triggered) == 1

        workers.append(start_worker(env, log))
        await wait_for(
            lambda: len(twilio.accepted) == 1 and len(sendgrid.accepted) == 1,
            60,
            "both providers to hold a message",
        )
        workers[0].send_signal(signal.SIGKILL)
        assert workers[0].wait(timeout=10) == -signal.SIGKILL

        for channel, provider in (("sms", "twilio"), ("email", "sendgrid")):
            held = message(db, "first", channel)
            assert held is not None and held.status == "sending"
            assert [(a["channel"], a["provider"], a["state"]) for a in held.attempts] == [
                (channel, provider, "pending")
            ]

        workers.append(start_worker(env, log))
        # The sends are retried once their 30 s start-to-close timeout has passed.
        await wait_for(
            lambda: all(
                (row := message(db, "second", channel)) is not None and row.status == "sent"
                for channel in ("sms", "email")
            ),
            120,
            "both runs to go on to their second message",
        )
        await wait_for(lambda: sum(r.status == "ended" for r in _runs(db)) == 2, 30, "the runs to end")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        twilio.stop()
        sendgrid.stop()

    sms = message(db, "first", "sms")
    assert sms is not None and (sms.status, sms.provider_id) == ("sent", twilio.accepted[0].response_id)
    assert [request.body["Body"] for request in twilio.accepted] == ["First for Li", "Second for Li"]
    assert len(twilio.reads) == 1  # asked once, found it, did not send again
    email = message(db, "first", "email")
    assert email is not None and (email.status, email.reason) == ("failed", "unknown_outcome")
    assert [request.body["subject"] for request in sendgrid.accepted] == ["First for Li", "Second for Li"]
    assert twilio.rejected == [] and sendgrid.rejected == []
    db.dispose()


def _runs(db: Database) -> list[RunRecord]:
    with db.session() as session:
        return list(session.exec(select(RunRecord)).all())
