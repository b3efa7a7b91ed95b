"""Opt-outs through identify: channels and the project's topics in one set, replaced with
``opted_out`` or changed in place with ``subscribe`` / ``unsubscribe``; unknown names answer 400.

The app runs in process on SQLite and PostgreSQL without Temporal: identify only needs the
database, and a project declaring the topics ``promotions`` and ``newsletter``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from support import rows

from nurture.language.compiler import Project
from nurture.service.api import create_app
from nurture.service.settings import Settings
from nurture.storage.db import Database
from nurture.storage.models import EventRecord, ProfileRecord
from nurture.storage.stores import DbProfiles

KEY = "subscriptions-key-0123456789"
READ_KEY = "subscriptions-read-key-0123"
TOPICS = ("promotions", "newsletter")


@dataclass
class Api:
    http: httpx.AsyncClient
    db: Database

    async def identify(self, user: str, traits: dict[str, Any], **call: Any) -> httpx.Response:
        return await self.http.post("/v1/identify", json={"userId": user, "traits": traits, **call})

    def opted_out(self, user: str) -> list[str]:
        [row] = rows(self.db, ProfileRecord, user_id=user)
        return list(row.opted_out)


@pytest.fixture
async def api(project: Project, database: Database) -> AsyncIterator[Api]:
    topical = replace(project, settings=replace(project.settings, topics=TOPICS))
    settings = Settings(write_keys=(KEY,), read_keys=(READ_KEY,), database=database.url)
    app = create_app(settings, project=topical, db=database)
    # No Temporal client, and ASGITransport runs no lifespan: identify never needs Temporal.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://nurture", auth=(KEY, "")) as http:
        yield Api(http, database)


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def fields(answer: httpx.Response) -> dict[str, str]:
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    return {d["field"]: d["message"] for d in answer.json()["detail"]}


async def test_opted_out_takes_channels_and_declared_topics(api: Api) -> None:
    user = new_user()

    answer = await api.identify(user, {"vip": True, "opted_out": ["promotions", "sms", "promotions"]})

    assert answer.status_code == 200, answer.text
    assert api.opted_out(user) == ["promotions", "sms"]
    [row] = rows(api.db, ProfileRecord, user_id=user)
    assert row.traits == {"vip": True}, "opted_out is not kept as a trait"
    profile = (await api.http.get(f"/v1/users/{user}", auth=(READ_KEY, ""))).json()
    assert profile["opted_out"] == ["promotions", "sms"]

    cleared = await api.identify(user, {"opted_out": []})
    assert cleared.status_code == 200 and api.opted_out(user) == []


async def test_an_unknown_name_is_refused_with_the_field_and_the_choices(api: Api) -> None:
    user = new_user()

    answer = await api.identify(user, {"email": "li@example.com", "opted_out": ["sms", "promotion"]})

    message = fields(answer)["traits.opted_out[1]"]
    assert "'promotion'" in message and "(did you mean 'promotions'?)" in message
    assert "email, sms, wechat, promotions, newsletter" in message
    assert rows(api.db, ProfileRecord) == [] and rows(api.db, EventRecord) == []


async def test_without_declared_topics_only_channels_are_accepted(
    project: Project, database: Database
) -> None:
    bare = replace(project, settings=replace(project.settings, topics=()))
    app = create_app(Settings(write_keys=(KEY,), database=database.url), project=bare, db=database)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://n", auth=(KEY, "")) as http:
        answer = await http.post(
            "/v1/identify", json={"userId": "u1", "traits": {"unsubscribe": ["promotions"]}}
        )
    message = fields(answer)["traits.unsubscribe[0]"]
    assert "expected one of email, sms, wechat" in message and "topics: in nurture.yaml" in message
    assert rows(database, ProfileRecord) == []


async def test_unsubscribe_adds_and_subscribe_removes_keeping_the_rest(api: Api) -> None:
    user = new_user()
    DbProfiles(api.db).merge(user, {"first_name": "Li"}, ["email", "newsletter"])

    answer = await api.identify(
        user, {"vip": True, "unsubscribe": ["promotions", "sms"], "subscribe": ["email"]}
    )

    assert answer.status_code == 200, answer.text
    assert api.opted_out(user) == ["newsletter", "promotions", "sms"]
    [row] = rows(api.db, ProfileRecord, user_id=user)
    assert row.traits == {"first_name": "Li", "vip": True}, "subscribe and unsubscribe are not traits"

    await api.identify(user, {"subscribe": ["promotions", "wechat"]})  # wechat was never opted out of
    assert api.opted_out(user) == ["newsletter", "sms"]

    await api.identify(user, {"unsubscribe": []})  # empty: no change, not a reset
    assert api.opted_out(user) == ["newsletter", "sms"]


async def test_unsubscribe_creates_the_profile_of_a_new_user(api: Api) -> None:
    user = new_user()
    assert (await api.identify(user, {"unsubscribe": ["newsletter"]})).status_code == 200
    assert api.opted_out(user) == ["newsletter"]


async def test_a_repeated_message_id_does_not_apply_its_change_again(api: Api) -> None:
    user = new_user()
    await api.identify(user, {"unsubscribe": ["promotions"]}, messageId=f"m1-{user}")
    await api.identify(user, {"subscribe": ["promotions"]}, messageId=f"m2-{user}")

    again = await api.identify(user, {"unsubscribe": ["promotions"]}, messageId=f"m1-{user}")

    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert api.opted_out(user) == []


BAD_CHANGES: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown-subscribe", {"subscribe": ["newsleter"]}, "traits.subscribe[0]", "did you mean 'newsletter'?"),
    ("unknown-unsubscribe", {"unsubscribe": ["sms", "fax"]}, "traits.unsubscribe[1]", "'fax'"),
    (
        "both",
        {"subscribe": ["sms"], "unsubscribe": ["email", "sms"]},
        "traits.unsubscribe[1]",
        "also in subscribe",
    ),
    (
        "with-opted-out",
        {"opted_out": ["sms"], "unsubscribe": ["email"]},
        "traits.opted_out",
        "cannot be combined",
    ),
    ("not-a-list", {"unsubscribe": "promotions"}, "traits.unsubscribe", "valid list"),
    ("not-text", {"subscribe": [1]}, "traits.subscribe[0]", "valid string"),
]


@pytest.mark.parametrize(
    ("traits", "field", "words"), [c[1:] for c in BAD_CHANGES], ids=[c[0] for c in BAD_CHANGES]
)
async def test_a_bad_change_names_the_field_and_changes_nothing(
    api: Api, traits: dict[str, Any], field: str, words: str
) -> None:
    user = new_user()
    DbProfiles(api.db).merge(user, {}, ["email"])

    answer = await api.identify(user, {"vip": True, **traits})

    found = fields(answer)
    assert field in found, found
    assert words in found[field]
    [row] = rows(api.db, ProfileRecord, user_id=user)
    assert (row.traits, row.opted_out) == ({}, ["email"])
    assert rows(api.db, EventRecord) == []


async def test_a_batch_applies_changes_in_order(api: Api) -> None:
    user = new_user()
    batch = [
        {"type": "identify", "userId": user, "traits": {"unsubscribe": ["promotions", "sms"]}},
        {"type": "identify", "userId": user, "traits": {"subscribe": ["promotions"]}},
        {"type": "identify", "userId": user, "traits": {"unsubscribe": ["newsletter"]}},
    ]

    answer = await api.http.post("/v1/batch", json={"batch": batch})

    assert answer.status_code == 200, answer.text
    assert api.opted_out(user) == ["newsletter", "sms"]


async def test_a_batch_item_with_an_unknown_name_is_refused_alone(api: Api) -> None:
    user = new_user()
    batch = [
        {"type": "identify", "userId": user, "traits": {"unsubscribe": ["promotions"]}},
        {"type": "identify", "userId": user, "traits": {"vip": True}},
        {"type": "identify", "userId": user, "traits": {"vip": False, "unsubscribe": ["promos"]}},
    ]

    answer = await api.http.post("/v1/batch", json={"batch": batch})

    assert answer.status_code == 200, answer.text
    [refused] = answer.json()["refused"]
    assert refused["index"] == 2
    assert [d["field"] for d in refused["detail"]] == ["batch[2].traits.unsubscribe[0]"]
    assert api.opted_out(user) == ["promotions"]
    [profile] = rows(api.db, ProfileRecord, user_id=user)
    assert profile.traits == {"vip": True}  # the refused item's vip: false changed nothing


async def test_a_change_keeps_what_a_webhook_did_meanwhile(api: Api) -> None:
    """The change is a function of the stored set, not a set the client read earlier."""
    user = new_user()
    await api.identify(user, {"unsubscribe": ["promotions"]})
    DbProfiles(api.db).set_opt_out(user, "sms", True)  # a STOP arrives

    await api.identify(user, {"unsubscribe": ["newsletter"]})

    assert api.opted_out(user) == ["newsletter", "promotions", "sms"]


async def test_the_openapi_document_describes_the_opt_out_traits(api: Api) -> None:
    schema = (await api.http.get("/openapi.json")).json()
    traits = schema["components"]["schemas"]["Traits"]["properties"]
    assert {"opted_out", "subscribe", "unsubscribe"} <= set(traits)
    assert (
        "keeps" not in traits["opted_out"]["description"] and "replaces" in traits["opted_out"]["description"]
    )
    assert "other opt-outs are kept" in traits["unsubscribe"]["description"]
    profile = schema["components"]["schemas"]["ProfilePublic"]["properties"]["opted_out"]
    assert "topics" in profile["description"]
    assert "subscribe" in schema["info"]["description"]
