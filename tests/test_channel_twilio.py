"""Contract tests for the Twilio SMS adapter: the real ``twilio`` SDK against a mock that validates
every request with Twilio's own OpenAPI description of the 2010-04-01 API."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from openapi_mock import OpenApiMock, provider_spec

from channels import Channel, DeliveryError, Envelope, PermanentError, TransientError
from channels.twilio import ERROR_CODES, TwilioSms, classify
from nurture.templates import RenderedMessage

ACCOUNT = "AC" + "0123456789abcdef" * 2
TOKEN = "test-auth-token"
SERVICE = "MG" + "fedcba9876543210" * 2
SENDER = "+15550001111"
RECIPIENT = "+15551234567"
CALLBACK = "https://n.example/webhooks/twilio/status"
MESSAGES = f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json"

SMS = RenderedMessage(
    channel="sms", template="welcome", locale=None, text="Welcome aboard! Reply STOP to opt out."
)
ENVELOPE = Envelope(
    address=RECIPIENT,
    idempotency_key="run-1:s1",
    user_id="u1",
    journey="welcome_series",
    category="marketing",
    unsubscribe_url="https://n.example/u/tok",
)


@pytest.fixture
def mock() -> Iterator[OpenApiMock]:
    with OpenApiMock(provider_spec("twilio_api_v2010.json")) as server:
        yield server


def adapter(mock: OpenApiMock, **options: Any) -> TwilioSms:
    settings: dict[str, Any] = {
        "account_sid": ACCOUNT,
        "auth_token": TOKEN,
        "from_number": SENDER,
        "status_callback": CALLBACK,
        "base_url": mock.url,
        "timeout": 0.3,
    }
    settings.update(options)
    return TwilioSms(**settings)


def twilio_error(code: int, status: int, message: str = "refused") -> dict[str, Any]:
    """An error body in the format Twilio documents for its REST API."""
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


# -- successful sends ---------------------------------------------------------------------------


async def test_send_from_a_number_is_valid_and_carries_the_message(mock: OpenApiMock) -> None:
    sms = adapter(mock)
    assert isinstance(sms, Channel)

    result = await sms.deliver(SMS, ENVELOPE)

    assert mock.rejected == []
    assert len(mock.accepted) == 1
    request = mock.accepted[0]
    assert (request.method, request.path) == ("POST", MESSAGES)
    assert request.body["To"] == RECIPIENT
    assert request.body["Body"] == SMS.text
    assert request.body["From"] == SENDER
    assert "MessagingServiceSid" not in request.body
    assert request.body["StatusCallback"] == f"{CALLBACK}?key=run-1%3As1"
    assert (
        request.headers["authorization"]
        == "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
    )
    assert result.provider == "twilio"
    assert result.provider_id == request.response_id
    assert (
        result.provider_id is not None
        and result.provider_id.startswith("SM")
        and len(result.provider_id) == 34
    )


async def test_send_through_a_messaging_service(mock: OpenApiMock) -> None:
    sms = adapter(mock, from_number=None, messaging_service_sid=SERVICE, status_callback=None)

    result = await sms.deliver(SMS, ENVELOPE)

    assert mock.rejected == []
    [request] = mock.accepted
    assert request.body["MessagingServiceSid"] == SERVICE
    assert "From" not in request.body
    assert "StatusCallback" not in request.body
    assert result.provider_id == request.response_id


async def test_status_callback_keeps_its_own_query(mock: OpenApiMock) -> None:
    sms = adapter(mock, status_callback=CALLBACK + "?tenant=a")

    await sms.deliver(SMS, Envelope(address=RECIPIENT, idempotency_key="run 7:step/2"))

    [request] = mock.accepted
    assert request.body["StatusCallback"] == f"{CALLBACK}?tenant=a&key=run%207%3Astep%2F2"


async def test_each_send_gets_its_own_sid(mock: OpenApiMock) -> None:
    sms = adapter(mock)
    first = await sms.deliver(SMS, ENVELOPE)
    second = await sms.deliver(SMS, Envelope(address=RECIPIENT, idempotency_key="run-1:s2"))
    assert first.provider_id != second.provider_id
    assert len(mock.accepted) == 2


async def test_concurrent_sends_each_get_their_own_sid(mock: OpenApiMock) -> None:
    sms = adapter(mock)
    envelopes = [Envelope(address=RECIPIENT, idempotency_key=f"run-{n}:s1") for n in range(6)]

    results = await asyncio.gather(*(sms.deliver(SMS, envelope) for envelope in envelopes))

    assert mock.rejected == []
    assert sorted(result.provider_id or "" for result in results) == sorted(
        request.response_id or "" for request in mock.accepted
    )
    assert len({result.provider_id for result in results}) == 6
    keys = {request.body["StatusCallback"].rsplit("key=", 1)[1] for request in mock.accepted}
    assert keys == {f"run-{n}%3As1" for n in range(6)}


@pytest.mark.parametrize(
    "options",
    [
        {"from_number": None, "messaging_service_sid": None},
        {"from_number": SENDER, "messaging_service_sid": SERVICE},
    ],
)
def test_needs_exactly_one_sender(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        TwilioSms(account_sid=ACCOUNT, auth_token=TOKEN, **options)


async def test_refuses_a_message_that_is_not_sms(mock: OpenApiMock) -> None:
    email = RenderedMessage(
        channel="email", template="w", locale=None, subject="Hi", html="<p>Hi</p>", text="Hi"
    )
    with pytest.raises(ValueError, match="sms"):
        await adapter(mock).deliver(email, ENVELOPE)
    assert mock.accepted == mock.faulted == []


# -- the mock really validates ------------------------------------------------------------------


def basic(user: str = ACCOUNT, password: str = TOKEN) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_mock_rejects_a_message_without_to(mock: OpenApiMock) -> None:
    answer = httpx.post(mock.url + MESSAGES, data={"From": SENDER, "Body": "hi"}, headers=basic())

    assert answer.status_code == 422
    assert "'To' is a required property" in answer.json()["message"]
    assert mock.accepted == []
    [(request, problem)] = mock.rejected
    assert request.body == {"From": SENDER, "Body": "hi"}
    assert "'To' is a required property" in problem


def test_mock_rejects_a_malformed_messaging_service_sid(mock: OpenApiMock) -> None:
    answer = httpx.post(
        mock.url + MESSAGES,
        data={"To": RECIPIENT, "MessagingServiceSid": "MG123", "Body": "hi"},
        headers=basic(),
    )
    assert answer.status_code == 422
    assert "does not match '^MG[0-9a-fA-F]{32}$'" in mock.rejected[0][1]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer abc"}, {"Authorization": "Basic not-base64!"}, basic(password="")],
    ids=["none", "bearer", "garbled", "no-password"],
)
def test_mock_wants_basic_credentials(mock: OpenApiMock, headers: dict[str, str]) -> None:
    answer = httpx.post(
        mock.url + MESSAGES, data={"To": RECIPIENT, "From": SENDER, "Body": "hi"}, headers=headers
    )
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Basic"
    assert len(mock.rejected) == 1 and mock.accepted == []


def test_mock_rejects_unknown_paths_and_methods(mock: OpenApiMock) -> None:
    assert httpx.post(mock.url + "/2010-04-01/Nope.json", headers=basic()).status_code == 404
    assert httpx.put(mock.url + MESSAGES, headers=basic()).status_code == 405
    assert len(mock.rejected) == 2


async def test_a_request_the_spec_refuses_is_not_a_success(mock: OpenApiMock) -> None:
    # A Messaging Service SID of the wrong shape: the SDK sends it, the spec refuses it.
    sms = adapter(mock, from_number=None, messaging_service_sid="MG-not-a-sid")
    with pytest.raises(PermanentError) as caught:
        await sms.deliver(SMS, ENVELOPE)
    assert caught.value.reason == "rejected"
    assert mock.accepted == [] and len(mock.rejected) == 1


# -- error mapping ------------------------------------------------------------------------------

# (HTTP status, Twilio code or None, error class, reason)
ERROR_CASES: list[tuple[int, int | None, type[DeliveryError], str]] = [
    (400, 21211, PermanentError, "invalid_number"),
    (400, 21614, PermanentError, "not_mobile"),
    (400, 21610, PermanentError, "unsubscribed"),
    (400, 21612, PermanentError, "unreachable"),
    (400, 21408, PermanentError, "region_not_enabled"),
    (400, 21617, PermanentError, "body_too_long"),
    (401, 20003, TransientError, "auth"),
    (429, 20429, TransientError, "rate_limited"),
    (400, 21601, TransientError, "sender_config"),
    (400, 21603, TransientError, "sender_config"),
    (400, 21606, TransientError, "sender_config"),
    (400, 21659, TransientError, "sender_config"),
    (400, 21660, TransientError, "sender_config"),
    (400, 21701, TransientError, "sender_config"),
    (400, 21703, TransientError, "sender_config"),
    (400, 21705, TransientError, "sender_config"),
    (429, None, TransientError, "rate_limited"),
    (401, None, TransientError, "auth"),
    (500, None, TransientError, "provider_error"),
    (502, None, TransientError, "provider_error"),
    (503, 20500, TransientError, "provider_error"),
    (400, 21999, PermanentError, "rejected"),
    (404, 20404, PermanentError, "rejected"),
    (403, None, PermanentError, "rejected"),
]


def test_every_mapped_code_is_tested() -> None:
    assert set(ERROR_CODES) <= {code for _, code, _, _ in ERROR_CASES}


@pytest.mark.parametrize(("status", "code", "error", "reason"), ERROR_CASES)
def test_classify(status: int, code: int | None, error: type[DeliveryError], reason: str) -> None:
    failure = classify(status, code, "The 'To' number +15551234567 is not valid")
    assert type(failure) is error
    assert failure.reason == reason
    assert "+15551234567" not in failure.detail  # numbers are masked before they reach logs
    if code is not None:
        assert str(code) in failure.detail


def test_classify_keeps_retry_after_on_transient_errors() -> None:
    failure = classify(429, 20429, "Too Many Requests", retry_after=3.0)
    assert isinstance(failure, TransientError) and failure.retry_after == 3.0


@pytest.mark.parametrize(("status", "code", "error", "reason"), ERROR_CASES)
async def test_error_answers_through_the_sdk(
    mock: OpenApiMock, status: int, code: int | None, error: type[DeliveryError], reason: str
) -> None:
    body = (
        twilio_error(code, status, f"The 'To' number {RECIPIENT} refused")
        if code
        else {"status": status, "message": "refused"}
    )
    mock.answer_next(status, body)

    with pytest.raises(error) as caught:
        await adapter(mock).deliver(SMS, ENVELOPE)

    assert caught.value.reason == reason
    assert RECIPIENT not in str(caught.value)
    assert mock.accepted == [] and mock.rejected == []
    assert [request.fault for request in mock.faulted] == [f"answer:{status}"]


async def test_problem_details_errors_are_classified_too(mock: OpenApiMock) -> None:
    # Newer Twilio services answer in RFC 9457 form, which the SDK raises as another exception.
    mock.answer_next(
        400,
        {
            "type": "https://www.twilio.com/docs/errors/21610",
            "title": "Attempt to send to unsubscribed recipient",
            "status": 400,
            "code": 21610,
            "detail": f"{RECIPIENT} replied STOP",
        },
    )
    with pytest.raises(PermanentError) as caught:
        await adapter(mock).deliver(SMS, ENVELOPE)
    assert caught.value.reason == "unsubscribed"
    assert "21610" in caught.value.detail and RECIPIENT not in caught.value.detail


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (lambda: {"Retry-After": "7"}, (7.0, 7.0)),
        (
            lambda: {"Retry-After": format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)},
            (110.0, 120.0),
        ),
        (lambda: {}, None),
    ],
    ids=["seconds", "http-date", "absent"],
)
async def test_rate_limit_reports_retry_after(
    mock: OpenApiMock, headers: Callable[[], dict[str, str]], expected: tuple[float, float] | None
) -> None:
    # The headers are made here, not at collection, so the clock has not moved since.
    mock.answer_next(429, twilio_error(20429, 429, "Too Many Requests"), headers())

    with pytest.raises(TransientError) as caught:
        await adapter(mock).deliver(SMS, ENVELOPE)

    assert caught.value.reason == "rate_limited"
    if expected is None:
        assert caught.value.retry_after is None
    else:
        assert caught.value.retry_after is not None
        assert expected[0] <= caught.value.retry_after <= expected[1]


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("429", "rate_limited"),
        ("500", "provider_error"),
        ("503", "provider_error"),
        ("timeout", "timeout"),
        ("drop", "connection"),
    ],
)
async def test_fault_is_transient_and_the_retry_sends_once(
    mock: OpenApiMock, fault: str, reason: str
) -> None:
    sms = adapter(mock)
    mock.fail_next(fault)

    with pytest.raises(TransientError) as caught:
        await sms.deliver(SMS, ENVELOPE)

    assert caught.value.reason == reason
    if fault == "429":
        assert caught.value.retry_after == 1.0
    assert mock.accepted == []

    result = await sms.deliver(SMS, ENVELOPE)

    assert len(mock.accepted) == 1
    assert result.provider_id == mock.accepted[0].response_id
    assert [request.fault for request in mock.faulted] == [fault]
    assert mock.rejected == []


async def test_a_drop_on_a_reused_connection_is_not_resent(mock: OpenApiMock) -> None:
    # The SDK keeps connections alive; a connection cut after a success must not be retried
    # silently underneath us, or a message could go out twice.
    sms = adapter(mock)
    await sms.deliver(SMS, ENVELOPE)
    mock.fail_next("drop")

    with pytest.raises(TransientError) as caught:
        await sms.deliver(SMS, Envelope(address=RECIPIENT, idempotency_key="run-1:s2"))

    assert caught.value.reason == "connection"
    assert len(mock.accepted) == 1 and len(mock.faulted) == 1


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sms = TwilioSms(
        account_sid=ACCOUNT,
        auth_token=TOKEN,
        from_number=SENDER,
        base_url=f"http://127.0.0.1:{port}",
        timeout=0.3,
    )
    with pytest.raises(TransientError) as caught:
        await sms.deliver(SMS, ENVELOPE)
    assert caught.value.reason == "connection"


async def test_logs_never_show_the_full_number(mock: OpenApiMock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sms = adapter(mock)
    await sms.deliver(SMS, ENVELOPE)
    mock.answer_next(
        400, twilio_error(21211, 400, f"The 'To' number {RECIPIENT} is not a valid phone number.")
    )
    with pytest.raises(PermanentError):
        await sms.deliver(SMS, ENVELOPE)

    assert "+15*****4567" in caplog.text
    assert RECIPIENT not in caplog.text
