"""The service end to end over HTTP: the API served by uvicorn on loopback (built from settings
alone, as ``nurture up`` builds it), a real ``temporal server start-dev``, a worker, and SQLite or
PostgreSQL. Journeys wait hours, so these tests check what happens at once: sends that are due
now, goals and restarts that end sleeping runs, duplicates, and refused calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import httpx
import pytest
from support import eventually, messages, new_user, rows, served_settings, uvicorn_thread
from temporalio.client import Client as TemporalClient
from temporalio.service import RPCError

from nurture.language.compiler import Project
from nurture.service.api import create_app
from nurture.service.client import AsyncClient, NurtureError
from nurture.service.ingest import workflow_id
from nurture.service.worker import build_worker
from nurture.storage.db import Database
from nurture.storage.models import EventRecord, MessageRecord, ProfileRecord, Route, RunRecord

KEY = "devserver-test-key"
READ_KEY = "devserver-read-key"
T = TypeVar("T")


def daytime_zone() -> str:
    """A fixed-offset zone where it is about noon now, so quiet hours (21:00-08:00) never defer
    a marketing send, whatever the hour the suite runs at."""
    offset = 12 - datetime.now(UTC).hour  # -11 .. +12 hours
    return f"Etc/GMT{-offset:+d}"  # POSIX signs: Etc/GMT-3 is UTC+3






@dataclass
class Service:
    url: str
    api: AsyncClient
    reader: AsyncClient
    db: Database
    temporal: TemporalClient


@pytest.fixture
async def service(dev_server: str, database: Database, project: Project) -> AsyncIterator[Service]:
    settings = served_settings(dev_server, database.url, "test-devserver", write_keys=(KEY,), read_keys=(READ_KEY,))
    temporal = await TemporalClient.connect(dev_server)
    with uvicorn_thread(create_app(settings)) as url:
        async with (
            build_worker(temporal, project, database, settings.task_queue),
            AsyncClient(KEY, base_url=url, retries=0) as api,
            AsyncClient(READ_KEY, base_url=url, retries=0) as reader,
        ):
            yield Service(url, api, reader, database, temporal)








def runs_of(db: Database, user: str, journey: str, count: int = 1) -> Callable[[], list[Any]]:
    def check() -> list[Any]:
        found = sorted(rows(db, RunRecord, user_id=user, journey=journey), key=lambda r: r.entered_at)
        return found if len(found) >= count else []

    return check


async def test_events_become_workflows_and_outbox_messages(service: Service) -> None:
    user = new_user()
    zone = daytime_zone()
    assert 8 <= datetime.now(ZoneInfo(zone)).hour < 21, "the user's local time is outside quiet hours"
    await service.api.identify(user, {"email": "li@example.com", "first_name": "Li", "timezone": zone})

    signed_up = await service.api.track(user, "Signed Up")

    assert signed_up["triggered"] == [workflow_id("welcome_series", user, "")]
    [message] = await eventually(
        lambda: messages(service.db, user_id=user), what="the welcome email"
    )
    assert (message.journey, message.channel, message.template, message.status) == (
        "welcome_series",
        "email",
        "welcome",
        "sent",
    )
    assert message.subject == "Welcome to Nurture Academy, Li!" and message.address == "li@example.com"
    assert "<html" in message.content["html"]
    [run] = rows(service.db, RunRecord, user_id=user)
    assert run.status == "active", "the series now sleeps a day before its next email"
    outbox = await service.reader.outbox(limit=5)
    assert any(m["user_id"] == user and m["template"] == "welcome" for m in outbox)


async def test_a_goal_ends_a_sleeping_run_at_once(service: Service) -> None:
    user = new_user()
    await service.api.identify(user, {"email": "li@example.com", "timezone": "UTC"})
    cart = await service.api.track(user, "Cart Updated", {"cart_id": "c-1", "item_count": 2})
    [started] = await eventually(runs_of(service.db, user, "cart_abandonment"), what="the cart run")
    assert started.status == "active" and cart["triggered"] == [started.workflow_id]

    ordered_at = time.monotonic()
    order = await service.api.track(
        user, "Order Completed", {"order_id": "o-1", "total": 49, "cart_id": "c-1"}
    )

    assert order["signalled"] == [started.workflow_id]

    def ended() -> RunRecord | None:
        [run] = rows(service.db, RunRecord, run_id=started.run_id)
        return run if run.status == "ended" else None

    run = await eventually(ended, timeout=2.0, what="the cart run's end")
    assert time.monotonic() - ordered_at < 2.0, "not at the end of the 1h wait"
    assert run.end_reason == "goal" and run.converted_at is not None
    await asyncio.sleep(0.3)
    assert [
        m.template for m in messages(service.db, user_id=user, journey="cart_abandonment")
    ] == []
    assert rows(service.db, Route, workflow_id=started.workflow_id)[0].active is False


async def test_a_second_cart_update_restarts_the_run_under_one_workflow_id(service: Service) -> None:
    user = new_user()
    await service.api.identify(user, {"email": "li@example.com", "timezone": "UTC"})
    properties = {"cart_id": "c-7", "item_count": 1}
    await service.api.track(user, "Cart Updated", properties)
    await eventually(runs_of(service.db, user, "cart_abandonment"), what="the first run")

    again = await service.api.track(user, "Cart Updated", {**properties, "item_count": 3})

    wid = workflow_id("cart_abandonment", user, "c-7")
    assert again["triggered"] == [wid]
    first, second = await eventually(runs_of(service.db, user, "cart_abandonment", 2), what="the second run")

    def first_ended() -> bool:
        return rows(service.db, RunRecord, run_id=first.run_id)[0].status == "ended"

    await eventually(first_ended, what="the first run's end")
    first = rows(service.db, RunRecord, run_id=first.run_id)[0]
    assert (first.status, first.end_reason) == ("ended", "restarted")
    assert (second.status, second.end_reason) == ("active", None)
    assert first.workflow_id == second.workflow_id == wid
    description = await service.temporal.get_workflow_handle(wid).describe()
    assert description.run_id == second.run_id and description.status is not None
    assert description.status.name == "RUNNING"
    assert rows(service.db, Route, workflow_id=wid)[0].active is True


async def test_a_repeated_message_id_sends_nothing_twice(service: Service) -> None:
    user = new_user()
    await service.api.identify(user, {"phone": "+8613800138000", "timezone": "UTC"})
    properties = {"order_id": "o-2", "total": 99, "tracking_number": "SF123"}

    answers = await asyncio.gather(
        *[service.api.track(user, "Order Completed", properties, message_id=f"m-{user}") for _ in range(3)]
    )

    assert sorted(a["duplicate"] for a in answers) == [False, True, True]
    [message] = await eventually(lambda: messages(service.db, user_id=user), what="the SMS")
    assert (message.template, message.status) == ("shipping_notice", "sent")  # transactional: any hour
    assert "SF123" in message.content["text"]
    await asyncio.sleep(1.0)
    assert len(messages(service.db, user_id=user)) == 1
    assert len(rows(service.db, RunRecord, user_id=user)) == 1
    assert len(rows(service.db, EventRecord, user_id=user, kind="track")) == 1


BAD = [
    ("/v1/track", {"event": "Signed Up"}, 400, "userId"),  # neither userId nor anonymousId
    ("/v1/track", {"userId": "{user}", "properties": {"cart_id": "c"}}, 400, "event"),
    ("/v1/track", {"userId": "{user}", "event": "Signed Up", "timestamp": "2026-13-45"}, 400, "timestamp"),
    ("/v1/track", {"userId": "{user}", "event": "Order Completed", "properties": "o-1"}, 400, "properties"),
    ("/v1/identify", {"userId": "{user}", "traits": {"opted_out": "sms"}}, 400, "traits.opted_out"),
    # A batch's bad items are refused one by one in a 200 (tests/test_api.py); a bad body whole.
    ("/v1/batch", {"batch": {"type": "track", "userId": "{user}", "event": "Signed Up"}}, 400, "batch"),
    ("/v1/track", {"userId": "{user}", "event": "Signed Up", "properties": {"x": "y" * 40_000}}, 413, "body"),
]


async def test_bad_events_get_4xx_and_change_nothing(service: Service) -> None:
    user = new_user()
    async with httpx.AsyncClient(base_url=service.url, auth=(KEY, ""), timeout=30.0) as http:
        for path, body, status, field in BAD:
            answer = await http.post(path, json=_fill(body, user))
            assert answer.status_code == status, (path, body, answer.text)
            assert field in [d["field"] for d in answer.json()["detail"]], answer.text
    await asyncio.sleep(0.3)
    for model in (EventRecord, ProfileRecord, RunRecord, Route, MessageRecord):
        assert rows(service.db, model) == [], f"{model.__tablename__} changed"
    with pytest.raises(RPCError):
        await service.temporal.get_workflow_handle(workflow_id("welcome_series", user, "")).describe()


def _fill(value: Any, user: str) -> Any:
    if isinstance(value, str):
        return value.replace("{user}", user)
    if isinstance(value, list):
        return [_fill(v, user) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, user) for k, v in value.items()}
    return value


async def test_a_wrong_write_key_gets_401(service: Service) -> None:
    user = new_user()
    async with AsyncClient("not-the-key", base_url=service.url) as intruder:
        with pytest.raises(NurtureError) as raised:
            await intruder.track(user, "Signed Up")
    async with httpx.AsyncClient(base_url=service.url, timeout=30.0) as http:
        bearer = await http.post(
            "/v1/track", json={"userId": user, "event": "Signed Up"}, headers={"Authorization": "Bearer nope"}
        )
        health = await http.get("/healthz")
    assert raised.value.status == 401 and raised.value.error == "unauthorized"
    assert bearer.status_code == 401 and bearer.headers["WWW-Authenticate"] == 'Basic realm="nurture"'
    assert health.status_code == 200 and health.json()["ok"] is True
    assert rows(service.db, EventRecord) == []
