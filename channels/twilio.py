"""SMS through Twilio's Programmable Messaging API, with the official ``twilio`` SDK.

Twilio answers a refused message with an HTTP status and one of its documented error codes
(https://www.twilio.com/docs/api/errors). :data:`ERROR_CODES` sorts the codes this adapter knows
into permanent refusals (the number is wrong, the recipient opted out: try the next channel) and
transient ones (credentials or sender configuration an operator fixes, rate limits and full
queues: retry later); :func:`classify` applies it, and to statuses without a known code.

When the answer to a send is lost (a read timeout, the connection dropped after the request went
out) the error says ``maybe_sent``, and :meth:`TwilioSms.find` can ask Twilio whether it has the
message before it is sent again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import requests
import urllib3
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from channels import (
    DeliveryError,
    DeliveryResult,
    Envelope,
    PermanentError,
    TransientError,
    mask_address,
    mask_in_text,
)
from channels._common import log_failure, request_written, retry_after, transport_failure
from nurture.language.templates import RenderedMessage

__all__ = ["ERROR_CODES", "FIND_WINDOW", "PROVIDER", "TwilioSms", "classify"]

PROVIDER = "twilio"

Kind = Literal["permanent", "transient"]

_T = TypeVar("_T")

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
    # The sender's queue is full (it holds at most about 4 hours of sending): it drains by itself.
    21611: ("transient", "rate_limited"),  # 'From' has exceeded the maximum number of queued messages
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

FIND_WINDOW = timedelta(days=1)
"""How far back :meth:`TwilioSms.find` looks: a lost answer is reconciled by the send's next
retries, well within a day, and an identical text sent to the same number earlier (a reminder
repeated every week) must not be taken for it."""

_FIND_LIMIT = 50
"""Messages :meth:`TwilioSms.find` reads (one page, newest first)."""

log = logging.getLogger(__name__)

# requests' failures that say where the request was: connect-phase ones (nothing reached Twilio;
# urllib3's NewConnectionError covers refused and unknown hosts) and read-phase ones (the request
# was written; Twilio may have created the message).
_UNSENT = (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)
_WRITTEN = (requests.exceptions.ReadTimeout, requests.exceptions.ChunkedEncodingError)


def classify(
    status: int, code: int | None, message: str, *, retry_after: float | None = None
) -> DeliveryError:
    """The error to raise for a Twilio error answer: HTTP ``status``, Twilio ``code``, its message.

    Known codes decide first (:data:`ERROR_CODES`); then 429 and 5xx are transient, 401 is a
    credentials problem, 404 and 405 a wrong API URL (transient ``endpoint``: an operator fixes
    the configuration, the messages wait), and any other 4xx is a permanent ``rejected`` naming
    the code. ``retry_after`` (seconds, from ``Retry-After``) is kept on a transient error.
    """
    # Phone numbers appear in Twilio's error messages ("The 'To' number +1555... is not valid").
    detail = mask_in_text(f"{code}: {message}" if code is not None else message)
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
    if status in (404, 405):
        return "transient", "endpoint"
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

    async def find(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult | None:
        """Twilio's record of ``message`` to ``envelope.address`` if it has one: the newest
        message of the last :data:`FIND_WINDOW` to that number with the same text, sent from our
        number or Messaging Service. Any failure to ask is a plain :class:`TransientError`."""
        if message.channel != "sms" or not message.text:
            return None
        sid = await asyncio.to_thread(self._find, message.text, envelope)
        if sid is not None:
            log.info(
                "twilio already had %s for %s (%s)",
                sid,
                mask_address(envelope.address),
                envelope.idempotency_key,
            )
        return None if sid is None else DeliveryResult(provider=PROVIDER, provider_id=sid)

    def _create(self, params: dict[str, Any], envelope: Envelope) -> str:
        try:
            created = self._call(lambda: self._client.messages.create(**params))
        except DeliveryError as failure:
            log_failure(log, PROVIDER, failure, envelope)
            raise
        return str(created.sid)

    def _find(self, text: str, envelope: Envelope) -> str | None:
        since = datetime.now(UTC) - FIND_WINDOW
        try:
            listed = self._call(
                lambda: self._client.messages.list(
                    to=envelope.address, date_sent_after=since, limit=_FIND_LIMIT
                )
            )
        except DeliveryError as failure:
            # A lookup changes nothing at Twilio: whatever went wrong, asking again is safe.
            retry = failure.retry_after if isinstance(failure, TransientError) else None
            log.warning(
                "twilio could not look up %s for %s: %s",
                envelope.idempotency_key,
                mask_address(envelope.address),
                failure,
            )
            raise TransientError(failure.reason, f"looking up: {failure.detail}", retry_after=retry) from None
        for sent in listed:
            if sent.body == text and self._ours(sent.from_, sent.messaging_service_sid):
                return str(sent.sid)
        return None

    def _ours(self, sender: str | None, service: str | None) -> bool:
        """Whether a message was sent as this adapter sends: from its number, or through its
        Messaging Service (whose sender Twilio picks)."""
        if self.messaging_service_sid:
            return service == self.messaging_service_sid
        return sender is not None and _number(sender) == _number(self.from_number or "")

    def _call(self, request: Callable[[], _T]) -> _T:
        """``request()`` through the SDK, its failures turned into :class:`DeliveryError`."""
        self._responses.last = None
        try:
            return request()
        except (TwilioRestException, TwilioServiceException) as error:
            detail = error.msg if isinstance(error, TwilioRestException) else (error.detail or error.title)
            status = int(error.status)
            code = int(error.code) if error.code is not None else None
            limited = status == 429 or code == 20429
            wait = retry_after(self._last_headers()) if limited else None
            raise classify(status, None if code == status else code, str(detail), retry_after=wait) from None
        except TwilioException as error:
            # A list page that did not load is a bare TwilioException holding the raw response.
            response = error.args[1] if len(error.args) > 1 else None
            if not isinstance(response, Response):
                raise TransientError("provider_error", mask_in_text(str(error))) from None
            code, message = _error_body(response.text)
            wait = retry_after(self._last_headers()) if response.status_code == 429 or code == 20429 else None
            raise classify(response.status_code, code, message, retry_after=wait) from None
        except requests.exceptions.RequestException as error:
            sent = request_written(error, unsent=_UNSENT, written=_WRITTEN)
            raise transport_failure(error, peer="Twilio", timeout=self.timeout, sent=sent) from error

    def _last_headers(self) -> requests.structures.CaseInsensitiveDict[str] | None:
        response: requests.Response | None = self._responses.last
        return None if response is None else response.headers

    def _keep_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._responses.last = response


def _error_body(text: str) -> tuple[int | None, str]:
    """Twilio's error ``code`` and ``message`` from an error answer's body, as far as it has them."""
    try:
        body = json.loads(text)
    except ValueError:
        return None, text.strip()[:200]
    if not isinstance(body, dict):
        return None, text.strip()[:200]
    code = body.get("code")
    message = body.get("message") or body.get("detail") or body.get("title") or ""
    return (code if isinstance(code, int) else None), str(message)


def _number(sender: str) -> str:
    """A sender without formatting, so ``+1 (555) 000-1111`` matches ``+15550001111``;
    alphanumeric sender ids keep their letters."""
    return re.sub(r"[\s().-]", "", sender)
