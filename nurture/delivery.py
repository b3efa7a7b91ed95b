"""Sending one step: channel choice, quiet hours, rendering, delivery, one outcome.

:class:`Deliverer` is the single implementation of the spec's "Sends" rules. The simulator calls
it directly on its virtual clock; the Temporal send activity calls it with the wall clock. It
reads the profile at send time, so an opt-out or a new address counts from the moment it is made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from channels import Channel, DeliveryResult, Envelope, PermanentError
from channels import mask_address as mask_address

from .clock import in_quiet_hours, zone
from .model import ADDRESS_TRAITS, CHANNELS, Profile, SendOutcome, SendRequest, SendResult, Status
from .templates import RenderedMessage, TemplateError, TemplateStore

log = logging.getLogger("nurture.delivery")

UNKNOWN_OUTCOME = "unknown_outcome"
"""The reason recorded when a process died between calling a provider and hearing back."""

UnsubscribeUrl = Callable[[str, str], str]
"""``(user_id, channel) -> signed unsubscribe URL``."""


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


def render_context(
    request: SendRequest, profile: Profile, *, unsubscribe_url: str | None = None
) -> dict[str, Any]:
    """What templates see: the profile as ``user``, the run's event context, and the signed
    ``unsubscribe_url`` (empty for transactional sends or when links are not configured)."""
    return {
        "user": {**profile.traits, "id": profile.user_id},
        "event": request.context.get("event") or {},
        "last_event": request.context.get("last_event") or {},
        "journey": request.context.get("journey") or {},
        "unsubscribe_url": unsubscribe_url or "",
    }


@dataclass(frozen=True, slots=True)
class Claim:
    """What the ledger knows about one channel's attempt at a send, before the provider call."""

    state: Literal["new", "sent", "failed", "unknown"]
    """``new``: go ahead and call the provider; ``sent``/``failed``: an earlier attempt's result;
    ``unknown``: an earlier attempt called the provider and never learned the answer."""
    provider_id: str | None = None
    reason: str | None = None


class SendLedger(Protocol):
    """The message rows: written before a provider is called, so a retry never sends twice."""

    async def claim(
        self, request: SendRequest, channel: str, provider: str, address: str, message: RenderedMessage
    ) -> Claim: ...

    async def settle(
        self,
        request: SendRequest,
        channel: str,
        state: Literal["sent", "failed", "retry"],
        *,
        provider_id: str | None = None,
        reason: str | None = None,
    ) -> None: ...


@dataclass
class MemoryLedger:
    """A :class:`SendLedger` in a dict, for the scenario runner and tests."""

    attempts: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    async def claim(
        self, request: SendRequest, channel: str, provider: str, address: str, message: RenderedMessage
    ) -> Claim:
        key = (request.idempotency_key, channel)
        attempt = self.attempts.get(key)
        if attempt is None or attempt["state"] == "retry":
            self.attempts[key] = {"state": "pending", "provider": provider, "address": address}
            return Claim("new")
        return claim_of(attempt)

    async def settle(
        self,
        request: SendRequest,
        channel: str,
        state: Literal["sent", "failed", "retry"],
        *,
        provider_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        attempt = self.attempts[(request.idempotency_key, channel)]
        attempt.update(state=state, provider_id=provider_id, reason=reason)


def claim_of(attempt: Mapping[str, Any]) -> Claim:
    """The claim an existing, not-retryable attempt record stands for."""
    state = attempt.get("state")
    if state == "sent":
        return Claim("sent", provider_id=attempt.get("provider_id"))
    if state == "failed":
        return Claim("failed", reason=attempt.get("reason"))
    return Claim("unknown")


class Deliverer:
    """Renders and delivers sends through the configured channel of each kind.

    With a ``ledger``, every provider call is preceded by a claim on the message row (unique per
    run and step), so a retried activity that finds an earlier attempt reuses its result instead
    of sending again. An attempt found still pending means the process died while the provider
    had the message: it is recorded ``failed:unknown_outcome`` and neither re-sent nor passed to
    a fallback channel (the user may have it). Channels that are idempotent by key themselves
    (``idempotent = True``, like the outbox) are simply called again.

    With ``render=False`` it decides each send's channel, quiet-hour deferral and outcome by the
    same rules but neither renders nor delivers, for bulk "what would happen" simulations: the
    outcome has no ``text``, ``preview`` or provider, a template that is missing or has errors
    still fails over as ``template_error``, and a render that only some recipients' data would
    break, or a provider rejection, counts as sent.
    """

    def __init__(
        self,
        templates: TemplateStore,
        channels: Mapping[str, Channel],
        *,
        render: bool = True,
        ledger: SendLedger | None = None,
        links: UnsubscribeUrl | None = None,
    ) -> None:
        self.templates = templates
        self.channels = channels
        self.render = render
        self.ledger = ledger
        self.links = links

    async def send(self, request: SendRequest, profile: Profile, now: datetime) -> SendResult:
        """Apply the send rules at ``now`` and return the outcome or the deferral instant.

        Raises what a channel raised for a transient failure, so the activity is retried.
        """
        usable, reason = usable_channels(profile, request.channels, request.category)
        if not usable:
            return SendResult(self._outcome(request, now, request.channels[0], "skipped", reason))
        if request.category == "marketing" and request.quiet_hours is not None:
            tz = zone(_text(profile.traits.get("timezone")), request.timezone)
            until = in_quiet_hours(now, request.quiet_hours, tz)
            if until is not None:
                return SendResult(defer_until=until)
        locale = _text(profile.traits.get("locale"))
        failure = "no_channel"
        for channel in usable:
            if not self.render:
                try:
                    used = self.templates.prepare(channel, request.template, locale=locale)
                except TemplateError:
                    failure = "template_error"
                    continue
                return SendResult(self._outcome(request, now, channel, "sent", None, locale=used))
            unsubscribe = None
            if self.links is not None and request.category == "marketing":
                unsubscribe = self.links(profile.user_id, channel)
            context = render_context(request, profile, unsubscribe_url=unsubscribe)
            try:
                message = self.templates.render(channel, request.template, context, locale=locale)
            except TemplateError as exc:
                log.warning("render failed for %s %s: %s", channel, request.template, exc)
                failure = "template_error"
                continue
            envelope = Envelope(
                address=str(profile.traits[ADDRESS_TRAITS[channel]]),
                idempotency_key=request.idempotency_key,
                user_id=profile.user_id,
                journey=request.journey,
                category=request.category,
                unsubscribe_url=unsubscribe,
            )
            attempt = await self._attempt(request, channel, message, envelope)
            if isinstance(attempt, DeliveryResult):
                return SendResult(
                    self._outcome(
                        request,
                        now,
                        channel,
                        "sent",
                        None,
                        provider=attempt.provider,
                        provider_id=attempt.provider_id,
                        text=message.searchable_text(),
                        preview=message.preview(),
                        locale=message.locale,
                    )
                )
            if attempt == UNKNOWN_OUTCOME:
                return SendResult(self._outcome(request, now, channel, "failed", attempt))
            failure = attempt
        return SendResult(self._outcome(request, now, usable[-1], "failed", failure))

    async def _attempt(
        self, request: SendRequest, channel: str, message: RenderedMessage, envelope: Envelope
    ) -> DeliveryResult | str:
        """Deliver through one channel: the provider's acceptance, or why it failed for good."""
        adapter = self.channels[channel]
        if self.ledger is not None:
            claim = await self.ledger.claim(request, channel, adapter.provider, envelope.address, message)
            if claim.state == "sent":
                return DeliveryResult(adapter.provider, claim.provider_id)
            if claim.state == "failed":
                return claim.reason or "rejected"
            if claim.state == "unknown" and not getattr(adapter, "idempotent", False):
                log.warning(
                    "send %s step=%s channel=%s: an earlier attempt died waiting for %s; not sending again",
                    request.run_id,
                    request.step_id,
                    channel,
                    adapter.provider,
                )
                await self.ledger.settle(request, channel, "failed", reason=UNKNOWN_OUTCOME)
                return UNKNOWN_OUTCOME
        try:
            result = await adapter.deliver(message, envelope)
        except PermanentError as exc:
            self._log(request, channel, envelope, f"failed:{exc.reason}")
            if self.ledger is not None:
                await self.ledger.settle(request, channel, "failed", reason=exc.reason)
            return exc.reason
        except BaseException as exc:
            # Transient (or a bug): the provider did not take the message, so a retry may call again.
            self._log(request, channel, envelope, f"retry:{getattr(exc, 'reason', type(exc).__name__)}")
            if self.ledger is not None:
                await self.ledger.settle(request, channel, "retry", reason=getattr(exc, "reason", None))
            raise
        self._log(request, channel, envelope, "sent")
        if self.ledger is not None:
            await self.ledger.settle(request, channel, "sent", provider_id=result.provider_id)
        return result

    @staticmethod
    def _log(request: SendRequest, channel: str, envelope: Envelope, status: str) -> None:
        if log.isEnabledFor(logging.INFO):  # masking costs more than the check
            log.info(
                "send %s step=%s channel=%s to=%s status=%s",
                request.run_id,
                request.step_id,
                channel,
                mask_address(envelope.address),
                status,
            )

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
