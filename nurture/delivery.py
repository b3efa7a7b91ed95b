"""Sending one step: channel choice, quiet hours, rendering, delivery, one outcome.

:class:`Deliverer` is the single implementation of the spec's "Sends" rules. The simulator calls
it directly on its virtual clock; the Temporal send activity calls it with the wall clock. It
reads the profile at send time, so an opt-out or a new address counts from the moment it is made.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from channels import Channel
from channels import mask_address as mask_address

from .clock import in_quiet_hours, zone
from .model import ADDRESS_TRAITS, CHANNELS, Profile, SendOutcome, SendRequest, SendResult, Status
from .templates import TemplateError, TemplateStore

log = logging.getLogger("nurture.delivery")


class ProfileStore(Protocol):
    """Where profiles live: memory for simulations, the database for the service."""

    async def get(self, user_id: str) -> Profile: ...

    async def update(self, user_id: str, traits: Mapping[str, Any]) -> Profile: ...


@dataclass
class MemoryProfiles:
    """Profiles held in a dict; the simulator's and the scenario runner's store."""

    profiles: dict[str, Profile] = field(default_factory=dict)

    async def get(self, user_id: str) -> Profile:
        return self.get_now(user_id)

    def get_now(self, user_id: str) -> Profile:
        return self.profiles.get(user_id) or Profile(user_id)

    async def update(self, user_id: str, traits: Mapping[str, Any]) -> Profile:
        return self.update_now(user_id, traits)

    def update_now(
        self, user_id: str, traits: Mapping[str, Any], opted_out: frozenset[str] | None = None
    ) -> Profile:
        current = self.get_now(user_id)
        profile = Profile(
            user_id,
            {**current.traits, **traits},
            current.opted_out if opted_out is None else opted_out,
        )
        self.profiles[user_id] = profile
        return profile


def for_every_channel(channel: Channel) -> dict[str, Channel]:
    """One adapter for email, SMS and WeChat alike (the outbox)."""
    return dict.fromkeys(CHANNELS, channel)


def usable_channels(
    profile: Profile, channels: tuple[str, ...], category: str
) -> tuple[list[str], str | None]:
    """The channels that may carry this send, in order, or why none can."""
    usable: list[str] = []
    opted_out = False
    for channel in channels:
        if not profile.traits.get(ADDRESS_TRAITS[channel]):
            continue
        if category == "marketing" and channel in profile.opted_out:
            opted_out = True
            continue
        usable.append(channel)
    if usable:
        return usable, None
    return [], "opted_out" if opted_out else "no_address"


def render_context(request: SendRequest, profile: Profile) -> dict[str, Any]:
    """What templates see: the profile as ``user`` plus the run's event context."""
    return {
        "user": {**profile.traits, "id": profile.user_id},
        "event": request.context.get("event") or {},
        "last_event": request.context.get("last_event") or {},
        "journey": request.context.get("journey") or {},
    }


class Deliverer:
    """Renders and delivers sends through the configured channel of each kind.

    With ``render=False`` it decides each send's channel, quiet-hour deferral and outcome by the
    same rules but neither renders nor delivers, for bulk "what would happen" simulations: the
    outcome has no ``text``, ``preview`` or provider, a template that is missing or has errors
    still fails over as ``template_error``, and a render that only some recipients' data would
    break, or a provider rejection, counts as sent.
    """

    def __init__(
        self, templates: TemplateStore, channels: Mapping[str, Channel], *, render: bool = True
    ) -> None:
        self.templates = templates
        self.channels = channels
        self.render = render

    async def send(self, request: SendRequest, profile: Profile, now: datetime) -> SendResult:
        """Apply the send rules at ``now`` and return the outcome or the deferral instant."""
        usable, reason = usable_channels(profile, request.channels, request.category)
        if not usable:
            return SendResult(self._outcome(request, now, request.channels[0], "skipped", reason))
        if request.category == "marketing" and request.quiet_hours is not None:
            tz = zone(_text(profile.traits.get("timezone")), request.timezone)
            until = in_quiet_hours(now, request.quiet_hours, tz)
            if until is not None:
                return SendResult(defer_until=until)
        context = render_context(request, profile) if self.render else None
        locale = _text(profile.traits.get("locale"))
        failure = "no_channel"
        for channel in usable:
            try:
                if context is None:
                    used = self.templates.prepare(channel, request.template, locale=locale)
                    return SendResult(self._outcome(request, now, channel, "sent", None, locale=used))
                message = self.templates.render(channel, request.template, context, locale=locale)
            except TemplateError as exc:
                log.warning("render failed for %s %s: %s", channel, request.template, exc)
                failure = "template_error"
                continue
            address = str(profile.traits[ADDRESS_TRAITS[channel]])
            result = await self.channels[channel].deliver(
                message, address=address, idempotency_key=request.idempotency_key
            )
            if log.isEnabledFor(logging.INFO):  # masking costs more than the check
                log.info(
                    "send %s step=%s channel=%s to=%s status=%s",
                    request.run_id,
                    request.step_id,
                    channel,
                    mask_address(address),
                    result.status,
                )
            if result.status == "sent":
                return SendResult(
                    self._outcome(
                        request,
                        now,
                        channel,
                        "sent",
                        None,
                        provider=result.provider,
                        provider_id=result.provider_id,
                        text=message.searchable_text(),
                        preview=message.preview(),
                        locale=message.locale,
                    )
                )
            failure = result.reason or "rejected"
        return SendResult(self._outcome(request, now, usable[-1], "failed", failure))

    def _outcome(
        self,
        request: SendRequest,
        now: datetime,
        channel: str,
        status: Status,
        reason: str | None,
        *,
        provider: str | None = None,
        provider_id: str | None = None,
        text: str = "",
        preview: str = "",
        locale: str | None = None,
    ) -> SendOutcome:
        return SendOutcome(
            step_id=request.step_id,
            channel=channel,
            template=request.template,
            status=status,
            at=now,
            reason=reason,
            variant=request.variant,
            provider=provider,
            provider_id=provider_id,
            text=text,
            preview=preview,
            locale=locale,
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
