"""Delivery channels: one small protocol, one adapter module per provider.

An adapter takes a :class:`~nurture.language.templates.RenderedMessage` and an :class:`Envelope` (address,
idempotency key, who and why) and either returns a :class:`DeliveryResult` once the provider has
accepted the message, or raises:

- :class:`PermanentError` when the provider refused it for good (invalid number, unsubscribed
  recipient, a request it will never accept). The send is recorded as ``failed:<reason>`` and the
  step's next fallback channel is tried.
- :class:`TransientError` (or any other exception) when it may work later (timeouts, dropped
  connections, 429, 5xx, bad credentials an operator can fix). The send activity fails and
  Temporal retries it with backoff: an outage delays messages, it never drops them.

:class:`nurture.delivery.deliverer.Deliverer` writes the message row with its unique idempotency key before
it calls an adapter, so a retried activity never calls twice for a message the provider accepted.
When a call fails after the request reached the provider (``TransientError(maybe_sent=True)``) or
the process died during it, the provider may have the message: an adapter that can look it up
(:class:`Reconciling`) is asked before sending again; otherwise the send is recorded
``failed:unknown_outcome`` rather than risk a second copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from nurture.engine.model import idempotency_key, split_idempotency_key
from nurture.language.templates import RenderedMessage

__all__ = [
    "Channel",
    "DeliveryError",
    "DeliveryResult",
    "Envelope",
    "PermanentError",
    "Reconciling",
    "TransientError",
    "idempotency_key",
    "mask_address",
    "mask_in_text",
    "mask_user_id",
    "split_idempotency_key",
]


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """Where a message goes and what it belongs to."""

    address: str
    """Email address, E.164 phone number or WeChat openid."""
    idempotency_key: str
    """``run:step``; the same for every retry of the same send."""
    user_id: str = ""
    """The recipient's user id."""
    journey: str = ""
    """The journey sending it."""
    category: str = "marketing"
    """``marketing`` or ``transactional``; marketing email carries unsubscribe headers."""
    unsubscribe_url: str | None = None
    """Signed one-click unsubscribe link for this user and channel, when links are configured."""

    @property
    def run_id(self) -> str | None:
        return split_idempotency_key(self.idempotency_key)[0]

    @property
    def step_id(self) -> str | None:
        return split_idempotency_key(self.idempotency_key)[1]


@dataclass(frozen=True)
class DeliveryResult:
    """The provider accepted a message."""

    provider: str
    """The adapter's provider name, e.g. ``twilio``."""
    provider_id: str | None = None
    """The provider's id for the message (Twilio SID, SendGrid message id, WeChat msgid)."""


class DeliveryError(Exception):
    """A provider did not accept a message; ``reason`` is short and machine-friendly."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PermanentError(DeliveryError):
    """Refused for good: recorded as ``failed:<reason>``; the next fallback channel is tried."""


class TransientError(DeliveryError):
    """May work later: the send is retried by Temporal with backoff."""

    def __init__(
        self, reason: str, detail: str = "", *, retry_after: float | None = None, maybe_sent: bool = False
    ) -> None:
        super().__init__(reason, detail)
        self.retry_after = retry_after
        """Seconds the provider asked us to wait (``Retry-After``), if it said."""
        self.maybe_sent = maybe_sent
        """The request had reached the provider when it failed (a read timeout, a connection
        dropped before the answer): the provider may have accepted the message."""


@runtime_checkable
class Channel(Protocol):
    """A provider adapter able to deliver rendered messages."""

    provider: str

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult: ...


@runtime_checkable
class Reconciling(Protocol):
    """An adapter that can ask its provider whether it already has a message."""

    async def find(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult | None:
        """The provider's record of this message if it accepted it, else ``None``."""
        ...


def mask_address(address: str) -> str:
    """An address safe for logs: ``l***@example.com``, ``+86*******8000``; a phone number written
    with spaces, brackets or dashes (``+1 (500) 555-0143``) is masked as its digits are."""
    address = address.strip()
    if _PHONE.fullmatch(address):
        address = re.sub(r"[^\d+]", "", address)
    if "@" in address:
        local, _, domain = address.rpartition("@")
        return f"{local[:1]}***@{domain}"
    digits = address.lstrip("+")
    if digits.isdigit():
        plus = "+" if address.startswith("+") else ""
        keep_start = 2 if plus else 0
        if len(digits) <= keep_start + 4:
            return plus + "*" * max(len(digits) - 2, 0) + digits[-2:]
        middle = len(digits) - keep_start - 4
        return plus + digits[:keep_start] + "*" * middle + digits[-4:]
    if len(address) <= 6:
        return "***"
    return f"{address[:3]}***{address[-3:]}"


# An email address: no whitespace, brackets, quotes or list separators, and a domain ending in a
# top-level label of letters (any script: SMTPUTF8 addresses end in e.g. ``.中国``). The local
# part stops at URL delimiters, so a path or query around an address stays readable.
_EMAIL = re.compile(r"[^\s<>\"'(),;:\[\]/?&=]+@[^\s<>\"'(),;:\[\]@/?&=]+\.[^\W\d_]{2,}")
# A phone number: seven or more digits, optionally after a "+", with at most two of " ()-" between
# them. It must stand alone (not inside an id such as a Twilio SID, a hash or a UUID whose first
# group is all digits) and must not be an ISO date; dots are not separators so IP addresses and
# version numbers stay readable.
_PHONE = re.compile(r"(?<![\w.+-])(?!\d{4}-\d\d-\d\d(?!\d))\+?\(?\d(?:[ ()-]{0,2}\d){6,}(?!\w|-\w)")


def mask_user_id(user_id: str) -> str:
    """A user id fit for logs: ids that are email addresses or phone numbers (in any of the
    formats :func:`mask_in_text` finds) are masked."""
    if "@" in user_id or _PHONE.fullmatch(user_id.strip()):
        return mask_address(user_id)
    return user_id


def mask_in_text(text: str, *addresses: str) -> str:
    """``text`` fit for logs and stored error details: each of ``addresses`` (any kind, e.g. an
    openid, matched regardless of case) and anything shaped like an email address or a phone
    number is replaced by its :func:`mask_address` form.

    Providers quote recipients in their error messages, sometimes re-formatted or re-cased, so
    the known addresses alone are not enough; the patterns alone would miss ids such as openids.
    """
    known = sorted({a.strip() for a in addresses if a and a.strip()}, key=len, reverse=True)
    if known:  # longest first, so an address containing another is masked whole
        pattern = re.compile("|".join(map(re.escape, known)), re.IGNORECASE)
        text = pattern.sub(lambda match: mask_address(match.group()), text)
    text = _EMAIL.sub(lambda match: mask_address(match.group()), text)
    return _PHONE.sub(lambda match: mask_address(match.group()), text)
