"""The Python client: retries that keep their messageId (on a mock transport), and the real API
served by uvicorn on a loopback port (field-level errors, profiles, runs, the outbox).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from support import served_settings, uvicorn_thread
from temporalio.client import Client as TemporalClient

from nurture.cli import events as cli_events
from nurture.cli.events import identify, parse_value, track
from nurture.language.compiler import Project
from nurture.service.api import create_app
from nurture.service.client import AsyncClient, Client, NurtureError
from nurture.service.devserver import free_port
from nurture.service.settings import Settings
from nurture.service.worker import build_worker
from nurture.storage.db import Database

KEY = "client-test-key"
READ_KEY = "client-read-key-0123456789"


# Retries, on a mock transport -----------------------------------------------------------------


class Script:
    """A mock server that answers from a list (an exception is raised as a transport error)."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


def ok(**extra: Any) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "success": True,
            "type": "track",
            "messageId": "x",
            "duplicate": False,
            "triggered": [],
            "signalled": [],
            "skipped": [],
            **extra,
        },
    )


def client(script: Script, retries: int = 3) -> Client:
    return Client(KEY, transport=httpx.MockTransport(script), retries=retries, backoff=0.0)


def test_retries_resend_the_same_message_id() -> None:
    script = Script(
        httpx.ConnectError("refused"),
        httpx.Response(503, json={"error": "unavailable"}),
        httpx.Response(429, json={"error": "slow down"}),
        ok(),
    )

    answer = client(script).track("u1", "Signed Up", {"plan": "pro"})

    assert answer["success"] is True
    ids = {body["messageId"] for body in script.bodies()}
    assert len(script.requests) == 4 and len(ids) == 1
    assert uuid.UUID(ids.pop()).version == 4
    body = script.bodies()[0]
    assert (body["userId"], body["event"], body["properties"]) == ("u1", "Signed Up", {"plan": "pro"})
    segment_style = base64.b64encode(f"{KEY}:".encode()).decode()  # the key as user, empty password
    assert script.requests[0].headers["Authorization"] == f"Basic {segment_style}"


def test_each_call_gets_its_own_message_id_unless_given() -> None:
    script = Script(ok(), ok(), ok())
    nurture = client(script)
    nurture.track("u1", "A")
    nurture.track("u1", "A")
    nurture.identify("u1", {"vip": True}, message_id="mine", opted_out=["sms"])
    first, second, third = script.bodies()
    assert first["messageId"] != second["messageId"]
    assert third == {"userId": "u1", "traits": {"vip": True, "opted_out": ["sms"]}, "messageId": "mine"}
    assert [r.url.path for r in script.requests] == ["/v1/track", "/v1/track", "/v1/identify"]


def test_batch_items_get_message_ids_that_survive_retries() -> None:
    script = Script(httpx.Response(502), httpx.Response(200, json={"success": True, "results": []}))
    items: list[dict[str, Any]] = [
        {"type": "track", "userId": "u1", "event": "A"},
        {"type": "identify", "userId": "u1", "traits": {}, "messageId": "given"},
    ]

    client(script).batch(items)

    first, retry = script.bodies()
    assert first == retry
    assert first["batch"][1]["messageId"] == "given" and first["batch"][0]["messageId"]
    assert "messageId" not in items[0], "the caller's items are not changed"


def test_a_4xx_raises_with_the_servers_detail_and_is_not_retried() -> None:
    detail = [{"field": "batch[2].event", "message": "event is required for track"}]
    script = Script(httpx.Response(400, json={"error": "invalid_request", "detail": detail}), ok())

    with pytest.raises(NurtureError) as raised:
        client(script).batch([{"type": "track", "userId": "u1"}])

    assert raised.value.status == 400 and raised.value.error == "invalid_request"
    assert raised.value.detail == detail
    assert "batch[2].event: event is required for track" in str(raised.value)
    assert len(script.requests) == 1


def test_5xx_is_retried_then_raised() -> None:
    script = Script(*[httpx.Response(500, text="boom")] * 3)
    with pytest.raises(NurtureError) as raised:
        client(script, retries=2).track("u1", "A")
    assert raised.value.status == 500 and len(script.requests) == 3
    assert len({body["messageId"] for body in script.bodies()}) == 1


def test_connection_errors_are_retried_then_raised() -> None:
    script = Script(*[httpx.ConnectError("refused")] * 2)
    with pytest.raises(NurtureError) as raised:
        client(script, retries=1).track("u1", "A")
    assert raised.value.status is None and raised.value.error == "unreachable"
    assert len(script.requests) == 2


def test_reads_send_the_user_id_in_the_query() -> None:
    script = Script(httpx.Response(200, json=[]), httpx.Response(200, json=[]))
    nurture = client(script)
    nurture.messages("X/export c", content=True)
    nurture.outbox(5)
    assert script.requests[0].url.path == "/v1/user/messages"
    assert script.requests[0].url.params == httpx.QueryParams({"id": "X/export c", "content": "true"})
    assert script.requests[1].url.raw_path == b"/v1/outbox?limit=5"


async def test_the_async_client_retries_alike() -> None:
    script = Script(httpx.ReadTimeout("slow"), httpx.Response(503), ok(duplicate=True))
    transport = httpx.MockTransport(script)
    async with AsyncClient(KEY, transport=transport, backoff=0.0) as nurture:
        answer = await nurture.track("u1", "A", message_id="m-1")
    assert answer["duplicate"] is True
    assert [body["messageId"] for body in script.bodies()] == ["m-1", "m-1", "m-1"]


def test_identify_sends_subscribe_and_unsubscribe_as_traits() -> None:
    script = Script(ok(), ok())
    nurture = client(script)

    nurture.identify("u1", {"vip": True}, unsubscribe=("promotions", "sms"), subscribe=["email"])
    nurture.identify("u1", {}, unsubscribe=[])

    first, second = script.bodies()
    assert first["traits"] == {"vip": True, "unsubscribe": ["promotions", "sms"], "subscribe": ["email"]}
    assert second["traits"] == {"unsubscribe": []}, "an empty list is sent, not dropped"


async def test_the_async_client_sends_subscribe_and_unsubscribe_alike() -> None:
    script = Script(ok())
    async with AsyncClient(KEY, transport=httpx.MockTransport(script), backoff=0.0) as nurture:
        await nurture.identify("u1", {}, subscribe=["promotions"], opted_out=None)
    assert script.bodies()[0]["traits"] == {"subscribe": ["promotions"]}


def cli_script(monkeypatch: pytest.MonkeyPatch, *answers: httpx.Response) -> Script:
    """The CLI's client talking to a mock server."""
    script = Script(*answers)

    def mocked(write_key: str, **options: Any) -> Client:
        return Client(write_key, transport=httpx.MockTransport(script), **options)

    monkeypatch.setattr(cli_events, "Client", mocked)
    return script


def test_cli_identify_subscribe_and_unsubscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    script = cli_script(monkeypatch, ok(type="identify"))

    result = CliRunner().invoke(
        identify,
        ["u1", "vip=true", "--unsubscribe", "promotions", "--subscribe", "sms", "--unsubscribe", "email"]
        + ["--write-key", KEY],
    )

    assert result.exit_code == 0, result.output
    [body] = script.bodies()
    assert body["traits"] == {"vip": True, "unsubscribe": ["promotions", "email"], "subscribe": ["sms"]}


@pytest.mark.parametrize("replacing", [["--opt-out", "sms"], ["--clear-opt-outs"]])
def test_cli_refuses_to_mix_replacing_and_changing_opt_outs(
    monkeypatch: pytest.MonkeyPatch, replacing: list[str]
) -> None:
    script = cli_script(monkeypatch)
    result = CliRunner().invoke(identify, ["u1", *replacing, "--subscribe", "email", "--write-key", KEY])
    assert result.exit_code == 2 and "cannot be combined" in result.output
    assert script.requests == []


# The real API, served by uvicorn ---------------------------------------------------------------






@pytest.fixture
def settings(dev_server: str, tmp_path: Path) -> Settings:
    settings: Settings = served_settings(
        dev_server, f"sqlite:///{tmp_path / 'nurture.db'}", "test-client", write_keys=(KEY,), read_keys=(READ_KEY,)
    )
    return settings


@pytest.fixture
def url(settings: Settings) -> Iterator[str]:
    """The API as ``nurture up`` builds it: from settings alone, connecting to Temporal itself."""
    with uvicorn_thread(create_app(settings)) as url:
        yield url


def test_the_client_against_the_served_api(url: str) -> None:
    user = f"team/u-{uuid.uuid4().hex[:10]}/export"  # the reads take it in the query
    with Client(KEY, base_url=url) as nurture, Client(READ_KEY, base_url=url) as reader:
        identified = nurture.identify(user, {"email": "li@example.com", "timezone": "UTC"}, opted_out=["sms"])
        first = nurture.track(user, "Signed Up", message_id=f"m-{user}")
        again = nurture.track(user, "Signed Up", message_id=f"m-{user}")
        profile = reader.profile(user)

        with pytest.raises(NurtureError) as bad:
            nurture.track(user, "Signed Up", {"plan": "pro"}, timestamp="next week")
        with pytest.raises(NurtureError) as missing:
            reader.profile("nobody-" + user)
        with pytest.raises(NurtureError) as wrong_kind:
            nurture.profile(user)

    assert identified["type"] == "identify" and identified["duplicate"] is False
    assert first["duplicate"] is False and len(first["triggered"]) == 1
    assert again["duplicate"] is True and again["triggered"] == []
    assert profile["traits"] == {"email": "li@example.com", "timezone": "UTC"} and profile["opted_out"] == [
        "sms"
    ]
    assert bad.value.status == 400 and [d["field"] for d in bad.value.detail] == ["timestamp"]
    assert missing.value.status == 404 and missing.value.error == "not_found"
    assert wrong_kind.value.status == 403 and "needs a read key" in wrong_kind.value.message


def test_the_client_makes_one_person_of_a_visitor_and_a_user(url: str) -> None:
    user, visitor = f"u-{uuid.uuid4().hex[:10]}", f"v-{uuid.uuid4().hex[:10]}"
    with Client(KEY, base_url=url) as nurture, Client(READ_KEY, base_url=url) as reader:
        browsed = nurture.track(None, "Course Viewed", anonymous_id=visitor)
        signed_in = nurture.identify(user, {"email": f"{user}@example.com"}, anonymous_id=visitor)
        grouped = nurture.group(user, "acme", {"plan": "team"})
        aliased = nurture.alias(f"old-{user}", user)
        profile = reader.profile(user)

    person = f"anonymous_id:{visitor}"  # seen first
    assert [c["person"] for c in (browsed, signed_in, grouped, aliased)] == [person] * 4
    assert [c["type"] for c in (grouped, aliased)] == ["group", "alias"]
    assert profile["person_id"] == person and profile["group_id"] == "acme"
    assert {(i["kind"], i["value"]) for i in profile["identifiers"]} == {
        ("anonymous_id", visitor),
        ("anonymous_id", f"old-{user}"),
        ("user_id", user),
        ("email", f"{user}@example.com"),
    }


def test_subscribe_and_unsubscribe_against_the_served_api(url: str) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    runner = CliRunner()
    with Client(KEY, base_url=url) as nurture, Client(READ_KEY, base_url=url) as reader:
        nurture.identify(user, {"timezone": "UTC"}, opted_out=["email"])
        nurture.identify(user, {}, unsubscribe=["sms", "wechat"], subscribe=["email"])
        changed = reader.profile(user)
        with pytest.raises(NurtureError) as unknown:
            nurture.identify(user, {}, subscribe=["smss"])
        cli = runner.invoke(identify, [user, "--subscribe", "wechat", "--url", url, "--write-key", KEY])
        cli_unknown = runner.invoke(
            identify, [user, "--unsubscribe", "fax", "--url", url, "--write-key", KEY]
        )
        after = reader.profile(user)

    assert changed["opted_out"] == ["sms", "wechat"] and changed["traits"] == {"timezone": "UTC"}
    assert unknown.value.status == 400
    [detail] = unknown.value.detail
    assert detail["field"] == "traits.subscribe[0]" and "did you mean 'sms'?" in detail["message"]
    assert cli.exit_code == 0, cli.output
    assert cli_unknown.exit_code == 1 and "traits.unsubscribe[0]: 'fax'" in cli_unknown.output
    assert after["opted_out"] == ["sms"]


def test_a_wrong_key_raises_unauthorized(url: str) -> None:
    with Client("not-the-key", base_url=url) as nurture, pytest.raises(NurtureError) as raised:
        nurture.track("u1", "Signed Up")
    assert raised.value.status == 401 and raised.value.error == "unauthorized"


def test_an_unreachable_api_raises_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(KEY, base_url=url, retries=1, backoff=0.0) as nurture, pytest.raises(NurtureError) as raised:
        nurture.profile("u1")
    assert raised.value.status is None


@pytest.fixture
async def worker(settings: Settings, project: Project, dev_server: str) -> AsyncIterator[None]:
    temporal = await TemporalClient.connect(dev_server)
    db = Database(settings.database)
    db.migrate()
    async with build_worker(temporal, project, db, settings.task_queue):
        yield
    db.dispose()


async def test_the_async_client_sees_the_journey_run(url: str, worker: None) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    async with AsyncClient(KEY, base_url=url) as nurture, AsyncClient(READ_KEY, base_url=url) as reader:
        await nurture.identify(user, {"phone": "+8613800138000", "timezone": "UTC"})
        await nurture.track(user, "Order Completed", {"order_id": "o-1", "total": 10})
        messages = await poll(lambda: reader.messages(user, content=True))
        runs = await reader.runs(user)
        outbox = await reader.outbox(limit=1)

    assert [(m["template"], m["status"]) for m in messages] == [("course_access", "sent")]
    assert messages[0]["content"] is not None and "o-1" in messages[0]["content"]["text"]
    assert [(r["journey"], r["key"], r["status"]) for r in runs] == [("post_purchase", "o-1", "active")]
    assert outbox[0]["user_id"] == user and outbox[0]["address"] == "+86*******8000"


async def poll(read: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


# The command line (nurture track / nurture identify) ---------------------------------------------


def test_cli_track_and_identify(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NURTURE_WRITE_KEY", raising=False)
    monkeypatch.setenv("NURTURE_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "write_key").write_text(KEY + "\n")  # as `nurture up` leaves it
    user = f"u-{uuid.uuid4().hex[:10]}"
    runner = CliRunner()

    identified = runner.invoke(
        identify,
        [user, "phone=+8613800138000", "vip=true", "age=31", "zip=01234", "--opt-out", "sms", "--url", url],
    )
    tracked = runner.invoke(
        track,
        [user, "Cart Updated", "--json", '{"cart_id": "c-1", "item_count": 1}', "--prop", "item_count=2"]
        + ["--message-id", f"m-{user}", "--timestamp", "2026-03-02T10:00:00+08:00", "--url", url],
    )

    assert identified.exit_code == 0, identified.output
    assert json.loads(identified.output)["type"] == "identify"
    assert tracked.exit_code == 0, tracked.output
    answer = json.loads(tracked.output)
    assert answer["messageId"] == f"m-{user}" and len(answer["triggered"]) == 1
    with Client(READ_KEY, base_url=url) as reader:
        profile = reader.profile(user)
    assert profile["traits"] == {"phone": "+8613800138000", "vip": True, "age": 31, "zip": "01234"}
    assert profile["opted_out"] == ["sms"]


def test_cli_prints_the_fields_at_fault(url: str) -> None:
    result = CliRunner().invoke(
        track, ["u1", "Signed Up", "--timestamp", "soon", "--url", url, "--write-key", KEY]
    )
    assert result.exit_code == 1
    assert (
        "400 invalid_request" in result.output and "timestamp: timestamp must be an ISO 8601" in result.output
    )


def test_cli_without_a_key_says_where_to_get_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NURTURE_WRITE_KEY", raising=False)
    monkeypatch.setenv("NURTURE_HOME", str(tmp_path))
    result = CliRunner().invoke(track, ["u1", "Signed Up"])
    assert result.exit_code == 2 and "NURTURE_WRITE_KEY" in result.output


def test_cli_values_are_json_when_they_parse() -> None:
    assert [parse_value(v) for v in ["2", "2.5", "true", "null", "[1]", "+8613800138000", "NaN", "Li"]] == [
        2,
        2.5,
        True,
        None,
        [1],
        "+8613800138000",
        "NaN",
        "Li",
    ]
