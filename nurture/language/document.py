"""The journey file format as pydantic models: validation, and the JSON Schema for editors.

These models describe what a marketer writes (strings like ``1d12h``, ``"10:00"``). Field
validators check each value in place, so one validation pass reports every mistake at once;
:mod:`nurture.language.compiler` turns the validated documents into :mod:`nurture.language.ir`.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Callable
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .diagnostics import did_you_mean
from .durations import DurationError, parse_duration, parse_duration_range, parse_rate, parse_signed_duration
from .expressions import ExpressionError, compile_expression, compile_value
from .ir import CHANNELS
from .providers import ProvidersDoc
from .schema import BUILTIN_TRAITS, TYPES, TypeName, value_problem

IDENT = re.compile(r"^[a-z][a-z0-9_]*$")
STEP_KINDS = ("wait", "wait_until", "send", "wait_for", "branch", "split", "update", "exit")
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_CLOCK = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


# --- value checks ------------------------------------------------------------------------------


def _fail(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    # pydantic fills {name} placeholders from ctx only; any other braces are kept as written.
    return PydanticCustomError(kind, message, ctx or None)


def check_ident(value: str) -> str:
    if not IDENT.match(value):
        raise _fail(
            "identifier",
            f"'{value}' is not a valid id: use lowercase letters, digits and _, starting with a letter",
        )
    return value


def checked_by(kind: str, parse: Callable[[str], object], error: type[Exception] = DurationError) -> Callable[[str], str]:
    """A field check that ``parse`` reads the value, its ``error`` reported as a ``kind`` error."""

    def check(value: str) -> str:
        try:
            parse(value)
        except error as exc:
            raise _fail(kind, str(exc)) from None
        return value

    return check


check_duration = checked_by("duration", parse_duration)
check_duration_range = checked_by("duration", parse_duration_range)
check_offset = checked_by("duration", parse_signed_duration)
check_rate = checked_by("rate", parse_rate)


RateText = Annotated[str, AfterValidator(check_rate), Field(examples=["1000/h", "50/m"])]
OffsetText = Annotated[str, AfterValidator(check_offset), Field(examples=["-3d", "12h"])]


def _clock_minutes(value: str) -> int:
    hours, minutes = value.split(":")
    return int(hours) * 60 + int(minutes)


def check_clock(value: str) -> str:
    if not _CLOCK.match(value):
        raise _fail("clock", f"'{value}' is not a time of day: write HH:MM in 24-hour form, e.g. \"08:00\"")
    return value


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_timezone(value: str) -> str:
    if value not in _zones():
        raise _fail(
            "timezone",
            f"unknown time zone '{value}'{did_you_mean(value, _zones())}: use an IANA name like Asia/Shanghai",
        )
    return value


def check_condition(value: str) -> str:
    try:
        compile_expression(value)
    except ExpressionError as exc:
        raise _fail("expression", exc.message, column=exc.column) from None
    return value


def check_value(value: Any) -> Any:
    try:
        compile_value(value)
    except ExpressionError as exc:
        raise _fail("expression", exc.message, column=exc.column) from None
    return value


def check_channel(value: str) -> str:
    if value not in CHANNELS:
        raise _fail(
            "channel",
            f"unknown channel '{value}'{did_you_mean(value, CHANNELS)}; channels are {', '.join(CHANNELS)}",
        )
    return value


def check_send_channel(value: str) -> str:
    """A channel, or ``auto``: the user's ``preferred_channel``, then the channel order."""
    return value if value == "auto" else check_channel(value)


def check_property_name(value: str) -> str:
    if not value or value.startswith("_"):
        raise _fail("property", f"'{value}' is not a property name: it cannot be empty or start with _")
    return value


def check_trait_name(value: str) -> str:
    if value == "id":
        raise _fail("trait", "'id' is the user's identity and cannot be updated")
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value) or value.startswith("_"):
        raise _fail("trait", f"'{value}' is not a valid trait name: use letters, digits and _")
    return value


Ident = Annotated[str, AfterValidator(check_ident)]
DurationText = Annotated[str, AfterValidator(check_duration), Field(examples=["1h", "1d12h"])]
ClockText = Annotated[str, AfterValidator(check_clock), Field(pattern=r"^\d{1,2}:\d{2}$")]
TimezoneName = Annotated[str, AfterValidator(check_timezone)]
Condition = Annotated[str, AfterValidator(check_condition)]
ChannelName = Annotated[str, AfterValidator(check_channel), Field(json_schema_extra={"enum": list(CHANNELS)})]
SendChannel = Annotated[
    str, AfterValidator(check_send_channel), Field(json_schema_extra={"enum": [*CHANNELS, "auto"]})
]
TraitValue = Annotated[Any, AfterValidator(check_value)]


class Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=False)


FORM_TAGS = ("as-text", "as-mapping", "as-date", "as-audience")
"""Tags of a value written either as text or as a mapping (``wait: 1h`` or ``wait: {random: ..}``);
they are not keys of the file, so diagnostics leave them out of the path."""


def _form(value: Any) -> str:
    return FORM_TAGS[1] if isinstance(value, dict) else FORM_TAGS[0]


def _trigger_form(value: Any) -> str:
    if isinstance(value, dict) and "audience" in value:
        return FORM_TAGS[3]
    return FORM_TAGS[2] if isinstance(value, dict) and "date" in value else FORM_TAGS[1]


def _goal_form(value: Any) -> str:
    """A goal naming an audience (``{audience: customers}``), or an event."""
    return FORM_TAGS[3] if isinstance(value, dict) and "audience" in value else FORM_TAGS[1]


def _wait_for_form(value: Any) -> str:
    """``wait_for: Order Completed``, or a mapping naming an audience."""
    return FORM_TAGS[3] if isinstance(value, dict) else FORM_TAGS[0]


# --- journey documents -------------------------------------------------------------------------


class EventRuleDoc(Doc):
    """An event name with an optional condition on it."""

    event: str = Field(min_length=1, description="Track event name, e.g. Order Completed.")
    if_: Condition | None = Field(None, alias="if", description="Jinja2 condition on the event.")


class DateTriggerDoc(Doc):
    """A run starts at a moment worked out from a date the person or an event carries."""

    date: Condition = Field(description="Expression giving the date, e.g. user.birthday or event.properties.renews_at.")
    offset: OffsetText | None = Field(None, description="Moved by this much: -3d is three days before.")
    at: ClockText | None = Field(None, description="Local time of day on the (moved) date, e.g. \"09:00\".")
    every: Literal["year"] | None = Field(None, description="Repeat every year (birthdays, anniversaries).")
    event: str | None = Field(
        None, min_length=1, description="The event that carries the date; without one, the person's traits do."
    )
    if_: Condition | None = Field(None, alias="if", description="Jinja2 condition on the event and the person.")


class AudienceTriggerDoc(Doc):
    """A run starts when a person enters (or leaves) an audience."""

    audience: Ident = Field(description="Audience id: the file name in audiences/, e.g. lapsed_customers.")
    on: Literal["enter", "exit"] = Field("enter", description="enter (default) or exit.")
    if_: Condition | None = Field(None, alias="if", description="Condition on the person (and the audience event).")


TriggerDoc = Annotated[
    Annotated[EventRuleDoc, Tag(FORM_TAGS[1])]
    | Annotated[DateTriggerDoc, Tag(FORM_TAGS[2])]
    | Annotated[AudienceTriggerDoc, Tag(FORM_TAGS[3])],
    Discriminator(_trigger_form),
]


class GoalDoc(EventRuleDoc):
    """The conversion event."""

    within: DurationText | None = Field(None, description="Conversion window (from entry, or see `from`).")
    exit: bool = Field(True, description="Whether the goal ends the run at once.")
    from_: Literal["entry", "last_message"] = Field(
        "entry", alias="from", description="Where the window starts: entry, or the latest message sent."
    )
    value: Condition | None = Field(
        None, description="Expression: what one conversion is worth, e.g. event.properties.total."
    )


class AudienceGoalDoc(Doc):
    """The conversion is entering an audience."""

    audience: Ident = Field(description="Audience id; entering it is the conversion.")
    if_: Condition | None = Field(None, alias="if", description="Condition on the person.")
    within: DurationText | None = Field(None, description="Conversion window (from entry, or see `from`).")
    exit: bool = Field(True, description="Whether the goal ends the run at once.")
    from_: Literal["entry", "last_message"] = Field(
        "entry", alias="from", description="Where the window starts: entry, or the latest message sent."
    )


AnyGoal = Annotated[
    Annotated[GoalDoc, Tag(FORM_TAGS[1])] | Annotated[AudienceGoalDoc, Tag(FORM_TAGS[3])],
    Discriminator(_goal_form),
]


class ChannelQuietHoursDoc(Doc):
    """A channel's own quiet window."""

    start: ClockText
    end: ClockText

    @model_validator(mode="after")
    def _not_empty(self) -> ChannelQuietHoursDoc:
        # An empty window would hold every marketing send forever: it can never end.
        if _clock_minutes(self.start) == _clock_minutes(self.end):
            raise _fail("quiet_hours", "quiet hours start and end are equal: the window would be empty")
        return self


# YAML 1.1 reads an unquoted `off` as false; both mean "no quiet hours for this channel".
ChannelQuiet = ChannelQuietHoursDoc | Literal["off", False] | None


class QuietHoursDoc(ChannelQuietHoursDoc):
    """A local-time window in which marketing sends wait; a channel may have its own, or ``off``."""

    email: ChannelQuiet = None
    sms: ChannelQuiet = None
    wechat: ChannelQuiet = None


class CapDoc(Doc):
    """At most so many marketing messages per local calendar day and per seven local days."""

    per_day: int | None = Field(None, ge=1)
    per_week: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_limit(self) -> CapDoc:
        if self.per_day is None and self.per_week is None:
            raise _fail("cap", "a cap needs per_day, per_week or both")
        return self


class FrequencyCapsDoc(Doc):
    """Marketing caps across all journeys: ``all`` counts every channel, a channel only itself."""

    all: CapDoc | None = None
    email: CapDoc | None = None
    sms: CapDoc | None = None
    wechat: CapDoc | None = None


class PolicyFields(Doc):
    """Delivery policy a project sets and a journey may override."""

    frequency_caps: FrequencyCapsDoc | None = None
    on_cap: Literal["skip", "defer"] | None = None
    channel_order: list[ChannelName] | None = Field(
        None, description="Order `send: auto` tries channels in, after the user's preferred_channel."
    )

    @field_validator("channel_order")
    @classmethod
    def _each_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise _fail("channel_order", "each channel is listed once in channel_order")
        return value


class StepDoc(Doc):
    id: Ident | None = Field(None, description="Stable step id for analytics and diagrams.")


class RandomWaitDoc(Doc):
    """A wait of a random length within a range, drawn once per run."""

    random: Annotated[str, AfterValidator(check_duration_range)] = Field(
        description="Range of durations, e.g. 0..2h: each run waits its own length within it.",
        examples=["0..2h", "30m..1h"],
    )


class WaitDoc(StepDoc):
    wait: Annotated[
        Annotated[DurationText, Tag(FORM_TAGS[0])] | Annotated[RandomWaitDoc, Tag(FORM_TAGS[1])],
        Discriminator(_form),
    ] = Field(description="Sleep, e.g. 1d12h, or {random: 0..2h}.")


class DateWaitDoc(Doc):
    """A moment worked out from a date the person or the event carries."""

    date: Condition = Field(
        description="Expression giving the date: ISO text such as 2026-03-15 or 2026-03-15T09:30:00Z."
    )
    offset: OffsetText | None = Field(None, description="Moved by this much: -3d is three days before.")
    at: ClockText | None = Field(None, description="Local time of day on the (moved) date, e.g. \"10:00\".")


class WaitUntilDoc(StepDoc):
    wait_until: Annotated[
        Annotated[ClockText, Tag(FORM_TAGS[0])] | Annotated[DateWaitDoc, Tag(FORM_TAGS[1])],
        Discriminator(_form),
    ] = Field(description="Next such local time of the user, e.g. \"10:00\", or {date, offset, at}.")
    days: list[Weekday] | None = Field(
        None, min_length=1, description="Allowed weekdays (with a time of day, not with a date)."
    )



class SendDoc(StepDoc):
    send: SendChannel = Field(description="Channel: email, sms, wechat, or auto (preference, then order).")
    template: str = Field(min_length=1, description="Template name under templates/<channel>/.")
    fallback: list[ChannelName] = Field(default_factory=list, description="Channels to try next.")
    category: Literal["marketing", "transactional"] = "marketing"
    topic: Ident | None = Field(None, description="Subscription topic from nurture.yaml's topics.")
    rate: RateText | None = Field(None, description="At most so many of this step's sends per unit of time, spread evenly.")


class AudienceWaitDoc(Doc):
    """Waiting for the person to enter (or leave) an audience."""

    audience: Ident = Field(description="Audience id.")
    on: Literal["enter", "exit"] = Field("enter", description="enter (default) or exit.")


class WaitForDoc(StepDoc):
    wait_for: Annotated[
        Annotated[str, Field(min_length=1), Tag(FORM_TAGS[0])] | Annotated[AudienceWaitDoc, Tag(FORM_TAGS[3])],
        Discriminator(_wait_for_form),
    ] = Field(description="Event to wait for, or {audience: id}.")
    timeout: DurationText
    if_: Condition | None = Field(None, alias="if")
    then: list[AnyStep] = Field(default_factory=list)
    else_: list[AnyStep] = Field(default_factory=list, alias="else")


class ArmDoc(Doc):
    if_: Condition = Field(alias="if")
    then: list[AnyStep]


class ElseArmDoc(Doc):
    else_: list[AnyStep] = Field(alias="else")


def _arm_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return "else" if "else" in value and "if" not in value else "if"
    return None


AnyArm = Annotated[
    Annotated[ArmDoc, Tag("if")] | Annotated[ElseArmDoc, Tag("else")],
    Discriminator(_arm_tag),
]


class BranchDoc(StepDoc):
    branch: list[AnyArm] = Field(min_length=1)


class VariantDoc(Doc):
    weight: int = Field(ge=0)
    steps: list[AnyStep] = Field(default_factory=list)


class SplitDoc(StepDoc):
    split: Ident = Field(description="Experiment name.")
    variants: dict[Ident, VariantDoc] = Field(min_length=1)


class UpdateDoc(StepDoc):
    update: dict[Annotated[str, AfterValidator(check_trait_name)], TraitValue] = Field(min_length=1)


class ExitDoc(StepDoc):
    exit: Ident = Field(description="End reason.")


def step_kind(value: Any) -> str | None:
    """The kind key of a raw step mapping, or ``None`` when there is not exactly one."""
    if isinstance(value, dict):
        kinds = [key for key in STEP_KINDS if key in value]
        if len(kinds) == 1:
            return kinds[0]
    return None


AnyStep = Annotated[
    Annotated[WaitDoc, Tag("wait")]
    | Annotated[WaitUntilDoc, Tag("wait_until")]
    | Annotated[SendDoc, Tag("send")]
    | Annotated[WaitForDoc, Tag("wait_for")]
    | Annotated[BranchDoc, Tag("branch")]
    | Annotated[SplitDoc, Tag("split")]
    | Annotated[UpdateDoc, Tag("update")]
    | Annotated[ExitDoc, Tag("exit")],
    Discriminator(step_kind),
]

STEP_DOCS: dict[str, type[Doc]] = {
    "wait": WaitDoc,
    "wait_until": WaitUntilDoc,
    "send": SendDoc,
    "wait_for": WaitForDoc,
    "branch": BranchDoc,
    "split": SplitDoc,
    "update": UpdateDoc,
    "exit": ExitDoc,
}


class ReEntryDoc(Doc):
    """Enter again once the last run has ended and this long has passed since it entered."""

    after: DurationText = Field(description="Time since the last entry, e.g. 7d.")


class JourneyDoc(PolicyFields):
    """A journey file."""

    model_config = ConfigDict(title="Nurture journey")

    journey: Ident = Field(description="Journey id; equals the file name.")
    name: str | None = None
    description: str | None = None
    trigger: TriggerDoc
    key: Condition | None = Field(None, description="Expression: one run per (journey, user, key).")
    re_entry: Annotated[
        Annotated[Literal["after_exit", "restart", "once"], Tag(FORM_TAGS[0])]
        | Annotated[ReEntryDoc, Tag(FORM_TAGS[1])],
        Discriminator(_form),
    ] = Field("after_exit", description="after_exit, restart, once, or {after: 7d} (that long after the last entry).")
    goal: AnyGoal | None = None
    exit_on: list[EventRuleDoc] = Field(default_factory=list)
    timezone: TimezoneName | None = None
    quiet_hours: QuietHoursDoc | None = None
    rate: RateText | None = Field(None, description="At most so many of the journey's sends per unit of time, spread evenly.")
    steps: list[AnyStep] = Field(min_length=1)


class HoldoutDoc(Doc):
    """The project-wide holdout: a fixed share of users who get no marketing message at all."""

    percent: float = Field(description="Share of users held out, more than 0 and below 100, e.g. 5 or 2.5.")
    salt: str = Field(min_length=1, description="Mixed into each user's draw; a new salt draws a new group.")

    @field_validator("percent")
    @classmethod
    def _share(cls, value: float) -> float:
        if not 0 < value < 100:
            raise _fail("holdout", f"the holdout percent must be more than 0 and less than 100, got {value:g}")
        if round(value, 2) != value:
            raise _fail(
                "holdout", f"the holdout percent has at most 2 decimals (users are drawn in steps of 0.01%), got {value}"
            )
        return value


class TraitDoc(Doc):
    """A declared trait: its type, and optionally an example and what it means."""

    type: TypeName = Field(description=f"One of {', '.join(TYPES)}.")
    example: Any = Field(None, description="A typical value, checked against the type.")
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `vip: boolean` is short for `vip: {type: boolean}`; YAML reads an unquoted 1990-05-01
        # as a date, which is the text a date trait holds.
        if isinstance(data, str):
            return {"type": data}
        if isinstance(data, dict) and isinstance(data.get("example"), date):
            return {**data, "example": data["example"].isoformat()}
        return data

    @model_validator(mode="after")
    def _example_fits(self) -> TraitDoc:
        problem = value_problem(self.type, self.example)
        if problem is not None:
            raise _fail("example", f"the example does not fit type {self.type}: {problem}")
        return self


class PropertyDoc(TraitDoc):
    """A declared event property."""

    required: bool = Field(False, description="Whether every such event carries it (not null).")


class EventDoc(Doc):
    """A declared event and its properties (`properties:` left out: it has none)."""

    description: str | None = None
    properties: dict[Annotated[str, AfterValidator(check_property_name)], PropertyDoc] = Field(
        default_factory=dict
    )

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, data: Any) -> Any:
        # `Signed Up:` with nothing after it declares an event without properties.
        return {} if data is None else data


class ActivityDoc(Doc):
    """One ``did`` or ``not_did`` clause of an audience: an event, counted in a trailing window."""

    event: str = Field(min_length=1, description="Track event name, e.g. Order Completed.")
    at_least: int = Field(1, ge=1, description="How many such events (default 1).")
    within: DurationText | None = Field(None, description="Counted in the last so long, e.g. 30d (default: ever).")
    if_: Condition | None = Field(None, alias="if", description="Condition on each event (and the person).")


class AudienceDoc(Doc):
    """An audience file: who is in it, as a condition on a person."""

    model_config = ConfigDict(title="Nurture audience")

    name: str | None = None
    description: str | None = None
    where: Condition | None = Field(None, description="Condition on the person's traits, e.g. user.interest == \"python\".")
    did: list[ActivityDoc] = Field(default_factory=list, description="Every clause must hold.")
    not_did: list[ActivityDoc] = Field(default_factory=list, description="No clause may hold.")
    subscribed: list[Ident] = Field(default_factory=list, description="Topics the person has not opted out of.")


def check_declared_trait(value: str) -> str:
    if value in ("id", "group"):
        raise _fail("trait", f"'{value}' is built in (user.{value}) and cannot be declared")
    if not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", value):
        raise _fail("trait", f"'{value}' is not a trait name: use letters, digits and _, starting with a letter")
    return value


class ProjectDoc(PolicyFields):
    """``nurture.yaml``: project defaults."""

    model_config = ConfigDict(title="Nurture project settings")

    timezone: TimezoneName = "UTC"
    quiet_hours: QuietHoursDoc | None = None
    sms_max_segments: int = Field(3, ge=1)
    """Warn at compile time when an SMS template needs more segments than this, whatever the data."""
    providers: ProvidersDoc = ProvidersDoc()
    topics: list[Ident] = Field(default_factory=list)
    """Subscription topics a send may name (``topic: promotions``) and users may opt out of."""
    holdout: HoldoutDoc | None = None
    """Users no journey sends marketing to, measured against everyone else."""
    traits: dict[Annotated[str, AfterValidator(check_declared_trait)], TraitDoc] | None = None
    """The traits people have; when set, every ``user.<trait>`` read must name one."""
    events: dict[Annotated[str, Field(min_length=1)], EventDoc] | None = None
    """The events and their properties; when set, every event named and property read must be one."""
    enforce_declarations: bool = False
    """Whether the event API refuses calls that contradict ``traits`` and ``events``."""

    @model_validator(mode="after")
    def _something_to_enforce(self) -> ProjectDoc:
        if self.enforce_declarations and self.traits is None and self.events is None:
            raise _fail("enforce", "enforce_declarations needs traits: or events: to enforce: declare them")
        return self

    @field_validator("traits")
    @classmethod
    def _builtin_types(cls, value: dict[str, TraitDoc] | None) -> dict[str, TraitDoc] | None:
        for name, doc in (value or {}).items():
            builtin = BUILTIN_TRAITS.get(name)
            if builtin is not None and doc.type != builtin.type:
                raise _fail("trait", f"'{name}' is built in as {builtin.type}: declare it as {builtin.type} or leave it out")
        return value

    @field_validator("topics")
    @classmethod
    def _not_channels(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise _fail("topic", "each topic is listed once in topics")
        for name in value:
            if name in CHANNELS or name == "auto":
                raise _fail("topic", f"'{name}' is a channel, not a topic: opting out of it is by channel already")
        return value


for _model in (WaitForDoc, ArmDoc, ElseArmDoc, VariantDoc, JourneyDoc):
    _model.model_rebuild()


def allowed_keys(data: Any) -> tuple[str, ...] | None:
    """Keys a step or branch arm may have, judged from its raw mapping."""
    kind = step_kind(data)
    if kind is not None:
        return tuple(f.alias or name for name, f in STEP_DOCS[kind].model_fields.items())
    return None


def journey_schema() -> dict[str, Any]:
    """JSON Schema for journey files, for editors' YAML language servers."""
    schema = JourneyDoc.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def validation_context(info: ValidationInfo) -> dict[str, Any]:
    return dict(info.context or {})
