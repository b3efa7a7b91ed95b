"""Delivery channels: one small protocol, one adapter module per provider.

An adapter takes a :class:`~nurture.templates.RenderedMessage`, an address and an idempotency key
and returns a :class:`DeliveryResult`. Delivering twice with the same key must not send twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from nurture.model import idempotency_key, split_idempotency_key
from nurture.templates import RenderedMessage

__all__ = [
    "Channel",
    "DeliveryResult",
    "idempotency_key",
    "mask_address",
    "split_idempotency_key",
]


@dataclass(frozen=True)
class DeliveryResult:
    """What a provider said about one delivery."""

    status: Literal["sent", "failed"]
    """``sent`` once the provider accepted the message; ``failed`` for a permanent rejection."""
    provider: str
    """The adapter's provider name, e.g. ``outbox``."""
    provider_id: str | None = None
    """The provider's id for the message, for support and webhooks."""
    reason: str | None = None
    """For ``failed``: a short machine-friendly reason such as ``invalid_number``."""


@runtime_checkable
class Channel(Protocol):
    """A provider adapter able to deliver rendered messages."""

    provider: str

    async def deliver(
        self, message: RenderedMessage, *, address: str, idempotency_key: str
    ) -> DeliveryResult: ...


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
