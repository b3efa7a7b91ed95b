"""WeChat template messages against the loopback WeChat API server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from channel_support import WECHAT_APP_ID as APP_ID
from channel_support import WECHAT_MESSAGE as MESSAGE
from channel_support import WECHAT_SECRET as SECRET
from channel_support import WECHAT_TEMPLATE as TEMPLATE
from channel_support import assert_wait, http_date_in
from channel_support import wechat_envelope as envelope
from wechat_server import WeChatServer

from channels import Channel, DeliveryResult, PermanentError, TransientError
from channels.wechat import (
    ERRCODES,
    TOKEN_ERRCODES,
    MemoryTokens,
    WeChatTemplate,
    classify,
    client_msg_id,
    template_payload,
)
from nurture.language.templates import RenderedMessage
from nurture.service.devserver import free_port

MINI = RenderedMessage(
    channel="wechat",
    template="order_shipped",
    locale=None,
    template_id=TEMPLATE,
    data={"keyword1": "NU-1024"},
    miniprogram={"appid": "wx-mini", "pagepath": "pages/order?id=NU-1024"},
)


@pytest.fixture
def server() -> Iterator[WeChatServer]:
    with WeChatServer(
        app_id=APP_ID,
        app_secret=SECRET,
        openids={"o-alice", "o-bob"},
        non_followers={"o-gone"},
        templates={TEMPLATE},
        hang=4.0,
    ) as running:
        yield running


@pytest.fixture
async def wechat(server: WeChatServer) -> AsyncIterator[WeChatTemplate]:
    channel = WeChatTemplate(
        app_id=APP_ID, app_secret=SECRET, tokens=MemoryTokens(), base_url=server.url, timeout=1.5
    )
    yield channel
    await channel.aclose()


# -- payload ---------------------------------------------------------------------------------


def test_payload_with_url_wraps_each_field_in_value() -> None:
    payload = template_payload(MESSAGE, "o-alice")

    assert payload == {
        "touser": "o-alice",
        "template_id": TEMPLATE,
        "url": "https://shop.example/orders/NU-1024",
        "data": {
            "first": {"value": "您的订单已发货"},
            "keyword1": {"value": "NU-1024"},
            "remark": {"value": "感谢惠顾"},
        },
    }


def test_payload_with_miniprogram_omits_url() -> None:
    payload = template_payload(MINI, "o-bob", client_msg_id="abc")

    assert "url" not in payload
    assert payload["miniprogram"] == {"appid": "wx-mini", "pagepath": "pages/order?id=NU-1024"}
    assert payload["client_msg_id"] == "abc"


def test_payload_without_links_and_without_template_id() -> None:
    bare = RenderedMessage(channel="wechat", template="t", locale=None, template_id="tid", data={})
    assert template_payload(bare, "o") == {"touser": "o", "template_id": "tid", "data": {}}
    with pytest.raises(ValueError, match="template_id"):
        template_payload(RenderedMessage(channel="wechat", template="t", locale=None), "o")


def test_client_msg_id_is_stable_and_short() -> None:
    assert client_msg_id("run-1:s1") == client_msg_id("run-1:s1")
    assert client_msg_id("run-1:s1") != client_msg_id("run-1:s2")
    assert len(client_msg_id("r" * 500 + ":s")) <= 64


# -- classify --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("errcode", "kind", "reason"),
    [
        (-1, TransientError, "busy"),
        (45009, TransientError, "rate_limited"),
        (45011, TransientError, "rate_limited"),
        (40003, PermanentError, "invalid_openid"),
        (43004, PermanentError, "not_following"),
        (43101, PermanentError, "refused"),
        (40037, PermanentError, "invalid_template"),
        (47001, PermanentError, "bad_request"),
        (47003, PermanentError, "bad_request"),
        (40013, TransientError, "auth"),
        (40125, TransientError, "auth"),
        (40164, TransientError, "auth"),
        (48001, TransientError, "auth"),
        (42001, TransientError, "token"),
        (12345, PermanentError, "rejected"),
    ],
)
def test_classify(errcode: int, kind: type[Exception], reason: str) -> None:
    error = classify(errcode, "some message")
    assert type(error) is kind
    assert error.reason == reason
    assert str(errcode) in error.detail and "some message" in error.detail


# -- delivery --------------------------------------------------------------------------------


async def test_is_a_channel(wechat: WeChatTemplate) -> None:
    assert isinstance(wechat, Channel)
    assert wechat.provider == "wechat"


async def test_delivers_and_reuses_one_token(server: WeChatServer, wechat: WeChatTemplate) -> None:
    results = [await wechat.deliver(MESSAGE, envelope(key=f"run-{i}:s1")) for i in range(5)]
    results += await asyncio.gather(
        *(wechat.deliver(MINI, envelope("o-bob", key=f"run-c{i}:s1")) for i in range(10))
    )

    assert server.token_requests == 1
    accepted = server.messages
    assert len(accepted) == 15
    assert {message.token for message in accepted} == {server.tokens[0]}
    assert [r.provider_id for r in results[:5]] == [str(m.msgid) for m in accepted[:5]]
    assert sorted(r.provider_id or "" for r in results) == sorted(str(m.msgid) for m in accepted)
    assert all(r.provider == "wechat" for r in results)


async def test_payload_reaches_the_server_in_the_documented_shape(
    server: WeChatServer, wechat: WeChatTemplate
) -> None:
    await wechat.deliver(MESSAGE, envelope(key="run-1:s1"))
    await wechat.deliver(MINI, envelope("o-bob", key="run-1:s2"))

    first, second = (message.body for message in server.messages)
    assert first["touser"] == "o-alice" and first["template_id"] == TEMPLATE
    assert first["url"] == MESSAGE.url and "miniprogram" not in first
    assert first["data"]["first"] == {"value": "您的订单已发货"}
    assert first["client_msg_id"] == client_msg_id("run-1:s1")
    assert second["miniprogram"] == {"appid": "wx-mini", "pagepath": "pages/order?id=NU-1024"}
    assert "url" not in second


async def test_two_instances_in_one_process_fetch_once(server: WeChatServer) -> None:
    tokens = MemoryTokens()
    channels = [
        WeChatTemplate(app_id=APP_ID, app_secret=SECRET, tokens=tokens, base_url=server.url) for _ in range(2)
    ]
    try:
        await asyncio.gather(
            *(channels[i % 2].deliver(MESSAGE, envelope(key=f"run-{i}:s1")) for i in range(8))
        )
    finally:
        for channel in channels:
            await channel.aclose()
    assert server.token_requests == 1
    assert len(server.messages) == 8


async def test_token_near_expiry_is_replaced(server: WeChatServer) -> None:
    tokens = MemoryTokens()
    await tokens.put(f"wechat:{APP_ID}", "old-token", datetime.now(UTC) + timedelta(seconds=60))
    async with WeChatTemplate(app_id=APP_ID, app_secret=SECRET, tokens=tokens, base_url=server.url) as ch:
        await ch.deliver(MESSAGE, envelope())

    assert server.token_requests == 1
    stored = await tokens.get(f"wechat:{APP_ID}")
    assert stored is not None and stored[0] == server.tokens[0]
    assert stored[1] > datetime.now(UTC) + timedelta(seconds=7000)
    assert server.messages[0].token == server.tokens[0]


async def test_expired_token_is_refreshed_once_and_the_send_succeeds(
    server: WeChatServer, wechat: WeChatTemplate
) -> None:
    await wechat.deliver(MESSAGE, envelope(key="run-1:s1"))
    server.expire_tokens()

    result = await wechat.deliver(MESSAGE, envelope(key="run-2:s1"))

    assert server.token_requests == 2
    assert server.send_requests == 3
    assert len(server.messages) == 2
    assert server.messages[1].token == server.tokens[1]
    assert result.provider_id == str(server.messages[1].msgid)


async def test_unknown_stored_token_is_discarded_and_replaced(server: WeChatServer) -> None:
    tokens = MemoryTokens()
    name = f"wechat:{APP_ID}"
    await tokens.put(name, "revoked", datetime.now(UTC) + timedelta(hours=1))
    async with WeChatTemplate(app_id=APP_ID, app_secret=SECRET, tokens=tokens, base_url=server.url) as ch:
        await ch.deliver(MESSAGE, envelope())

    assert server.token_requests == 1
    assert len(server.messages) == 1
    assert (await tokens.get(name) or ("",))[0] == server.tokens[0]


@pytest.mark.parametrize("errcode", sorted(TOKEN_ERRCODES))
async def test_token_refused_twice_is_transient_after_one_refresh(
    server: WeChatServer, wechat: WeChatTemplate, errcode: int
) -> None:
    server.fail_next(errcode, count=2)

    with pytest.raises(TransientError) as caught:
        await wechat.deliver(MESSAGE, envelope())

    assert caught.value.reason == "token"
    assert server.token_requests == 2
    assert server.messages == []
    await wechat.deliver(MESSAGE, envelope())
    assert len(server.messages) == 1


@pytest.mark.parametrize("errcode", sorted(code for code in ERRCODES if code not in TOKEN_ERRCODES))
async def test_each_mapped_errcode_through_the_server(
    server: WeChatServer, wechat: WeChatTemplate, errcode: int
) -> None:
    kind, reason = ERRCODES[errcode]
    server.fail_next(errcode)

    with pytest.raises(kind) as caught:
        await wechat.deliver(MESSAGE, envelope())

    assert type(caught.value) is kind
    assert caught.value.reason == reason
    assert str(errcode) in caught.value.detail
    assert server.messages == []


async def test_unknown_errcode_is_permanent_rejected(server: WeChatServer, wechat: WeChatTemplate) -> None:
    server.fail_next(48004)
    with pytest.raises(PermanentError) as caught:
        await wechat.deliver(MESSAGE, envelope())
    assert caught.value.reason == "rejected"
    assert "48004" in caught.value.detail


async def test_real_refusals_from_the_server(server: WeChatServer, wechat: WeChatTemplate) -> None:
    with pytest.raises(PermanentError) as unknown:
        await wechat.deliver(MESSAGE, envelope("o-stranger"))
    with pytest.raises(PermanentError) as gone:
        await wechat.deliver(MESSAGE, envelope("o-gone"))
    wrong = RenderedMessage(channel="wechat", template="x", locale=None, template_id="nope", data={})
    with pytest.raises(PermanentError) as template:
        await wechat.deliver(wrong, envelope())

    assert (unknown.value.reason, gone.value.reason, template.value.reason) == (
        "invalid_openid",
        "not_following",
        "invalid_template",
    )
    assert server.messages == []


async def test_message_without_template_id_is_permanent(wechat: WeChatTemplate) -> None:
    with pytest.raises(PermanentError) as caught:
        await wechat.deliver(RenderedMessage(channel="wechat", template="t", locale=None), envelope())
    assert caught.value.reason == "bad_request"


@pytest.mark.parametrize(
    ("secret", "app_id", "code"), [("wrong", APP_ID, "40125"), (SECRET, "wx-other", "40013")]
)
async def test_bad_credentials_are_transient_auth(
    server: WeChatServer, secret: str, app_id: str, code: str
) -> None:
    async with WeChatTemplate(
        app_id=app_id, app_secret=secret, tokens=MemoryTokens(), base_url=server.url
    ) as channel:
        with pytest.raises(TransientError) as caught:
            await channel.deliver(MESSAGE, envelope())
    assert caught.value.reason == "auth"
    assert code in caught.value.detail
    assert secret not in str(caught.value)
    assert server.token_requests == 0


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("busy", "busy"), ("500", "server_error"), ("timeout", "timeout"), ("drop", "connection")],
)
async def test_faults_are_transient_and_a_retry_sends_once(
    server: WeChatServer, wechat: WeChatTemplate, fault: str, reason: str
) -> None:
    await wechat.deliver(MESSAGE, envelope(key="run-0:s1"))  # the token is already held
    server.fail_next(fault)

    with pytest.raises(TransientError) as caught:
        await wechat.deliver(MESSAGE, envelope(key="run-1:s1"))
    assert caught.value.reason == reason
    # The retry carries the same client_msg_id, so WeChat de-duplicates it: never "maybe sent".
    assert not caught.value.maybe_sent

    result = await wechat.deliver(MESSAGE, envelope(key="run-1:s1"))
    assert [m.body["client_msg_id"] for m in server.messages] == [
        client_msg_id("run-0:s1"),
        client_msg_id("run-1:s1"),
    ]
    assert result.provider_id == str(server.messages[1].msgid)
    assert server.token_requests == 1


async def test_fault_on_the_token_endpoint_is_transient(server: WeChatServer, wechat: WeChatTemplate) -> None:
    server.fail_next("busy", endpoint="token")
    with pytest.raises(TransientError) as caught:
        await wechat.deliver(MESSAGE, envelope())
    assert caught.value.reason == "busy"
    assert server.send_requests == 0

    await wechat.deliver(MESSAGE, envelope())
    assert server.token_requests == 1 and len(server.messages) == 1


async def test_answer_lost_after_accept_is_not_sent_twice(
    server: WeChatServer, wechat: WeChatTemplate
) -> None:
    await wechat.deliver(MESSAGE, envelope(key="run-0:s1"))
    server.fail_next("drop_after_accept")

    with pytest.raises(TransientError) as caught:
        await wechat.deliver(MESSAGE, envelope(key="run-1:s1"))
    assert caught.value.reason == "connection"
    assert not caught.value.maybe_sent  # the retry below is safe, and proves it
    result = await wechat.deliver(MESSAGE, envelope(key="run-1:s1"))

    assert len(server.messages) == 2
    assert result.provider_id == str(server.messages[1].msgid)


async def test_duplicate_client_msg_id_answer_counts_as_accepted(
    server: WeChatServer, wechat: WeChatTemplate
) -> None:
    server.fail_next(45065)
    result = await wechat.deliver(MESSAGE, envelope())
    assert result == DeliveryResult(provider="wechat", provider_id=None)


async def test_server_down_is_transient() -> None:
    async with WeChatTemplate(
        app_id=APP_ID,
        app_secret=SECRET,
        tokens=MemoryTokens(),
        base_url=f"http://127.0.0.1:{free_port()}",
        timeout=1.0,
    ) as channel:
        with pytest.raises(TransientError) as caught:
            await channel.deliver(MESSAGE, envelope())
    assert caught.value.reason == "connection"


@pytest.mark.parametrize(
    ("status", "headers", "reason", "expected"),
    [
        (429, lambda: {"Retry-After": "7"}, "rate_limited", (7.0, 7.0)),
        (503, lambda: {"Retry-After": http_date_in(120)}, "server_error", (110.0, 120.0)),
        (503, lambda: {"Retry-After": "later"}, "server_error", None),
        (502, lambda: {}, "server_error", None),
    ],
    ids=["429-seconds", "503-http-date", "503-unreadable", "502-absent"],
)
async def test_http_errors_keep_the_retry_after(
    status: int, headers: Callable[[], dict[str, str]], reason: str, expected: tuple[float, float] | None
) -> None:
    # A proxy in front of WeChat answers in HTTP; the wait it asks for is kept, in either form.
    sent = headers()
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda _: httpx.Response(status, headers=sent)))
    channel = WeChatTemplate(app_id=APP_ID, app_secret=SECRET, tokens=MemoryTokens(), http=client)
    with pytest.raises(TransientError) as caught:
        await channel.deliver(MESSAGE, envelope())
    await client.aclose()
    assert caught.value.reason == reason
    assert not caught.value.maybe_sent
    assert_wait(caught.value, expected)


async def test_non_json_and_wrong_base_url_are_transient(server: WeChatServer) -> None:
    async with WeChatTemplate(
        app_id=APP_ID, app_secret=SECRET, tokens=MemoryTokens(), base_url=server.url + "/prefix"
    ) as channel:
        with pytest.raises(TransientError) as caught:
            await channel.deliver(MESSAGE, envelope())
    assert caught.value.reason == "http_error"

    def plain(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>maintenance</html>")

    client = httpx.AsyncClient(transport=httpx.MockTransport(plain))
    channel = WeChatTemplate(app_id=APP_ID, app_secret=SECRET, tokens=MemoryTokens(), http=client)
    with pytest.raises(TransientError) as caught:
        await channel.deliver(MESSAGE, envelope())
    assert caught.value.reason == "bad_response"
    await channel.aclose()
    assert not client.is_closed  # a handed-in client belongs to the caller
    await client.aclose()


async def test_logs_hide_token_secret_and_openid(
    server: WeChatServer, wechat: WeChatTemplate, caplog: pytest.LogCaptureFixture
) -> None:
    openid = "o-alice"
    with caplog.at_level(logging.DEBUG):
        await wechat.deliver(MESSAGE, envelope(openid))
        server.expire_tokens()
        await wechat.deliver(MESSAGE, envelope(openid, key="run-2:s1"))

    text = caplog.text
    assert "HTTP Request" in text  # httpx did log its requests, with the query redacted
    assert "access_token=%2A%2A%2A" in text or "access_token=***" in text
    assert SECRET not in text
    for token in server.tokens:
        assert token not in text
    assert openid not in text
