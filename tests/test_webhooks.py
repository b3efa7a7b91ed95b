"""Provider webhooks and unsubscribe links through the real app, on SQLite and PostgreSQL.

Requests are signed the way the providers sign them (Twilio's RequestValidator over the public URL,
an ECDSA P-256 key for SendGrid, SHA-1 over the sorted token, timestamp and nonce for WeChat);
forged, stale or unsigned ones answer 403 and change nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from support import eventually, link_payload, rows, v1_link_token
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped, unused-ignore]

from nurture.language.compiler import Project
from nurture.service.api import create_app
from nurture.service.api import serve as serve_api
from nurture.service.devserver import free_port
from nurture.service.settings import Settings, SettingsError
from nurture.storage.db import Database
from nurture.storage.identities import DbIdentities
from nurture.storage.models import MessageEvent, MessageRecord, ProfileRecord, UsedNonce
from nurture.storage.stores import DbProfiles

WRITE_KEY = "test-key-0123456789"
PUBLIC = "https://hooks.example.com/nurture"
SECRET = "unsubscribe-secret-0123456789"
TWILIO_TOKEN = "twilio-auth-token-0123456789"
SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
PHONE = "+8613800138000"
OTHER_PHONE = "+8613900139000"
WECHAT_TOKEN = "wechatToken2026"
OPENID = "oX3kA5e-Jw7qLmN2pR8sTuVwYz01"
OTHER_OPENID = "oX3kA5e-Jw7qLmN2pR8sTuVwYz99"


def public_key(key: ec.EllipticCurvePrivateKey) -> str:
    """The key as SendGrid's settings show it: base64 DER, no PEM lines."""
    der = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


SETTINGS = Settings(
    write_keys=(WRITE_KEY,),
    public_url=PUBLIC,
    secret=SECRET,
    twilio_auth_token=TWILIO_TOKEN,
    sendgrid_webhook_public_key=public_key(SENDGRID_KEY),
    wechat_token=WECHAT_TOKEN,
)


@dataclass
class Hooks:
    http: httpx.AsyncClient
    db: Database
    settings: Settings

    async def twilio(
        self, path: str, form: Mapping[str, str], *, query: str = "", signed_url: str | None = None
    ) -> httpx.Response:
        """``form`` posted to ``path`` as Twilio would, signed over the public URL (or ``signed_url``)."""
        target = path + (f"?{query}" if query else "")
        url = signed_url if signed_url is not None else PUBLIC + target
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(url, dict(form))
        return await self.http.post(target, data=dict(form), headers={"X-Twilio-Signature": signature})

    async def wechat(
        self,
        body: str | bytes,
        *,
        token: str = WECHAT_TOKEN,
        timestamp: int | None = None,
        query: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """``body`` pushed as WeChat pushes (plaintext mode): signed in the query, not the body."""
        return await self.http.post(
            WECHAT,
            params=dict(query) if query is not None else wechat_query(token, timestamp),
            content=body.encode() if isinstance(body, str) else body,
            headers={"Content-Type": "text/xml"},
        )

    async def sendgrid(
        self,
        events: list[Any] | bytes,
        *,
        key: ec.EllipticCurvePrivateKey = SENDGRID_KEY,
        timestamp: int | str | None = None,
        body: bytes | None = None,
    ) -> httpx.Response:
        """``events`` posted as SendGrid would, signed with ``key`` over timestamp + body."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signed = events if isinstance(events, bytes) else json.dumps(events).encode()
        signature = key.sign(stamp.encode() + signed, ec.ECDSA(hashes.SHA256()))
        return await self.http.post(
            "/webhooks/sendgrid/events",
            content=signed if body is None else body,
            headers={
                "Content-Type": "application/json",
                "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
            },
        )


async def serve(project: Project, db: Database, settings: Settings) -> AsyncIterator[Hooks]:
    # No Temporal client: these routes never need one, and ASGITransport runs no lifespan.
    app = create_app(replace(settings, database=db.url), project=project, db=db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nurture") as http:
        yield Hooks(http, db, settings)


@pytest.fixture
async def hooks(project: Project, database: Database) -> AsyncIterator[Hooks]:
    async for hooks in serve(project, database, SETTINGS):
        yield hooks


def profile(
    db: Database,
    phone: str | None = None,
    email: str | None = None,
    opted_out: list[str] | None = None,
    openid: str | None = None,
) -> str:
    user = f"u-{uuid.uuid4().hex[:10]}"
    traits = {k: v for k, v in (("phone", phone), ("email", email), ("wechat_openid", openid)) if v}
    DbProfiles(db).merge(user, traits, opted_out)
    return user


def opted_out(db: Database, user: str) -> list[str]:
    [row] = rows(db, ProfileRecord, user_id=user)
    return list(row.opted_out)


def message(db: Database, *, provider: str, provider_id: str, user: str = "u-mail") -> MessageRecord:
    run = f"run-{uuid.uuid4().hex[:8]}"
    record = MessageRecord(
        idempotency_key=f"{run}:s1",
        run_id=run,
        user_id=user,
        step_id="s1",
        channel="email" if provider == "sendgrid" else "sms",
        template="welcome",
        provider=provider,
        provider_id=provider_id,
        status="sent",
    )
    with db.session() as session:
        session.add(record)
    return record


def state(db: Database) -> tuple[Any, ...]:
    """Everything a webhook may change."""
    return (
        sorted((p.user_id, tuple(p.opted_out)) for p in rows(db, ProfileRecord)),
        sorted((m.idempotency_key, m.delivery_status) for m in rows(db, MessageRecord)),
        len(rows(db, MessageEvent)),
    )


# Twilio inbound ------------------------------------------------------------------------------


def inbound(body: str, phone: str = PHONE) -> dict[str, str]:
    return {
        "MessageSid": f"SM{uuid.uuid4().hex}",
        "AccountSid": "AC" + "0" * 32,
        "From": phone,
        "To": "+15005550006",
        "Body": body,
        "NumMedia": "0",
    }


INBOUND = "/webhooks/twilio/inbound"
STATUS = "/webhooks/twilio/status"


async def test_stop_opts_every_profile_with_the_number_out_of_sms_and_start_opts_back_in(
    hooks: Hooks,
) -> None:
    first = profile(hooks.db, phone=PHONE, opted_out=["email"])
    second = profile(hooks.db, phone=PHONE)
    bystander = profile(hooks.db, phone=OTHER_PHONE)

    stop = await hooks.twilio(INBOUND, inbound("  Stop \n"))

    assert stop.status_code == 200, stop.text
    assert stop.headers["content-type"].startswith("text/xml") and "<Response/>" in stop.text
    assert opted_out(hooks.db, first) == ["email", "sms"]
    assert opted_out(hooks.db, second) == ["sms"]
    assert opted_out(hooks.db, bystander) == []

    start = await hooks.twilio(INBOUND, inbound("unstop"))

    assert start.status_code == 200, start.text
    assert opted_out(hooks.db, first) == ["email"], "START clears only the SMS opt-out"
    assert opted_out(hooks.db, second) == []
    events = sorted(e.event for e in rows(hooks.db, MessageEvent, provider="twilio"))
    assert events == ["opt_in", "opt_out"]


async def test_every_standard_keyword_is_understood(hooks: Hooks) -> None:
    user = profile(hooks.db, phone=PHONE)
    for stop, start in [("STOPALL", "yes"), ("unsubscribe", "OptIn"), ("Cancel", "start"), ("end", "UNSTOP")]:
        await hooks.twilio(INBOUND, inbound(stop))
        assert opted_out(hooks.db, user) == ["sms"], stop
        await hooks.twilio(INBOUND, inbound(start))
        assert opted_out(hooks.db, user) == [], start
    for stop in ("QUIT", "optout", "revoke"):
        await hooks.twilio(INBOUND, inbound(stop))
        assert opted_out(hooks.db, user) == ["sms"], stop
        DbProfiles(hooks.db).set_opt_out(user, "sms", False)


async def test_other_texts_are_recorded_and_change_nothing(hooks: Hooks) -> None:
    user = profile(hooks.db, phone=PHONE)
    form = inbound("please stop sending these")  # not the keyword alone

    answer = await hooks.twilio(INBOUND, form)

    assert answer.status_code == 200
    assert opted_out(hooks.db, user) == []
    [event] = rows(hooks.db, MessageEvent)
    assert (event.event, event.user_id, event.provider_event_id) == ("inbound", user, form["MessageSid"])
    assert event.data["body"] == "please stop sending these"


async def test_a_retried_stop_is_applied_once(hooks: Hooks) -> None:
    """Twilio retries a webhook it got no answer for: a late repeat must not undo a later START."""
    user = profile(hooks.db, phone=PHONE)
    stop = inbound("STOP")
    await hooks.twilio(INBOUND, stop)
    await hooks.twilio(INBOUND, inbound("START"))

    again = await hooks.twilio(INBOUND, stop)

    assert again.status_code == 200
    assert opted_out(hooks.db, user) == []
    assert len(rows(hooks.db, MessageEvent)) == 2


async def test_advanced_opt_out_type_is_honoured(hooks: Hooks) -> None:
    """A custom keyword configured in Twilio's Advanced Opt-Out arrives with OptOutType."""
    user = profile(hooks.db, phone=PHONE)
    await hooks.twilio(INBOUND, {**inbound("ARRET"), "OptOutType": "STOP"})
    assert opted_out(hooks.db, user) == ["sms"]


async def test_a_bad_twilio_signature_is_refused_and_changes_nothing(hooks: Hooks) -> None:
    user = profile(hooks.db, phone=PHONE)
    before = state(hooks.db)
    form = inbound("STOP")
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(PUBLIC + INBOUND, form)
    forged = RequestValidator("not-the-token").compute_signature(PUBLIC + INBOUND, form)

    answers = {
        "forged": await hooks.http.post(INBOUND, data=form, headers={"X-Twilio-Signature": forged}),
        # The request's own URL, as an app behind a proxy sees it, is not what Twilio signs.
        "wrong url": await hooks.twilio(INBOUND, form, signed_url="http://nurture" + INBOUND),
        "missing": await hooks.http.post(INBOUND, data=form),
        "changed body": await hooks.http.post(
            INBOUND, data={**form, "From": OTHER_PHONE}, headers={"X-Twilio-Signature": signature}
        ),
    }

    for how, answer in answers.items():
        assert answer.status_code == 403, (how, answer.text)
        assert answer.json()["error"] == "forbidden"
    assert state(hooks.db) == before
    assert opted_out(hooks.db, user) == []


# Twilio status callbacks ---------------------------------------------------------------------


def status(sid: str, value: str, error: str = "") -> dict[str, str]:
    form = {"MessageSid": sid, "SmsSid": sid, "MessageStatus": value, "SmsStatus": value, "To": PHONE}
    return {**form, "ErrorCode": error} if error else form


async def test_status_callbacks_update_the_delivery_status(hooks: Hooks) -> None:
    sid = f"SM{uuid.uuid4().hex}"
    sms = message(hooks.db, provider="twilio", provider_id=sid)
    query = urlencode({"key": sms.idempotency_key})

    for value in ("queued", "sent", "delivered"):
        answer = await hooks.twilio(STATUS, status(sid, value), query=query)
        assert answer.status_code == 200, answer.text
        [row] = rows(hooks.db, MessageRecord, idempotency_key=sms.idempotency_key)
        assert row.delivery_status == value

    assert row.updated_at is not None
    late = await hooks.twilio(STATUS, status(sid, "sent"), query=query)  # out of order
    assert late.status_code == 200
    [row] = rows(hooks.db, MessageRecord, idempotency_key=sms.idempotency_key)
    assert row.delivery_status == "delivered", "a late 'sent' does not undo 'delivered'"
    events = rows(hooks.db, MessageEvent, idempotency_key=sms.idempotency_key)
    assert sorted(e.event for e in events) == ["delivered", "queued", "sent"], "the repeat is ignored"
    assert {e.user_id for e in events} == {"u-mail"}


async def test_a_status_without_key_finds_the_message_by_sid(hooks: Hooks) -> None:
    sid = f"SM{uuid.uuid4().hex}"
    sms = message(hooks.db, provider="twilio", provider_id=sid)

    answer = await hooks.twilio(STATUS, status(sid, "undelivered", error="30003"))

    assert answer.status_code == 200
    [row] = rows(hooks.db, MessageRecord, idempotency_key=sms.idempotency_key)
    assert row.delivery_status == "undelivered"
    [event] = rows(hooks.db, MessageEvent)
    assert event.idempotency_key == sms.idempotency_key and event.data["error_code"] == "30003"


async def test_a_forged_status_callback_changes_nothing(hooks: Hooks) -> None:
    sid = f"SM{uuid.uuid4().hex}"
    sms = message(hooks.db, provider="twilio", provider_id=sid)
    before = state(hooks.db)
    query = urlencode({"key": sms.idempotency_key})
    # Signed for another message's key: the query is part of what Twilio signs.
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(
        f"{PUBLIC}{STATUS}?key=other%3As1", status(sid, "failed")
    )

    answer = await hooks.http.post(
        f"{STATUS}?{query}", data=status(sid, "failed"), headers={"X-Twilio-Signature": signature}
    )

    assert answer.status_code == 403
    assert state(hooks.db) == before


# SendGrid ------------------------------------------------------------------------------------


def sg_event(name: str, record: MessageRecord | None = None, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "email": "ada@example.com",
        "timestamp": 1_780_000_000,
        "event": name,
        "sg_event_id": uuid.uuid4().hex,
        "sg_message_id": f"{record.provider_id if record else 'unknown'}.filter0001.16648.5515E0B88.0",
    }
    if record is not None:
        event.update(
            idempotency_key=record.idempotency_key,
            run_id=record.run_id,
            step_id=record.step_id,
            user_id=record.user_id,
        )
    return {**event, **fields}


async def test_sendgrid_events_are_recorded_once_and_update_the_message(hooks: Hooks) -> None:
    user = profile(hooks.db, email="ada@example.com")
    mail = message(hooks.db, provider="sendgrid", provider_id="14c5d75ce93", user=user)
    batch = [
        sg_event("processed", mail),
        sg_event("delivered", mail),
        sg_event("open", mail),
        sg_event("click", mail, url="https://example.com/"),
        sg_event("delivered", mail),  # SendGrid repeats itself: a different sg_event_id, same state
    ]

    answer = await hooks.sendgrid(batch)

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"received": 5, "recorded": 5, "duplicates": 0, "ignored": 0}
    [row] = rows(hooks.db, MessageRecord, idempotency_key=mail.idempotency_key)
    assert row.delivery_status == "click", "a late 'delivered' does not undo 'click'"
    events = rows(hooks.db, MessageEvent, provider="sendgrid")
    assert sorted(e.event for e in events) == ["click", "delivered", "delivered", "open", "processed"]
    assert {(e.idempotency_key, e.provider_id, e.user_id) for e in events} == {
        (mail.idempotency_key, "14c5d75ce93", user)
    }
    assert opted_out(hooks.db, user) == []

    replayed = await hooks.sendgrid(batch)  # a retry of the same batch, freshly signed

    assert replayed.status_code == 200
    assert replayed.json() == {"received": 5, "recorded": 0, "duplicates": 5, "ignored": 0}
    assert len(rows(hooks.db, MessageEvent)) == 5


async def test_a_bounce_is_recorded_but_does_not_opt_out(hooks: Hooks) -> None:
    user = profile(hooks.db, email="ada@example.com")
    mail = message(hooks.db, provider="sendgrid", provider_id="bounced1", user=user)

    answer = await hooks.sendgrid([sg_event("bounce", mail, type="bounce", reason="550 5.1.1 unknown user")])

    assert answer.status_code == 200
    [row] = rows(hooks.db, MessageRecord, idempotency_key=mail.idempotency_key)
    assert row.delivery_status == "bounce"
    [event] = rows(hooks.db, MessageEvent)
    assert event.data["reason"] == "550 5.1.1 unknown user"
    assert opted_out(hooks.db, user) == []


async def test_a_message_is_found_by_its_sendgrid_message_id(hooks: Hooks) -> None:
    """Events without custom args (sent before they were added) still find their message."""
    mail = message(hooks.db, provider="sendgrid", provider_id="abcDEF123")
    event = sg_event("delivered", sg_message_id="abcDEF123.filterdrecv-1.0")

    assert (await hooks.sendgrid([event])).status_code == 200

    [row] = rows(hooks.db, MessageRecord, idempotency_key=mail.idempotency_key)
    assert row.delivery_status == "delivered"
    [recorded] = rows(hooks.db, MessageEvent)
    assert (recorded.idempotency_key, recorded.user_id) == (mail.idempotency_key, "u-mail")


@pytest.mark.parametrize("name", ["unsubscribe", "group_unsubscribe", "spamreport"])
async def test_unsubscribes_and_spam_reports_opt_the_user_out_of_email(hooks: Hooks, name: str) -> None:
    user = profile(hooks.db, email="ada@example.com", opted_out=["sms"])
    same_address = profile(hooks.db, email="ada@example.com")
    mail = message(hooks.db, provider="sendgrid", provider_id="unsub1", user=user)

    answer = await hooks.sendgrid([sg_event(name, mail, asm_group_id=7)])

    assert answer.status_code == 200
    assert opted_out(hooks.db, user) == ["email", "sms"]
    assert opted_out(hooks.db, same_address) == [], "the user_id custom arg names whom"


async def test_an_unsubscribe_without_custom_args_opts_out_by_email(hooks: Hooks) -> None:
    first = profile(hooks.db, email="ada@example.com")
    second = profile(hooks.db, email="ada@example.com")
    other = profile(hooks.db, email="bob@example.com")

    answer = await hooks.sendgrid([sg_event("spamreport", email="ada@example.com")])

    assert answer.status_code == 200
    assert (opted_out(hooks.db, first), opted_out(hooks.db, second)) == (["email"], ["email"])
    assert opted_out(hooks.db, other) == []


async def test_events_without_sg_event_id_are_recorded_once(hooks: Hooks) -> None:
    """Older or hand-made events carry no sg_event_id: the event itself identifies it."""
    user = profile(hooks.db, email="ada@example.com")
    mail = message(hooks.db, provider="sendgrid", provider_id="noid1", user=user)
    batch = [
        {k: v for k, v in sg_event(name, mail).items() if k != "sg_event_id"}
        for name in ("delivered", "open", "unsubscribe")
    ]

    first = await hooks.sendgrid(batch)
    DbProfiles(hooks.db).set_opt_out(user, "email", False)  # the user opted back in since
    # The same batch again, freshly signed, its keys in another order.
    replayed = await hooks.sendgrid([dict(reversed(event.items())) for event in batch])

    assert first.json() == {"received": 3, "recorded": 3, "duplicates": 0, "ignored": 0}
    assert replayed.json() == {"received": 3, "recorded": 0, "duplicates": 3, "ignored": 0}
    assert len(rows(hooks.db, MessageEvent)) == 3
    assert opted_out(hooks.db, user) == [], "the replayed unsubscribe is not applied again"
    other = {**batch[1], "timestamp": batch[1]["timestamp"] + 1}  # a second open, a moment later
    assert (await hooks.sendgrid([other])).json()["recorded"] == 1


async def test_a_replayed_unsubscribe_is_not_applied_twice(hooks: Hooks) -> None:
    user = profile(hooks.db, email="ada@example.com")
    unsubscribe = sg_event("unsubscribe", email="ada@example.com")
    await hooks.sendgrid([unsubscribe])
    DbProfiles(hooks.db).set_opt_out(user, "email", False)  # the user opted back in since

    again = await hooks.sendgrid([unsubscribe])

    assert again.json()["duplicates"] == 1
    assert opted_out(hooks.db, user) == []


async def test_a_bad_sendgrid_signature_is_refused_and_records_nothing(hooks: Hooks) -> None:
    user = profile(hooks.db, email="ada@example.com")
    mail = message(hooks.db, provider="sendgrid", provider_id="forged1", user=user)
    batch = [sg_event("delivered", mail), sg_event("unsubscribe", mail)]
    before = state(hooks.db)
    now = int(time.time())

    answers = {
        "other key": await hooks.sendgrid(batch, key=OTHER_KEY),
        "changed body": await hooks.sendgrid(
            batch, body=json.dumps([*batch, sg_event("spamreport", mail)]).encode()
        ),
        # Correctly signed, but 11 minutes ago (a replay) or ahead.
        "stale": await hooks.sendgrid(batch, timestamp=now - 660),
        "future": await hooks.sendgrid(batch, timestamp=now + 660),
        "missing": await hooks.http.post("/webhooks/sendgrid/events", json=batch),
        "huge timestamp": await hooks.sendgrid(batch, timestamp="9" * 5000),
        "garbage": await hooks.http.post(
            "/webhooks/sendgrid/events",
            json=batch,
            headers={
                "X-Twilio-Email-Event-Webhook-Signature": "not base64 !!",
                "X-Twilio-Email-Event-Webhook-Timestamp": str(now),
            },
        ),
    }

    for how, answer in answers.items():
        assert answer.status_code == 403, (how, answer.text)
        assert answer.json()["error"] == "forbidden"
    assert state(hooks.db) == before
    assert opted_out(hooks.db, user) == []
    fresh = await hooks.sendgrid(batch)  # the same batch, properly signed now, is taken
    assert fresh.json()["recorded"] == 2 and opted_out(hooks.db, user) == ["email"]


async def test_a_signed_body_that_is_not_an_array_of_events_records_nothing(hooks: Hooks) -> None:
    for body in (b'{"event": "delivered"}', b"not json"):
        answer = await hooks.sendgrid(body)
        assert answer.status_code == 400, body
        assert answer.json()["error"] == "invalid_request"
    answer = await hooks.sendgrid([{"no": "event"}, "junk"])
    assert answer.status_code == 200 and answer.json()["ignored"] == 2
    assert rows(hooks.db, MessageEvent) == []


# Unsubscribe links ---------------------------------------------------------------------------


def link_path(user: str, channel: str = "email", topic: str | None = None) -> str:
    links = SETTINGS.unsubscribe_links()
    assert links is not None
    url = links.url(user, channel, topic)
    assert url.startswith(PUBLIC + "/u/")
    return url.removeprefix(PUBLIC)


async def test_the_link_page_asks_and_changes_nothing(hooks: Hooks) -> None:
    """Mail scanners open links before people do: GET never unsubscribes."""
    user = profile(hooks.db, email="ada@example.com")
    before = state(hooks.db)

    page = await hooks.http.get(link_path(user, "email", "<b>news</b>"))

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<form method="post">' in page.text and "List-Unsubscribe" in page.text
    assert "&lt;b&gt;news&lt;/b&gt;" in page.text and "<b>news" not in page.text
    assert page.headers["referrer-policy"] == "no-referrer" and "no-store" in page.headers["cache-control"]
    assert user not in page.text and "ada@example.com" not in page.text
    assert state(hooks.db) == before


@pytest.mark.parametrize("body", [{"List-Unsubscribe": "One-Click"}, None])
async def test_one_click_post_unsubscribes(hooks: Hooks, body: dict[str, str] | None) -> None:
    user = profile(hooks.db, email="ada@example.com", opted_out=["wechat"])
    bystander = profile(hooks.db, email="ada@example.com")

    answer = await hooks.http.post(link_path(user, "email"), data=body)

    assert answer.status_code == 200
    assert "You are unsubscribed" in answer.text and "our emails" in answer.text
    assert opted_out(hooks.db, user) == ["email", "wechat"]
    assert opted_out(hooks.db, bystander) == []
    [event] = rows(hooks.db, MessageEvent)
    assert (event.event, event.user_id, event.data["opted_out"]) == ("unsubscribe", user, "email")

    again = await hooks.http.post(link_path(user, "email"))  # clicked twice
    assert again.status_code == 200 and opted_out(hooks.db, user) == ["email", "wechat"]
    assert len(rows(hooks.db, MessageEvent)) == 1, "a second click changes nothing, so records nothing"


async def test_a_link_used_again_after_opting_back_in_opts_out_again(hooks: Hooks) -> None:
    user = profile(hooks.db, email="ada@example.com")
    assert (await hooks.http.post(link_path(user, "email"))).status_code == 200
    DbProfiles(hooks.db).set_opt_out(user, "email", False)  # identify with subscribe: [email]

    assert (await hooks.http.post(link_path(user, "email"))).status_code == 200

    assert opted_out(hooks.db, user) == ["email"]
    assert len(rows(hooks.db, MessageEvent)) == 2


async def test_a_link_sent_before_links_were_encrypted_still_unsubscribes(hooks: Hooks) -> None:
    user = profile(hooks.db, email="ada@example.com")
    path = "/u/" + v1_link_token(SECRET, link_payload(u=user, c="email", t="promotions"))

    page = await hooks.http.get(path)
    answer = await hooks.http.post(path)

    assert page.status_code == 200 and "messages about promotions" in page.text
    assert answer.status_code == 200 and opted_out(hooks.db, user) == ["promotions"]


async def test_a_topic_link_opts_out_of_the_topic_only(hooks: Hooks) -> None:
    """The user leaves promotions on every channel, and keeps email for everything else."""
    user = profile(hooks.db, email="ada@example.com", opted_out=["wechat"])
    path = link_path(user, "email", "promotions")

    page = await hooks.http.get(path)

    assert page.status_code == 200
    assert "Stop receiving messages about promotions on any channel?" in page.text
    assert "emails" not in page.text, "the page names the topic, not the channel"
    assert opted_out(hooks.db, user) == ["wechat"], "the page changes nothing"

    answer = await hooks.http.post(path, data={"List-Unsubscribe": "One-Click"})

    assert answer.status_code == 200
    assert "You will no longer receive messages about promotions on any channel." in answer.text
    assert opted_out(hooks.db, user) == ["promotions", "wechat"]
    [event] = rows(hooks.db, MessageEvent)
    assert (event.data["channel"], event.data["topic"], event.data["opted_out"]) == (
        "email",
        "promotions",
        "promotions",
    )


async def test_a_channel_link_page_names_the_channel(hooks: Hooks) -> None:
    user = profile(hooks.db, phone=PHONE)
    page = await hooks.http.get(link_path(user, "sms"))
    assert page.status_code == 200 and "Stop receiving our text messages?" in page.text


async def test_an_sms_link_opts_out_of_sms_only(hooks: Hooks) -> None:
    user = profile(hooks.db, phone=PHONE)
    assert (await hooks.http.post(link_path(user, "sms"))).status_code == 200
    assert opted_out(hooks.db, user) == ["sms"]


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_tampered_link_is_refused(hooks: Hooks, method: str) -> None:
    victim = profile(hooks.db, email="ada@example.com")
    mine = link_path(profile(hooks.db, email="eve@example.com"))
    theirs = link_path(victim)
    # The start of the victim's token (its synthetic IV) with the rest of mine, an old-format
    # link for the victim signed with another secret, and a link made with another secret.
    spliced = theirs[: len("/u/") + 24] + mine[len("/u/") + 24 :]
    old_forged = "/u/" + v1_link_token("some-other-secret-0123456", link_payload(u=victim, c="email"))
    other = Settings(public_url=PUBLIC, secret="some-other-secret-0123456").unsubscribe_links()
    assert other is not None
    foreign = other.url(victim, "email").removeprefix(PUBLIC)
    before = state(hooks.db)

    for path in (spliced, old_forged, foreign, "/u/garbage", theirs[:-2]):
        answer = await hooks.http.request(method, path)
        assert answer.status_code == 403, path
        assert "not valid" in answer.text
    assert state(hooks.db) == before


# WeChat --------------------------------------------------------------------------------------


WECHAT = "/webhooks/wechat"


def wechat_query(token: str = WECHAT_TOKEN, timestamp: int | None = None, **extra: str) -> dict[str, str]:
    """The query WeChat signs: SHA-1 of token, timestamp and nonce, sorted and joined (its spec)."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    nonce = str(uuid.uuid4().int % 10**10)
    signature = hashlib.sha1("".join(sorted([token, stamp, nonce])).encode()).hexdigest()
    return {"signature": signature, "timestamp": stamp, "nonce": nonce, **extra}


def follow(event: str, openid: str = OPENID, created: int = 1_780_000_000, msg_type: str = "event") -> str:
    """A push as WeChat sends it, CDATA and all."""
    return (
        "<xml><ToUserName><![CDATA[gh_0123456789ab]]></ToUserName>"
        f"<FromUserName><![CDATA[{openid}]]></FromUserName><CreateTime>{created}</CreateTime>"
        f"<MsgType><![CDATA[{msg_type}]]></MsgType><Event><![CDATA[{event}]]></Event>"
        "<EventKey><![CDATA[]]></EventKey></xml>"
    )


async def test_wechat_server_verification_echoes_echostr(hooks: Hooks) -> None:
    # The handshake is checked for the signature only: the admin may save the form at any time.
    query = wechat_query(timestamp=1_500_000_000, echostr="6907305366735781642")

    answer = await hooks.http.get(WECHAT, params=query)

    assert answer.status_code == 200, answer.text
    assert answer.text == "6907305366735781642"
    assert answer.headers["content-type"].startswith("text/plain")


async def test_a_forged_wechat_verification_is_refused(hooks: Hooks) -> None:
    signed = wechat_query(echostr="12345")
    queries = {
        "other token": wechat_query("notTheToken", echostr="12345"),
        "changed nonce": {**signed, "nonce": signed["nonce"] + "1"},
        "changed timestamp": {**signed, "timestamp": str(int(signed["timestamp"]) + 1)},
        "no signature": {k: v for k, v in signed.items() if k != "signature"},
        "non-ascii signature": {**signed, "signature": "é" * 40},
        "nothing": {},
    }
    for how, query in queries.items():
        answer = await hooks.http.get(WECHAT, params=query)
        assert answer.status_code == 403, (how, answer.text)
        assert "12345" not in answer.text, how


async def test_unfollowing_opts_out_of_wechat_and_following_opts_back_in(hooks: Hooks) -> None:
    first = profile(hooks.db, openid=OPENID, opted_out=["email", "promotions"])
    second = profile(hooks.db, openid=OPENID)
    bystander = profile(hooks.db, openid=OTHER_OPENID)

    unfollowed = await hooks.wechat(follow("unsubscribe"))

    assert unfollowed.status_code == 200, unfollowed.text
    assert unfollowed.text == "success"
    assert opted_out(hooks.db, first) == ["email", "promotions", "wechat"]
    assert opted_out(hooks.db, second) == ["wechat"]
    assert opted_out(hooks.db, bystander) == []

    followed = await hooks.wechat(follow("subscribe", created=1_780_000_060))

    assert followed.status_code == 200 and followed.text == "success"
    assert opted_out(hooks.db, first) == ["email", "promotions"], "following clears only the WeChat opt-out"
    assert opted_out(hooks.db, second) == []
    events = sorted(rows(hooks.db, MessageEvent, provider="wechat"), key=lambda e: e.event)
    assert [(e.event, e.user_id) for e in events] == [("subscribe", None), ("unsubscribe", None)]
    assert events[1].data["openid"] == OPENID and sorted(events[1].data["users"]) == sorted([first, second])
    assert events[1].provider_event_id == f"wechat:{OPENID}:1780000000:unsubscribe"


async def test_a_follow_of_one_profile_names_its_user(hooks: Hooks) -> None:
    user = profile(hooks.db, openid=OPENID)
    assert (await hooks.wechat(follow("unsubscribe"))).status_code == 200
    [event] = rows(hooks.db, MessageEvent)
    assert event.user_id == user and opted_out(hooks.db, user) == ["wechat"]


async def test_a_follow_of_an_unknown_openid_is_recorded_and_opts_nobody(hooks: Hooks) -> None:
    user = profile(hooks.db, openid=OTHER_OPENID)
    answer = await hooks.wechat(follow("unsubscribe"))
    assert answer.status_code == 200 and answer.text == "success"
    [event] = rows(hooks.db, MessageEvent)
    assert (event.event, event.user_id, event.data["users"]) == ("unsubscribe", None, [])
    assert opted_out(hooks.db, user) == []


async def test_a_retried_unfollow_is_applied_once(hooks: Hooks) -> None:
    """WeChat retries a push it got no answer for: the repeat must not undo a later follow."""
    user = profile(hooks.db, openid=OPENID)
    await hooks.wechat(follow("unsubscribe"))
    await hooks.wechat(follow("subscribe", created=1_780_000_010))

    again = await hooks.wechat(follow("unsubscribe"))  # same follower, time and event; fresh signature

    assert again.status_code == 200 and again.text == "success"
    assert opted_out(hooks.db, user) == []
    assert len(rows(hooks.db, MessageEvent)) == 2


async def test_other_wechat_pushes_are_ignored(hooks: Hooks) -> None:
    user = profile(hooks.db, openid=OPENID)
    before = state(hooks.db)
    text = (
        f"<xml><ToUserName>gh_0123456789ab</ToUserName><FromUserName>{OPENID}</FromUserName>"
        "<CreateTime>1780000000</CreateTime><MsgType>text</MsgType><Content>unsubscribe</Content>"
        "<MsgId>23456789012345678</MsgId></xml>"
    )
    for body in (text, follow("CLICK"), follow("LOCATION"), follow("unsubscribe", msg_type="text")):
        answer = await hooks.wechat(body)
        assert answer.status_code == 200 and answer.text == "success", body
    assert state(hooks.db) == before
    assert opted_out(hooks.db, user) == []


async def test_a_forged_or_stale_wechat_push_is_refused_and_changes_nothing(hooks: Hooks) -> None:
    user = profile(hooks.db, openid=OPENID)
    before = state(hooks.db)
    body = follow("unsubscribe")

    answers = {
        "other token": await hooks.wechat(body, token="notTheToken"),
        # Plaintext mode signs no body, so an old signed URL must not be reusable.
        "stale": await hooks.wechat(body, timestamp=int(time.time()) - 660),
        "future": await hooks.wechat(body, timestamp=int(time.time()) + 660),
        "unsigned": await hooks.http.post(WECHAT, content=body),
    }

    for how, answer in answers.items():
        assert answer.status_code == 403, (how, answer.text)
        assert answer.json()["error"] == "forbidden"
    assert state(hooks.db) == before
    assert opted_out(hooks.db, user) == []


async def test_a_signed_query_used_again_with_another_body_is_refused(
    project: Project, hooks: Hooks
) -> None:
    """Plaintext mode signs the query only: a captured query must not carry a body of one's own."""
    victim = profile(hooks.db, openid=OTHER_OPENID)
    query = wechat_query()
    assert (await hooks.wechat(follow("subscribe"), query=query)).status_code == 200
    # The follow is the follower's person too, made in the background.
    await eventually(lambda: DbIdentities(hooks.db).resolve("wechat_openid", OPENID), what="the follower")
    before = state(hooks.db)

    replayed = await hooks.wechat(follow("unsubscribe", openid=OTHER_OPENID), query=query)
    # Another API process on the same database knows the query too.
    async for other in serve(project, hooks.db, SETTINGS):
        elsewhere = await other.wechat(follow("unsubscribe", openid=OTHER_OPENID), query=query)

    for answer in (replayed, elsewhere):
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"] == "forbidden" and "already used" in answer.json()["message"]
    assert state(hooks.db) == before and opted_out(hooks.db, victim) == []

    # WeChat's own retry repeats the push as it was: answered, and changes nothing more.
    retried = await hooks.wechat(follow("subscribe"), query=query)
    assert retried.status_code == 200 and retried.text == "success"
    assert state(hooks.db) == before


async def test_used_queries_are_remembered_until_their_signature_is_stale(hooks: Hooks) -> None:
    stamp = int(time.time()) - 30
    query = wechat_query(timestamp=stamp)
    with hooks.db.session() as session:  # one left by a push signed 11 minutes ago
        session.add(UsedNonce(key="wechat:1:2", digest="0" * 64, expires_at=datetime.now(UTC) - timedelta(minutes=1)))

    assert (await hooks.wechat(follow("subscribe"), query=query)).status_code == 200

    [kept] = rows(hooks.db, UsedNonce)
    assert kept.key == f"wechat:{stamp}:{query['nonce']}"
    expires = kept.expires_at.replace(tzinfo=kept.expires_at.tzinfo or UTC)
    assert expires.timestamp() == stamp + 600, "when its timestamp is refused anyway"


BAD_XML = {
    "not xml": "unsubscribe",
    "another root": f"<event><FromUserName>{OPENID}</FromUserName></event>",
    "external entity": (
        '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY id SYSTEM "file:///etc/hostname">]>'
        "<xml><FromUserName>&id;</FromUserName><CreateTime>1780000000</CreateTime>"
        "<MsgType>event</MsgType><Event>unsubscribe</Event></xml>"
    ),
    "entity expansion": (
        '<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa">'
        # Each entity ten of the one before: 10**9 characters from a few hundred bytes.
        + "".join(
            f'<!ENTITY {n} "{("&" + p + ";") * 10}">' for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        )
        + "]><xml><FromUserName>&i;</FromUserName><MsgType>event</MsgType><Event>unsubscribe</Event></xml>"
    ),
    "no openid": (
        "<xml><CreateTime>1780000000</CreateTime><MsgType>event</MsgType><Event>unsubscribe</Event></xml>"
    ),
    "no time": (
        f"<xml><FromUserName>{OPENID}</FromUserName><MsgType>event</MsgType><Event>unsubscribe</Event></xml>"
    ),
}


@pytest.mark.parametrize("body", BAD_XML.values(), ids=BAD_XML.keys())
async def test_a_signed_push_that_is_not_a_follow_event_changes_nothing(hooks: Hooks, body: str) -> None:
    user = profile(hooks.db, openid=OPENID)
    before = state(hooks.db)

    answer = await hooks.wechat(body)

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert state(hooks.db) == before and opted_out(hooks.db, user) == []


async def test_an_oversized_wechat_push_is_refused_unread(hooks: Hooks) -> None:
    answer = await hooks.wechat("<xml>" + "x" * (65 * 1024) + "</xml>")
    assert answer.status_code == 413
    assert rows(hooks.db, MessageEvent) == []


def test_the_wechat_token_comes_from_the_environment_and_stays_out_of_repr() -> None:
    settings = Settings.from_env({"WECHAT_TOKEN": f" {WECHAT_TOKEN}\n"})
    assert settings.wechat_token == WECHAT_TOKEN
    assert WECHAT_TOKEN not in repr(settings)
    assert Settings.from_env({}).wechat_token == ""


# Configuration -------------------------------------------------------------------------------


MISCONFIGURED: list[tuple[dict[str, Any], str, str, str]] = [
    ({"twilio_auth_token": ""}, "POST", INBOUND, "TWILIO_AUTH_TOKEN"),
    ({"twilio_auth_token": ""}, "POST", STATUS, "TWILIO_AUTH_TOKEN"),
    ({"public_url": ""}, "POST", INBOUND, "NURTURE_PUBLIC_URL"),
    ({"sendgrid_webhook_public_key": ""}, "POST", "/webhooks/sendgrid/events", "SENDGRID_WEBHOOK_PUBLIC_KEY"),
    ({"secret": ""}, "GET", "/u/anything.x", "NURTURE_SECRET"),
    ({"secret": ""}, "POST", "/u/anything.x", "NURTURE_SECRET"),
    ({"public_url": ""}, "POST", "/u/anything.x", "NURTURE_PUBLIC_URL"),
    ({"wechat_token": ""}, "GET", "/webhooks/wechat", "WECHAT_TOKEN"),
    ({"wechat_token": ""}, "POST", "/webhooks/wechat", "WECHAT_TOKEN"),
]


async def test_a_route_without_its_secret_answers_503(project: Project, database: Database) -> None:
    user = profile(database, phone=PHONE, email="ada@example.com")
    before = state(database)
    for missing, method, path, variable in MISCONFIGURED:
        async for hooks in serve(project, database, replace(SETTINGS, **missing)):
            answer = await hooks.http.request(method, path, data={"From": PHONE, "Body": "STOP"})
        assert answer.status_code == 503, (path, variable)
        assert variable in answer.text, (path, answer.text)
    assert state(database) == before and opted_out(database, user) == []


def test_a_malformed_sendgrid_key_stops_the_api_at_start(project: Project, database: Database) -> None:
    with pytest.raises(SettingsError, match="SENDGRID_WEBHOOK_PUBLIC_KEY"):
        create_app(
            replace(SETTINGS, sendgrid_webhook_public_key="bm90IGEga2V5"), project=project, db=database
        )


async def test_a_pem_sendgrid_key_is_accepted(project: Project, database: Database) -> None:
    pem = "-----BEGIN PUBLIC KEY-----\n" + public_key(SENDGRID_KEY) + "\n-----END PUBLIC KEY-----\n"
    async for hooks in serve(project, database, replace(SETTINGS, sendgrid_webhook_public_key=pem)):
        assert (await hooks.sendgrid([sg_event("delivered")])).status_code == 200


async def test_oversized_webhook_bodies_are_refused_unread(hooks: Hooks) -> None:
    answer = await hooks.http.post(INBOUND, content=b"Body=" + b"x" * (65 * 1024))
    assert answer.status_code == 413
    assert rows(hooks.db, MessageEvent) == []


async def test_the_access_log_shows_no_link_token_callback_key_or_address(
    project: Project, database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    """The API served as ``nurture up`` and ``serve`` serve it: uvicorn's access log through ours."""
    user = profile(database, email="pii.person@example.com")
    link = link_path(user)
    old_link = "/u/" + v1_link_token(SECRET, link_payload(u="pii.person@example.com", c="email"))
    key = "run-7f3a9c:welcome_email"
    form = status("SMaccesslog", "delivered")
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(f"{PUBLIC}{STATUS}?key={key}", form)
    app = create_app(replace(SETTINGS, database=database.url), project=project, db=database)
    port, stop = free_port(), asyncio.Event()
    root = logging.getLogger()
    level = root.level
    served = asyncio.create_task(serve_api(SETTINGS, port=port, stop=stop, app=app))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as http:
            for _ in range(200):
                with contextlib.suppress(httpx.ConnectError):
                    await http.get("/healthz")
                    break
                await asyncio.sleep(0.05)
            assert (await http.get(link)).status_code == 200
            assert (await http.post(old_link)).status_code == 200
            # The callback URL as the SMS sender sets it, signed by Twilio as it is.
            answer = await http.post(f"{STATUS}?key={key}", data=form, headers={"X-Twilio-Signature": signature})
            assert answer.status_code == 200, answer.text
            assert (await http.get("/v1/users/+1 (500) 555-0143", auth=(WRITE_KEY, ""))).status_code
    finally:
        stop.set()
        await served
        for handler in [h for h in root.handlers if h.get_name() == "nurture"]:
            root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)

    log = capsys.readouterr().err
    access = [json.loads(line)["message"] for line in log.splitlines() if '"uvicorn.access"' in line]
    assert any('"GET /u/*** HTTP/1.1" 200' in line for line in access), access
    assert any('"POST /u/*** HTTP/1.1" 200' in line for line in access), access
    assert any('"POST /webhooks/twilio/status?key=*** HTTP/1.1" 200' in line for line in access), access
    assert any("/v1/users/%2B15*****0143 HTTP/1.1" in line for line in access), access
    for secret in (link.removeprefix("/u/"), old_link.removeprefix("/u/")[:20], "7f3a9c", "555-0143"):
        assert secret not in log, secret
    assert "pii.person" not in log and user not in log


async def test_webhooks_are_in_the_openapi_document_and_links_are_not(hooks: Hooks) -> None:
    paths = set((await hooks.http.get("/openapi.json")).json()["paths"])
    assert {INBOUND, STATUS, "/webhooks/sendgrid/events", WECHAT} <= paths
    assert not any(path.startswith("/u/") for path in paths)
