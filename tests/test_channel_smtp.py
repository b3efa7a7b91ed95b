"""SMTP email against aiosmtpd servers on loopback: plain, authenticated, STARTTLS and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, Literal

import channel_support
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from channels import Channel, Envelope, PermanentError, TransientError
from channels.smtp import SmtpEmail, message_id
from nurture.language.templates import RenderedMessage
from nurture.service.devserver import free_port

ADDRESS = "li.wei@example.com"
HTML = '<html><body><p>你好 Li, <a href="https://shop.example">welcome</a></p></body></html>'
EMAIL = RenderedMessage(
    channel="email",
    template="welcome",
    locale="zh-CN",
    subject="欢迎, Li",
    preheader="Your first week",
    html=HTML,
    text="你好 Li, welcome (https://shop.example)",
)


def envelope(key: str = "run-1:s1", *, address: str = ADDRESS, **changes: Any) -> Envelope:
    return channel_support.envelope(address, key, **changes)


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    authenticated: bool


@dataclass
class Mailbox:
    """An aiosmtpd handler: records what it accepts, refuses what it is told to.

    ``after_rcpt``/``after_data``: ``drop`` closes the connection instead of answering (at RCPT
    nothing is recorded; after DATA the message is recorded first, as a server that queued it
    and then lost the connection); ``hang`` records the message and answers only after
    ``hang_for`` seconds, long after the client gave up."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    after_rcpt: Literal["answer", "drop"] = "answer"
    after_data: Literal["answer", "drop", "hang"] = "answer"
    hang_for: float = 2.0
    quit_reply: str | None = None

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self.after_rcpt == "drop":
            server.transport.close()
            return "250 OK"  # never reaches the client
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        parsed = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), parsed, bool(session.authenticated))
        )
        if self.after_data == "drop":
            server.transport.close()
        elif self.after_data == "hang":
            await asyncio.sleep(self.hang_for)
        return "250 2.0.0 Ok: queued"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str | object:
        return self.quit_reply or MISSING


def check_password(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"mailer", b"right-password")
    return AuthResult(success=ok, handled=False)


@dataclass
class Server:
    port: int
    mailbox: Mailbox


@contextlib.contextmanager
def smtp_server(**options: Any) -> Iterator[Server]:
    """An aiosmtpd server on a free loopback port; ``options`` go to its ``Controller``."""
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **options)
    controller.start()
    try:
        yield Server(port, mailbox)
    finally:
        controller.stop()


@pytest.fixture
def server() -> Iterator[Server]:
    with smtp_server() as running:
        yield running


def plain(server: Server, **options: Any) -> SmtpEmail:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "security": "none",
        "from_address": "Nurture <hello@news.example>",
        "timeout": 5.0,
    }
    return SmtpEmail(**(settings | options))


@dataclass(frozen=True)
class Certificate:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and the contexts that serve and trust it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nurture test smtp")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert_file, key_file)
    return Certificate(serving, ssl.create_default_context(cafile=str(cert_file)))


def received_one(server: Server) -> EmailMessage:
    assert len(server.mailbox.messages) == 1
    return server.mailbox.messages[0].message


# -- the message ---------------------------------------------------------------------------


async def test_is_a_channel(server: Server) -> None:
    channel = plain(server)
    assert isinstance(channel, Channel)
    assert channel.provider == "smtp"


async def test_sends_text_then_html_alternatives(server: Server) -> None:
    result = await plain(server, reply_to="help@news.example").deliver(EMAIL, envelope())

    [received] = server.mailbox.messages
    assert received.mail_from == "hello@news.example"
    assert received.rcpt_tos == [ADDRESS]
    email = received.message
    assert email.get_content_type() == "multipart/alternative"
    parts = list(email.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
    assert isinstance(parts[0], EmailMessage) and isinstance(parts[1], EmailMessage)
    assert parts[0].get_content().strip() == EMAIL.text
    assert parts[1].get_content().strip() == HTML
    assert email["Subject"] == "欢迎, Li"
    assert email["From"] == "Nurture <hello@news.example>"
    assert email["To"] == ADDRESS
    assert email["Reply-To"] == "help@news.example"
    assert email["Date"] is not None
    assert result.provider == "smtp"
    assert result.provider_id == email["Message-ID"] == message_id("run-1:s1", "news.example")


@pytest.mark.parametrize(
    ("category", "url", "expected"),
    [
        ("marketing", "https://n.example/u/tok", True),
        ("marketing", None, False),
        ("transactional", "https://n.example/u/tok", False),
    ],
)
async def test_unsubscribe_headers_only_on_marketing_mail(
    server: Server, category: str, url: str | None, expected: bool
) -> None:
    await plain(server).deliver(EMAIL, envelope(category=category, unsubscribe_url=url))

    email = received_one(server)
    assert email["X-Nurture-Run"] == "run-1"
    assert email["X-Nurture-Step"] == "s1"
    if expected:
        assert email["List-Unsubscribe"] == "<https://n.example/u/tok>"
        assert email["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    else:
        assert email["List-Unsubscribe"] is None
        assert email["List-Unsubscribe-Post"] is None


async def test_message_id_is_stable_per_idempotency_key(server: Server) -> None:
    channel = plain(server)
    first = await channel.deliver(EMAIL, envelope("run-1:s1"))
    retry = await channel.deliver(EMAIL, envelope("run-1:s1"))
    other = await channel.deliver(EMAIL, envelope("run-1:s2"))

    ids = [received.message["Message-ID"] for received in server.mailbox.messages]
    assert ids == [first.provider_id, retry.provider_id, other.provider_id]
    assert first.provider_id == retry.provider_id != other.provider_id
    assert channel.build(EMAIL, envelope("run-1:s1"))["Message-ID"] == first.provider_id
    assert first.provider_id is not None and first.provider_id.endswith("@news.example>")


def test_subject_line_breaks_are_folded_and_html_only_mail_is_one_part() -> None:
    channel = SmtpEmail(host="127.0.0.1", from_address="hello@news.example")
    message = RenderedMessage(
        channel="email", template="t", locale=None, subject="Hello\r\nBcc: x@evil.example", html="<p>hi</p>"
    )

    email = channel.build(message, envelope(category="transactional"))

    assert email["Subject"] == "Hello Bcc: x@evil.example"
    assert email["Bcc"] is None
    assert email.get_content_type() == "text/html"


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="from_address"):
        SmtpEmail(host="h", from_address="nobody")
    with pytest.raises(ValueError, match="security"):
        SmtpEmail(host="h", from_address="a@b.example", security="tls")  # type: ignore[arg-type]


# -- refusals --------------------------------------------------------------------------------


async def test_recipient_refused_with_550_is_permanent(server: Server) -> None:
    server.mailbox.rcpt_replies[ADDRESS] = f"550 5.1.1 <{ADDRESS}>: Recipient address rejected"

    with pytest.raises(PermanentError) as caught:
        await plain(server).deliver(EMAIL, envelope())

    assert caught.value.reason == "rejected_recipient"
    assert "550" in caught.value.detail
    assert ADDRESS not in str(caught.value)  # the server quoted it; the detail is masked
    assert server.mailbox.messages == []


async def test_recipient_refused_with_450_is_transient(server: Server) -> None:
    server.mailbox.rcpt_replies[ADDRESS] = "450 4.2.0 Greylisted, try again later"

    with pytest.raises(TransientError) as caught:
        await plain(server).deliver(EMAIL, envelope())

    assert caught.value.reason == "deferred"
    assert "450" in caught.value.detail
    del server.mailbox.rcpt_replies[ADDRESS]
    await plain(server).deliver(EMAIL, envelope())
    assert len(server.mailbox.messages) == 1


@pytest.mark.parametrize(
    ("reply", "kind", "reason"),
    [
        ("554 5.7.1 Message rejected as spam", PermanentError, "rejected"),
        ("552 5.3.4 Message too big for system", PermanentError, "too_large"),
        ("451 4.3.0 Try later", TransientError, "deferred"),
    ],
)
async def test_content_refused(server: Server, reply: str, kind: type[Exception], reason: str) -> None:
    server.mailbox.data_reply = reply

    with pytest.raises(kind) as caught:
        await plain(server).deliver(EMAIL, envelope())

    assert type(caught.value) is kind
    assert getattr(caught.value, "reason", None) == reason
    assert not getattr(caught.value, "maybe_sent", False)  # the server answered


async def test_a_message_over_the_size_limit_is_permanent_too_large() -> None:
    # The server announces SIZE; smtplib declares the size in MAIL FROM and the server refuses
    # the sender with 552. The same mail would always be refused: fall back, do not retry.
    with smtp_server(data_size_limit=200) as server, pytest.raises(PermanentError) as caught:
        await plain(server).deliver(EMAIL, envelope())
    assert caught.value.reason == "too_large"
    assert caught.value.detail.startswith("552 ")
    assert server.mailbox.messages == []


@pytest.mark.parametrize(
    "address",
    [
        "not-an-address",
        "li@",
        f"{ADDRESS}, boss@example.com",
        f"Li <{ADDRESS}>",
        f"{ADDRESS}\r\nBcc: x@evil.example",
    ],
)
async def test_invalid_address_is_permanent(server: Server, address: str) -> None:
    with pytest.raises(PermanentError) as caught:
        await plain(server).deliver(EMAIL, envelope(address=address))
    assert caught.value.reason == "invalid_address"
    assert server.mailbox.messages == []


async def test_non_ascii_address_is_sent_with_smtputf8(server: Server) -> None:
    await plain(server).deliver(EMAIL, envelope(address="李雷@例子.中国"))
    assert server.mailbox.messages[0].rcpt_tos == ["李雷@例子.中国"]


# -- connections -----------------------------------------------------------------------------


async def test_server_down_is_transient() -> None:
    channel = SmtpEmail(host="127.0.0.1", port=free_port(), security="none", from_address="a@b.example")
    with pytest.raises(TransientError) as caught:
        await channel.deliver(EMAIL, envelope())
    assert caught.value.reason == "connection"
    assert not caught.value.maybe_sent  # refused: nothing was sent


@pytest.mark.parametrize(("after_data", "reason"), [("drop", "connection"), ("hang", "timeout")])
async def test_a_connection_lost_after_data_may_have_sent(
    after_data: Literal["drop", "hang"], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    with smtp_server() as server:
        server.mailbox.after_data = after_data
        with pytest.raises(TransientError) as caught:
            await plain(server, timeout=0.3).deliver(EMAIL, envelope())
    assert caught.value.reason == reason
    assert caught.value.maybe_sent  # the server had the message: it may deliver it
    assert len(server.mailbox.messages) == 1
    assert "smtp may have taken run-1:s1 for l***@example.com" in caplog.text
    assert ADDRESS not in caplog.text


async def test_an_odd_goodbye_after_acceptance_is_still_a_success(server: Server) -> None:
    # smtplib raises when QUIT is not answered 221, after the server took the message: failing
    # the send then would have it retried and delivered twice.
    server.mailbox.quit_reply = "250 2.0.0 Bye"
    result = await plain(server).deliver(EMAIL, envelope())
    assert result.provider_id == received_one(server)["Message-ID"]


async def test_a_connection_lost_before_data_is_plain_transient(server: Server) -> None:
    server.mailbox.after_rcpt = "drop"
    with pytest.raises(TransientError) as caught:
        await plain(server, timeout=0.3).deliver(EMAIL, envelope())
    assert caught.value.reason == "connection"
    assert not caught.value.maybe_sent  # DATA never went out: the server cannot have the message
    assert server.mailbox.messages == []


@contextlib.contextmanager
def raw_listener(greet: bool) -> Iterator[int]:
    """A TCP server that never speaks SMTP: it either stays silent or hangs up at once."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        held: list[socket.socket] = []
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            if greet:
                connection.close()
            else:
                held.append(connection)
        for connection in held:
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        listener.close()


async def test_silent_server_times_out() -> None:
    with raw_listener(greet=False) as port:
        channel = SmtpEmail(
            host="127.0.0.1", port=port, security="none", from_address="a@b.example", timeout=0.3
        )
        with pytest.raises(TransientError) as caught:
            await channel.deliver(EMAIL, envelope())
    assert caught.value.reason == "timeout"
    assert not caught.value.maybe_sent  # no greeting, so no DATA either


async def test_server_hanging_up_is_transient() -> None:
    with raw_listener(greet=True) as port:
        channel = SmtpEmail(
            host="127.0.0.1", port=port, security="none", from_address="a@b.example", timeout=2.0
        )
        with pytest.raises(TransientError) as caught:
            await channel.deliver(EMAIL, envelope())
    assert caught.value.reason == "connection"
    assert not caught.value.maybe_sent


# -- authentication and TLS ------------------------------------------------------------------


async def test_authentication_over_starttls(certificate: Certificate) -> None:
    with smtp_server(
        tls_context=certificate.server, authenticator=check_password, auth_required=True
    ) as server:
        tls = {"security": "starttls", "tls_context": certificate.client}
        await plain(server, username="mailer", password="right-password", **tls).deliver(EMAIL, envelope())
        assert server.mailbox.messages[0].authenticated

        with pytest.raises(TransientError) as wrong:
            await plain(server, username="mailer", password="wrong-password", **tls).deliver(
                EMAIL, envelope()
            )
        with pytest.raises(TransientError) as anonymous:
            await plain(server, **tls).deliver(EMAIL, envelope())

    assert wrong.value.reason == "auth"
    assert "535" in wrong.value.detail and "wrong-password" not in wrong.value.detail
    assert anonymous.value.reason == "sender_refused"
    assert len(server.mailbox.messages) == 1


async def test_starttls(certificate: Certificate) -> None:
    with smtp_server(tls_context=certificate.server, require_starttls=True) as server:
        await plain(server, security="starttls", tls_context=certificate.client).deliver(EMAIL, envelope())
        # The default context does not trust a self-signed certificate: refused, and retried later.
        with pytest.raises(TransientError) as untrusted:
            await plain(server, security="starttls").deliver(EMAIL, envelope())

    assert len(server.mailbox.messages) == 1
    assert untrusted.value.reason == "tls"


async def test_starttls_never_falls_back_to_plain_text(server: Server) -> None:
    with pytest.raises(TransientError) as caught:
        await plain(server, security="starttls").deliver(EMAIL, envelope())
    assert caught.value.reason == "tls"
    assert server.mailbox.messages == []


async def test_implicit_tls(certificate: Certificate) -> None:
    with smtp_server(ssl_context=certificate.server) as server:
        await plain(server, security="ssl", tls_context=certificate.client).deliver(EMAIL, envelope())
    assert len(server.mailbox.messages) == 1


async def test_logs_mask_the_address(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="channels.smtp"):
        await plain(server).deliver(EMAIL, envelope())
    assert "l***@example.com" in caplog.text
    assert ADDRESS not in caplog.text
