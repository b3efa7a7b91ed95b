"""The send rules around providers: fallback on permanent failures, retries, exactly one send."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import send_request
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from channels import DeliveryResult, Envelope, PermanentError, TransientError
from nurture.delivery.deliverer import UNKNOWN_OUTCOME, Deliverer, MemoryLedger, MemoryProfiles
from nurture.delivery.links import UnsubscribeLinks
from nurture.engine.model import Profile, SendRequest
from nurture.language.templates import RenderedMessage, TemplateStore
from nurture.storage.db import Database
from nurture.storage.stores import DbLedger
from workflows.activities import JourneyActivities
from workflows.runtime import MemoryRecorder

NOW = datetime(2026, 3, 2, 4, 0, tzinfo=UTC)
USER = Profile("u1", {"email": "li@example.com", "phone": "+8613800138000", "first_name": "Li"})


@dataclass
class Scripted:
    """A provider that answers from a script: an exception to raise, or acceptance."""

    provider: str
    script: list[Exception | None] = field(default_factory=list)
    accepted: list[tuple[RenderedMessage, Envelope]] = field(default_factory=list)
    calls: int = 0

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult:
        self.calls += 1
        step = self.script.pop(0) if self.script else None
        if step is not None:
            raise step
        self.accepted.append((message, envelope))
        return DeliveryResult(self.provider, f"{self.provider}-{len(self.accepted)}")


@pytest.fixture
def templates(tmp_path: Path) -> TemplateStore:
    (tmp_path / "sms").mkdir()
    (tmp_path / "email").mkdir()
    (tmp_path / "sms" / "hello.txt").write_text("Hi {{ user.first_name }}", encoding="utf-8")
    (tmp_path / "email" / "hello.mjml").write_text(
        "---\nsubject: Hi {{ user.first_name }}\n---\n<mjml><mj-body><mj-section><mj-column>"
        '<mj-text>Hello <a href="{{ unsubscribe_url }}">unsubscribe</a></mj-text>'
        "</mj-column></mj-section></mj-body></mjml>\n",
        encoding="utf-8",
    )
    return TemplateStore(tmp_path)


def request(step: str = "s1", category: str = "marketing") -> SendRequest:
    return send_request(step_id=step, category=category)  # type: ignore[no-any-return]


async def test_permanent_failure_falls_back_to_the_next_channel(templates: TemplateStore) -> None:
    sms = Scripted("twilio", [PermanentError("invalid_number", "21211")])
    email = Scripted("sendgrid")
    deliverer = Deliverer(templates, {"sms": sms, "email": email}, ledger=MemoryLedger())

    result = await deliverer.send(request(), USER, NOW)

    assert result.outcome is not None
    assert (result.outcome.status, result.outcome.channel, result.outcome.provider) == (
        "sent",
        "email",
        "sendgrid",
    )
    assert len(email.accepted) == 1 and email.accepted[0][1].address == "li@example.com"


async def test_every_channel_failing_records_the_last_reason(templates: TemplateStore) -> None:
    sms = Scripted("twilio", [PermanentError("invalid_number")])
    email = Scripted("sendgrid", [PermanentError("bad_request")])
    result = await Deliverer(templates, {"sms": sms, "email": email}).send(request(), USER, NOW)
    assert result.outcome is not None and result.outcome.label == "failed:bad_request"


async def test_transient_failure_raises_and_the_retry_sends_once(templates: TemplateStore) -> None:
    sms = Scripted("twilio", [TransientError("rate_limited", retry_after=3)])
    email = Scripted("sendgrid")
    ledger = MemoryLedger()
    deliverer = Deliverer(templates, {"sms": sms, "email": email}, ledger=ledger)

    with pytest.raises(TransientError):
        await deliverer.send(request(), USER, NOW)
    assert email.calls == 0  # a transient failure is retried, never handed to a fallback
    first = await deliverer.send(request(), USER, NOW)
    again = await deliverer.send(request(), USER, NOW)  # e.g. the activity result was lost

    assert first.outcome is not None and first.outcome.label == "sent"
    assert again == first
    assert sms.calls == 2 and len(sms.accepted) == 1


async def test_a_permanent_failure_is_not_retried_on_the_same_channel(templates: TemplateStore) -> None:
    sms = Scripted("twilio", [PermanentError("unsubscribed")])
    email = Scripted("sendgrid", [TransientError("provider_error")])
    deliverer = Deliverer(templates, {"sms": sms, "email": email}, ledger=MemoryLedger())
    with pytest.raises(TransientError):
        await deliverer.send(request(), USER, NOW)
    result = await deliverer.send(request(), USER, NOW)
    assert result.outcome is not None and result.outcome.channel == "email"
    assert sms.calls == 1 and email.calls == 2


async def test_an_attempt_that_died_in_flight_is_not_sent_again(templates: TemplateStore) -> None:
    sms, email = Scripted("twilio"), Scripted("sendgrid")
    ledger = MemoryLedger()
    # What a worker killed while the provider had the message leaves behind: a pending attempt.
    await ledger.claim(request(), "sms", "twilio", "+8613800138000", RenderedMessage("sms", "hello", None))

    result = await Deliverer(templates, {"sms": sms, "email": email}, ledger=ledger).send(
        request(), USER, NOW
    )

    assert result.outcome is not None and result.outcome.label == f"failed:{UNKNOWN_OUTCOME}"
    assert sms.calls == 0 and email.calls == 0  # neither re-sent nor passed to the fallback


async def test_unsubscribe_link_only_on_marketing(templates: TemplateStore) -> None:
    email = Scripted("sendgrid")
    links = "https://n.example/u/{}-{}".format
    deliverer = Deliverer(templates, {"email": email}, links=links)
    only_email = Profile("u1", {"email": "li@example.com", "first_name": "Li"})

    await deliverer.send(request("m"), only_email, NOW)
    await deliverer.send(request("t", category="transactional"), only_email, NOW)

    (marketing, m_env), (transactional, t_env) = email.accepted
    assert m_env.unsubscribe_url == "https://n.example/u/u1-email"
    assert 'href="https://n.example/u/u1-email"' in (marketing.html or "")
    assert t_env.unsubscribe_url is None and "n.example" not in (transactional.html or "")


async def test_db_ledger_keeps_one_row_across_retries(templates: TemplateStore, database: Database) -> None:
    sms = Scripted("twilio", [TransientError("timeout"), TransientError("provider_error")])
    deliverer = Deliverer(templates, {"sms": sms}, ledger=DbLedger(database))
    only_sms = request()
    for _ in range(2):
        with pytest.raises(TransientError):
            await deliverer.send(only_sms, USER, NOW)
    result = await deliverer.send(only_sms, USER, NOW)
    assert result.outcome is not None and result.outcome.provider_id == "twilio-1"
    assert await deliverer.send(only_sms, USER, NOW) == result
    assert sms.calls == 3 and len(sms.accepted) == 1


async def test_send_activity_turns_retry_after_into_the_next_retry_delay(templates: TemplateStore) -> None:
    sms = Scripted("twilio", [TransientError("rate_limited", "429", retry_after=7)])
    profiles = MemoryProfiles()
    profiles.update_now("u1", USER.traits)
    activities = JourneyActivities(Deliverer(templates, {"sms": sms}), profiles, MemoryRecorder())
    payload = {"request": request().to_dict(), "now": NOW.isoformat()}

    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(activities.send, payload)

    assert caught.value.type == "transient:rate_limited"
    assert caught.value.next_retry_delay == timedelta(seconds=7)
    assert not caught.value.non_retryable


@dataclass
class Findable(Scripted):
    """A provider that can be asked whether it has a message (like Twilio's message list)."""

    kept: list[str] = field(default_factory=list)
    """Keys of messages the provider took although the answer never came back."""
    lookups: int = 0

    async def find(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult | None:
        self.lookups += 1
        if envelope.idempotency_key in self.kept:
            return DeliveryResult(self.provider, "found-1")
        return None


async def test_a_lost_answer_is_looked_up_before_sending_again(templates: TemplateStore) -> None:
    lost = TransientError("connection", "dropped after sending", maybe_sent=True)
    sms = Findable("twilio", [lost], kept=[request().idempotency_key])
    deliverer = Deliverer(templates, {"sms": sms, "email": Scripted("sendgrid")}, ledger=MemoryLedger())
    with pytest.raises(TransientError):
        await deliverer.send(request(), USER, NOW)

    result = await deliverer.send(request(), USER, NOW)

    assert result.outcome is not None and (result.outcome.label, result.outcome.provider_id) == (
        "sent",
        "found-1",
    )
    assert (sms.calls, sms.lookups) == (1, 1)  # found it: not sent again


async def test_a_lost_answer_the_provider_does_not_have_is_sent_again(templates: TemplateStore) -> None:
    sms = Findable("twilio", [TransientError("timeout", maybe_sent=True)])
    deliverer = Deliverer(templates, {"sms": sms}, ledger=MemoryLedger())
    with pytest.raises(TransientError):
        await deliverer.send(request(), USER, NOW)
    result = await deliverer.send(request(), USER, NOW)
    assert result.outcome is not None and result.outcome.label == "sent"
    assert (sms.calls, sms.lookups, len(sms.accepted)) == (2, 1, 1)


async def test_a_lost_answer_without_a_lookup_is_an_unknown_outcome(templates: TemplateStore) -> None:
    sms = Scripted("sendgrid-like", [TransientError("timeout", maybe_sent=True)])
    email = Scripted("sendgrid")
    deliverer = Deliverer(templates, {"sms": sms, "email": email}, ledger=MemoryLedger())
    with pytest.raises(TransientError):
        await deliverer.send(request(), USER, NOW)
    result = await deliverer.send(request(), USER, NOW)
    assert result.outcome is not None and result.outcome.label == f"failed:{UNKNOWN_OUTCOME}"
    assert sms.calls == 1 and email.calls == 0


async def test_cancelled_mid_call_is_never_called_again(templates: TemplateStore) -> None:
    sms = Scripted("twilio", [asyncio.CancelledError()])
    deliverer = Deliverer(templates, {"sms": sms, "email": Scripted("sendgrid")}, ledger=MemoryLedger())
    with pytest.raises(asyncio.CancelledError):
        await deliverer.send(request(), USER, NOW)
    result = await deliverer.send(request(), USER, NOW)
    assert result.outcome is not None and result.outcome.label == f"failed:{UNKNOWN_OUTCOME}"
    assert sms.calls == 1


async def test_an_empty_rendering_falls_back(tmp_path: Path) -> None:
    (tmp_path / "sms").mkdir()
    (tmp_path / "email").mkdir()
    (tmp_path / "sms" / "hello.txt").write_text("{{ user.nickname }}", encoding="utf-8")
    (tmp_path / "email" / "hello.mjml").write_text(
        "---\nsubject: Hi\n---\n<mjml><mj-body><mj-section><mj-column><mj-text>Hi</mj-text>"
        "</mj-column></mj-section></mj-body></mjml>\n",
        encoding="utf-8",
    )
    sms, email = Scripted("twilio"), Scripted("sendgrid")
    result = await Deliverer(TemplateStore(tmp_path), {"sms": sms, "email": email}).send(request(), USER, NOW)
    assert result.outcome is not None and (result.outcome.channel, result.outcome.label) == ("email", "sent")
    assert sms.calls == 0
    only_sms = Profile("u1", {"phone": "+8613800138000"})
    result = await Deliverer(TemplateStore(tmp_path), {"sms": sms, "email": email}).send(
        request(), only_sms, NOW
    )
    assert result.outcome is not None and result.outcome.label == "failed:empty_message"


async def test_a_topic_sends_link_unsubscribes_from_that_topic(templates: TemplateStore) -> None:
    links = UnsubscribeLinks(secret="s" * 32, public_url="https://n.example")
    email = Scripted("sendgrid")
    only_email = Profile("u1", {"email": "li@example.com", "first_name": "Li"})
    await Deliverer(templates, {"email": email}, links=links.url).send(
        send_request(channels=("email",), topic="promotions"), only_email, NOW
    )
    url = email.accepted[0][1].unsubscribe_url or ""
    target = links.verify(url.rsplit("/", 1)[1])
    assert (target.user_id, target.channel, target.topic) == ("u1", "email", "promotions")
