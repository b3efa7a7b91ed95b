"""The event API in process (httpx on the ASGI app) on SQLite and PostgreSQL, with a real Temporal
dev server and a worker: calls reach journeys, bad calls name the field at fault and change nothing.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import psycopg
import pytest
from conftest import POSTGRES, POSTGRES_BASE, postgres_database
from sqlalchemy.exc import OperationalError
from support import eventually, messages, new_user, rows
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from nurture.language.compiler import Project, load_project
from nurture.service import ingest as ingest_module
from nurture.service.api import create_app
from nurture.service.ingest import workflow_id
from nurture.service.settings import Settings, SettingsError
from nurture.service.worker import build_worker
from nurture.storage.audit import AuditRecord
from nurture.storage.db import Database
from nurture.storage.models import EventRecord, MessageRecord, ProfileRecord, Route, RunRecord

KEY = "test-key-0123456789"
OTHER_KEY = "second-key-abcdef"
READ_KEY = "read-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"
T = TypeVar("T")


@pytest.fixture(scope="session")
async def temporal_client(dev_server: str) -> Client:
    return await Client.connect(dev_server)


@dataclass
class Api:
    http: httpx.AsyncClient
    db: Database
    temporal: Client

    async def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        return await self.http.post(path, json=body, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        """A read, with the read key."""
        return await self.http.get(path, auth=(READ_KEY, ""), **kwargs)


@asynccontextmanager
async def serving(project: Project, db: Database, temporal: Client) -> AsyncIterator[Api]:
    """The app on ``db`` and a worker on its own task queue, so tests never share workers."""
    queue = f"test-api-{uuid.uuid4().hex[:10]}"
    settings = Settings(
        write_keys=(KEY, OTHER_KEY),
        read_keys=(READ_KEY,),
        admin_keys=(ADMIN_KEY,),
        task_queue=queue,
        database=db.url,
    )
    app = create_app(settings, project=project, db=db, client=temporal)
    transport = httpx.ASGITransport(app=app)
    async with (
        build_worker(temporal, project, db, queue),
        httpx.AsyncClient(transport=transport, base_url="http://nurture", auth=(KEY, "")) as http,
    ):
        yield Api(http, db, temporal)


@pytest.fixture
async def api(project: Project, database: Database, temporal_client: Client) -> AsyncIterator[Api]:
    async with serving(project, database, temporal_client) as api:
        yield api


def utc(value: datetime) -> datetime:
    """SQLite hands back naive UTC; PostgreSQL, aware in the session's zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def order(user: str, order_id: str, **properties: Any) -> dict[str, Any]:
    return {
        "userId": user,
        "event": "Order Completed",
        "properties": {"order_id": order_id, "total": 99, **properties},
    }


async def buyer(api: Api) -> str:
    """A user with a phone: post_purchase texts them a transactional SMS at once, at any hour."""
    user = new_user()
    answer = await api.post(
        "/v1/identify", {"userId": user, "traits": {"phone": "+8613800138000", "timezone": "UTC"}}
    )
    assert answer.status_code == 200, answer.text
    return user


async def test_track_runs_the_journey_into_the_outbox(api: Api) -> None:
    user = await buyer(api)

    answer = await api.post("/v1/track", order(user, "o-1", course_name="Python 101"))

    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True and body["duplicate"] is False
    assert body["triggered"] == [workflow_id("post_purchase", user, "o-1")]
    [message] = await eventually(lambda: messages(api.db, user_id=user), what="the SMS")
    assert (message.channel, message.template, message.status, message.provider) == (
        "sms",
        "course_access",
        "sent",
        "outbox",
    )
    assert "o-1" in message.content["text"] and "Python 101" in message.content["text"]


async def test_a_call_after_postgresql_dropped_the_connections_is_a_503_and_its_retry_lands(
    project: Project, migrated_postgres: str | None, temporal_client: Client
) -> None:
    # A server restart closes every connection in the pool; those used moments ago are handed
    # out unchecked, so the next call's first statement fails. Its answer must tell the tracking
    # library to retry (a 503), and the retry must land once.
    assert migrated_postgres is not None, f"this test needs PostgreSQL at {POSTGRES}"
    with postgres_database(template=migrated_postgres) as name:
        # Checked only after a minute idle, so a loaded machine's pause before the call cannot
        # have its connection checked (and replaced) first.
        db = Database(f"{POSTGRES_BASE}/{name}", idle_check=60.0)
        try:
            async with serving(project, db, temporal_client) as api:
                user = await buyer(api)
                with psycopg.connect(POSTGRES, autocommit=True) as admin:
                    dropped = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s", (name,)
                    ).fetchone()
                assert dropped is not None and dropped[0] >= 1
                call = {**order(user, "o-1"), "messageId": f"m-{user}"}

                first = await api.post("/v1/track", call)
                second = await api.post("/v1/track", call)

                assert first.status_code == 503, first.text
                assert first.json()["code"] == "unavailable" and first.headers["Retry-After"] == "5"
                assert second.status_code == 200, second.text
                assert second.json()["triggered"] == [workflow_id("post_purchase", user, "o-1")]
                [message] = await eventually(lambda: messages(db, user_id=user), what="the SMS")
                assert message.status == "sent"
                assert len(rows(db, EventRecord, message_id=f"m-{user}")) == 1
        finally:
            db.dispose()


@pytest.mark.parametrize("failures", [1, 2])
async def test_a_routing_read_that_fails_after_the_event_is_stored_is_read_again_or_retried(
    api: Api, monkeypatch: pytest.MonkeyPatch, failures: int
) -> None:
    # The call's routing reads ride on its identity transaction's trip to a thread. One that fails
    # there is read again by routing; one that fails again is a 503, and the retry routes the
    # event the first attempt stored.
    user = await buyer(api)
    read = ingest_module.Ingest._read_routing
    left = [failures]

    def flaky(self: ingest_module.Ingest, *args: Any, **options: Any) -> Any:
        if left[0]:
            left[0] -= 1
            raise OperationalError("SELECT routes", {}, ConnectionError("server closed the connection"))
        return read(self, *args, **options)

    monkeypatch.setattr(ingest_module.Ingest, "_read_routing", flaky)
    monkeypatch.setattr(ingest_module, "ROUTING_GRACE", 0.2)
    call = {**order(user, "o-1"), "messageId": f"m-{user}"}
    first = await api.post("/v1/track", call)
    if failures == 1:
        assert first.status_code == 200, first.text
        answer = first.json()
    else:
        assert first.status_code == 503, first.text
        [stored] = rows(api.db, EventRecord, message_id=f"m-{user}")
        assert stored.routed_at is None  # kept, unrouted, for the retry
        second = await api.post("/v1/track", call)
        assert second.status_code == 200, second.text
        answer = second.json()
        assert answer["rerouted"] is True
    assert left == [0]
    assert answer["triggered"] == [workflow_id("post_purchase", user, "o-1")]
    [message] = await eventually(lambda: messages(api.db, user_id=user), what="the SMS")
    assert message.status == "sent"
    [stored] = rows(api.db, EventRecord, message_id=f"m-{user}")
    assert stored.routed_at is not None


JOURNEY = """\
journey: vip_check
trigger: {event: Checked In}
steps:
  - branch:
      - if: "user.vip"
        then:
          - {send: sms, template: vip_yes, category: transactional}
      - else:
          - {send: sms, template: vip_no, category: transactional}
"""


@pytest.fixture
def vip_project(tmp_path: Path) -> Project:
    """One journey whose condition reads a trait, so an identify visibly changes its course."""
    (tmp_path / "journeys").mkdir()
    (tmp_path / "journeys" / "vip_check.yaml").write_text(JOURNEY)
    (tmp_path / "templates" / "sms").mkdir(parents=True)
    (tmp_path / "templates" / "sms" / "vip_yes.txt").write_text("Welcome back, VIP {{ user.first_name }}")
    (tmp_path / "templates" / "sms" / "vip_no.txt").write_text("Welcome back, {{ user.first_name }}")
    return load_project(tmp_path / "journeys", tmp_path / "templates")


async def test_identify_updates_the_profile_that_conditions_read(
    vip_project: Project, database: Database, temporal_client: Client
) -> None:
    async with serving(vip_project, database, temporal_client) as api:
        user = new_user()
        traits = {"phone": "+8613800138000", "first_name": "Li", "vip": True}
        assert (await api.post("/v1/identify", {"userId": user, "traits": traits})).status_code == 200

        first = await api.post("/v1/track", {"userId": user, "event": "Checked In"})
        assert first.status_code == 200 and len(first.json()["triggered"]) == 1
        await eventually(
            lambda: rows(api.db, RunRecord, user_id=user, status="ended"), what="first run ended"
        )

        assert (await api.post("/v1/identify", {"userId": user, "traits": {"vip": False}})).status_code == 200
        assert (await api.post("/v1/track", {"userId": user, "event": "Checked In"})).status_code == 200

        def both() -> list[Any]:
            sent = messages(api.db, user_id=user)
            return sent if len(sent) == 2 else []

        sent = sorted(await eventually(both, what="two messages"), key=lambda m: m.id)
    assert [m.template for m in sent] == ["vip_yes", "vip_no"]
    assert sent[0].content["text"] == "Welcome back, VIP Li"
    profile = rows(database, ProfileRecord, user_id=user)[0]
    assert profile.traits == {"phone": "+8613800138000", "first_name": "Li", "vip": False}


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


@pytest.mark.parametrize(
    "authorization",
    [None, basic("wrong-key"), "Bearer wrong-key", basic(KEY[:-1]), "Bearer ", "Basic not-base64!"],
    ids=["missing", "wrong-basic", "wrong-bearer", "prefix-of-key", "empty-bearer", "malformed-basic"],
)
async def test_a_key_is_required(api: Api, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    user = new_user()
    for method, path, body in [
        ("POST", "/v1/track", {"userId": user, "event": "Signed Up"}),
        ("POST", "/v1/identify", {"userId": user, "traits": {"vip": True}}),
        ("GET", f"/v1/users/{user}", None),
        ("GET", "/v1/outbox", None),
    ]:
        answer = await api.http.request(method, path, json=body, headers=headers, auth=None)
        assert answer.status_code == 401, (path, answer.text)
        assert answer.headers["WWW-Authenticate"] == 'Basic realm="nurture"'
        assert answer.json()["error"] == "unauthorized"
    assert rows(api.db, EventRecord, user_id=user) == []


@pytest.mark.parametrize(
    "authorization", [basic(KEY), basic(OTHER_KEY), f"Bearer {KEY}", f"Bearer {OTHER_KEY}"]
)
async def test_either_form_of_either_key_is_accepted(api: Api, authorization: str) -> None:
    user = new_user()
    headers = {"Authorization": authorization}
    answer = await api.http.post(
        "/v1/identify", json={"userId": user, "traits": {"plan": "pro"}}, headers=headers, auth=None
    )
    assert answer.status_code == 200, answer.text
    for reader in (basic(READ_KEY), f"Bearer {READ_KEY}", basic(ADMIN_KEY), f"Bearer {ADMIN_KEY}"):
        profile = await api.http.get(f"/v1/users/{user}", headers={"Authorization": reader}, auth=None)
        assert profile.status_code == 200 and profile.json()["traits"] == {"plan": "pro"}


WRITE, READ, ADMIN = "write", "read", "admin"
ENDPOINTS = [
    # (method, path, body, what it needs)
    ("POST", "/v1/track", {"userId": "{user}", "event": "Browsed"}, WRITE),
    ("POST", "/v1/identify", {"userId": "{user}", "traits": {"vip": True}}, WRITE),
    ("POST", "/v1/batch", {"batch": [{"type": "identify", "userId": "{user}"}]}, WRITE),
    ("GET", "/v1/users/{user}", None, READ),
    ("GET", "/v1/user?id={user}", None, READ),
    ("GET", "/v1/users/{user}/runs", None, READ),
    ("GET", "/v1/user/messages?id={user}", None, READ),
    ("GET", "/v1/outbox", None, READ),
    ("GET", "/v1/journeys", None, READ),
    ("GET", "/v1/journeys/post_purchase/report", None, READ),
    ("GET", "/v1/runs?journey=post_purchase", None, READ),
    ("GET", "/v1/runs/counts?journey=post_purchase", None, READ),
    ("GET", "/v1/users/{user}/export", None, ADMIN),
    ("GET", "/v1/user/export?id={user}", None, ADMIN),
    ("DELETE", "/v1/users/{user}", None, ADMIN),
    ("DELETE", "/v1/user?id={user}", None, ADMIN),
]
MAY = {KEY: {WRITE}, READ_KEY: {READ}, ADMIN_KEY: {READ, ADMIN}}
NEEDED = {
    WRITE: "sending events needs a write key (NURTURE_WRITE_KEYS)",
    READ: "reading people and messages needs a read key (NURTURE_READ_KEYS) or an admin key",
    ADMIN: "exporting and forgetting users needs an admin key (NURTURE_ADMIN_KEYS)",
}


@pytest.mark.parametrize("key", list(MAY), ids=["write-key", "read-key", "admin-key"])
async def test_each_kind_of_key_does_only_what_it_may(api: Api, key: str) -> None:
    user = new_user()
    assert (await api.post("/v1/identify", {"userId": user, "traits": {"vip": False}})).status_code == 200
    for method, path, body, needs in ENDPOINTS:
        answer = await api.http.request(
            method, path.replace("{user}", user), json=fill(body, user), auth=(key, "")
        )
        kind = {KEY: "write", READ_KEY: "read", ADMIN_KEY: "admin"}[key]
        if needs in MAY[key]:
            assert answer.status_code == 200, (method, path, answer.text)
            continue
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json() == {
            "error": "forbidden",
            "code": "forbidden",
            "message": f"{NEEDED[needs]}; the key given is a {kind} key",
        }
    profile = rows(api.db, ProfileRecord, user_id=user)
    if key == ADMIN_KEY:
        assert profile == [], "the admin key forgot the user"
    else:
        assert [p.traits for p in profile] == [{"vip": key == KEY}], "only a write key sends events"
        assert rows(api.db, AuditRecord) == [], "only an admin key exports and forgets"


def big(size: int) -> str:
    return "x" * size


BAD_CALLS: list[tuple[str, str, Any, int, str, str]] = [
    # (id, path, body, status, field, words of the message)
    (
        "no-ids",
        "/v1/track",
        {"event": "Signed Up"},
        400,
        "userId",
        "userId or anonymousId is required",
    ),
    ("no-user", "/v1/identify", {"traits": {"vip": True}}, 400, "userId", "userId or anonymousId is required"),
    ("blank-ids", "/v1/page", {"userId": " ", "anonymousId": " "}, 400, "userId", "userId or anonymousId"),
    ("alias-without-user", "/v1/alias", {"previousId": "a-1", "anonymousId": "a-2"}, 400, "userId", "required"),
    ("group-without-id", "/v1/group", {"userId": "{user}", "traits": {}}, 400, "groupId", "required"),
    ("empty-user", "/v1/track", {"userId": "", "event": "Signed Up"}, 400, "userId", "at least 1 character"),
    ("numeric-user", "/v1/track", {"userId": 42, "event": "Signed Up"}, 400, "userId", "valid string"),
    (
        "no-event",
        "/v1/track",
        {"userId": "{user}", "properties": {}},
        400,
        "event",
        "event is required for track",
    ),
    (
        "bad-timestamp",
        "/v1/track",
        {"userId": "{user}", "event": "Signed Up", "timestamp": "last tuesday"},
        400,
        "timestamp",
        "ISO 8601",
    ),
    (
        "epoch-timestamp",
        "/v1/track",
        {"userId": "{user}", "event": "Signed Up", "timestamp": 1772416800},
        400,
        "timestamp",
        "ISO 8601",
    ),
    (
        "timestamp-before-year-1",
        "/v1/track",
        {"userId": "{user}", "event": "Signed Up", "timestamp": "0001-01-01T00:00:00+01:00"},
        400,
        "timestamp",
        "between 0001-01-02T00:00:00Z and 9999-12-30T23:59:59Z",
    ),
    (
        "timestamp-after-year-9999",
        "/v1/identify",
        {"userId": "{user}", "traits": {"vip": True}, "timestamp": "9999-12-31T23:59:59-01:00"},
        400,
        "timestamp",
        "between 0001-01-02T00:00:00Z and 9999-12-30T23:59:59Z",
    ),
    (
        "page-timestamp-out-of-range",
        "/v1/page",
        {"userId": "{user}", "name": "Home", "timestamp": "9999-12-31T23:59:59-01:00"},
        400,
        "timestamp",
        "between 0001-01-02T00:00:00Z and 9999-12-30T23:59:59Z",
    ),
    (
        "screen-user-id-too-long",
        "/v1/screen",
        {"userId": "u" * 256, "name": "Home"},
        400,
        "userId",
        "at most 255 characters",
    ),
    (
        "sent-at-correction-out-of-range",
        "/v1/track",
        {"userId": "{user}", "event": "A", "timestamp": "9999-12-30T00:00:00Z", "sentAt": "2000-01-01T00:00:00Z"},
        400,
        "body",
        "corrected by sentAt",
    ),
    (
        "properties-list",
        "/v1/track",
        {"userId": "{user}", "event": "Signed Up", "properties": [1, 2]},
        400,
        "properties",
        "must be a JSON object",
    ),
    (
        "traits-string",
        "/v1/identify",
        {"userId": "{user}", "traits": "vip"},
        400,
        "traits",
        "must be a JSON object",
    ),
    (
        "unknown-opt-out",
        "/v1/identify",
        {"userId": "{user}", "traits": {"opted_out": ["sms", "fax"]}},
        400,
        "traits.opted_out[1]",
        "'fax'",
    ),
    (
        "unknown-unsubscribe",
        "/v1/identify",
        {"userId": "{user}", "traits": {"vip": True, "unsubscribe": ["emial"]}},
        400,
        "traits.unsubscribe[0]",
        "did you mean 'email'?",
    ),
    ("batch-not-list", "/v1/batch", {"batch": {"type": "track"}}, 400, "batch", "valid list"),
    ("not-an-object", "/v1/track", ["{user}", "Signed Up"], 400, "body", "JSON object"),
    (
        "oversize-call",
        "/v1/track",
        {"userId": "{user}", "event": "Signed Up", "properties": {"blob": big(33 * 1024)}},
        413,
        "body",
        "at most 32768 bytes",
    ),
    (
        "oversize-batch",
        "/v1/batch",
        {
            "batch": [{"type": "track", "userId": "{user}", "event": "A", "properties": {"b": big(20_000)}}]
            * 26
        },
        413,
        "body",
        "at most 512000 bytes",
    ),
]


BAD_ITEMS = [
    # (id, a batch, the field of its refused item, words of the message); the other items are valid
    (
        "timestamp-out-of-range-in-batch",
                {
            "batch": [
                {"type": "identify", "userId": "{user}", "traits": {"vip": True}},
                {"type": "track", "userId": "{user}", "event": "Signed Up"},
                {"type": "identify", "userId": "{user}", "traits": {"vip": False}},
                {"type": "track", "userId": "{user}", "event": "A", "timestamp": "9999-12-31T23:59:59-01:00"},
            ]
        },
        "batch[3].timestamp",
        "9999-12-31T23:59:59-01:00",
    ),
    (
        "unknown-subscribe-in-batch",
                {
            "batch": [
                {"type": "identify", "userId": "{user}", "traits": {"unsubscribe": ["sms"]}},
                {"type": "identify", "userId": "{user}", "traits": {"subscribe": ["sms", "fax"]}},
            ]
        },
        "batch[1].traits.subscribe[1]",
        "'fax' is not a channel or a topic",
    ),
    (
        "unknown-batch-type",
                {
            "batch": [
                {"type": "track", "userId": "{user}", "event": "Signed Up"},
                {"type": "merge", "userId": "{user}", "groupId": "g-1"},
            ]
        },
        "batch[1].type",
        "'merge' is not supported",
    ),
    (
        "batch-item-without-event",
                {"batch": [{"type": "identify", "userId": "{user}"}, {"type": "track", "userId": "{user}"}]},
        "batch[1].event",
        "event is required for track",
    ),
    (
        "batch-item-bad-property",
                {"batch": [{"type": "track", "userId": "{user}", "event": "A", "properties": "x"}]},
        "batch[0].properties",
        "must be a JSON object",
    ),
    (
        "batch-sent-at-correction-out-of-range",
        {
            "sentAt": "2000-01-01T00:00:00Z",
            "batch": [
                {"type": "track", "userId": "{user}", "event": "A"},
                {"type": "page", "userId": "{user}", "name": "Home", "timestamp": "9999-12-30T00:00:00Z"},
            ],
        },
        "batch[1].timestamp",
        "corrected by sentAt",
    ),
    (
        "oversize-batch-item",
                {"batch": [{"type": "track", "userId": "{user}", "event": "A", "properties": {"b": big(40_000)}}]},
        "batch[0]",
        "at most 32768 bytes",
    ),
]


@pytest.mark.parametrize(("body", "field", "words"), [c[1:] for c in BAD_ITEMS], ids=[c[0] for c in BAD_ITEMS])
async def test_a_bad_batch_item_is_refused_alone(api: Api, body: Any, field: str, words: str) -> None:
    user = new_user()
    batch = fill(body, user)["batch"]

    answer = await api.post("/v1/batch", fill(body, user))

    assert answer.status_code == 200, answer.text
    [refused] = answer.json()["refused"]
    fields = {d["field"]: d["message"] for d in refused["detail"]}
    assert field in fields and words in fields[field], fields
    assert refused["index"] == int(field[len("batch[") :].split("]")[0])
    assert answer.json()["success"] is False and len(answer.json()["results"]) == len(batch) - 1
    applied = [item for index, item in enumerate(batch) if index != refused["index"]]
    tracked = [item["event"] if item["type"] == "track" else "Page Viewed" for item in applied if item["type"] != "identify"]
    assert sorted(e.name for e in rows(api.db, EventRecord, user_id=user, kind="track")) == sorted(tracked)


def fill(value: Any, user: str) -> Any:
    if isinstance(value, str):
        return value.replace("{user}", user)
    if isinstance(value, list):
        return [fill(v, user) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, user) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("path", "body", "status", "field", "words"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
async def test_a_bad_call_names_the_field_and_changes_nothing(
    api: Api, path: str, body: Any, status: int, field: str, words: str
) -> None:
    user = new_user()

    answer = await api.post(path, fill(body, user))

    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["error"] == ("payload_too_large" if status == 413 else "invalid_request")
    fields = {d["field"]: d["message"] for d in error["detail"]}
    assert field in fields, fields
    assert words in fields[field]
    for model in (EventRecord, ProfileRecord, RunRecord, Route, MessageRecord):
        assert rows(api.db, model) == [], f"{model.__tablename__} changed"


async def test_invalid_json_is_a_400_on_the_body(api: Api) -> None:
    answer = await api.http.post(
        "/v1/track", content=b'{"userId": "u", "event": ', headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.json()["detail"][0]["field"] == "body"
    assert "not valid JSON" in answer.json()["detail"][0]["message"]


HOSTILE_VALUES = [
    # (id, a JSON value as sent, words of the message)
    ("deeply-nested", "[" * 2000 + "]" * 2000, "JSON nested deeper than 64 levels"),
    ("nested-past-the-limit", "[" * 64 + "]" * 64, "JSON nested deeper than 64 levels"),
    ("huge-integer", "9" * 5000, "integer out of range"),
    ("integer-past-64-bits", str(2**63), "integer out of range"),
    ("infinite-number", "1e400", "number out of range"),
    ("nan", "NaN", "NaN and Infinity are not JSON"),
    ("nul-character", '"a\\u0000b"', "U+0000"),
    ("unpaired-surrogate", '"\\ud800"', "unpaired surrogate"),
]


def hostile_body(path: str, user: str, value: str) -> str:
    """A call to ``path`` carrying ``value`` (raw JSON text) as a property or trait."""
    where = "traits" if path == "/v1/identify" else "properties"
    call = f'"userId": {json.dumps(user)}, "event": "A", "{where}": {{"x": {value}}}'
    return f'{{"batch": [{{"type": "track", {call}}}]}}' if path == "/v1/batch" else f"{{{call}}}"


@pytest.mark.parametrize("path", ["/v1/track", "/v1/identify", "/v1/page", "/v1/batch"])
@pytest.mark.parametrize(
    ("value", "words"), [v[1:] for v in HOSTILE_VALUES], ids=[v[0] for v in HOSTILE_VALUES]
)
async def test_json_no_store_can_keep_is_a_400_on_the_body(
    api: Api, path: str, value: str, words: str
) -> None:
    user = new_user()

    answer = await api.http.post(
        path, content=hostile_body(path, user, value), headers={"Content-Type": "application/json"}
    )

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    [detail] = answer.json()["detail"]
    assert detail["field"] == "body" and words in detail["message"], detail
    for model in (EventRecord, ProfileRecord, RunRecord, Route, MessageRecord):
        assert rows(api.db, model) == [], f"{model.__tablename__} changed"


async def test_json_within_the_limits_is_accepted(api: Api) -> None:
    user = new_user()
    nested = "[" * 61 + "]" * 61  # with the body, properties and the list around it: 64 levels
    body = hostile_body("/v1/track", user, f'[{nested}, {2**63 - 1}, {-(2**63)}, 1e308, "\\ud83d\\ude00"]')

    answer = await api.http.post("/v1/track", content=body, headers={"Content-Type": "application/json"})

    assert answer.status_code == 200, answer.text
    [event] = rows(api.db, EventRecord, user_id=user)
    assert event.properties["x"][1:] == [2**63 - 1, -(2**63), 1e308, "😀"]


async def test_a_body_that_is_not_utf8_is_a_400(api: Api) -> None:
    answer = await api.http.post(
        "/v1/track", content=b'{"userId": "\xff", "event": "A"}', headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
    assert "UTF-8" in answer.json()["detail"][0]["message"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/track", "POST"),
        ("PUT", "/v1/users/u-1", "DELETE, GET"),
        ("POST", "/v1/users/u-1", "DELETE, GET"),
        ("PATCH", "/v1/outbox", "GET"),
        ("DELETE", "/v1/users/u-1/export", "GET"),
        ("POST", "/v1/user", "DELETE, GET"),
    ],
)
async def test_a_wrong_method_is_a_405_naming_every_allowed_one(
    api: Api, method: str, path: str, allowed: str
) -> None:
    answer = await api.http.request(method, path)
    assert answer.status_code == 405, answer.text
    assert answer.headers["Allow"] == allowed
    assert (
        answer.json()["error"] == "method_not_allowed" and allowed.split(",")[0] in answer.json()["message"]
    )


async def test_a_batch_with_one_bad_item_applies_the_others(api: Api) -> None:
    user = await buyer(api)
    calls = [
        {"type": "track", **order(user, "o-9")},
        {"type": "track", "userId": user, "event": "Cart Updated", "properties": {"item_count": "two"}},
        {"type": "alias", "userId": user},
    ]

    answer = await api.post("/v1/batch", {"batch": calls})

    assert answer.status_code == 200, answer.text
    [refused] = answer.json()["refused"]
    assert refused["index"] == 2 and [d["field"] for d in refused["detail"]] == ["batch[2].previousId"]
    assert "previousId is required" in refused["detail"][0]["message"]
    assert [r["type"] for r in answer.json()["results"]] == ["track", "track"]
    assert {e.name for e in rows(api.db, EventRecord, kind="track", user_id=user)} == {
        "Order Completed",
        "Cart Updated",
    }
    await api.temporal.get_workflow_handle(workflow_id("post_purchase", user, "o-9")).describe()


async def test_a_repeated_message_id_changes_nothing(api: Api) -> None:
    user = await buyer(api)
    call = {**order(user, "o-2"), "messageId": f"m-{user}", "timestamp": "2026-03-02T10:00:00+08:00"}

    first = await api.post("/v1/track", call)
    await eventually(lambda: messages(api.db, user_id=user), what="the SMS")
    again = await api.post("/v1/track", {**call, "properties": {"order_id": "o-3", "total": 5}})

    assert first.json()["duplicate"] is False and first.json()["messageId"] == f"m-{user}"
    assert again.status_code == 200
    assert again.json() == {
        "success": True,
        "type": "track",
        "messageId": f"m-{user}",
        "person": None,
        "duplicate": True,
        "rerouted": False,
        "triggered": [],
        "signalled": [],
        "skipped": [],
        "skip_reasons": {},
    }
    await asyncio.sleep(1.0)  # long enough for a second run to have sent its SMS
    assert len(messages(api.db, user_id=user)) == 1
    assert len(rows(api.db, RunRecord, user_id=user)) == 1
    [event] = rows(api.db, EventRecord, kind="track", user_id=user)
    assert event.properties["order_id"] == "o-2"
    assert utc(event.timestamp) == datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


async def test_calls_without_message_id_get_fresh_ones(api: Api) -> None:
    user = new_user()
    answers = [await api.post("/v1/identify", {"userId": user, "traits": {"n": n}}) for n in (1, 2)]
    ids = [a.json()["messageId"] for a in answers]
    assert ids[0] != ids[1] and all(uuid.UUID(i) for i in ids)
    assert [a.json()["duplicate"] for a in answers] == [False, False]


async def test_a_batched_order_ends_the_cart_run_with_its_goal(api: Api) -> None:
    user = new_user()
    traits = {"email": "li@example.com", "phone": "+8613800138000", "timezone": "UTC"}
    cart = workflow_id("cart_abandonment", user, "c-1")
    calls = [
        {"type": "identify", "userId": user, "traits": traits},
        {
            "type": "track",
            "userId": user,
            "event": "Cart Updated",
            "properties": {"cart_id": "c-1", "item_count": 2},
        },
        {"type": "track", **order(user, "o-4", cart_id="c-1")},
    ]

    answer = await api.post("/v1/batch", {"batch": calls})

    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert [r["type"] for r in results] == ["identify", "track", "track"]
    assert results[1]["triggered"] == [cart]
    assert results[2]["signalled"] == [cart], "the order reaches the cart run started one item before"
    assert results[2]["triggered"] == [workflow_id("post_purchase", user, "o-4")]

    def cart_run() -> RunRecord | None:
        runs = rows(api.db, RunRecord, user_id=user, journey="cart_abandonment", status="ended")
        return runs[0] if runs else None

    run = await eventually(cart_run, what="the cart run's end")
    assert run.end_reason == "goal" and run.converted_at is not None
    await eventually(lambda: messages(api.db, user_id=user), what="the order SMS")
    assert [m.template for m in messages(api.db, user_id=user)] == ["course_access"]


async def test_read_endpoints(api: Api, project: Project) -> None:
    user = new_user()
    identify = {
        "userId": user,
        "traits": {
            "phone": "+8613800138000",
            "first_name": "Li",
            "timezone": "UTC",
            "opted_out": ["sms", "sms"],
        },
    }
    assert (await api.post("/v1/identify", identify)).status_code == 200
    assert (await api.post("/v1/track", order(user, "o-5"))).status_code == 200
    await eventually(lambda: messages(api.db, user_id=user), what="the SMS")

    profile = (await api.get(f"/v1/users/{user}")).json()
    assert profile["traits"] == {
        "phone": "+8613800138000",
        "first_name": "Li",
        "timezone": "UTC",
        "last_order_id": "o-5",  # post_purchase's update step
    }
    assert profile["opted_out"] == ["sms"]
    assert profile["created_at"].endswith("Z") and profile["updated_at"] >= profile["created_at"]

    [run] = (await api.get(f"/v1/users/{user}/runs")).json()
    assert (run["journey"], run["key"], run["status"], run["end_reason"]) == (
        "post_purchase",
        "o-5",
        "active",
        None,
    )
    assert run["version"] == project.journeys["post_purchase"].version

    [message] = (await api.get(f"/v1/users/{user}/messages")).json()
    assert message["template"] == "course_access" and message["status"] == "sent", (
        "transactional ignores opt-outs"
    )
    assert message["content"] is None and message["preview"].startswith("Nurture Academy")
    [full] = (await api.get(f"/v1/users/{user}/messages", params={"content": "true"})).json()
    assert "o-5" in full["content"]["text"]

    outbox = (await api.get("/v1/outbox", params={"limit": 1})).json()
    assert len(outbox) == 1
    assert (outbox[0]["user_id"], outbox[0]["address"], outbox[0]["provider"]) == (
        user,
        "+86*******8000",
        "outbox",
    ), "addresses masked, as nurture outbox shows them"
    assert "o-5" in outbox[0]["content"]["text"]

    missing = await api.get(f"/v1/users/{new_user()}")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert (await api.get(f"/v1/users/{new_user()}/runs")).json() == []


AWKWARD_IDS = {
    "newline": "line\nbreak",
    "trailing-newline": "u-1\n",
    "slash": "a/b",
    "ends-in-export": "X/export",
    "ends-in-runs": "X/runs",
    "ends-in-messages": "X/messages",
    "encoded-slash": "%2F",
    "spaces": " two  spaces ",
    "query-and-fragment": "a?b=c#d",
    "dots": "..",
    "emoji": "😀 ünïcödé 名字",
    "longest": "😀" * 255,
}


async def reads(api: Api, query: dict[str, str], form: str) -> dict[str, httpx.Response]:
    """Every per-user route for one user, by ``form``: ``/v1/users/ID...`` or ``/v1/user...?id=ID``."""
    answers = {}
    for name, method, suffix in [
        ("profile", "GET", ""),
        ("runs", "GET", "/runs"),
        ("messages", "GET", "/messages"),
        ("export", "GET", "/export"),
        ("forget", "DELETE", ""),
    ]:
        path = f"/v1/user{suffix}" if form == "query" else f"/v1/users/{quote(query['id'], safe='')}{suffix}"
        params = query if form == "query" else None
        answers[name] = await api.http.request(method, path, params=params, auth=(ADMIN_KEY, ""))
    return answers


@pytest.mark.parametrize("user", list(AWKWARD_IDS.values()), ids=list(AWKWARD_IDS))
async def test_every_user_id_reaches_every_per_user_route(api: Api, user: str) -> None:
    bystander = user.split("/")[0] or "bystander"  # what the id's first segment would name
    for who in (user, bystander):
        answer = await api.post("/v1/identify", {"userId": who, "traits": {"name": who}})
        assert answer.status_code == 200, answer.text
    forms = ["query"] if "/" in user or user == ".." else ["query", "path"]
    for form in forms:
        answers = await reads(api, {"id": user}, form)
        assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(answers, 200), form
        assert answers["profile"].json()["user_id"] == user and answers["profile"].json()["traits"] == {
            "name": user
        }
        assert answers["runs"].json() == [] and answers["messages"].json() == []
        assert answers["export"].json()["user_id"] == user
        assert answers["forget"].json()["deleted"]["profiles"] == 1
        assert rows(api.db, ProfileRecord, user_id=user) == []
        assert (await reads(api, {"id": user}, form))["profile"].status_code == 404
        assert (await api.post("/v1/identify", {"userId": user, "traits": {"name": user}})).status_code == 200
    assert rows(api.db, ProfileRecord, user_id=bystander), "nobody else was forgotten"


@pytest.mark.parametrize("user", ["a/b", "X/export", "X/runs", "X/messages"])
async def test_an_id_with_a_slash_in_the_path_is_a_400_naming_the_query_form(api: Api, user: str) -> None:
    assert (await api.post("/v1/identify", {"userId": "X", "traits": {"vip": True}})).status_code == 200
    for name, answer in (await reads(api, {"id": user}, "path")).items():
        assert answer.status_code == 400, (name, answer.text)
        [detail] = answer.json()["detail"]
        assert detail["field"] == "user_id" and "/v1/user?id=" in detail["message"]
    assert rows(api.db, ProfileRecord, user_id="X") and rows(api.db, AuditRecord) == []


async def test_an_id_the_api_would_not_accept_is_a_400_on_every_route(api: Api) -> None:
    for user in ("x" * 256, "x" * 1000, "a\x00b"):
        track = await api.post("/v1/track", {"userId": user, "event": "A"})
        assert track.status_code == 400, track.text
        for form, field in (("query", "id"), ("path", "user_id")):
            for name, answer in (await reads(api, {"id": user}, form)).items():
                assert answer.status_code == 400, (form, name, answer.text)
                assert answer.json()["detail"][0]["field"] == field
    empty = await reads(api, {"id": ""}, "query")
    assert {a.status_code for a in empty.values()} == {400}
    assert rows(api.db, AuditRecord) == []


async def test_outbox_lists_newest_first(api: Api) -> None:
    user = await buyer(api)
    for n in (1, 2, 3):
        assert (await api.post("/v1/track", order(user, f"o-n{n}"))).status_code == 200

    def three() -> list[Any]:
        sent = messages(api.db, user_id=user)
        return sent if len(sent) == 3 else []

    await eventually(three, what="three messages")
    outbox = (await api.get("/v1/outbox", params={"limit": 2})).json()
    assert len(outbox) == 2
    assert outbox[0]["created_at"] >= outbox[1]["created_at"]
    newest = max(messages(api.db, user_id=user), key=lambda m: (m.created_at, m.id))
    assert outbox[0]["id"] == newest.id
    bad = await api.get("/v1/outbox", params={"limit": 0})
    assert bad.status_code == 400 and bad.json()["detail"][0]["field"] == "limit"


async def test_journeys_and_their_reports(api: Api, project: Project) -> None:
    user = await buyer(api)
    assert (await api.post("/v1/track", order(user, "o-report"))).status_code == 200
    await eventually(lambda: rows(api.db, RunRecord, user_id=user, journey="post_purchase"))

    listed = await api.get("/v1/journeys")
    assert listed.status_code == 200, listed.text
    journeys = {journey["id"]: journey for journey in listed.json()}
    assert set(journeys) == set(project.journeys)
    post = journeys["post_purchase"]
    assert post["name"] == project.journeys["post_purchase"].name
    assert post["version"] == project.journeys["post_purchase"].version
    assert post["counts"]["entered_today"] == post["counts"]["entered_7d"] == 1

    answer = await api.get("/v1/journeys/post_purchase/report", params={"since": "2000-01-01"})
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["schema"] == "nurture.report/v1" and report["journey"] == "post_purchase"
    assert report["since"] == "2000-01-01T00:00:00Z"
    assert report["totals"]["entered"] == 1
    assert report["steps"][0]["id"] == project.journeys["post_purchase"].steps[0].id
    future = await api.get("/v1/journeys/post_purchase/report", params={"since": "2999-01-01"})
    assert future.json()["totals"] == {"entered": 0, "active": 0, "ended": {}}

    missing = await api.get("/v1/journeys/post_purchas/report")
    assert missing.status_code == 404 and "did you mean 'post_purchase'" in missing.json()["message"]
    bad = await api.get("/v1/journeys/post_purchase/report", params={"until": "tomorrow"})
    assert bad.status_code == 400
    assert bad.json()["detail"] == [
        {"field": "until", "message": "'tomorrow' is not a date (2026-03-31) or a date-time (2026-03-31T12:00:00Z)"}
    ]


async def test_health_needs_no_key(api: Api) -> None:
    answer = await api.http.get("/healthz", auth=None)
    assert answer.status_code == 200
    assert answer.json() == {
        "ok": True,
        "database": {"ok": True, "error": None},
        "temporal": {"ok": True, "error": None},
    }


async def test_health_reports_an_unreachable_temporal(project: Project, database: Database) -> None:
    settings = Settings(write_keys=(KEY,), database=database.url, temporal_address="127.0.0.1:9")
    app = create_app(settings, project=project, db=database)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nurture") as http:
        health = await http.get("/healthz")
        track = await http.post(
            "/v1/track", json={"userId": "u", "event": "Signed Up", "messageId": "m-503"}, auth=(KEY, "")
        )
    assert health.status_code == 503
    assert health.json()["database"]["ok"] is True and health.json()["temporal"]["ok"] is False
    assert track.status_code == 503 and "same messageId" in track.json()["message"]
    assert rows(database, EventRecord) == [], "a call that was not routed is not remembered"


def test_the_api_refuses_to_start_without_write_keys(project: Project, database: Database) -> None:
    with pytest.raises(SettingsError, match="NURTURE_WRITE_KEYS"):
        create_app(Settings(database=database.url), project=project, db=database)


async def test_openapi_documents_the_api(api: Api) -> None:
    doc = (await api.http.get("/openapi.json", auth=None)).json()

    assert doc["info"]["title"] == "Nurture event API" and doc["info"]["version"]
    assert "messageId" in doc["info"]["description"]
    assert {
        "/v1/track",
        "/v1/identify",
        "/v1/batch",
        "/v1/users/{user_id}",
        "/v1/users/{user_id}/runs",
        "/v1/users/{user_id}/messages",
        "/v1/outbox",
        "/v1/journeys",
        "/v1/journeys/{journey_id}/report",
        "/healthz",
    } <= set(doc["paths"])
    track = doc["paths"]["/v1/track"]["post"]
    assert {"400", "401", "413", "200"} <= set(track["responses"]) and "422" not in track["responses"]
    schemes = doc["components"]["securitySchemes"]
    assert set(schemes) == {"WriteKey", "ReadKey", "AdminKey", "BearerKey"}
    for name, variable in [
        ("WriteKey", "NURTURE_WRITE_KEYS"),
        ("ReadKey", "NURTURE_READ_KEYS"),
        ("AdminKey", "NURTURE_ADMIN_KEYS"),
    ]:
        assert schemes[name]["scheme"] == "basic" and variable in schemes[name]["description"]
    assert {"403", "401"} <= set(doc["paths"]["/v1/outbox"]["get"]["responses"])
    security = {
        (path, method): sorted(name for requirement in operation["security"] for name in requirement)
        for path, operations in doc["paths"].items()
        if path.startswith("/v1/")
        for method, operation in operations.items()
    }
    assert security[("/v1/track", "post")] == ["BearerKey", "WriteKey"]
    assert security[("/v1/outbox", "get")] == ["AdminKey", "BearerKey", "ReadKey"]
    assert security[("/v1/journeys/{journey_id}/report", "get")] == ["AdminKey", "BearerKey", "ReadKey"]
    report = doc["paths"]["/v1/journeys/{journey_id}/report"]["get"]["responses"]
    assert {"200", "400", "401", "403", "404"} <= set(report)
    assert report["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JourneyReport"}
    assert "schema" in doc["components"]["schemas"]["JourneyReport"]["properties"]
    assert security[("/v1/user", "get")] == ["AdminKey", "BearerKey", "ReadKey"]
    assert security[("/v1/user/export", "get")] == ["AdminKey", "BearerKey"]
    assert security[("/v1/users/{user_id}", "delete")] == ["AdminKey", "BearerKey"]
    assert {"/v1/user", "/v1/user/runs", "/v1/user/messages", "/v1/user/export"} <= set(doc["paths"])
    assert "NURTURE_ADMIN_KEYS" in doc["info"]["description"]
    assert (await api.http.get("/docs", auth=None)).status_code == 200


class RefusingTemporal:
    """Stands in for a Temporal client whose server refuses every call."""

    async def start_workflow(self, *args: Any, **kwargs: Any) -> None:
        raise RPCError("frontend unavailable", RPCStatusCode.UNAVAILABLE, b"")


async def test_a_call_temporal_refused_is_routed_when_retried(api: Api, project: Project) -> None:
    settings = Settings(write_keys=(KEY,), database=api.db.url)
    refusing = create_app(settings, project=project, db=api.db, client=RefusingTemporal())  # type: ignore[arg-type]
    user = new_user()
    call = {"userId": user, "event": "Signed Up", "messageId": f"m-{user}"}
    transport = httpx.ASGITransport(app=refusing)
    async with httpx.AsyncClient(transport=transport, base_url="http://nurture", auth=(KEY, "")) as http:
        refused = await http.post("/v1/track", json=call)

    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert "same messageId" in refused.json()["message"]
    [kept] = rows(api.db, EventRecord, user_id=user)
    assert kept.routed_at is None, "stored, and known not to be routed"
    retried = await api.post("/v1/track", call)
    assert retried.status_code == 200 and retried.json()["duplicate"] is False
    assert retried.json()["rerouted"] is True
    assert retried.json()["triggered"] == [workflow_id("welcome_series", user, "")]


async def test_logs_never_show_addresses(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    user = f"li.{uuid.uuid4().hex[:6]}@example.com"
    traits = {"email": user, "phone": "+8613800138000"}
    with caplog.at_level(logging.INFO, logger="nurture.api"):
        assert (await api.post("/v1/identify", {"userId": user, "traits": traits})).status_code == 200
        assert (
            await api.post("/v1/track", {"userId": "+8613800138000", "event": "Browsed"})
        ).status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "nurture.api"]
    assert len(lines) == 2, lines
    assert 'call="identify" user="l***@example.com"' in lines[0] and '"email", "phone"' in lines[0]
    assert 'user="+86*******8000" event="Browsed"' in lines[1] and "triggered=0" in lines[1]
    assert not any(user in line or "+8613800138000" in line for line in lines)


def compressed(body: Any, encoding: str) -> bytes:
    raw = json.dumps(body).encode()
    return gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_is_read(api: Api, encoding: str) -> None:
    user = new_user()
    body = {"batch": [{"type": "track", "userId": user, "event": "Signed Up", "messageId": f"m-{user}"}]}

    answer = await api.http.post(
        "/v1/batch",
        content=compressed(body, encoding),
        headers={"Content-Type": "application/json", "Content-Encoding": encoding},
    )

    assert answer.status_code == 200, answer.text
    [event] = rows(api.db, EventRecord, user_id=user)
    assert event.name == "Signed Up" and event.message_id == f"m-{user}"


@pytest.mark.parametrize(
    ("encoding", "content", "status", "words"),
    [
        # 1 MB of zeros gzips to about 1 KB: the decompressed size is what is held to the limit.
        ("gzip", gzip.compress(b'{"batch": [' + b" " * 1024 * 1024 + b"]}"), 413, "decompressed"),
        ("gzip", b"not gzip at all", 400, "not valid gzip"),
        ("gzip", gzip.compress(b'{"batch": []}')[:-12], 400, "truncated"),
        ("br", b"{}", 415, "'br' is not supported"),
    ],
    ids=["decompression-bomb", "not-gzip", "truncated", "brotli"],
)
async def test_a_bad_compressed_body_is_refused_and_changes_nothing(
    api: Api, encoding: str, content: bytes, status: int, words: str
) -> None:
    answer = await api.http.post(
        "/v1/batch", content=content, headers={"Content-Type": "application/json", "Content-Encoding": encoding}
    )

    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == answer.json()["error"]
    assert words in answer.json()["detail"][0]["message"]
    assert rows(api.db, EventRecord) == []


async def test_the_write_key_may_be_in_the_body(api: Api) -> None:
    user = new_user()
    body = {"writeKey": KEY, "batch": [{"type": "track", "userId": user, "event": "Signed Up"}]}

    answer = await api.http.post("/v1/batch", json=body, auth=None)
    wrong = await api.http.post("/v1/batch", json={**body, "writeKey": READ_KEY}, auth=None)

    assert answer.status_code == 200, answer.text
    assert wrong.status_code == 403 and wrong.json()["code"] == "forbidden"
    assert len(rows(api.db, EventRecord, user_id=user)) == 1


@pytest.mark.parametrize(("path", "event"), [("/v1/page", "Page Viewed"), ("/v1/screen", "Screen Viewed")])
async def test_page_and_screen_calls_are_track_events(api: Api, path: str, event: str) -> None:
    user = new_user()
    call = {
        "userId": user,
        "name": "Pricing",
        "category": "Docs",
        "properties": {"url": "https://example.com/pricing", "name": "overridden"},
    }

    answer = await api.post(path, call)
    batched = await api.post("/v1/import", {"batch": [{**call, "type": path.rsplit("/", 1)[1]}]})

    assert answer.status_code == 200 and batched.status_code == 200, (answer.text, batched.text)
    assert answer.json()["type"] == path.rsplit("/", 1)[1]
    stored = rows(api.db, EventRecord, user_id=user)
    assert [e.name for e in stored] == [event, event]
    assert stored[0].properties == {"url": "https://example.com/pricing", "name": "Pricing", "category": "Docs"}


async def test_sent_at_corrects_the_clients_clock(api: Api) -> None:
    user = new_user()
    # The client's clock is an hour fast: its timestamps are an hour late too.
    sent_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    happened = sent_at - timedelta(minutes=5)
    body = {
        "sentAt": sent_at.isoformat(),
        "batch": [{"type": "track", "userId": user, "event": "Signed Up", "timestamp": happened.isoformat()}],
    }

    answer = await api.post("/v1/batch", body)
    single = await api.post(
        "/v1/track",
        {"userId": user, "event": "Logged In", "timestamp": happened.isoformat(), "sentAt": sent_at.isoformat()},
    )

    assert answer.status_code == 200 and single.status_code == 200, (answer.text, single.text)
    for event in rows(api.db, EventRecord, user_id=user):
        assert abs(utc(event.timestamp) - (happened - timedelta(hours=1))) < timedelta(seconds=30), event.name


async def test_identify_takes_traits_timezone_and_locale_from_the_context(api: Api) -> None:
    user = new_user()
    call = {
        "userId": user,
        "traits": {"first_name": "Li"},
        "context": {
            "traits": {"email": "li@example.com", "first_name": "ignored"},
            "timezone": "Asia/Shanghai",
            "locale": "zh-CN",
            "library": {"name": "analytics-python"},
        },
    }

    answer = await api.post("/v1/identify", call)
    bad = await api.post("/v1/identify", {"userId": user, "context": {"traits": {"opted_out": ["fax"]}}})

    assert answer.status_code == 200, answer.text
    assert bad.status_code == 400 and bad.json()["detail"][0]["field"] == "traits.opted_out[0]"
    [profile] = rows(api.db, ProfileRecord, user_id=user)
    assert profile.traits == {
        "first_name": "Li",
        "email": "li@example.com",
        "timezone": "Asia/Shanghai",
        "locale": "zh-CN",
    }


async def test_a_query_parameter_given_twice_is_refused_and_named(api: Api) -> None:
    """Every parameter takes one value: keeping the last of two would answer another question."""
    answer = await api.get("/v1/runs?journey=post_purchase&journey=welcome_series&limit=5")
    assert answer.status_code == 400
    assert [d["field"] for d in answer.json()["detail"]] == ["journey"]
    assert (await api.get("/v1/runs?journey=post_purchase&limit=5")).status_code == 200
    doc = (await api.http.get("/openapi.json", auth=None)).json()
    assert "400" in doc["paths"]["/v1/runs"]["get"]["responses"]
