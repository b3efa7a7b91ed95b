"""SMS through Twilio's Programmable Messaging API, with the official ``twilio`` SDK.

Twilio answers a refused message with an HTTP status and one of its documented error codes
(https://www.twilio.com/docs/api/errors). :data:`ERROR_CODES` sorts the codes this adapter knows
into permanent refusals (the number is wrong, the recipient opted out: try the next channel) and
transient ones (credentials or sender configuration an operator fixes, rate limits: retry later);
:func:`classify` applies it, and to statuses without a known code.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote

import requests
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from channels import (
    DeliveryError,
    DeliveryResult,
    Envelope,
    PermanentError,
    TransientError,
    mask_address,
)
from nurture.templates import RenderedMessage

__all__ = ["ERROR_CODES", "PROVIDER", "TwilioSms", "classify"]

PROVIDER = "twilio"

Kind = Literal["permanent", "transient"]

ERROR_CODES: dict[int, tuple[Kind, str]] = {
    # The recipient cannot get this SMS, whenever we try: fall back to the next channel.
    21211: ("permanent", "invalid_number"),  # invalid 'To' phone number
    21614: ("permanent", "not_mobile"),  # 'To' number is not a mobile number
    21610: ("permanent", "unsubscribed"),  # the recipient replied STOP
    21612: ("permanent", "unreachable"),  # Twilio cannot route to this number
    21408: ("permanent", "region_not_enabled"),  # SMS to the recipient's region is not enabled
    21617: ("permanent", "body_too_long"),  # body exceeds the 1600-character limit
    # Our own configuration is wrong: an operator fixes it, the message is delayed, not lost.
    20003: ("transient", "auth"),  # authentication failed
    20429: ("transient", "rate_limited"),  # too many requests
    21601: ("transient", "sender_config"),  # 'From' is not an SMS-capable number of the account
    21603: ("transient", "sender_config"),  # neither 'From' nor 'MessagingServiceSid' given
    21606: ("transient", "sender_config"),  # 'From' cannot send to this destination/account
    21659: ("transient", "sender_config"),  # 'From' is not a Twilio number (or short code country mismatch)
    21660: ("transient", "sender_config"),  # 'From' belongs to another account
    21701: ("transient", "sender_config"),  # the Messaging Service does not exist
    21703: ("transient", "sender_config"),  # the Messaging Service has no sender available
    21705: ("transient", "sender_config"),  # the Messaging Service SID is invalid
}
"""Twilio error code -> (kind, reason) for the codes with a meaning of their own."""

log = logging.getLogger(__name__)

# Phone numbers appear in Twilio's error messages ("The 'To' number +1555... is not valid").
_PHONE = re.compile(r"\+?\d[\d ().-]{5,}\d")


def classify(
    status: int, code: int | None, message: str, *, retry_after: float | None = None
) -> DeliveryError:
    """The error to raise for a Twilio error answer: HTTP ``status``, Twilio ``code``, its message.

    Known codes decide first (:data:`ERROR_CODES`); then 429 and 5xx are transient, 401 is a
    credentials problem, and any other 4xx is a permanent ``rejected`` naming the code.
    ``retry_after`` (seconds, from ``Retry-After``) is kept on a transient error.
    """
    detail = _safe(f"{code}: {message}" if code is not None else message)
    kind, reason = ERROR_CODES.get(code, _by_status(status)) if code is not None else _by_status(status)
    if kind == "permanent":
        return PermanentError(reason, detail)
    return TransientError(reason, detail, retry_after=retry_after)


def _by_status(status: int) -> tuple[Kind, str]:
    if status == 429:
        return "transient", "rate_limited"
    if status >= 500:
        return "transient", "provider_error"
    if status == 401:
        return "transient", "auth"
    if 400 <= status < 500:
        return "permanent", "rejected"
    return "transient", "provider_error"


class TwilioSms:
    """A :class:`channels.Channel` sending ``sms`` messages through Twilio."""

    provider = PROVIDER

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        from_number: str | None = None,
        messaging_service_sid: str | None = None,
        status_callback: str | None = None,
        base_url: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Send from ``from_number`` or a Messaging Service (exactly one); ``status_callback``:
        the URL Twilio posts delivery statuses to; ``base_url``: the API host, for a proxy or a
        test server; ``timeout``: seconds per HTTP request."""
        if bool(from_number) == bool(messaging_service_sid):
            raise ValueError("TwilioSms needs exactly one of from_number and messaging_service_sid")
        self.from_number = from_number
        self.messaging_service_sid = messaging_service_sid
        self.status_callback = status_callback
        self.timeout = timeout
        # The SDK's exceptions carry no headers; a response hook keeps the last response of
        # each worker thread so a 429's Retry-After can be read.
        self._responses = threading.local()
        http_client = TwilioHttpClient(timeout=timeout, request_hooks={"response": [self._keep_response]})
        self._client = Client(account_sid, auth_token, http_client=http_client)
        if base_url:
            self._client.api.base_url = base_url.rstrip("/")
            # A TWILIO_EDGE/TWILIO_REGION in the environment would rewrite the host of base_url.
            self._client.edge = None
            self._client.region = None

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult:
        """Send ``message.text`` to ``envelope.address``; returns the message SID."""
        if message.channel != "sms" or not message.text:
            raise ValueError(f"TwilioSms sends sms messages with a text, got a {message.channel} message")
        params: dict[str, Any] = {"to": envelope.address, "body": message.text}
        if self.messaging_service_sid:
            params["messaging_service_sid"] = self.messaging_service_sid
        else:
            params["from_"] = self.from_number
        if self.status_callback:
            # The key lets the status webhook find the message row it reports on.
            separator = "&" if "?" in self.status_callback else "?"
            key = quote(envelope.idempotency_key, safe="")
            params["status_callback"] = f"{self.status_callback}{separator}key={key}"
        sid = await asyncio.to_thread(self._create, params, envelope)
        log.info(
            "twilio accepted %s for %s (%s)", sid, mask_address(envelope.address), envelope.idempotency_key
        )
        return DeliveryResult(provider=PROVIDER, provider_id=sid)

    def _create(self, params: dict[str, Any], envelope: Envelope) -> str:
        self._responses.last = None
        try:
            created = self._client.messages.create(**params)
        except (TwilioRestException, TwilioServiceException) as error:
            detail = error.msg if isinstance(error, TwilioRestException) else (error.detail or error.title)
            status = int(error.status)
            code = int(error.code) if error.code is not None else None
            retry_after = _retry_after(self._responses.last) if status == 429 or code == 20429 else None
            failure = classify(status, None if code == status else code, str(detail), retry_after=retry_after)
            self._log_failure(failure, envelope)
            raise failure from None
        except requests.exceptions.Timeout as error:
            failure = TransientError(
                "timeout", f"no answer from Twilio within {self.timeout}s ({type(error).__name__})"
            )
            self._log_failure(failure, envelope)
            raise failure from error
        except requests.exceptions.RequestException as error:
            failure = TransientError("connection", f"{type(error).__name__}: {error}")
            self._log_failure(failure, envelope)
            raise failure from error
        return str(created.sid)

    def _keep_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._responses.last = response

    @staticmethod
    def _log_failure(failure: DeliveryError, envelope: Envelope) -> None:
        level = logging.WARNING if isinstance(failure, TransientError) else logging.INFO
        log.log(
            level,
            "twilio did not take %s for %s: %s",
            envelope.idempotency_key,
            mask_address(envelope.address),
            failure,
        )


def _retry_after(response: requests.Response | None) -> float | None:
    """Seconds from a ``Retry-After`` header: a number of seconds or an HTTP date."""
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    value = str(value).strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _safe(text: str) -> str:
    """``text`` with phone numbers masked, fit for logs and the message table."""
    return _PHONE.sub(lambda match: mask_address(re.sub(r"[^\d+]", "", match.group())), text)
