"""Which provider carries each channel: the ``providers:`` section of ``nurture.yaml``.

``nurture.yaml`` says *what* is used (a provider per channel, the sender), never a secret::

    providers:
      email: {provider: sendgrid, from: "Nurture <hello@nurture.example>"}
      sms: {provider: twilio, messaging_service: MG0123456789abcdef0123456789abcdef}
      wechat: wechat

A channel left out, or set to ``outbox``, records its messages in the database instead of
sending them. The secrets each provider needs come from the environment and are checked where
the adapters are built (:mod:`nurture.service.providers`).
"""

from __future__ import annotations

from email.utils import parseaddr
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `email: sendgrid` is short for `email: {provider: sendgrid}`.
        return {"provider": data} if isinstance(data, str) else data


class EmailProviderDoc(_Doc):
    """How email is sent."""

    provider: Literal["outbox", "sendgrid", "smtp"] = "outbox"
    """``outbox`` (record only), ``sendgrid`` or ``smtp``."""
    sender: str | None = Field(default=None, alias="from")
    """The From address, ``hello@example.com`` or ``Name <hello@example.com>``."""
    reply_to: str | None = None
    """Optional Reply-To address."""

    @model_validator(mode="after")
    def _needs_sender(self) -> EmailProviderDoc:
        if self.provider != "outbox" and not self.sender:
            raise PydanticCustomError(
                "sender", f'email via {self.provider} needs a sender: add from: "Name <you@example.com>"'
            )
        for value in (self.sender, self.reply_to):
            if value and "@" not in sender_address(value):
                raise PydanticCustomError(
                    "sender", f"'{value}' is not an email address: write you@example.com or \"Name <you@example.com>\""
                )
        return self


class SmsProviderDoc(_Doc):
    """How SMS is sent."""

    provider: Literal["outbox", "twilio"] = "outbox"
    """``outbox`` (record only) or ``twilio``."""
    sender: str | None = Field(default=None, alias="from")
    """The E.164 number (or alphanumeric sender id) messages come from."""
    messaging_service: str | None = None
    """A Twilio Messaging Service SID (``MG...``), instead of ``from``."""

    @model_validator(mode="after")
    def _one_sender(self) -> SmsProviderDoc:
        if self.provider == "twilio" and bool(self.sender) == bool(self.messaging_service):
            raise PydanticCustomError(
                "sender", 'sms via twilio needs exactly one of from: "+1..." or messaging_service: MG...'
            )
        return self


class WeChatProviderDoc(_Doc):
    """How WeChat template messages are sent."""

    provider: Literal["outbox", "wechat"] = "outbox"
    """``outbox`` (record only) or ``wechat`` (an Official Account)."""


class ProvidersDoc(BaseModel):
    """``providers:`` in ``nurture.yaml``: one provider per channel (default: the outbox)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    email: EmailProviderDoc = EmailProviderDoc()
    sms: SmsProviderDoc = SmsProviderDoc()
    wechat: WeChatProviderDoc = WeChatProviderDoc()

    def configured(self) -> dict[str, str]:
        """Channel -> provider for every channel that does not use the outbox."""
        chosen = {"email": self.email.provider, "sms": self.sms.provider, "wechat": self.wechat.provider}
        return {channel: provider for channel, provider in chosen.items() if provider != "outbox"}


PROVIDER_DOCS: dict[str, type[BaseModel]] = {
    "email": EmailProviderDoc,
    "sms": SmsProviderDoc,
    "wechat": WeChatProviderDoc,
}

def sender_address(sender: str | None) -> str:
    """``hello@x`` from ``Name <hello@x>`` (or from ``hello@x``)."""
    return parseaddr(sender or "")[1]


def sender_name(sender: str | None) -> str | None:
    """``Name`` from ``Name <hello@x>``; ``None`` without one."""
    return parseaddr(sender or "")[0] or None
