"""Email through Twilio SendGrid's v3 Mail Send API, with the official ``sendgrid`` SDK.

Each mail carries the run, step, journey, user and idempotency key as ``custom_args``, which
SendGrid echoes in its event webhook, so events find their message. Marketing mail with an
unsubscribe link gets RFC 8058 one-click ``List-Unsubscribe`` headers.

SendGrid's documented answers (https://www.twilio.com/docs/sendgrid/api-reference/mail-send)
sort into permanent refusals of this mail (400, 413) and transient failures (401/403 credentials
and 404/405 a wrong API URL, which an operator fixes; 429, 5xx, network trouble): see
:func:`classify`. A failure after the request was written (a read timeout, the connection dropped
before the answer) says ``maybe_sent``: SendGrid may have queued the mail, and it offers no
lookup by our key, so the send is recorded as an unknown outcome rather than repeated.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import math
import time
import urllib.error
from typing import Any

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (
    Category,
    CustomArg,
    From,
    Header,
    HtmlContent,
    Mail,
    PlainTextContent,
    ReplyTo,
    To,
)

from channels import (
    DeliveryError,
    DeliveryResult,
    Envelope,
    PermanentError,
    TransientError,
    mask_address,
    mask_in_text,
)
from channels._common import (
    Headers,
    header,
    log_failure,
    request_written,
    retry_after,
    transport_failure,
)
from nurture.language.templates import RenderedMessage

__all__ = ["PROVIDER", "SendGridEmail", "classify"]

PROVIDER = "sendgrid"
DEFAULT_HOST = "https://api.sendgrid.com"

log = logging.getLogger(__name__)

# The SDK's HTTP layer logs whole requests at DEBUG, API key and recipients included; keep it
# quiet unless someone chose its level on purpose.
_http_log = logging.getLogger("python_http_client.client")
if _http_log.level == logging.NOTSET:
    _http_log.setLevel(logging.INFO)

# urllib wraps a failure to connect or to write the request in URLError (nothing reached
# SendGrid); a timeout raised bare came while waiting for the answer (the request was written).
_UNSENT = (urllib.error.URLError,)
_WRITTEN = (TimeoutError,)


def classify(status: int, body: bytes | str, headers: Headers | None = None) -> DeliveryError:
    """The error to raise for a SendGrid error answer: HTTP ``status``, its body and headers.

    400 is a permanent ``bad_request`` (detail: SendGrid's first error and its field), 413 a
    permanent ``too_large``; 401/403 are transient ``auth``, 404/405 transient ``endpoint`` (the
    configured API URL is wrong: the mail waits for the fix), 429 transient ``rate_limited`` (with
    ``Retry-After`` or ``X-RateLimit-Reset``), 5xx transient ``provider_error``; any other 4xx is
    a permanent ``rejected`` naming the status.
    """
    # SendGrid quotes addresses in its errors; details end up in logs and the message table.
    detail = mask_in_text(_first_error(body) or f"HTTP {status}")
    if status == 400:
        return PermanentError("bad_request", detail)
    if status == 413:
        return PermanentError("too_large", detail)
    if status in (401, 403):
        return TransientError("auth", detail)
    if status in (404, 405):
        return TransientError("endpoint", f"HTTP {status}: {detail}")
    if status == 429:
        return TransientError("rate_limited", detail, retry_after=_rate_limit_wait(headers))
    if status >= 500:
        return TransientError("provider_error", detail)
    if 400 <= status < 500:
        return PermanentError("rejected", f"HTTP {status}: {detail}")
    return TransientError("provider_error", f"unexpected HTTP {status}: {detail}")


class SendGridEmail:
    """A :class:`channels.Channel` sending ``email`` messages through SendGrid."""

    provider = PROVIDER

    def __init__(
        self,
        *,
        api_key: str,
        from_email: str,
        from_name: str | None = None,
        reply_to: str | None = None,
        host: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        """``from_email``/``from_name``: the sender; ``reply_to``: optional Reply-To address;
        ``host``: the API base URL, for a proxy or a test server; ``timeout``: seconds per request."""
        self.from_email = from_email
        self.from_name = from_name
        self.reply_to = reply_to
        self.timeout = timeout
        self._client = SendGridAPIClient(api_key=api_key, host=(host or DEFAULT_HOST).rstrip("/"))

    def build(self, message: RenderedMessage, envelope: Envelope) -> dict[str, Any]:
        """The v3 Mail Send request body for ``message`` to ``envelope.address``."""
        if message.channel != "email" or not message.subject or not (message.html or message.text):
            raise ValueError(
                f"SendGridEmail sends email with a subject and a body, got a {message.channel} message"
            )
        mail = Mail(
            from_email=From(self.from_email, self.from_name),
            to_emails=To(envelope.address),
            subject=message.subject,
            plain_text_content=PlainTextContent(message.text) if message.text else None,
            html_content=HtmlContent(message.html) if message.html else None,
        )
        if self.reply_to:
            mail.reply_to = ReplyTo(self.reply_to)
        custom_args = {
            "run_id": envelope.run_id,
            "step_id": envelope.step_id,
            "journey": envelope.journey,
            "user_id": envelope.user_id,
            "idempotency_key": envelope.idempotency_key,
        }
        # On the (only) personalization: SendGrid's spec types a mail-level custom_args as a
        # string, while a personalization's is an object, and it wins over the mail-level one.
        # Values must be strings; an empty one says nothing.
        mail.custom_arg = [CustomArg(key, str(value), p=0) for key, value in custom_args.items() if value]
        if envelope.journey:
            mail.category = Category(envelope.journey)
        if envelope.unsubscribe_url and envelope.category == "marketing":
            mail.header = [
                Header("List-Unsubscribe", f"<{envelope.unsubscribe_url}>"),
                Header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ]
        body: dict[str, Any] = mail.get()
        return body

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult:
        """Send ``message`` to ``envelope.address``; returns SendGrid's ``X-Message-Id``."""
        body = self.build(message, envelope)
        message_id = await asyncio.to_thread(self._send, body, envelope)
        log.info(
            "sendgrid accepted %s for %s (%s)",
            message_id,
            mask_address(envelope.address),
            envelope.idempotency_key,
        )
        return DeliveryResult(provider=PROVIDER, provider_id=message_id)

    def _send(self, body: dict[str, Any], envelope: Envelope) -> str | None:
        try:
            response = self._client.client.mail.send.post(request_body=body, timeout=self.timeout)
        except HTTPError as error:
            failure: DeliveryError = classify(int(error.status_code), error.body or b"", error.headers)
            log_failure(log, PROVIDER, failure, envelope)
            raise failure from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            sent = request_written(error, unsent=_UNSENT, written=_WRITTEN)
            failure = transport_failure(error, peer="SendGrid", timeout=self.timeout, sent=sent)
            log_failure(log, PROVIDER, failure, envelope)
            raise failure from error
        message_id = response.headers.get("X-Message-Id")
        return str(message_id) if message_id else None


def _first_error(body: bytes | str) -> str | None:
    """``message (field: x)`` of the first entry in SendGrid's ``{"errors": [...]}``."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        return text.strip()[:200] or None
    errors = data.get("errors") if isinstance(data, dict) else None
    if not errors or not isinstance(errors[0], dict):
        return None
    first = errors[0]
    message = str(first.get("message") or "").strip()[:300]
    field = first.get("field")
    if field and field != "null":
        return f"{message} (field: {field})"
    return message or None


def _rate_limit_wait(headers: Headers | None) -> float | None:
    """Seconds to wait: ``Retry-After`` (seconds or an HTTP date), else ``X-RateLimit-Reset``
    (the Unix time SendGrid's limit resets), else ``None``."""
    wait = retry_after(headers)
    if wait is not None:
        return wait
    try:
        reset = float((header(headers, "X-RateLimit-Reset") or "").strip())
    except ValueError:
        return None
    return max(reset - time.time(), 0.0) if math.isfinite(reset) else None
