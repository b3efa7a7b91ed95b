"""Email through any SMTP server (a relay, a provider's SMTP endpoint, a local MTA).

The standard library's :mod:`smtplib` runs in a thread, one connection per message: simple, and
a broken connection never outlives the message that met it. Each message is
``multipart/alternative`` (plain text, then HTML) with a ``Message-ID`` derived from the
idempotency key, so every retry of a send carries the same id and receivers or bounce handling
can tie them together; marketing email carries RFC 8058 one-click unsubscribe headers.

SMTP replies are mapped by their class: a 5xx refusal of the recipient or of the content is
permanent (552 for the sender or the content is ``too_large``: the same mail would be refused
again), a 4xx is "try later" (greylisting, full mailbox, rate limits), and failed
authentication, TLS or connection problems are transient: an operator can fix them, and the
messages wait rather than fall back. A connection lost or timed out once the DATA command went
out says ``maybe_sent``: the server may have queued the message before its answer was lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import TYPE_CHECKING, Literal

from channels import (
    DeliveryError,
    DeliveryResult,
    Envelope,
    PermanentError,
    TransientError,
    mask_address,
    mask_in_text,
)
from channels._common import log_failure, transport_failure
from nurture.language.templates import RenderedMessage

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = ["SmtpEmail", "message_id"]

log = logging.getLogger(__name__)

PROVIDER = "smtp"

Security = Literal["starttls", "ssl", "none"]

_WHITESPACE = re.compile(r"\s+")
# One plain addr-spec: no display name, list separator, quoting or line break, so a stored address
# can never add recipients or headers. Non-ASCII is allowed (SMTPUTF8).
_ADDRESS = re.compile(r'[^@\s,;:<>()\[\]\\"]+@[^@\s,;:<>()\[\]\\"]+')

# "Requested mail action aborted: exceeded storage allocation"; for MAIL FROM with SIZE (RFC 1870)
# and after DATA it means the message is larger than the server takes.
_TOO_LARGE = 552


def message_id(idempotency_key: str, domain: str = "nurture") -> str:
    """The ``Message-ID`` of the send with ``idempotency_key``: the same for every retry."""
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    return f"<{digest}@{domain}>"


class SmtpEmail:
    """A :class:`channels.Channel` sending email through an SMTP server."""

    provider = PROVIDER

    def __init__(
        self,
        *,
        host: str,
        port: int = 587,
        username: str | None = None,
        password: str | None = None,
        security: Security = "starttls",
        from_address: str,
        reply_to: str | None = None,
        timeout: float = 10.0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """``security``: ``starttls`` upgrades a plain connection (port 587), ``ssl`` is TLS from
        the first byte (port 465), ``none`` sends in the clear (a local relay only).
        ``tls_context`` replaces the default certificate checks, e.g. for a private CA."""
        if "@" not in parseaddr(from_address)[1]:
            raise ValueError(f"from_address {from_address!r} is not an email address")
        if security not in ("starttls", "ssl", "none"):
            raise ValueError(f"security must be starttls, ssl or none, not {security!r}")
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.security: Security = security
        self.from_address = from_address
        self.reply_to = reply_to
        self.timeout = timeout
        self._tls_context = tls_context
        # The Message-ID names the sender's domain: ids without a real domain look like spam.
        self._id_domain = _domain(from_address) or "nurture"
        self._sender = parseaddr(from_address)[1]

    def __repr__(self) -> str:
        return f"SmtpEmail(host={self.host!r}, port={self.port}, security={self.security!r})"

    def build(self, message: RenderedMessage, envelope: Envelope) -> EmailMessage:
        """The email ``deliver`` would send: headers, then text and HTML alternatives."""
        email = EmailMessage()
        email["From"] = self.from_address
        email["To"] = envelope.address
        if self.reply_to:
            email["Reply-To"] = self.reply_to
        # A rendered subject may contain a line break; a header must not.
        email["Subject"] = _WHITESPACE.sub(" ", message.subject or "").strip()
        email["Date"] = formatdate(usegmt=True)
        email["Message-ID"] = message_id(envelope.idempotency_key, self._id_domain)
        if envelope.run_id:
            email["X-Nurture-Run"] = envelope.run_id
        if envelope.step_id:
            email["X-Nurture-Step"] = envelope.step_id
        if envelope.category == "marketing" and envelope.unsubscribe_url:
            email["List-Unsubscribe"] = f"<{envelope.unsubscribe_url}>"
            email["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        if message.text is not None:
            email.set_content(message.text)
            if message.html is not None:
                email.add_alternative(message.html, subtype="html")
        elif message.html is not None:
            email.set_content(message.html, subtype="html")
        else:
            email.set_content("")
        return email

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult:
        """Send ``message`` to ``envelope.address``; the result's id is the ``Message-ID``."""
        if not _ADDRESS.fullmatch(envelope.address):
            raise PermanentError("invalid_address", mask_address(envelope.address))
        try:
            email = self.build(message, envelope)
        except (ValueError, TypeError) as exc:
            raise PermanentError("bad_request", mask_in_text(str(exc), envelope.address)) from None
        try:
            await asyncio.to_thread(self._send, email, envelope.address)
        except DeliveryError as failure:
            log_failure(log, PROVIDER, failure, envelope)
            raise
        log.info("email %s sent to %s via %s", email["Message-ID"], mask_address(envelope.address), self.host)
        return DeliveryResult(provider=PROVIDER, provider_id=str(email["Message-ID"]))

    def _send(self, email: EmailMessage, address: str) -> None:
        attempt = _Attempt()
        try:
            self._transmit_once(email, address, attempt)
        except DeliveryError:
            raise
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()), (0, b""))
            raise _refused(code, _text(reply), address, "rejected_recipient") from None
        except smtplib.SMTPSenderRefused as exc:
            if exc.smtp_code == _TOO_LARGE:
                raise PermanentError("too_large", _reply(exc, address)) from None
            # The server will not take mail from our From address: a configuration problem.
            raise TransientError("sender_refused", _reply(exc, address)) from None
        except smtplib.SMTPDataError as exc:
            if exc.smtp_code == _TOO_LARGE:
                raise PermanentError("too_large", _reply(exc, address)) from None
            raise _refused(exc.smtp_code, _text(exc.smtp_error), address, "rejected") from None
        except smtplib.SMTPAuthenticationError as exc:
            raise TransientError("auth", f"{exc.smtp_code} {_text(exc.smtp_error)}") from None
        except smtplib.SMTPNotSupportedError:
            # Raised by the send itself only when the address needs SMTPUTF8 and the server lacks it.
            raise PermanentError(
                "rejected_recipient", "address needs SMTPUTF8, not offered by the server"
            ) from None
        except smtplib.SMTPResponseException as exc:
            reason = "deferred" if 400 <= exc.smtp_code < 500 else "smtp_error"
            raise TransientError(reason, _reply(exc, address)) from None
        except smtplib.SMTPServerDisconnected as exc:
            # smtplib reports a read that timed out as a disconnection; the chain keeps the timeout.
            raise self._lost(exc, sent=attempt.data_started) from None
        except smtplib.SMTPException as exc:
            raise TransientError("smtp_error", mask_in_text(str(exc), address)) from None
        except ssl.SSLError as exc:
            if attempt.data_started:
                raise self._lost(exc, sent=True) from None
            raise TransientError("tls", f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:  # refused, unknown host, reset, timed out
            raise self._lost(exc, sent=attempt.data_started) from None

    def _lost(self, error: BaseException, *, sent: bool) -> TransientError:
        return transport_failure(error, peer=f"{self.host}:{self.port}", timeout=self.timeout, sent=sent)

    def _transmit_once(self, email: EmailMessage, address: str, attempt: _Attempt) -> None:
        try:
            self._transmit(email, address, attempt)
        except (smtplib.SMTPException, OSError) as exc:
            if not attempt.accepted:
                raise
            # Only the goodbye failed (smtplib raises when QUIT is not answered 221): the server
            # took the message, and failing the send would have it retried and delivered twice.
            log.info("%s:%s took the message, then QUIT failed: %s", self.host, self.port, type(exc).__name__)

    def _transmit(self, email: EmailMessage, address: str, attempt: _Attempt) -> None:
        context = self._tls_context or ssl.create_default_context()
        client: _Client
        if self.security == "ssl":
            client = _TlsClient(self.host, self.port, timeout=self.timeout, context=context)
        else:
            client = _Client(self.host, self.port, timeout=self.timeout)
        attempt.client = client
        with client:
            client.ehlo()
            if self.security == "starttls":
                if not client.has_extn("starttls"):
                    # Never fall back to sending credentials and mail in the clear.
                    raise TransientError("tls", f"{self.host}:{self.port} does not offer STARTTLS")
                client.starttls(context=context)
                client.ehlo()
            if self.username:
                if not client.has_extn("auth"):
                    raise TransientError("auth", f"{self.host}:{self.port} does not offer AUTH")
                client.login(self.username, self._password or "")
            # The envelope names exactly one recipient, whatever the headers say.
            client.send_message(email, from_addr=self._sender, to_addrs=[address])
            attempt.accepted = True


class _Client(smtplib.SMTP):
    """An SMTP connection that notes when the DATA command goes out: from then on the server may
    have the message whatever happens to the connection. (The moment between DATA and the server's
    354 counts too: there the message has not been sent, but calling it "maybe sent" costs a
    delivery marked unknown, while the opposite mistake would send the user a second copy.)"""

    data_started = False

    def data(self, msg: ReadableBuffer | str) -> tuple[int, bytes]:
        self.data_started = True
        return super().data(msg)


class _TlsClient(_Client, smtplib.SMTP_SSL):
    """:class:`_Client` over TLS from the first byte."""


class _Attempt:
    """How far one send got: its connection (did DATA go out?) and whether the server accepted
    the message, so a failure can tell what the server may have."""

    client: _Client | None = None
    accepted = False

    @property
    def data_started(self) -> bool:
        return self.client is not None and self.client.data_started


def _refused(code: int, reply: str, address: str, reason: str) -> DeliveryError:
    detail = f"{code} {mask_in_text(reply, address)}"
    if 500 <= code < 600:
        return PermanentError(reason, detail)
    return TransientError("deferred", detail)


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _reply(error: smtplib.SMTPResponseException, address: str) -> str:
    # Servers often quote the recipient in their replies; details end up in logs and history.
    return f"{error.smtp_code} {mask_in_text(_text(error.smtp_error), address)}"


def _domain(address: str) -> str:
    return parseaddr(address)[1].rpartition("@")[2]
