"""Contract tests for the SendGrid email adapter: the real ``sendgrid`` SDK against a mock that
validates every request with SendGrid's own OpenAPI description of ``POST /v3/mail/send``."""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from typing import Any

import httpx
import pytest
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

from channels import Channel, DeliveryError, Envelope, PermanentError, TransientError
from channels.sendgrid import SendGridEmail, classify
from nurture.language.templates import RenderedMessage

API_KEY = "SG.test-key"
RECIPIENT = "lee@example.com"
SEND = "/v3/mail/send"

EMAIL = RenderedMessage(
    channel="email",
    template="welcome",
    locale=None,
    subject="Welcome to Nurture",
    preheader="Three things to try first",
    html="<html><body><p>Welcome!</p></body></html>",
    text="Welcome!",
)
ENVELOPE = envelope(RECIPIENT)
MINIMAL_MAIL = {
    "personalizations": [{"to": [{"email": RECIPIENT}]}],
    "from": {"email": "hello@n.example"},
    "subject": "Hi",
    "content": [{"type": "text/plain", "value": "Hi"}],
}


@pytest.fixture
def mock() -> Iterator[OpenApiMock]:
    with OpenApiMock(provider_spec("sendgrid_mail_v3.json")) as server:
        yield server


def adapter(mock: OpenApiMock, **options: Any) -> SendGridEmail:
    settings: dict[str, Any] = {
        "api_key": API_KEY,
        "from_email": "hello@n.example",
        "from_name": "Nurture",
        "host": mock.url,
        "timeout": CLIENT_TIMEOUT,
    }
    settings.update(options)
    return SendGridEmail(**settings)


# -- successful sends ---------------------------------------------------------------------------


async def test_marketing_mail_is_valid_and_complete(mock: OpenApiMock) -> None:
    email = adapter(mock)
    assert isinstance(email, Channel)

    result = await email.deliver(EMAIL, ENVELOPE)

    assert mock.rejected == []
    [request] = mock.accepted
    assert (request.method, request.path) == ("POST", SEND)
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    mail = request.body
    [personalization] = mail["personalizations"]
    assert personalization["to"] == [{"email": RECIPIENT}]
    assert personalization["custom_args"] == {
        "run_id": "run-1",
        "step_id": "s1",
        "journey": "welcome_series",
        "user_id": "u1",
        "idempotency_key": "run-1:s1",
    }
    assert mail["from"] == {"email": "hello@n.example", "name": "Nurture"}
    assert mail["subject"] == EMAIL.subject
    # text/plain first: SendGrid requires that order when both are sent.
    assert mail["content"] == [
        {"type": "text/plain", "value": EMAIL.text},
        {"type": "text/html", "value": EMAIL.html},
    ]
    assert mail["categories"] == ["welcome_series"]
    assert mail["headers"] == {
        "List-Unsubscribe": "<https://n.example/u/tok>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert "reply_to" not in mail
    assert result.provider == "sendgrid"
    assert result.provider_id is not None and result.provider_id == request.response_id


@pytest.mark.parametrize(
    "changes",
    [{"category": "transactional"}, {"unsubscribe_url": None}],
    ids=["transactional", "marketing-without-link"],
)
async def test_no_unsubscribe_headers_without_marketing_and_a_link(
    mock: OpenApiMock, changes: dict[str, Any]
) -> None:
    await adapter(mock).deliver(EMAIL, dataclasses.replace(ENVELOPE, **changes))

    assert mock.rejected == []
    [request] = mock.accepted
    headers = request.body.get("headers", {})
    assert "List-Unsubscribe" not in headers and "List-Unsubscribe-Post" not in headers


async def test_empty_fields_are_left_out(mock: OpenApiMock) -> None:
    await adapter(mock, from_name=None).deliver(
        EMAIL, Envelope(address=RECIPIENT, idempotency_key="run-9:s3")
    )

    assert mock.rejected == []
    mail = mock.accepted[0].body
    assert mail["personalizations"][0]["custom_args"] == {
        "run_id": "run-9",
        "step_id": "s3",
        "idempotency_key": "run-9:s3",
    }
    assert "categories" not in mail
    assert mail["from"] == {"email": "hello@n.example"}


async def test_reply_to(mock: OpenApiMock) -> None:
    await adapter(mock, reply_to="help@n.example").deliver(EMAIL, ENVELOPE)
    assert mock.rejected == []
    assert mock.accepted[0].body["reply_to"] == {"email": "help@n.example"}


async def test_refuses_a_message_that_is_not_email(mock: OpenApiMock) -> None:
    sms = RenderedMessage(channel="sms", template="w", locale=None, text="Hi")
    with pytest.raises(ValueError, match="email"):
        await adapter(mock).deliver(sms, ENVELOPE)
    assert mock.accepted == mock.faulted == []


# -- the mock really validates ------------------------------------------------------------------


def test_mock_rejects_mail_without_personalizations(mock: OpenApiMock) -> None:
    mail = {key: value for key, value in MINIMAL_MAIL.items() if key != "personalizations"}
    answer = httpx.post(mock.url + SEND, json=mail, headers={"Authorization": f"Bearer {API_KEY}"})

    assert answer.status_code == 422
    assert "'personalizations' is a required property" in answer.json()["message"]
    assert mock.accepted == []
    [(request, problem)] = mock.rejected
    assert request.body == mail
    assert "'personalizations' is a required property" in problem


def test_mock_accepts_the_minimal_documented_mail(mock: OpenApiMock) -> None:
    answer = httpx.post(mock.url + SEND, json=MINIMAL_MAIL, headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 202
    assert answer.headers["X-Message-Id"] == mock.accepted[0].response_id
    assert mock.rejected == []


def test_mock_rejects_content_of_the_wrong_shape(mock: OpenApiMock) -> None:
    mail = {**MINIMAL_MAIL, "content": [{"type": "text/plain"}]}
    answer = httpx.post(mock.url + SEND, json=mail, headers={"Authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 422
    assert "'value' is a required property" in mock.rejected[0][1]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}],
    ids=["none", "basic", "empty-token"],
)
def test_mock_wants_a_bearer_token(mock: OpenApiMock, headers: dict[str, str]) -> None:
    answer = httpx.post(mock.url + SEND, json=MINIMAL_MAIL, headers=headers)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert len(mock.rejected) == 1 and mock.accepted == []


# -- error mapping ------------------------------------------------------------------------------


def sendgrid_errors(message: str, field: str | None = None) -> dict[str, Any]:
    """An error body in the format SendGrid documents for Mail Send."""
    return {"errors": [{"message": message, "field": field, "help": None}]}


# (HTTP status, body, error class, reason, text the detail must contain)
ERROR_CASES: list[tuple[int, dict[str, Any] | str, type[DeliveryError], str, str]] = [
    (
        400,
        sendgrid_errors("The to email does not contain a valid address.", "personalizations.0.to.0.email"),
        PermanentError,
        "bad_request",
        "The to email does not contain a valid address. (field: personalizations.0.to.0.email)",
    ),
    (413, sendgrid_errors("Payload Too Large"), PermanentError, "too_large", "Payload Too Large"),
    (
        401,
        sendgrid_errors("The provided authorization grant is invalid, expired, or revoked"),
        TransientError,
        "auth",
        "authorization grant",
    ),
    (403, sendgrid_errors("access forbidden"), TransientError, "auth", "access forbidden"),
    (429, sendgrid_errors("too many requests"), TransientError, "rate_limited", "too many requests"),
    (500, sendgrid_errors("internal error"), TransientError, "provider_error", "internal error"),
    (502, "<html>Bad Gateway</html>", TransientError, "provider_error", "Bad Gateway"),
    (503, "", TransientError, "provider_error", "HTTP 503"),
    # A wrong API URL: transient, so the mail waits for the operator's fix instead of falling back.
    (404, sendgrid_errors("resource not found"), TransientError, "endpoint", "HTTP 404"),
    (405, sendgrid_errors("method not allowed"), TransientError, "endpoint", "HTTP 405"),
    (409, sendgrid_errors("conflict"), PermanentError, "rejected", "HTTP 409"),
]


@pytest.mark.parametrize(("status", "body", "error", "reason", "detail"), ERROR_CASES)
async def test_error_answers_through_the_sdk(
    mock: OpenApiMock,
    status: int,
    body: dict[str, Any] | str,
    error: type[DeliveryError],
    reason: str,
    detail: str,
) -> None:
    mock.answer_next(status, body)

    with pytest.raises(error) as caught:
        await adapter(mock).deliver(EMAIL, ENVELOPE)

    assert caught.value.reason == reason
    assert detail in caught.value.detail
    assert not getattr(caught.value, "maybe_sent", False)  # SendGrid answered: it did not take it
    assert mock.accepted == [] and mock.rejected == []
    assert [request.fault for request in mock.faulted] == [f"answer:{status}"]


async def test_a_wrong_api_url_is_transient(mock: OpenApiMock) -> None:
    # The mock answers 404 for a path outside the spec, as SendGrid does.
    with pytest.raises(TransientError) as caught:
        await adapter(mock, host=mock.url + "/api").deliver(EMAIL, ENVELOPE)
    assert caught.value.reason == "endpoint"
    assert mock.accepted == [] and len(mock.rejected) == 1


@pytest.mark.parametrize(("status", "body", "error", "reason", "detail"), ERROR_CASES)
def test_classify(
    status: int, body: dict[str, Any] | str, error: type[DeliveryError], reason: str, detail: str
) -> None:
    raw = json.dumps(body) if isinstance(body, dict) else body
    for form in (raw, raw.encode()):
        failure = classify(status, form, {})
        assert type(failure) is error
        assert failure.reason == reason
        assert detail in failure.detail


def test_classify_masks_addresses() -> None:
    failure = classify(
        400, '{"errors": [{"message": "lee@example.com bounced before", "field": null}]}', None
    )
    assert RECIPIENT not in failure.detail and "l***@example.com" in failure.detail


def in_seconds(seconds: int) -> str:
    return str(int(time.time()) + seconds)


def as_message(headers: dict[str, str]) -> Message:
    """Headers as urllib hands them over (an ``http.client`` message)."""
    message = Message()
    for name, value in headers.items():
        message[name] = value
    return message


# Header factories, called in the test so the clock has not moved since.
RATE_LIMIT_CASES: list[tuple[str, Callable[[], Any], tuple[float, float] | None]] = [
    ("seconds", lambda: {"Retry-After": "7"}, (7.0, 7.0)),
    ("lower-case", lambda: {"retry-after": "7"}, (7.0, 7.0)),
    ("http-date", lambda: {"Retry-After": http_date_in(120)}, (110.0, 120.0)),
    ("reset", lambda: {"X-RateLimit-Reset": in_seconds(30)}, (25.0, 30.0)),
    ("reset-message", lambda: as_message({"X-RateLimit-Reset": in_seconds(30)}), (25.0, 30.0)),
    ("retry-after-wins", lambda: {"Retry-After": "2", "X-RateLimit-Reset": in_seconds(30)}, (2.0, 2.0)),
    ("absent", lambda: {}, None),
    ("no-headers", lambda: None, None),
]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [case[1:] for case in RATE_LIMIT_CASES],
    ids=[case[0] for case in RATE_LIMIT_CASES],
)
def test_classify_rate_limit_wait(headers: Callable[[], Any], expected: tuple[float, float] | None) -> None:
    failure = classify(429, b"", headers())
    assert isinstance(failure, TransientError) and failure.reason == "rate_limited"
    assert_wait(failure, expected)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [case[1:] for case in RATE_LIMIT_CASES if case[0] not in ("reset-message", "no-headers")],
    ids=[case[0] for case in RATE_LIMIT_CASES if case[0] not in ("reset-message", "no-headers")],
)
async def test_rate_limit_wait_through_the_sdk(
    mock: OpenApiMock, headers: Callable[[], dict[str, str]], expected: tuple[float, float] | None
) -> None:
    mock.answer_next(429, sendgrid_errors("too many requests"), headers())
    with pytest.raises(TransientError) as caught:
        await adapter(mock).deliver(EMAIL, ENVELOPE)
    assert caught.value.reason == "rate_limited"
    assert_wait(caught.value, expected)


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "reason", "maybe_sent"), FAULT_CASES)
async def test_fault_is_transient_and_the_retry_sends_once(
    mock: OpenApiMock, fault: str, reason: str, maybe_sent: bool
) -> None:
    email = adapter(mock)

    failure = await fault_then_retry(mock, fault, lambda: email.deliver(EMAIL, ENVELOPE))

    assert failure.reason == reason
    assert failure.maybe_sent is maybe_sent
    if fault == "429":
        assert failure.retry_after == 1.0


@pytest.mark.parametrize(("how", "reason"), LOST_ANSWERS)
async def test_an_answer_lost_after_acceptance_may_have_sent(
    mock: OpenApiMock, how: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    failure = await lose_answer(mock, how, lambda: adapter(mock).deliver(EMAIL, ENVELOPE))

    assert failure.reason == reason
    assert "after the request was sent" in failure.detail
    assert "sendgrid may have taken run-1:s1 for l***@example.com" in caplog.text
    assert RECIPIENT not in caplog.text


async def test_connection_refused_is_plain_transient() -> None:
    email = SendGridEmail(
        api_key=API_KEY, from_email="hello@n.example", host=f"http://127.0.0.1:{closed_port()}", timeout=0.3
    )
    with pytest.raises(TransientError) as caught:
        await email.deliver(EMAIL, ENVELOPE)
    assert caught.value.reason == "connection"
    assert not caught.value.maybe_sent  # nothing reached SendGrid: sending again is safe
    assert "ConnectionRefusedError" in caught.value.detail


# What urllib raises in each phase: it wraps failures to connect or to write the request in
# URLError, and lets those while reading the answer through bare. (error, reason, maybe_sent)
URLLIB_FAILURES: list[tuple[Callable[[], BaseException], str, bool]] = [
    (lambda: urllib.error.URLError(TimeoutError("timed out")), "timeout", False),
    (lambda: urllib.error.URLError(ConnectionRefusedError(111, "refused")), "connection", False),
    (lambda: urllib.error.URLError(ConnectionResetError(104, "reset")), "connection", False),
    (lambda: urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), "connection", False),
    (lambda: TimeoutError("timed out"), "timeout", True),
    (lambda: http.client.RemoteDisconnected("Remote end closed connection"), "connection", True),
    (lambda: ConnectionResetError(104, "reset"), "connection", True),
    (lambda: http.client.IncompleteRead(b"{"), "connection", True),
]


@pytest.mark.parametrize(
    ("error", "reason", "maybe_sent"),
    URLLIB_FAILURES,
    ids=[
        "connect-timeout",
        "refused",
        "reset-sending",
        "dns",
        "read-timeout",
        "closed",
        "reset",
        "truncated",
    ],
)
async def test_transport_failures_say_whether_sendgrid_may_have_the_mail(
    monkeypatch: pytest.MonkeyPatch, error: Callable[[], BaseException], reason: str, maybe_sent: bool
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error()

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", fail)
    email = SendGridEmail(api_key=API_KEY, from_email="hello@n.example", host="http://127.0.0.1:9")
    with pytest.raises(TransientError) as caught:
        await email.deliver(EMAIL, ENVELOPE)
    assert (caught.value.reason, caught.value.maybe_sent) == (reason, maybe_sent)


async def test_logs_never_show_the_address_or_the_key(
    mock: OpenApiMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    email = adapter(mock)
    await email.deliver(EMAIL, ENVELOPE)
    mock.answer_next(400, sendgrid_errors(f"{RECIPIENT} does not exist", "personalizations.0.to.0.email"))
    with pytest.raises(PermanentError):
        await email.deliver(EMAIL, ENVELOPE)

    assert "l***@example.com" in caplog.text
    assert RECIPIENT not in caplog.text
    assert API_KEY not in caplog.text
