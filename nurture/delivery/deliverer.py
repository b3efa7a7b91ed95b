"""Sending one step: channel choice, quiet hours, rendering, delivery, one outcome.

:class:`Deliverer` is the single implementation of the spec's "Sends" rules. The simulator calls
it directly on its virtual clock; the Temporal send activity calls it with the wall clock. It
reads the profile at send time, so an opt-out or a new address counts from the moment it is made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from channels import Channel, DeliveryResult, Envelope, PermanentError, Reconciling, TransientError
from channels import mask_address as mask_address
from nurture.engine.clock import in_quiet_hours, zone
from nurture.engine.holdout import in_holdout
from nurture.engine.identity import Identities, merge_traits, stamp
from nurture.engine.model import Profile, SendOutcome, SendRequest, SendResult, Status
from nurture.language.ir import ADDRESS_TRAITS, CHANNELS
from nurture.language.templates import RenderedMessage, TemplateError, TemplateStore

from .policy import cap_free_at, channel_order, history_start

log = logging.getLogger("nurture.delivery")

UNKNOWN_OUTCOME = "unknown_outcome"
"""The reason recorded when a process died between calling a provider and hearing back."""

UnsubscribeUrl = Callable[[str, str, str | None], str]
"""``(user_id, channel, topic) -> signed unsubscribe URL``: a send naming a topic unsubscribes
from that topic only, any other from the channel."""


class ProfileStore(Protocol):
    """Where profiles live: memory for simulations, the database for the service."""

    async def get(self, user_id: str) -> Profile: ...

    async def update(self, user_id: str, traits: Mapping[str, Any]) -> Profile: ...

    async def opt_out(self, user_id: str, name: str) -> None:
        """Add a channel or topic to the user's opt-outs."""
        ...


class SendHistory(Protocol):
    """The user's recent marketing sends, which frequency caps count."""

    async def sent(self, user_id: str, since: datetime) -> list[tuple[datetime, str]]:
        """Marketing messages sent to ``user_id`` at or after ``since``: ``(instant, channel)``."""
        ...

    async def record(self, request: SendRequest, channel: str, at: datetime) -> None:
        """Count a marketing message just sent."""
        ...


@dataclass
class MemoryHistory:
    """A :class:`SendHistory` in a dict, for the simulator and the scenario runner.

    With ``identities``, sends are counted per surviving person: a merged person's sends and
    those of runs that still carry a merged-away id count for the survivor (see :meth:`merge`).
    """

    sends: dict[str, list[tuple[datetime, str]]] = field(default_factory=dict)
    identities: Identities | None = None

    def _person(self, user_id: str) -> str:
        return user_id if self.identities is None else self.identities.canonical(user_id)

    async def sent(self, user_id: str, since: datetime) -> list[tuple[datetime, str]]:
        return [(at, channel) for at, channel in self.sends.get(self._person(user_id), ()) if at >= since]

    async def record(self, request: SendRequest, channel: str, at: datetime) -> None:
        self.sends.setdefault(self._person(request.user_id), []).append((at, channel))

    def merge(self, kept: str, merged: str) -> None:
        """``merged`` joined ``kept``: its sends count for ``kept`` from now on."""
        moved = self.sends.pop(merged, [])
        if moved:
            self.sends[kept] = sorted([*self.sends.get(kept, []), *moved])


OPT_OUT_REASONS = frozenset({"unsubscribed", "not_following", "refused"})
"""Permanent failures that mean the user stopped the channel (replied STOP to the number,
unfollowed the Official Account, refused its messages): recorded as an opt-out as well."""


@dataclass
class MemoryProfiles:
    """Profiles held in a dict; the simulator's and the scenario runner's store.

    With ``identities`` (nurture.engine.identity), profiles are kept per surviving person: a
    lookup or update by any id a person had (a merged-away person id included) reaches the
    survivor, and :meth:`merge` joins two profiles by the identity rules. Each trait keeps the
    time the call that set it was made (``at``); a trait written without a time (a journey's
    ``update`` step) counts as older than any call's in a merge.
    """

    profiles: dict[str, Profile] = field(default_factory=dict)
    identities: Identities | None = None
    times: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per person, when each trait was set (ISO-8601 UTC, see :func:`stamp`)."""
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Group traits by group id, shared by every member (``user.group``)."""
    member_of: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Per person, the group of their latest group call and when it was made."""

    def _person(self, user_id: str) -> str:
        return user_id if self.identities is None else self.identities.canonical(user_id)

    async def get(self, user_id: str) -> Profile:
        return self.get_now(user_id)

    def get_now(self, user_id: str) -> Profile:
        person = self._person(user_id)
        profile = self.profiles.get(person) or Profile(person)
        membership = self.member_of.get(person)
        if membership is None:
            return profile
        group = {**self.groups.get(membership[0], {}), "id": membership[0]}
        return Profile(person, {**profile.traits, "group": group}, profile.opted_out)

    async def update(self, user_id: str, traits: Mapping[str, Any]) -> Profile:
        return self.update_now(user_id, traits)

    async def opt_out(self, user_id: str, name: str) -> None:
        current = self.profiles.get(self._person(user_id)) or Profile(user_id)
        self.update_now(user_id, {}, current.opted_out | {name})

    def update_now(
        self,
        user_id: str,
        traits: Mapping[str, Any],
        opted_out: frozenset[str] | None = None,
        *,
        at: datetime | None = None,
    ) -> Profile:
        person = self._person(user_id)
        current = self.profiles.get(person) or Profile(person)
        profile = Profile(
            person,
            {**current.traits, **traits},
            current.opted_out if opted_out is None else opted_out,
        )
        self.profiles[person] = profile
        if traits:
            times = {k: v for k, v in self.times.get(person, {}).items() if k not in traits}
            self.times[person] = times if at is None else stamp(traits, at, times)
        return profile

    def join_group(self, user_id: str, group_id: str, traits: Mapping[str, Any], at: datetime) -> None:
        """A group call: the group's traits updated for every member, and the person a member."""
        self.groups[group_id] = {**self.groups.get(group_id, {}), **traits}
        self.member_of[self._person(user_id)] = (group_id, at.astimezone(UTC).isoformat())

    def merge(self, kept: str, merged: str) -> None:
        """``merged`` joined ``kept``: per trait the later value wins (ties: ``kept``'s), opt-outs
        are joined, and the later group call sets the group."""
        theirs = self.profiles.pop(merged, None)
        their_times = self.times.pop(merged, {})
        their_group = self.member_of.pop(merged, None)
        if their_group is not None:
            ours = self.member_of.get(kept)
            if ours is None or their_group[1] > ours[1]:
                self.member_of[kept] = their_group
        if theirs is None:
            return
        mine = self.profiles.get(kept) or Profile(kept)
        traits, times = merge_traits(mine.traits, self.times.get(kept, {}), theirs.traits, their_times)
        self.profiles[kept] = Profile(kept, traits, mine.opted_out | theirs.opted_out)
        self.times[kept] = times


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


AttemptState = Literal["sent", "failed", "retry", "uncertain"]
"""How an attempt ended: accepted, refused for good, not taken (retry may call again), or the
request reached the provider and the answer was lost (``uncertain``)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """What the ledger knows about a send before a channel's provider is called."""

    state: Literal["new", "sent", "failed", "unknown", "uncertain"]
    """``new``: go ahead and call the provider. ``sent``/``failed``: an earlier attempt's result.
    ``unknown``: an earlier attempt is still marked in flight (its process died, or it is running
    concurrently). ``uncertain``: an earlier attempt's answer was lost after the request reached
    the provider. For the last two the provider may have the message."""
    channel: str = ""
    """The channel the earlier attempt used (it may differ from the one asked about)."""
    provider_id: str | None = None
    reason: str | None = None


class SendLedger(Protocol):
    """The message rows: written before a provider is called, so a retry never sends twice."""

    async def claim(
        self, request: SendRequest, channel: str, provider: str, address: str, message: RenderedMessage
    ) -> Claim:
        """Mark ``channel``'s attempt in flight and answer ``new``, unless an earlier attempt
        (on any channel) decides the send."""
        ...

    async def settle(
        self,
        request: SendRequest,
        channel: str,
        state: AttemptState,
        *,
        provider_id: str | None = None,
        reason: str | None = None,
    ) -> None: ...


def earlier_claim(attempts: Sequence[Mapping[str, Any]], channel: str) -> Claim | None:
    """The claim the recorded ``attempts`` of a send decide for ``channel``, or ``None`` (go ahead).

    A message accepted, or possibly accepted, on any channel decides the send: a fallback is only
    tried after the earlier channels failed for good.
    """
    for attempt in attempts:
        state, used = attempt.get("state"), str(attempt.get("channel", ""))
        if state == "sent":
            return Claim("sent", used, provider_id=attempt.get("provider_id"))
        if state == "pending":
            return Claim("unknown", used)
        if state == "uncertain":
            return Claim("uncertain", used)
    for attempt in attempts:
        if attempt.get("state") == "failed" and attempt.get("channel") == channel:
            return Claim("failed", channel, reason=attempt.get("reason"))
    return None


def with_attempt(attempts: Sequence[Mapping[str, Any]], channel: str, **changes: Any) -> list[dict[str, Any]]:
    """``attempts`` with ``channel``'s entry updated (appended when there is none)."""
    out = [dict(a) for a in attempts if a.get("channel") != channel]
    current = next((dict(a) for a in attempts if a.get("channel") == channel), {"channel": channel})
    return [*out, {**current, **changes}]


@dataclass
class MemoryLedger:
    """A :class:`SendLedger` in a dict, for the scenario runner and tests."""

    attempts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    async def claim(
        self, request: SendRequest, channel: str, provider: str, address: str, message: RenderedMessage
    ) -> Claim:
        attempts = self.attempts.get(request.idempotency_key, [])
        decided = earlier_claim(attempts, channel)
        if decided is not None:
            return decided
        self.attempts[request.idempotency_key] = with_attempt(
            attempts, channel, provider=provider, address=address, state="pending", reason=None
        )
        return Claim("new", channel)

    async def settle(
        self,
        request: SendRequest,
        channel: str,
        state: AttemptState,
        *,
        provider_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        key = request.idempotency_key
        self.attempts[key] = with_attempt(
            self.attempts.get(key, []), channel, state=state, provider_id=provider_id, reason=reason
        )


def has_content(message: RenderedMessage) -> bool:
    """Whether a rendered message has anything to send (a template may render empty for a user)."""
    if message.channel == "email":
        return bool(
            (message.subject or "").strip() and ((message.html or "").strip() or (message.text or "").strip())
        )
    if message.channel == "wechat":
        return bool(message.template_id)
    return bool((message.text or "").strip())


class Deliverer:
    """Renders and delivers sends through the configured channel of each kind.

    With a ``ledger``, every provider call is preceded by a claim on the message row (unique per
    run and step), so a retried activity that finds an earlier attempt reuses its result instead
    of sending again. An attempt whose answer was lost (its process died mid-call, or the
    connection broke after the request reached the provider) may have been accepted: a provider
    that can look messages up (:class:`channels.Reconciling`) is asked, and the message is sent
    again only if it does not have it; otherwise the send is recorded ``failed:unknown_outcome``
    and neither re-sent nor passed to a fallback channel (the user may have it). Channels that are
    idempotent by key themselves (``idempotent = True``, like the outbox) are simply called again.

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
        history: SendHistory | None = None,
        profiles: ProfileStore | None = None,
    ) -> None:
        """``history`` enables frequency caps; ``profiles`` records the opt-outs a provider
        reports (a STOP reply, an unfollow)."""
        self.templates = templates
        self.channels = channels
        self.render = render
        self.ledger = ledger
        self.links = links
        self.history = history
        self.profiles = profiles

    async def send(self, request: SendRequest, profile: Profile, now: datetime) -> SendResult:
        """Apply the send rules at ``now`` and return the outcome or the deferral instant.

        Raises what a channel raised for a transient failure, so the activity is retried.
        """
        channels = channel_order(request.channels, request.policy, profile.traits)
        marketing = request.category == "marketing"
        if marketing and in_holdout(request.user_id, request.policy.holdout):
            return SendResult(self._outcome(request, now, channels[0], "skipped", "holdout"))
        if marketing and request.topic is not None and request.topic in profile.opted_out:
            return SendResult(self._outcome(request, now, channels[0], "skipped", "topic_opted_out"))
        usable, reason = usable_channels(profile, channels, request.category)
        if not usable:
            return SendResult(self._outcome(request, now, channels[0], "skipped", reason))
        if marketing:
            tz = zone(text_value(profile.traits.get("timezone")), request.timezone)
            if request.policy.caps and self.history is not None:
                sent = await self.history.sent(profile.user_id, history_start(now, tz))
                free = {c: cap_free_at(now, tz, request.policy.caps, sent, c) for c in usable}
                allowed = [c for c in usable if free[c] is None]
                if not allowed:
                    if request.policy.on_cap == "defer":
                        room = min(t for t in free.values() if t is not None)
                        return SendResult(defer_until=room, defer_reason="frequency_cap")
                    return SendResult(self._outcome(request, now, usable[0], "skipped", "frequency_cap"))
                usable = allowed
            quiet = request.policy.quiet_for(usable[0], request.quiet_hours)
            until = None if quiet is None else in_quiet_hours(now, quiet, tz)
            if until is not None:
                return SendResult(defer_until=until)
        locale = text_value(profile.traits.get("locale"))
        failure = "no_channel"
        for channel in usable:
            if not self.render:
                try:
                    used = self.templates.prepare(channel, request.template, locale=locale)
                except TemplateError:
                    failure = "template_error"
                    continue
                await self._count(request, channel, now)
                return SendResult(self._outcome(request, now, channel, "sent", None, locale=used))
            unsubscribe = None
            if self.links is not None and marketing:
                unsubscribe = self.links(profile.user_id, channel, request.topic)
            context = render_context(request, profile, unsubscribe_url=unsubscribe)
            try:
                message = self.templates.render(channel, request.template, context, locale=locale)
            except TemplateError as exc:
                log.warning("render failed for %s %s: %s", channel, request.template, exc)
                failure = "template_error"
                continue
            if not has_content(message):
                log.warning("%s %s rendered empty for this user", channel, request.template)
                failure = "empty_message"
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
            if isinstance(attempt, tuple):
                used, accepted = attempt
                await self._count(request, used, now)
                return SendResult(
                    self._outcome(
                        request,
                        now,
                        used,
                        "sent",
                        None,
                        provider=accepted.provider,
                        provider_id=accepted.provider_id,
                        text=message.searchable_text() if used == channel else "",
                        preview=message.preview() if used == channel else "",
                        locale=message.locale,
                    )
                )
            if attempt == UNKNOWN_OUTCOME:
                return SendResult(self._outcome(request, now, channel, "failed", attempt))
            failure = attempt
        return SendResult(self._outcome(request, now, usable[-1], "failed", failure))

    async def _attempt(
        self, request: SendRequest, channel: str, message: RenderedMessage, envelope: Envelope
    ) -> tuple[str, DeliveryResult] | str:
        """Deliver through one channel: the channel that carried the message and the provider's
        acceptance (an earlier attempt's, on another channel, counts), or why it failed for good."""
        adapter = self.channels[channel]
        if self.ledger is not None:
            claim = await self.ledger.claim(request, channel, adapter.provider, envelope.address, message)
            if claim.state == "sent":
                return claim.channel, DeliveryResult(self.channels[claim.channel].provider, claim.provider_id)
            if claim.state == "failed":
                return claim.reason or "rejected"
            if claim.state in ("unknown", "uncertain"):
                found = await self._recover(request, claim, channel, adapter, message, envelope)
                if isinstance(found, DeliveryResult):
                    return channel, found
                if found is not None:
                    return found
        try:
            result = await adapter.deliver(message, envelope)
        except PermanentError as exc:
            self._log(request, channel, envelope, f"failed:{exc.reason}")
            if self.ledger is not None:
                await self.ledger.settle(request, channel, "failed", reason=exc.reason)
            if exc.reason in OPT_OUT_REASONS and self.profiles is not None:
                await self.profiles.opt_out(request.user_id, channel)
            return exc.reason
        except asyncio.CancelledError:
            # Cancelled mid-call (a worker shutting down): the provider may have the message,
            # so the attempt stays in flight and the retry treats its outcome as unknown.
            raise
        except Exception as exc:
            maybe_sent = isinstance(exc, TransientError) and exc.maybe_sent
            reason = getattr(exc, "reason", type(exc).__name__)
            self._log(request, channel, envelope, f"{'uncertain' if maybe_sent else 'retry'}:{reason}")
            if self.ledger is not None:
                await self.ledger.settle(
                    request, channel, "uncertain" if maybe_sent else "retry", reason=reason
                )
            raise
        self._log(request, channel, envelope, "sent")
        if self.ledger is not None:
            await self.ledger.settle(request, channel, "sent", provider_id=result.provider_id)
        return channel, result

    async def _count(self, request: SendRequest, channel: str, now: datetime) -> None:
        if request.category == "marketing" and self.history is not None:
            await self.history.record(request, channel, now)

    async def _recover(
        self,
        request: SendRequest,
        claim: Claim,
        channel: str,
        adapter: Channel,
        message: RenderedMessage,
        envelope: Envelope,
    ) -> DeliveryResult | str | None:
        """After an attempt whose answer was lost: its acceptance, ``unknown_outcome``, or ``None``
        when it is safe to call the provider (again)."""
        assert self.ledger is not None
        if claim.channel == channel and getattr(adapter, "idempotent", False):
            await self._reclaim(request, channel, adapter, message, envelope)
            return None
        if claim.channel == channel and isinstance(adapter, Reconciling):
            found = await adapter.find(message, envelope)
            if found is not None:
                log.info(
                    "send %s step=%s: %s had the message already",
                    request.run_id,
                    request.step_id,
                    adapter.provider,
                )
                await self.ledger.settle(request, channel, "sent", provider_id=found.provider_id)
                return found
            await self._reclaim(request, channel, adapter, message, envelope)
            return None
        log.warning(
            "send %s step=%s: an earlier attempt on %s never heard back; not sending again",
            request.run_id,
            request.step_id,
            claim.channel,
        )
        return UNKNOWN_OUTCOME

    async def _reclaim(
        self,
        request: SendRequest,
        channel: str,
        adapter: Channel,
        message: RenderedMessage,
        envelope: Envelope,
    ) -> None:
        """Clear a lost attempt the provider does not have, and mark the new one in flight."""
        assert self.ledger is not None
        await self.ledger.settle(request, channel, "retry", reason="not found at the provider")
        claim = await self.ledger.claim(request, channel, adapter.provider, envelope.address, message)
        if claim.state != "new":  # another attempt got there first
            raise TransientError("concurrent", f"another attempt of this send is {claim.state}")

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


def text_value(value: Any) -> str | None:
    """A trait that should be text (a time zone, a locale, an address): the text, or ``None``."""
    return value if isinstance(value, str) and value else None
