"""One person across identifiers, through the running service (API, worker, a real Temporal dev
server; SQLite and PostgreSQL): an anonymous visitor's run sends to the address they give when
they sign in, alias, groups in a trigger, two runs of one journey and key merged, a trigger for a
run that moved in a merge, lookups by any identifier, and a WeChat follow joined by an identify."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import eventually, new_user, rows, served_settings, uvicorn_thread
from temporalio.client import Client as TemporalClient
from temporalio.service import RPCError, RPCStatusCode

from nurture.engine.identity import call_identifiers
from nurture.engine.interpreter import workflow_id
from nurture.engine.model import Event
from nurture.language.compiler import Project, load_project
from nurture.service.api import create_app
from nurture.service.ingest import Ingest, NotRouted
from nurture.service.worker import build_worker
from nurture.storage.audit import AuditRecord
from nurture.storage.db import Database
from nurture.storage.models import EventRecord, MessageRecord, Route, RunRecord

ROOT = Path(__file__).resolve().parents[1]
KEY = "identity-key"
WECHAT_TOKEN = "identityWechatToken"
READ = "identity-read-key"

JOURNEYS = {
    # A cart left by a visitor: the reminder goes out a few seconds later, to whatever address
    # the person has by then.
    "cart_recovery": """
        journey: cart_recovery
        trigger: {event: Cart Abandoned}
        steps:
          - {id: pause, wait: 3s}
          - id: reminder
            send: email
            template: welcome
    """,
    # Runs long: two of them for one person must not both go on.
    "browsing": """
        journey: browsing
        trigger: {event: Course Viewed}
        steps:
          - {id: pause, wait: 1h}
          - id: nudge
            send: email
            template: welcome
    """,
    # A welcome for each new WeChat follower.
    "wechat_welcome": """
        journey: wechat_welcome
        trigger: {event: WeChat Followed}
        steps:
          - {id: pause, wait: 1h}
    """,
    # Only for members of an enterprise account.
    "enterprise_onboarding": """
        journey: enterprise_onboarding
        trigger:
          event: Signed Up
          if: 'user.group.plan == "enterprise"'
        steps:
          - {id: pause, wait: 1h}
    """,
}


@dataclass
class Service:
    http: httpx.AsyncClient
    db: Database

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = await self.http.post(path, json=body)
        assert answer.status_code == 200, answer.text
        data: dict[str, Any] = answer.json()
        return data

    async def get(self, path: str, **params: str) -> httpx.Response:
        return await self.http.get(path, params=params, auth=(READ, ""))


def write_project(tmp_path: Path) -> tuple[Path, Project]:
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    for name, text in JOURNEYS.items():
        (journeys / f"{name}.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    return journeys, load_project(journeys, tmp_path / "templates")


@pytest.fixture
async def service(dev_server: str, database: Database, tmp_path: Path) -> AsyncIterator[Service]:
    journeys, project = write_project(tmp_path)
    settings = served_settings(
        dev_server,
        database.url,
        "test-identity",
        write_keys=(KEY,),
        read_keys=(READ,),
        wechat_token=WECHAT_TOKEN,
        journeys=journeys,
        templates=tmp_path / "templates",
    )
    temporal = await TemporalClient.connect(dev_server)
    with uvicorn_thread(create_app(settings)) as url:
        async with (
            build_worker(temporal, project, database, settings.task_queue),
            httpx.AsyncClient(base_url=url, auth=(KEY, ""), timeout=30) as http,
        ):
            yield Service(http, database)


def visitor() -> str:
    return f"anon-{uuid.uuid4().hex[:12]}"


async def test_a_visitors_cart_run_sends_to_the_address_given_at_sign_in(service: Service) -> None:
    user, anon = new_user(), visitor()
    email = f"{user}@example.com"
    await service.post("/v1/identify", {"userId": user, "traits": {"first_name": "Li"}})  # seen first
    tracked = await service.post("/v1/track", {"anonymousId": anon, "event": "Cart Abandoned"})
    assert tracked["person"] == f"anonymous_id:{anon}"
    [run] = await eventually(
        lambda: rows(service.db, RunRecord, user_id=f"anonymous_id:{anon}"), what="the visitor's run"
    )

    joined = await service.post(
        "/v1/identify", {"userId": user, "anonymousId": anon, "traits": {"email": email.upper()}}
    )

    assert joined["person"] == user  # the older person survives
    [sent] = await eventually(
        lambda: rows(service.db, MessageRecord, run_id=run.run_id, status="sent"), timeout=20, what="the reminder"
    )
    assert sent.address == email.upper() and sent.user_id == user
    [moved] = await eventually(
        lambda: rows(service.db, RunRecord, run_id=run.run_id, status="ended"), what="the run to end"
    )
    assert moved.user_id == user and moved.end_reason == "completed"
    events = rows(service.db, EventRecord, user_id=user)
    assert {e.kind for e in events} == {"identify", "track"}
    assert [e.anonymous_id for e in events if e.kind == "track"] == [anon]
    # Any identifier finds the merged person.
    for params in ({"anonymous_id": anon}, {"email": email}, {"id": user}, {"person": f"anonymous_id:{anon}"}):
        answer = await service.get("/v1/user", **params)
        assert answer.status_code == 200, (params, answer.text)
        profile = answer.json()
        assert profile["person_id"] == user and profile["traits"]["first_name"] == "Li"
        assert {(i["kind"], i["value"]) for i in profile["identifiers"]} == {
            ("user_id", user),
            ("anonymous_id", anon),
            ("email", email.lower()),
        }
    assert (await service.get(f"/v1/users/anonymous_id:{anon}")).json()["person_id"] == user
    two = await service.http.get("/v1/user", params={"email": email, "id": user}, auth=(READ, ""))
    assert two.status_code == 400 and "exactly one of" in two.json()["detail"][0]["message"]
    assert [a.action for a in rows(service.db, AuditRecord)] == ["merge"]


async def test_of_two_runs_of_one_journey_and_key_the_newer_ends_merged(service: Service) -> None:
    user, anon = new_user(), visitor()
    await service.post("/v1/track", {"userId": user, "event": "Course Viewed"})
    await eventually(lambda: rows(service.db, RunRecord, user_id=user), what="the user's run")
    await service.post("/v1/track", {"anonymousId": anon, "event": "Course Viewed"})
    await eventually(lambda: rows(service.db, RunRecord, user_id=f"anonymous_id:{anon}"), what="the visitor's run")

    aliased = await service.post("/v1/alias", {"previousId": anon, "userId": user})

    assert aliased["person"] == user

    def ended() -> list[RunRecord]:
        return [r for r in rows(service.db, RunRecord, user_id=user) if r.status == "ended"]

    [loser] = await eventually(ended, timeout=15, what="the newer run to end")
    assert loser.end_reason == "merged" and "/anonymous_id%3A" in loser.workflow_id
    [kept] = rows(service.db, RunRecord, user_id=user, status="active")
    assert kept.entered_at < loser.entered_at
    assert [r.workflow_id for r in rows(service.db, Route, user_id=user, active=True)] == [kept.workflow_id]
    [alias] = rows(service.db, EventRecord, kind="alias")
    assert alias.routed_at is not None, "routed once the stop was delivered"
    # The same alias again changes nothing.
    again = await service.post("/v1/alias", {"previousId": anon, "userId": user, "messageId": alias.message_id})
    assert again["duplicate"] is True


async def test_a_trigger_reaches_the_run_that_moved_in_a_merge(service: Service) -> None:
    user, anon = new_user(), visitor()
    await service.post("/v1/identify", {"userId": user, "traits": {}})
    await service.post("/v1/track", {"anonymousId": anon, "event": "Course Viewed"})
    [run] = await eventually(
        lambda: rows(service.db, RunRecord, user_id=f"anonymous_id:{anon}"), what="the visitor's run"
    )
    await service.post("/v1/identify", {"userId": user, "anonymousId": anon})

    again = await service.post("/v1/track", {"userId": user, "event": "Course Viewed"})

    assert again["triggered"] == [run.workflow_id]  # after_exit: the moved run ignores it
    runs = rows(service.db, RunRecord, user_id=user)
    assert [(r.run_id, r.status) for r in runs] == [(run.run_id, "active")]


async def test_a_group_is_readable_as_user_group(service: Service) -> None:
    member, outsider = new_user(), new_user()
    account = f"acme-{uuid.uuid4().hex[:8]}"
    await service.post("/v1/group", {"userId": member, "groupId": account, "traits": {"plan": "enterprise"}})
    batch = await service.post(
        "/v1/batch",
        {
            "batch": [
                {"type": "group", "userId": outsider, "groupId": f"{account}-small", "traits": {"plan": "team"}},
                {"type": "track", "userId": member, "event": "Signed Up"},
                {"type": "track", "userId": outsider, "event": "Signed Up"},
                {"type": "alias", "userId": outsider},
            ]
        },
    )
    assert [r["type"] for r in batch["results"]] == ["group", "track", "track"]
    assert [d["field"] for d in batch["refused"][0]["detail"]] == ["batch[3].previousId"]
    assert batch["results"][1]["triggered"] and not batch["results"][2]["triggered"]
    profile = (await service.get(f"/v1/users/{member}")).json()
    assert profile["group_id"] == account


def wechat_follow(openid: str) -> tuple[dict[str, str], str]:
    """A signed follow push, as WeChat sends it."""
    stamp, nonce = str(int(time.time())), str(uuid.uuid4().int % 10**10)
    signature = hashlib.sha1("".join(sorted([WECHAT_TOKEN, stamp, nonce])).encode()).hexdigest()
    body = (
        f"<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName><FromUserName><![CDATA[{openid}]]>"
        f"</FromUserName><CreateTime>{stamp}</CreateTime><MsgType><![CDATA[event]]></MsgType>"
        "<Event><![CDATA[subscribe]]></Event></xml>"
    )
    return {"signature": signature, "timestamp": stamp, "nonce": nonce}, body


async def test_a_wechat_follow_is_a_person_joined_by_an_identify(service: Service) -> None:
    user, openid = new_user(), f"oW{uuid.uuid4().hex[:16]}"
    query, body = wechat_follow(openid)
    answer = await service.http.post("/webhooks/wechat", params=query, content=body)
    assert answer.status_code == 200 and answer.text == "success"
    follower = f"wechat_openid:{openid}"
    [run] = await eventually(lambda: rows(service.db, RunRecord, user_id=follower), what="the welcome run")
    assert run.journey == "wechat_welcome"
    # The run's row is written with its route, just before the event is marked routed.
    [followed] = await eventually(
        lambda: [e for e in rows(service.db, EventRecord, user_id=follower) if e.routed_at is not None],
        what="the follow marked routed",
    )
    assert followed.name == "WeChat Followed"

    joined = await service.post("/v1/identify", {"userId": user, "traits": {"wechat_openid": openid}})

    assert joined["person"] == follower  # the follower was seen first
    profile = (await service.get("/v1/user", wechat_openid=openid)).json()
    assert profile["person_id"] == follower and profile["traits"]["wechat_openid"] == openid
    assert (await service.get(f"/v1/users/{user}")).json()["person_id"] == follower
    [moved] = rows(service.db, RunRecord, run_id=run.run_id)
    assert moved.user_id == follower


class StopFailsOnce:
    """A real Temporal client whose first ``stop`` signal fails as an outage would."""

    def __init__(self, client: TemporalClient) -> None:
        self.client = client
        self.failed = False
        self.stopped: list[str] = []

    def get_workflow_handle(self, wid: str) -> Any:
        handle = self.client.get_workflow_handle(wid)
        outer = self

        class Handle:
            async def signal(self, name: str, arg: Any) -> None:
                if name == "stop":
                    if not outer.failed:
                        outer.failed = True
                        raise RPCError("frontend unavailable", RPCStatusCode.UNAVAILABLE, b"")
                    outer.stopped.append(wid)
                await handle.signal(name, arg)

        return Handle()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@pytest.mark.parametrize("finish", ["retry", "start-up"])
async def test_a_merge_whose_stop_fails_is_finished_by_the_retry_or_the_next_start(
    dev_server: str, database: Database, tmp_path: Path, finish: str
) -> None:
    _, project = write_project(tmp_path)
    client = StopFailsOnce(await TemporalClient.connect(dev_server))
    ingest = Ingest(project, database, client, f"test-identity-{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    user, anon = new_user(), visitor()
    now = datetime.now(UTC)
    await ingest.track(user, Event("Course Viewed", now, {}, f"t1-{user}"))
    await ingest.track(call_identifiers(None, anon), Event("Course Viewed", now, {}, f"t2-{user}"))
    [newer] = rows(database, Route, user_id=f"anonymous_id:{anon}")
    merge = {"message_id": f"i-{user}", "event": Event("identify", now)}

    with pytest.raises(NotRouted):
        await ingest.identify(call_identifiers(user, anon), {}, **merge)

    [stored] = rows(database, EventRecord, message_id=f"i-{user}")
    assert stored.routed_at is None and stored.user_id == user, "the merge is kept, its stops are owed"
    assert [r.active for r in rows(database, Route, workflow_id=newer.workflow_id)] == [True]
    if finish == "retry":
        assert await ingest.identify(call_identifiers(user, anon), {}, **merge) is None
    else:
        assert await ingest.route_unrouted(before=datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert client.stopped == [newer.workflow_id]
    [stored] = rows(database, EventRecord, message_id=f"i-{user}")
    assert stored.routed_at is not None
    kept = workflow_id("browsing", user, "")
    assert [r.workflow_id for r in rows(database, Route, user_id=user, active=True)] == [kept]
