"""The intermediate form: what a compiled journey is.

Frozen dataclasses, one per step kind, joined by :data:`Step`. Everything is resolved: durations
are seconds (their spelling kept beside them, for display only), times are minutes after
midnight, weekdays are 0 (Monday) to 6, expressions are compiled trees, time zone and quiet hours
are filled in from project defaults. It round-trips
through JSON (:func:`journey_to_dict`, :func:`journey_from_dict`); the Temporal workflow receives
the exact version a user entered in the compact form of :func:`journey_payload`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, Union

from .audiences import EXITED, written_condition
from .durations import format_duration
from .evaluation import Expr

T = TypeVar("T")
Category = Literal["marketing", "transactional"]
ReEntry = Literal["after_exit", "restart", "once"]
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ADDRESS_TRAITS: dict[str, str] = {"email": "email", "sms": "phone", "wechat": "wechat_openid"}
"""The trait holding each channel's address."""
CHANNELS: tuple[str, ...] = tuple(ADDRESS_TRAITS)
"""Every channel a send may use."""
_AS_WRITTEN = {"as_written": True}
"""Marks a field that keeps the source's spelling of a value for display: ``30d`` and ``720h``
behave alike, so such a field is left out of the version (and of equality)."""
_OPTIONAL = {"optional": True}
"""Marks a field added to the language after journeys were deployed: while it holds its default
it is left out of the version, so a journey that does not use it keeps the version it had."""
GoalFrom = Literal["entry", "last_message"]


@dataclass(frozen=True, slots=True)
class EventRule:
    """An event name and an optional condition on it (trigger, exit_on)."""

    event: str
    cond: Expr | None = None
    audience: str | None = field(default=None, metadata=_OPTIONAL)
    """With ``trigger: {audience: ...}``: the audience whose entry (or exit) this is; ``event`` is
    then the audience event and ``cond`` also requires its ``audience`` property."""

    @property
    def describe(self) -> str:
        """The rule in the file's words: ``Order Completed``, ``leaving audience customers``."""
        return self.event if self.audience is None else f"{audience_verb(self.event)} audience {self.audience}"

    @property
    def written_if(self) -> str | None:
        """The condition as the marketer wrote it (an audience rule's own part left out)."""
        return written_condition(self.cond, self.audience)


@dataclass(frozen=True, slots=True)
class DateTrigger:
    """Runs start at a moment worked out from a date: in the trigger event (``trigger.event``) or,
    without one, in the person's traits, read again whenever they change."""

    date: Expr
    offset: int = 0
    """Seconds added to the date (negative: before it), counted on the local wall clock."""
    minute: int | None = None
    """Local time of day on the day reached; ``None`` keeps the date's own time."""
    yearly: bool = False
    """Repeat on the same day every year (``every: year``)."""


@dataclass(frozen=True, slots=True)
class Goal:
    """The conversion event of a journey."""

    event: str
    cond: Expr | None = None
    within: int | None = None
    """Conversion window in seconds from :attr:`measured_from`; ``None`` is the run's whole life."""
    exit: bool = True
    """Whether a conversion ends the run at once."""
    within_written: str | None = field(default=None, compare=False, metadata=_AS_WRITTEN)
    """``within`` as the marketer wrote it (``30d``), for display."""
    value: Expr | None = field(default=None, metadata=_OPTIONAL)
    """What one conversion is worth (``event.properties.total``), summed in reports."""
    measured_from: GoalFrom = field(default="entry", metadata=_OPTIONAL)
    """Where the window starts: the run's entry, or the latest message sent to the user."""
    audience: str | None = field(default=None, metadata=_OPTIONAL)
    """With ``goal: {audience: ...}``: converting is entering this audience (see :class:`EventRule`)."""

    @property
    def describe(self) -> str:
        return self.event if self.audience is None else f"entering audience {self.audience}"


@dataclass(frozen=True, slots=True)
class QuietHours:
    """A daily local-time window in which marketing sends wait; may wrap midnight."""

    start: int
    """Minutes after local midnight."""
    end: int


@dataclass(frozen=True, slots=True)
class ChannelQuiet:
    """A channel's own quiet window; ``None`` turns quiet hours off for it."""

    channel: str
    quiet: QuietHours | None


@dataclass(frozen=True, slots=True)
class Cap:
    """At most ``per_day`` marketing messages per local calendar day and ``per_week`` per seven."""

    scope: str
    """``all`` (every channel together) or one channel."""
    per_day: int | None = None
    per_week: int | None = None


@dataclass(frozen=True, slots=True)
class Holdout:
    """The project's global control group: a fixed share of users no journey sends marketing to."""

    percent: float
    """Share of users held out: more than 0, less than 100, in steps of 0.01."""
    salt: str
    """Mixed into every user's draw: a new salt draws a new group."""


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` sends per ``per`` seconds, spread evenly: one every ``per / count`` seconds."""

    count: int
    per: int
    written: str = field(default="", compare=False, metadata=_AS_WRITTEN)
    """The rate as the marketer wrote it (``1000/h``), for display."""

    @property
    def spacing(self) -> float:
        """Seconds between two sends at this rate."""
        return self.per / self.count


@dataclass(frozen=True, slots=True)
class Policy:
    """The delivery policy of a journey: the project's, with the journey's overrides applied."""

    caps: tuple[Cap, ...] = ()
    on_cap: Literal["skip", "defer"] = "skip"
    channel_order: tuple[str, ...] = ("email", "sms", "wechat")
    quiet_by_channel: tuple[ChannelQuiet, ...] = ()
    holdout: Holdout | None = field(default=None, metadata=_OPTIONAL)
    """The project's holdout, the same in every journey (a journey cannot set it)."""

    def quiet_for(self, channel: str, default: QuietHours | None) -> QuietHours | None:
        """``channel``'s quiet window: its own when set (``None`` for off), else ``default``."""
        for entry in self.quiet_by_channel:
            if entry.channel == channel:
                return entry.quiet
        return default


@dataclass(frozen=True, slots=True)
class Wait:
    kind: ClassVar[str] = "wait"
    id: str
    seconds: int
    written: str = field(default="", compare=False, metadata=_AS_WRITTEN)
    """The duration as the marketer wrote it (``30d``, not ``4w2d``; ``0..2h``), for display."""
    spread: int = field(default=0, metadata=_OPTIONAL)
    """A random wait (``random: 0..2h``) lasts ``seconds`` plus a share of this, drawn per run."""


@dataclass(frozen=True, slots=True)
class WaitUntil:
    kind: ClassVar[str] = "wait_until"
    id: str
    minute: int | None
    """Local time of day, minutes after midnight; with a ``date``, ``None`` keeps the date's own time."""
    days: tuple[int, ...] = ()
    """Allowed weekdays, 0 = Monday; empty means every day."""
    date: Expr | None = field(default=None, metadata=_OPTIONAL)
    """The date to wait for (``event.properties.renews_at``); ``None`` waits for the next ``minute``."""
    offset: int = field(default=0, metadata=_OPTIONAL)
    """Seconds added to the date (negative: before it), counted on the local wall clock."""

    @property
    def when(self) -> str:
        """The moment in the file's words: ``10:00 (mon,fri)``, ``user.birthday -3d at 09:00``."""
        clock = None if self.minute is None else f"{self.minute // 60:02d}:{self.minute % 60:02d}"
        if self.date is None:
            days = ",".join(WEEKDAYS[d] for d in self.days)
            return f"{clock}" + (f" ({days})" if days else "")
        moved = ""
        if self.offset:
            moved = f" {'-' if self.offset < 0 else '+'}{format_duration(abs(self.offset))}"
        return f"{self.date.source}{moved}" + (f" at {clock}" if clock else "")


@dataclass(frozen=True, slots=True)
class Send:
    kind: ClassVar[str] = "send"
    id: str
    channel: str
    template: str
    fallback: tuple[str, ...] = ()
    category: Category = "marketing"
    topic: str | None = None
    rate: Rate | None = field(default=None, metadata=_OPTIONAL)
    """This step's own send rate; without one, the journey's applies."""

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels in order; empty for ``auto`` (decided per user at send time)."""
        return () if self.channel == "auto" else (self.channel, *self.fallback)


@dataclass(frozen=True, slots=True)
class WaitFor:
    kind: ClassVar[str] = "wait_for"
    id: str
    event: str
    timeout: int
    cond: Expr | None = None
    then: tuple[Step, ...] = ()
    otherwise: tuple[Step, ...] = ()
    timeout_written: str = field(default="", compare=False, metadata=_AS_WRITTEN)
    """``timeout`` as the marketer wrote it, for display."""
    audience: str | None = field(default=None, metadata=_OPTIONAL)
    """With ``wait_for: {audience: ...}``: the audience waited for (see :class:`EventRule`)."""

    @property
    def describe(self) -> str:
        """What is waited for, in the file's words."""
        return self.event if self.audience is None else f"{audience_verb(self.event)} audience {self.audience}"


@dataclass(frozen=True, slots=True)
class Arm:
    cond: Expr
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Branch:
    kind: ClassVar[str] = "branch"
    id: str
    arms: tuple[Arm, ...]
    otherwise: tuple[Step, ...] = ()


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    weight: int
    steps: tuple[Step, ...]


@dataclass(frozen=True, slots=True)
class Split:
    kind: ClassVar[str] = "split"
    id: str
    experiment: str
    variants: tuple[Variant, ...]


@dataclass(frozen=True, slots=True)
class Trait:
    name: str
    value: Expr


@dataclass(frozen=True, slots=True)
class Update:
    kind: ClassVar[str] = "update"
    id: str
    traits: tuple[Trait, ...]


@dataclass(frozen=True, slots=True)
class Exit:
    kind: ClassVar[str] = "exit"
    id: str
    reason: str


Step = Union[Wait, WaitUntil, Send, WaitFor, Branch, Split, Update, Exit]  # noqa: UP007
STEP_TYPES: dict[str, type[Any]] = {
    cls.kind: cls for cls in (Wait, WaitUntil, Send, WaitFor, Branch, Split, Update, Exit)
}


@dataclass(frozen=True, slots=True)
class Journey:
    """One compiled journey, pinned by its content-hash ``version``."""

    id: str
    version: str
    trigger: EventRule
    steps: tuple[Step, ...]
    name: str = ""
    description: str = ""
    key: Expr | None = None
    re_entry: ReEntry = "after_exit"
    date_trigger: DateTrigger | None = field(default=None, metadata=_OPTIONAL)
    """Runs start at a date's moment rather than at the trigger event (``trigger: {date: ...}``)."""
    re_entry_after: int = field(default=0, metadata=_OPTIONAL)
    """With ``after_exit``: seconds that must also pass since the last run entered (``{after: 7d}``)."""
    goal: Goal | None = None
    exit_on: tuple[EventRule, ...] = ()
    timezone: str = "UTC"
    quiet_hours: QuietHours | None = None
    policy: Policy = field(default_factory=Policy)
    rate: Rate | None = field(default=None, metadata=_OPTIONAL)
    """The journey's send rate, shared by its send steps that have none of their own."""
    source: str = ""
    """The file it was compiled from (not part of the version)."""

    @property
    def starts_on(self) -> str:
        """What starts a run, in the file's words: ``Signed Up``, ``date user.birthday at 09:00, every year``."""
        trigger = self.date_trigger
        if trigger is None:
            return self.trigger.describe
        moment = WaitUntil("", trigger.minute, date=trigger.date, offset=trigger.offset).when
        carried = f" from {self.trigger.event}" if self.trigger.event else ""
        return f"date {moment}{carried}" + (", every year" if trigger.yearly else "")

    def listens_for(self) -> frozenset[str]:
        """Event names a running run reacts to (goal, exit_on, wait_for)."""
        names = {rule.event for rule in self.exit_on}
        if self.goal is not None:
            names.add(self.goal.event)
        names.update(s.event for s in walk(self.steps) if isinstance(s, WaitFor))
        return frozenset(names)

    def step(self, step_id: str) -> Step:
        for step in walk(self.steps):
            if step.id == step_id:
                return step
        raise KeyError(step_id)


def audience_verb(event: str) -> str:
    """``entering`` for the audience entry event, ``leaving`` for the exit one."""
    return "leaving" if event == EXITED else "entering"


def children(step: Step) -> Iterator[tuple[str, tuple[Step, ...]]]:
    """The nested step lists of a step, labelled (``then``, ``else``, ``arm 1``, ``variant a``)."""
    if isinstance(step, WaitFor):
        yield "then", step.then
        yield "else", step.otherwise
    elif isinstance(step, Branch):
        for arm in step.arms:
            yield f"if {arm.cond.source}", arm.steps
        if step.otherwise:
            yield "else", step.otherwise
    elif isinstance(step, Split):
        for variant in step.variants:
            yield f"variant {variant.name}", variant.steps


def walk(steps: tuple[Step, ...]) -> Iterator[Step]:
    """Every step, nested ones included, in document order."""
    for step in steps:
        yield step
        for _, nested in children(step):
            yield from walk(nested)


# --- JSON round trip ---------------------------------------------------------------------------


def _encode(value: Any, *, as_written: bool = True, compact: bool = False) -> Any:
    if isinstance(value, Expr):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {
            f.name: _encode(getattr(value, f.name), as_written=as_written, compact=compact)
            for f in dataclasses.fields(value)
            if (as_written or not (f.metadata.get("as_written") or _unused_optional(f, value)))
            and not (compact and _at_default(f, value))
        }
        kind = getattr(type(value), "kind", None)
        if isinstance(kind, str):
            out = {"kind": kind, **out}
        return out
    if isinstance(value, (tuple, list)):
        return [_encode(item, as_written=as_written, compact=compact) for item in value]
    return value


def _at_default(f: dataclasses.Field[Any], value: Any) -> bool:
    """Whether ``value``'s field ``f`` holds its default (decoding a form without it gives it back)."""
    if f.default is not dataclasses.MISSING:
        return bool(getattr(value, f.name) == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(getattr(value, f.name) == f.default_factory())
    return False


def _unused_optional(f: dataclasses.Field[Any], value: Any) -> bool:
    return bool(f.metadata.get("optional")) and getattr(value, f.name) == f.default


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _decode(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if hint is Expr:
        return Expr.from_dict(value)
    if hint is Step or hint == "Step":
        cls = STEP_TYPES[value["kind"]]
        return _decode_dataclass(cls, value)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _decode(args[0], value)
        return _decode(Step, value)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return tuple(_decode(item, v) for v in value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, value)
    return value


def _decode_dataclass(cls: type[Any], data: Mapping[str, Any]) -> Any:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls, globalns=globals())
        _HINTS[cls] = hints
    kwargs = {f.name: _decode(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data}
    return cls(**kwargs)


def to_dict(value: Any) -> dict[str, Any]:
    """JSON-serialisable form of any intermediate-form dataclass (a journey, a policy)."""
    result = _encode(value)
    assert isinstance(result, dict)
    return result


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """A ``cls`` back from :func:`to_dict`; fields it lacks take their defaults."""
    result = _decode_dataclass(cls, data)
    assert isinstance(result, cls)
    return result


def journey_to_dict(journey: Journey) -> dict[str, Any]:
    """JSON-serialisable form of a compiled journey."""
    return to_dict(journey)


def journey_payload(journey: Journey) -> dict[str, Any]:
    """The journey as a run's input carries it: :func:`journey_to_dict` without the fields that
    hold their defaults (a tenth to two fifths smaller for the journeys of this repository and
    its benchmarks, and every byte of a run's input is stored in its history).
    :func:`journey_from_dict` reads both forms."""
    result = _encode(journey, compact=True)
    assert isinstance(result, dict)
    return result


def journey_from_dict(data: Mapping[str, Any]) -> Journey:
    """The journey back from :func:`journey_to_dict` or :func:`journey_payload`."""
    return from_dict(Journey, data)


def content_version(journey: Journey) -> str:
    """A short hash of everything that shapes behaviour (not the source path, the version or
    how durations were spelled)."""
    data = _encode(journey, as_written=False)
    data.pop("version", None)
    data.pop("source", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
