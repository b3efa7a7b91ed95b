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
from typing import Any, TypeVar

import httpx
import pytest
import requests
from channel_support import (
    CLIENT_TIMEOUT,
    FAULT_CASES,
    LOST_ANSWERS,
    assert_wait,
    closed_port,
    envelope,
    fault_then_retry,
    http_date_in,
    lose_answer,
)
from openapi_mock import OpenApiMock, provider_spec
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from channels import (
    Channel,
    DeliveryError,
    DeliveryResult,
    Envelope,
    PermanentError,
    Reconciling,
    TransientError,
    mask_in_text,
)
from channels._common import parse_retry_after
from channels.twilio import ERROR_CODES, TwilioSms, classify
from nurture.language.templates import RenderedMessage

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
ENVELOPE = envelope(RECIPIENT)


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
        "timeout": CLIENT_TIMEOUT,
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
    (400, 21611, TransientError, "rate_limited"),
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
    (404, 20404, TransientError, "endpoint"),
    (404, None, TransientError, "endpoint"),
    (405, None, TransientError, "endpoint"),
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
    if isinstance(failure, TransientError):
        assert not failure.maybe_sent  # Twilio answered: it did not take the message


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


async def test_a_wrong_api_url_is_transient(mock: OpenApiMock) -> None:
    # The mock answers 404 for a path outside the spec, as Twilio does: the operator fixes the
    # URL and the messages go out late instead of falling back or being lost.
    with pytest.raises(TransientError) as caught:
        await adapter(mock, base_url=mock.url + "/v1").deliver(SMS, ENVELOPE)
    assert caught.value.reason == "endpoint"
    assert not caught.value.maybe_sent
    assert mock.accepted == [] and len(mock.rejected) == 1


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (lambda: {"Retry-After": "7"}, (7.0, 7.0)),
        (lambda: {"Retry-After": http_date_in(120)}, (110.0, 120.0)),
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
    assert_wait(caught.value, expected)


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "reason", "maybe_sent"), FAULT_CASES)
async def test_fault_is_transient_and_the_retry_sends_once(
    mock: OpenApiMock, fault: str, reason: str, maybe_sent: bool
) -> None:
    sms = adapter(mock)

    failure = await fault_then_retry(mock, fault, lambda: sms.deliver(SMS, ENVELOPE))

    assert failure.reason == reason
    assert failure.maybe_sent is maybe_sent
    if fault == "429":
        assert failure.retry_after == 1.0


@pytest.mark.parametrize(("how", "reason"), LOST_ANSWERS)
async def test_an_answer_lost_after_acceptance_may_have_sent(
    mock: OpenApiMock, how: str, reason: str
) -> None:
    failure = await lose_answer(mock, how, lambda: adapter(mock).deliver(SMS, ENVELOPE))

    assert failure.reason == reason
    assert RECIPIENT not in str(failure)


async def test_a_drop_on_a_reused_connection_is_not_resent(mock: OpenApiMock) -> None:
    # The SDK keeps connections alive; a connection cut after a success must not be retried
    # silently underneath us, or a message could go out twice.
    sms = adapter(mock)
    await sms.deliver(SMS, ENVELOPE)
    mock.fail_next("drop")

    with pytest.raises(TransientError) as caught:
        await sms.deliver(SMS, Envelope(address=RECIPIENT, idempotency_key="run-1:s2"))

    assert caught.value.reason == "connection"
    assert caught.value.maybe_sent
    assert len(mock.accepted) == 1 and len(mock.faulted) == 1


async def test_connection_refused_is_plain_transient() -> None:
    sms = TwilioSms(
        account_sid=ACCOUNT,
        auth_token=TOKEN,
        from_number=SENDER,
        base_url=f"http://127.0.0.1:{closed_port()}",
        timeout=0.3,
    )
    with pytest.raises(TransientError) as caught:
        await sms.deliver(SMS, ENVELOPE)
    assert caught.value.reason == "connection"
    assert not caught.value.maybe_sent  # nothing reached Twilio: sending again is safe
    assert "ConnectionRefusedError" in caught.value.detail


async def test_an_unknown_host_is_plain_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    # The resolver fails as it does for a misspelt host; no real DNS is asked.
    def no_such_host(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    sms = TwilioSms(
        account_sid=ACCOUNT, auth_token=TOKEN, from_number=SENDER, base_url="http://api.twilio.invalid"
    )
    with pytest.raises(TransientError) as caught:
        await sms.deliver(SMS, ENVELOPE)
    assert caught.value.reason == "connection"
    assert not caught.value.maybe_sent
    assert "gaierror" in caught.value.detail


Failure = TypeVar("Failure", bound=Exception)


def caused(error: Failure, cause: BaseException) -> Failure:
    """``error`` as raised ``from cause``."""
    error.__cause__ = cause
    return error


URL = "/2010-04-01/Accounts/AC.../Messages.json"
NO_POOL: Any = None  # urllib3 keeps the pool or connection only to describe it


def connect_timeout() -> BaseException:
    timed_out = caused(ConnectTimeoutError(NO_POOL, "timed out"), TimeoutError("timed out"))
    return requests.exceptions.ConnectTimeout(MaxRetryError(NO_POOL, URL, timed_out))


def refused() -> BaseException:
    failed = caused(NewConnectionError(NO_POOL, "refused"), ConnectionRefusedError(111, "refused"))
    return requests.exceptions.ConnectionError(MaxRetryError(NO_POOL, URL, failed))


def read_timeout() -> BaseException:
    return requests.exceptions.ReadTimeout(
        caused(ReadTimeoutError(NO_POOL, URL, "Read timed out."), TimeoutError("timed out"))
    )


def reset() -> BaseException:
    return requests.exceptions.ConnectionError(
        ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
    )


def truncated() -> BaseException:
    return requests.exceptions.ChunkedEncodingError(ProtocolError("Response ended prematurely"))


# What requests raises in each phase, wrapped as urllib3 wraps it: (error, reason, maybe_sent).
REQUESTS_FAILURES: list[tuple[Callable[[], BaseException], str, bool]] = [
    (connect_timeout, "timeout", False),
    (refused, "connection", False),
    (read_timeout, "timeout", True),
    (reset, "connection", True),
    (truncated, "connection", True),
]


@pytest.mark.parametrize(
    ("error", "reason", "maybe_sent"),
    REQUESTS_FAILURES,
    ids=["connect-timeout", "refused", "read-timeout", "reset", "truncated"],
)
async def test_transport_failures_say_whether_twilio_may_have_the_message(
    monkeypatch: pytest.MonkeyPatch, error: Callable[[], BaseException], reason: str, maybe_sent: bool
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error()

    monkeypatch.setattr(requests.Session, "send", fail)
    sms = TwilioSms(account_sid=ACCOUNT, auth_token=TOKEN, from_number=SENDER, base_url="http://127.0.0.1:9")
    with pytest.raises(TransientError) as caught:
        await sms.deliver(SMS, ENVELOPE)
    assert (caught.value.reason, caught.value.maybe_sent) == (reason, maybe_sent)


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


# -- finding a message whose answer was lost ----------------------------------------------------

OTHER_TEXT = RenderedMessage(channel="sms", template="t", locale=None, text="Another text")


@pytest.mark.parametrize(("how", "reason"), LOST_ANSWERS)
@pytest.mark.parametrize("sender", ["number", "service"])
async def test_find_returns_the_message_twilio_took_before_the_answer_was_lost(
    mock: OpenApiMock, how: str, reason: str, sender: str
) -> None:
    service = {"from_number": None, "messaging_service_sid": SERVICE}
    sms = adapter(mock, **(service if sender == "service" else {}))
    assert isinstance(sms, Reconciling)
    await sms.deliver(SMS, envelope("+15557654321", "run-2:s1"))  # the same text to someone else
    await sms.deliver(OTHER_TEXT, envelope(RECIPIENT, "run-3:s1"))  # another text to the recipient
    failure = await lose_answer(mock, how, lambda: sms.deliver(SMS, ENVELOPE))
    assert failure.reason == reason
    lost = mock.accepted[-1]

    found = await sms.find(SMS, ENVELOPE)

    assert found == DeliveryResult("twilio", lost.response_id)
    assert mock.accepted[-1] is lost and len(mock.accepted) == 3  # looking sends nothing
    assert mock.rejected == []  # the listing request is one Twilio's spec allows
    [listing] = mock.reads
    assert (listing.path, listing.query["To"], listing.query["PageSize"]) == (MESSAGES, RECIPIENT, "50")
    since = datetime.fromisoformat(str(listing.query["DateSent>"]))
    assert timedelta(hours=23, minutes=59) < datetime.now(UTC) - since < timedelta(days=1, minutes=1)


async def test_find_returns_none_for_a_message_twilio_never_took(mock: OpenApiMock) -> None:
    sms = adapter(mock)
    await sms.deliver(OTHER_TEXT, ENVELOPE)
    await adapter(mock, from_number="+15550002222").deliver(SMS, ENVELOPE)  # another sender of ours
    mock.fail_next("drop")  # closed before Twilio took it; the client cannot tell the difference
    with pytest.raises(TransientError) as caught:
        await sms.deliver(SMS, ENVELOPE)
    assert caught.value.maybe_sent

    assert await sms.find(SMS, ENVELOPE) is None
    assert len(mock.reads) == 1 and mock.rejected == []


async def test_find_ignores_the_same_text_sent_before_the_window(mock: OpenApiMock) -> None:
    # A reminder with the same text went out two days ago; today's send never reached Twilio.
    sms = adapter(mock)
    await sms.deliver(SMS, envelope(RECIPIENT, "run-0:s1"))
    mock.accepted[0].response["date_sent"] = format_datetime(datetime.now(UTC) - timedelta(days=2))

    assert await sms.find(SMS, ENVELOPE) is None

    today = await sms.deliver(SMS, ENVELOPE)
    assert await sms.find(SMS, ENVELOPE) == today


@pytest.mark.parametrize(("fault", "reason"), [("500", "provider_error"), ("timeout", "timeout")])
async def test_a_failed_lookup_is_plain_transient(mock: OpenApiMock, fault: str, reason: str) -> None:
    mock.fail_next(fault, reads=True)
    with pytest.raises(TransientError) as caught:
        await adapter(mock).find(SMS, ENVELOPE)
    assert caught.value.reason == reason
    assert not caught.value.maybe_sent  # a lookup sends nothing
    assert RECIPIENT not in str(caught.value)


async def test_a_lookup_twilio_refuses_is_still_transient(mock: OpenApiMock) -> None:
    mock.answer_next(400, twilio_error(21211, 400, f"The 'To' number {RECIPIENT} is not valid"), reads=True)
    with pytest.raises(TransientError) as caught:
        await adapter(mock).find(SMS, ENVELOPE)
    assert caught.value.reason == "invalid_number"
    assert RECIPIENT not in str(caught.value)


async def test_find_asks_nothing_for_a_message_it_could_not_have_sent(mock: OpenApiMock) -> None:
    email = RenderedMessage(channel="email", template="w", locale=None, subject="Hi", text="Hi")
    assert await adapter(mock).find(email, ENVELOPE) is None
    assert mock.accepted == mock.faulted == []


# -- the shared helpers, with the numbers Twilio quotes ------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("The 'To' number +15551234567 is not valid.", "The 'To' number +15*****4567 is not valid."),
        ("call (555) 123-4567 or +1 555 123 4567", "call ******4567 or +15*****4567"),
        ("lee@example.com bounced", "l***@example.com bounced"),
        ("1234567", "***4567"),
        # Not phone numbers: ids, dates, addresses of hosts, short codes, error codes.
        ("SMded05904ccb347238880ca9264e8fe1c queued", "SMded05904ccb347238880ca9264e8fe1c queued"),
        ("sent 2024-01-02 12:00:00 via 203.113.100.254", "sent 2024-01-02 12:00:00 via 203.113.100.254"),
        ("error 21211 for short code 898211", "error 21211 for short code 898211"),
    ],
)
def test_mask_in_text_finds_phone_numbers_and_emails(text: str, masked: str) -> None:
    assert mask_in_text(text) == masked


def test_mask_in_text_masks_the_given_addresses_whatever_their_case() -> None:
    # An openid has no shape to recognise: only being named masks it.
    text = "o-AliceWX refused; LEE@Example.com and lee@example.com; o-alicewx again"
    assert mask_in_text(text, "o-alicewx", "lee@example.com", "") == (
        "o-A***eWX refused; L***@Example.com and l***@example.com; o-a***ewx again"
    )
    assert mask_in_text("o-alicewx refused") == "o-alicewx refused"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past
        ("nan", None),
        ("inf", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == expected
