"""Runtime data shared by the interpreter, the simulator, the workflow and the activities.

Plain frozen dataclasses with JSON round trips; nothing here imports a template engine, a
database or a network client, so workflow code can use it freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from nurture.language.ir import Policy, QuietHours, Rate, from_dict, to_dict

from .clock import format_instant, parse_instant


def idempotency_key(run_id: str, step_id: str) -> str:
    """The key for one send step of one run: a user never gets the same step twice."""
    return f"{run_id}:{step_id}"


def split_idempotency_key(key: str) -> tuple[str | None, str | None]:
    """``(run_id, step_id)`` from a key made by :func:`idempotency_key`."""
    # Run ids may contain ':' themselves; step ids never do.
    run_id, separator, step_id = key.rpartition(":")
    if not separator or not run_id or not step_id:
        return None, None
    return run_id, step_id


@dataclass(frozen=True, slots=True)
class Event:
    """A track event as the engine sees it."""

    name: str
    timestamp: datetime
    properties: Mapping[str, Any] = field(default_factory=dict)
    message_id: str | None = None

    def scope(self) -> dict[str, Any]:
        """What conditions and templates see as ``event``."""
        return {
            "name": self.name,
            "properties": dict(self.properties),
            "timestamp": format_instant(self.timestamp),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.scope(), "message_id": self.message_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        return cls(
            name=data["name"],
            timestamp=parse_instant(data["timestamp"]),
            properties=dict(data.get("properties") or {}),
            message_id=data.get("message_id"),
        )


@dataclass(frozen=True, slots=True)
class Profile:
    """A user: traits plus per-channel opt-outs."""

    user_id: str
    traits: Mapping[str, Any] = field(default_factory=dict)
    opted_out: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SendRequest:
    """Everything a send step needs from the run, resolved when the step starts."""

    run_id: str
    journey: str
    version: str
    step_id: str
    user_id: str
    channels: tuple[str, ...]
    template: str
    category: Literal["marketing", "transactional"]
    timezone: str
    quiet_hours: QuietHours | None
    variant: str | None
    context: Mapping[str, Any]
    """``event``, ``last_event`` and ``journey`` as templates see them."""
    topic: str | None = None
    """The subscription topic the send names, if any."""
    policy: Policy = field(default_factory=Policy)
    """Frequency caps, the channel order for ``auto`` (``channels`` is then empty) and
    per-channel quiet hours."""
    rate: Rate | None = None
    """The send rate this step obeys (its own, else the journey's)."""
    rate_key: str = ""
    """Which sends share the rate: ``<journey>`` for the journey's, ``<journey>/<step>`` for a step's."""
    rate_slot: datetime | None = None
    """The slot this send took under the rate when it was held back for it: at or after that
    instant it goes without taking another."""

    @property
    def idempotency_key(self) -> str:
        """One delivery per (run, step): retries and replays reuse it."""
        return idempotency_key(self.run_id, self.step_id)

    def to_dict(self) -> dict[str, Any]:
        quiet = self.quiet_hours
        return {
            "run_id": self.run_id,
            "journey": self.journey,
            "version": self.version,
            "step_id": self.step_id,
            "user_id": self.user_id,
            "channels": list(self.channels),
            "template": self.template,
            "category": self.category,
            "timezone": self.timezone,
            "quiet_hours": None if quiet is None else {"start": quiet.start, "end": quiet.end},
            "variant": self.variant,
            "context": dict(self.context),
            "topic": self.topic,
            "policy": to_dict(self.policy),
            # Only paced sends carry these, so a request looks as it did before rates existed.
            **(
                {}
                if self.rate is None
                else {
                    "rate": to_dict(self.rate),
                    "rate_key": self.rate_key,
                    "rate_slot": None if self.rate_slot is None else format_instant(self.rate_slot),
                }
            ),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SendRequest:
        quiet = data.get("quiet_hours")
        return cls(
            run_id=data["run_id"],
            journey=data["journey"],
            version=data["version"],
            step_id=data["step_id"],
            user_id=data["user_id"],
            channels=tuple(data["channels"]),
            template=data["template"],
            category=data["category"],
            timezone=data["timezone"],
            quiet_hours=None if quiet is None else QuietHours(quiet["start"], quiet["end"]),
            variant=data.get("variant"),
            context=dict(data.get("context") or {}),
            topic=data.get("topic"),
            policy=from_dict(Policy, data["policy"]) if data.get("policy") else Policy(),
            rate=from_dict(Rate, data["rate"]) if data.get("rate") else None,
            rate_key=data.get("rate_key") or "",
            rate_slot=parse_instant(data["rate_slot"]) if data.get("rate_slot") else None,
        )


Status = Literal["sent", "skipped", "failed"]
DeferReason = Literal["quiet_hours", "frequency_cap", "rate_limit"]
"""Why a send waits before it goes out."""


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """The one recorded outcome of a send step."""

    step_id: str
    channel: str
    """The channel used (for a skipped send: the step's first channel)."""
    template: str
    status: Status
    at: datetime
    reason: str | None = None
    variant: str | None = None
    provider: str | None = None
    provider_id: str | None = None
    text: str = ""
    """Everything a person would read, for ``contains`` checks."""
    preview: str = ""
    """One line for timelines."""
    locale: str | None = None

    @property
    def label(self) -> str:
        return self.status if self.reason is None else f"{self.status}:{self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id,
            "channel": self.channel,
            "template": self.template,
            "status": self.status,
            "at": format_instant(self.at),
            "reason": self.reason,
            "variant": self.variant,
            "provider": self.provider,
            "provider_id": self.provider_id,
            "text": self.text,
            "preview": self.preview,
            "locale": self.locale,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SendOutcome:
        return cls(**{**data, "at": parse_instant(data["at"])})


@dataclass(frozen=True, slots=True)
class SendResult:
    """A send's answer: an outcome, or an instant to try again at, and why it waits."""

    outcome: SendOutcome | None = None
    defer_until: datetime | None = None
    defer_reason: DeferReason = "quiet_hours"

    @property
    def is_message(self) -> bool:
        """Whether the send is over and counts as a message: sent, or held out (a held-out
        user's send counts as the moment the message would have gone out, so a goal measured
        from the last message compares the holdout fairly)."""
        outcome = self.outcome
        return self.defer_until is None and outcome is not None and (outcome.status == "sent" or outcome.reason == "holdout")

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": None if self.outcome is None else self.outcome.to_dict(),
            "defer_until": None if self.defer_until is None else format_instant(self.defer_until),
            "defer_reason": self.defer_reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SendResult:
        outcome = data.get("outcome")
        defer = data.get("defer_until")
        return cls(
            outcome=None if outcome is None else SendOutcome.from_dict(outcome),
            defer_until=None if defer is None else parse_instant(defer),
            defer_reason=data.get("defer_reason") or "quiet_hours",
        )


@dataclass(frozen=True, slots=True)
class EndedRun:
    """A run that has ended while its goal window is still open: a router may count its conversion."""

    run_id: str
    journey: str
    user_id: str
    key: str
    entered_at: datetime
    last_message_at: datetime | None = None
    variants: Mapping[str, str] = field(default_factory=dict)
    """The variant of each split the run went through."""


class Recorder(Protocol):
    """Where run results go: memory for scenarios, the database for the service.

    Each method takes a record a :class:`~nurture.engine.interpreter.Run` made
    (``start_record``, ``steps_record``, ``end_record``, ``conversion_record``), or a send's
    request and its one outcome.
    """

    async def send(self, request: SendRequest, outcome: SendOutcome, then: Mapping[str, Any] | None = None) -> None:
        """A send's outcome; ``then``, the record its run writes right after the message (a rider of
        :meth:`~nurture.engine.interpreter.Run.send_rider`: its ``kind``, ``steps`` or ``end``,
        and its ``record``), written with it as :meth:`steps` or :meth:`end` would write it."""

    async def start(self, record: Mapping[str, Any]) -> None: ...

    async def end(self, record: Mapping[str, Any]) -> None: ...

    async def conversion(self, record: Mapping[str, Any]) -> None: ...

    async def steps(self, record: Mapping[str, Any]) -> None: ...


async def record_rider(recorder: Recorder, rider: Mapping[str, Any]) -> None:
    """Write a send's rider (see :meth:`Recorder.send`) through ``recorder``'s own methods."""
    if rider["kind"] == "steps":
        await recorder.steps(rider["record"])
    else:
        await recorder.end(rider["record"])
