"""Delivery channels: one small protocol, one adapter module per provider.

An adapter takes a :class:`~nurture.templates.RenderedMessage` and an :class:`Envelope` (address,
idempotency key, who and why) and either returns a :class:`DeliveryResult` once the provider has
accepted the message, or raises:

- :class:`PermanentError` when the provider refused it for good (invalid number, unsubscribed
  recipient, a request it will never accept). The send is recorded as ``failed:<reason>`` and the
  step's next fallback channel is tried.
- :class:`TransientError` (or any other exception) when it may work later (timeouts, dropped
  connections, 429, 5xx, bad credentials an operator can fix). The send activity fails and
  Temporal retries it with backoff: an outage delays messages, it never drops them.

Adapters do not de-duplicate: :class:`nurture.delivery.Deliverer` writes the message row with its
unique idempotency key before it calls an adapter, so a retried activity never calls twice for a
message the provider accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from nurture.model import idempotency_key, split_idempotency_key
from nurture.templates import RenderedMessage

__all__ = [
    "Channel",
    "DeliveryError",
    "DeliveryResult",
    "Envelope",
    "PermanentError",
    "TransientError",
    "idempotency_key",
    "mask_address",
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

    def __init__(self, reason: str, detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(reason, detail)
        self.retry_after = retry_after
        """Seconds the provider asked us to wait (``Retry-After``), if it said."""


@runtime_checkable
class Channel(Protocol):
    """A provider adapter able to deliver rendered messages."""

    provider: str

    async def deliver(self, message: RenderedMessage, envelope: Envelope) -> DeliveryResult: ...


def mask_address(address: str) -> str:
    """An address safe for logs: ``l***@example.com``, ``+86*******8000``."""
    address = address.strip()
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
