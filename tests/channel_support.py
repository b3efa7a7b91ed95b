"""What the channel adapter tests share: envelopes, the WeChat test app, a port nobody listens on,
and the fault drills run against the OpenAPI mock by the Twilio and SendGrid tests."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from openapi_mock import OpenApiMock

from channels import DeliveryResult, Envelope, TransientError
from nurture.language.templates import RenderedMessage

_ENVELOPE = Envelope(
    address="",
    idempotency_key="run-1:s1",
    user_id="u1",
    journey="welcome_series",
    category="marketing",
    unsubscribe_url="https://n.example/u/tok",
)


def envelope(address: str, key: str = "run-1:s1", **changes: Any) -> Envelope:
    """A marketing send to ``address`` for the send ``key`` (user ``u1``, journey
    ``welcome_series``, an unsubscribe link), with ``changes``."""
    return dataclasses.replace(_ENVELOPE, address=address, idempotency_key=key, **changes)


# -- the WeChat test app -----------------------------------------------------------------------

WECHAT_APP_ID = "wx-test-app"
WECHAT_SECRET = "s3cret-app-secret-value"
WECHAT_TEMPLATE = "tpl-order-shipped"
WECHAT_MESSAGE = RenderedMessage(
    channel="wechat",
    template="order_shipped",
    locale="zh-CN",
    template_id=WECHAT_TEMPLATE,
    data={"first": "您的订单已发货", "keyword1": "NU-1024", "remark": "感谢惠顾"},
    url="https://shop.example/orders/NU-1024",
)


def wechat_envelope(openid: str = "o-alice", key: str = "run-1:s1") -> Envelope:
    return envelope(openid, key)


# -- transport -----------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def http_date_in(seconds: int) -> str:
    """An HTTP date ``seconds`` from now, as a ``Retry-After`` may give it."""
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


def assert_wait(error: TransientError, expected: tuple[float, float] | None) -> None:
    """``error.retry_after`` is ``None``, or within ``expected`` (low, high) seconds."""
    if expected is None:
        assert error.retry_after is None
    else:
        assert error.retry_after is not None
        assert expected[0] <= error.retry_after <= expected[1]


# -- fault drills against the OpenAPI mock --------------------------------------------------------

Send = Callable[[], Awaitable[DeliveryResult]]

# (fault, reason, maybe_sent). The mock never accepts these requests, but a timeout or a dropped
# connection looks to the client exactly like an answer lost after acceptance: it must say
# maybe_sent. A 429 or 5xx is the provider saying it did not take the message.
FAULT_CASES: list[tuple[str, str, bool]] = [
    ("429", "rate_limited", False),
    ("500", "provider_error", False),
    ("503", "provider_error", False),
    ("timeout", "timeout", True),
    ("drop", "connection", True),
]

# The provider adapters' timeout in these tests. A loaded CI machine can take more than a few
# hundred milliseconds to validate a request against the OpenAPI spec and answer, so a shorter
# timeout turns a scripted answer into a "timeout"; the mock holds a ``timeout`` fault for
# ``OpenApiMock.timeout_hold`` (5 s), well past this.
CLIENT_TIMEOUT = 2.0

# (how the answer is lost, reason): the mock accepts the request, then closes the connection
# without answering, or holds the answer past the client's timeout.
LOST_ANSWERS: list[tuple[str, str]] = [("accept_then_drop", "connection"), ("hold", "timeout")]


async def fault_then_retry(mock: OpenApiMock, fault: str, send: Send) -> TransientError:
    """Fault the next request: ``send`` fails transiently and nothing is accepted; a second
    ``send`` is accepted once and returns the id the mock gave. Returns the first failure."""
    mock.fail_next(fault)
    with pytest.raises(TransientError) as caught:
        await send()
    assert mock.accepted == []

    result = await send()

    assert len(mock.accepted) == 1
    assert result.provider_id == mock.accepted[0].response_id
    assert [request.fault for request in mock.faulted] == [fault]
    assert mock.rejected == []
    return caught.value


async def lose_answer(mock: OpenApiMock, how: str, send: Send) -> TransientError:
    """Have the mock accept the next request and lose its answer (see :data:`LOST_ANSWERS`);
    ``send`` must fail with ``maybe_sent`` although the mock has the request. Returns the failure."""
    accepted, faulted = len(mock.accepted), len(mock.faulted)
    if how == "hold":
        mock.hold_next()
    else:
        mock.fail_next(how)
    with pytest.raises(TransientError) as caught:
        await send()
    assert caught.value.maybe_sent
    assert len(mock.accepted) == accepted + 1 and len(mock.faulted) == faulted
    assert mock.rejected == []
    return caught.value
