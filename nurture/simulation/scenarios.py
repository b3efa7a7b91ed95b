"""Scenario files: an event timeline and the outcomes it must produce, on any runtime.

A runtime takes a :class:`Scenario` and returns the :class:`~nurture.simulation.simulator.Outcome` list;
:func:`compare` matches it against the expectations (same-instant outcomes as a set, otherwise
in order) and explains any difference as expected against actual. People are compared through
the scenario's final identity graph: an outcome of a run whose person merged into another since
is the survivor's, and an expectation may name the person by any of their ids.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from channels.outbox import Outbox
from nurture.delivery.deliverer import Deliverer, MemoryProfiles, for_every_channel
from nurture.engine.identity import Identities
from nurture.engine.model import Event, Recorder
from nurture.language import ir
from nurture.language.compiler import Project, _validation_diagnostics
from nurture.language.diagnostics import CompileError, Diagnostic, did_you_mean
from nurture.language.durations import UNITS, format_duration
from nurture.language.expressions import ExpressionError, compile_expression
from nurture.language.schema import Declarations, Fault, property_faults, trait_faults, unknown_event
from nurture.language.source import SourceError, SourceMap, load_yaml

from .people import Call, People
from .population import EventSpec, Population, SegmentRate, VariantRates, examples, value_spec
from .simulator import Outcome, Simulator

_OFFSET = re.compile(r"^(?:\d+[smhdw])+$")


def parse_offset(value: Any) -> int:
    """Seconds of an ``at`` offset: ``0s``, ``90m``, ``1d2h`` (0 allowed)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value).replace(" ", "")
    if text == "0":
        return 0
    if not _OFFSET.match(text):
        raise ValueError(f"'{value}' is not an offset: write e.g. 0s, 90m, 1d2h")
    return sum(int(n) * UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", text))


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventDoc(_Doc):
    at: str | int
    user: str | None = None
    anonymous: str | None = None
    event: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    identify: dict[str, Any] | None = None
    alias: str | None = None
    group: str | None = None
    traits: dict[str, Any] = Field(default_factory=dict)
    message_id: str | None = None

    @field_validator("at")
    @classmethod
    def _at(cls, value: str | int) -> str | int:
        parse_offset(value)
        return value


class ExpectDoc(_Doc):
    at: str | int
    user: str | None = None
    anonymous: str | None = None
    journey: str | None = None
    send: Literal["email", "sms", "wechat"] | None = None
    template: str | None = None
    status: Literal["sent", "skipped", "failed"] | None = None
    reason: str | None = None
    variant: str | None = None
    contains: str | None = None
    exit: str | None = None

    @field_validator("at")
    @classmethod
    def _at(cls, value: str | int) -> str | int:
        parse_offset(value)
        return value


Probability = Annotated[float, Field(ge=0, le=1)]


class SegmentDoc(_Doc):
    if_: str = Field(alias="if")
    probability: Probability


class PopulationEventDoc(_Doc):
    event: str
    at: str | int | None = None
    after: str | int | None = None
    properties: dict[str, Any] = Field(default_factory=dict)
    probability: Probability = 1.0
    by_variant: dict[str, dict[str, Probability]] = Field(default_factory=dict)
    by_segment: list[SegmentDoc] = Field(default_factory=list)


class PopulationDoc(_Doc):
    count: int = Field(ge=1, le=10_000_000)
    seed: int = 0
    user: str = "user{n}"
    traits: dict[str, Any] = Field(default_factory=dict)
    events: list[PopulationEventDoc] = Field(min_length=1)


class ScenarioDoc(_Doc):
    scenario: str
    start: datetime
    journeys: list[str] | None = None
    paused: list[str] = Field(default_factory=list)
    users: dict[str, dict[str, Any]] = Field(default_factory=dict)
    events: list[EventDoc] = Field(default_factory=list)
    population: PopulationDoc | None = None
    expect: list[ExpectDoc] = Field(default_factory=list)
    until: str | int | None = None


@dataclass(frozen=True)
class Expectation:
    at: int
    user: str
    journey: str
    send: str | None = None
    template: str | None = None
    status: str | None = None
    reason: str | None = None
    variant: str | None = None
    contains: str | None = None
    exit: str | None = None
    line: int = 0
    at_written: str = ""
    """``at`` as the scenario wrote it, for reports."""
    who: str = ""
    """The person as the scenario named them (``u1``, ``anonymous a1``), for reports; ``user``
    is their person id in the scenario's final identity graph."""

    def matches(self, actual: Observed) -> bool:
        """Whether ``actual`` is this outcome; a field left out of the expectation matches anything.

        Every field is compared whatever the kind of outcome, so a field that cannot hold for
        it (a variant on a run's end) fails instead of passing unchecked.
        """
        return (
            self.at == actual.at
            and self.user == actual.user
            and self.journey == actual.journey
            and self.exit == actual.exit
            and (self.send is None or self.send == actual.send)
            and (self.template is None or self.template == actual.template)
            and (self.status or (None if self.exit is not None else "sent")) == actual.status
            and (self.reason is None or self.reason == actual.reason)
            and (self.variant is None or self.variant == actual.variant)
            and (self.contains is None or self.contains in actual.text)
        )

    def describe(self) -> str:
        return _describe(
            self.at_written or format_duration(self.at),
            self.who or self.user,
            self.journey,
            self.exit,
            self.send,
            self.template,
            self.status or "sent",
            self.reason,
            self.variant,
            self.contains,
        )


@dataclass(frozen=True)
class Observed:
    """An actual outcome in scenario terms (offset in whole seconds)."""

    at: int
    user: str
    journey: str
    send: str | None = None
    template: str | None = None
    status: str | None = None
    reason: str | None = None
    variant: str | None = None
    text: str = ""
    exit: str | None = None

    def describe(self) -> str:
        return _describe(
            format_duration(self.at),
            self.user,
            self.journey,
            self.exit,
            self.send,
            self.template,
            self.status or "sent",
            self.reason,
            self.variant,
            None,
        )


def _describe(
    at: str,
    user: str,
    journey: str,
    exit: str | None,
    send: str | None,
    template: str | None,
    status: str,
    reason: str | None,
    variant: str | None,
    contains: str | None,
) -> str:
    """One expected or actual outcome as a line of a scenario report."""
    head = f"{at:>8}  {user}  {journey}  "
    if exit is not None:
        return head + f"exit: {exit}"
    text = f"send: {send} {template or ''}".rstrip()
    if status != "sent":
        text += f" {status}"
    if reason:
        text += f" ({reason})"
    if variant:
        text += f" [variant {variant}]"
    if contains:
        text += f" contains {contains!r}"
    return head + text


@dataclass(frozen=True)
class Step:
    """One scenario input at an offset: a track event, an identify, an alias or a group call."""

    at: int
    user: str | None
    event: Event | None = None
    traits: dict[str, Any] | None = None
    """An identify's traits, or a group's."""
    opted_out: frozenset[str] | None = None
    """With identify: the channels the user is now opted out of (``None``: unchanged)."""
    anonymous: str | None = None
    alias: str | None = None
    """An alias's previous id (``user`` is the new one)."""
    group: str | None = None

    def call(self) -> Call:
        """Who the step names, as the identity rules read it."""
        if self.event is not None:
            return Call("track", self.user, self.anonymous)
        if self.alias is not None:
            return Call("alias", self.user, previous=self.alias)
        if self.group is not None:
            return Call("group", self.user, self.anonymous, self.traits or {}, group=self.group)
        return Call("identify", self.user, self.anonymous, self.traits or {}, self.opted_out)


@dataclass
class Scenario:
    """A loaded scenario file."""

    name: str
    path: str
    start: datetime
    journeys: list[str]
    users: dict[str, dict[str, Any]]
    opted_out: dict[str, list[str]]
    events: list[Step]
    expect: list[Expectation] = field(default_factory=list)
    population: Population | None = None
    """Generated users and their events: a forecast rather than a test (it has no expectations)."""
    until: int | None = None
    """Offset after which date triggers start no more runs (needed by yearly ones, which never stop)."""
    paused: frozenset[str] = frozenset()
    """Journeys paused for the whole scenario: their triggers start no run."""
    _identities: Identities | None = field(default=None, init=False, repr=False, compare=False)

    def instant(self, offset: int) -> datetime:
        return self.start + timedelta(seconds=offset)

    def identities(self) -> Identities:
        """Who is who once every event has been applied: the users, then the events in time
        order, by the rules every runtime applies (journeys never change identities)."""
        if self._identities is None:
            self._identities = replay(self.start, self.users, self.opted_out, self.events)
        return self._identities


def replay(
    start: datetime, users: dict[str, dict[str, Any]], opted_out: dict[str, list[str]], events: Sequence[Step]
) -> Identities:
    """The identity graph the scenario's users and events make (see :meth:`Scenario.identities`)."""
    people = People(MemoryProfiles())
    for user_id, traits in users.items():
        people.add_user(user_id, traits, opted_out.get(user_id, ()), start)
    for step in sorted(events, key=lambda e: e.at):
        people.apply(step.call(), start + timedelta(seconds=step.at))
    return people.identities


_DOC_AT: dict[str, type[_Doc]] = {
    "": ScenarioDoc,
    "events": EventDoc,
    "expect": ExpectDoc,
    "population": PopulationDoc,
    "population.events": PopulationEventDoc,
    "population.events.by_segment": SegmentDoc,
}


def _scenario_keys(found: Diagnostic) -> Diagnostic:
    """An unknown key's hint from the scenario's own keys (the shared wording knows journey keys)."""
    if not found.message.startswith("unknown key '"):
        return found
    parent, _, name = re.sub(r"\[\d+\]", "", found.key).rpartition(".")
    model = _DOC_AT.get(parent)
    if model is None:
        return found
    keys = [f.alias or key for key, f in model.model_fields.items()]
    hint = did_you_mean(name, keys) or f"; allowed keys: {', '.join(keys)}"
    return dataclasses.replace(found, message=f"unknown key '{name}'{hint}")


def load_scenario(path: Path, project: Project) -> Scenario:
    """Read and check a scenario file against the project; raises :class:`CompileError`."""
    text = path.read_text(encoding="utf-8")
    try:
        data, smap = load_yaml(text, str(path))
    except SourceError as exc:
        raise CompileError(exc.diagnostics) from None
    try:
        doc = ScenarioDoc.model_validate(data)
    except ValidationError as exc:
        raise CompileError([_scenario_keys(d) for d in _validation_diagnostics(exc, data, smap)]) from None
    problems: list[Diagnostic] = []
    declarations = project.settings.declarations
    journeys = doc.journeys or sorted(project.journeys)
    for index, name in enumerate(doc.journeys or []):
        if name not in project.journeys:
            problems.append(
                smap.diagnostic(
                    ("journeys", index), f"unknown journey '{name}'{did_you_mean(name, project.journeys)}"
                )
            )
    for index, name in enumerate(doc.paused):
        if name not in journeys:
            problems.append(
                smap.diagnostic(("paused", index), f"'{name}' is not a journey of this scenario{did_you_mean(name, journeys)}")
            )
    start = doc.start if doc.start.tzinfo else doc.start.replace(tzinfo=UTC)
    users: dict[str, dict[str, Any]] = {}
    opted: dict[str, list[str]] = {}
    for user_id, entry in doc.users.items():
        traits = dict(entry)
        out = traits.pop("opted_out", [])
        users[user_id] = traits
        opted[user_id] = list(out) if isinstance(out, list) else [str(out)]
        problems.extend(_traits_checked(traits, ("users", user_id), declarations, smap))
    anonymous_ids = list(dict.fromkeys(item.anonymous for item in doc.events if item.anonymous is not None))
    only_user = next(iter(users)) if len(users) == 1 and not anonymous_ids else None
    introduced = [
        item.user
        for item in doc.events
        if item.user is not None and item.event is None and item.user not in users
    ]
    known = [*users, *dict.fromkeys(introduced)]

    def declared(given: str, where: tuple[str | int, ...]) -> None:
        """A ``user:`` is declared under ``users:`` or named by an identify, alias or group."""
        if given in known:
            return
        if given in anonymous_ids:
            hint = f"; '{given}' is an anonymous id here: write anonymous: {given}"
        else:
            hint = f"{did_you_mean(given, known)}; declare it under users: or name it in an identify"
        problems.append(smap.diagnostic(where, f"unknown user '{given}'{hint}", at_key=True))

    events: list[Step] = []
    aliased: list[str] = []
    for index, item in enumerate(doc.events):
        where: tuple[str | int, ...] = ("events", index)
        offset = parse_offset(item.at)
        given = item.model_fields_set
        kinds = [k for k in ("event", "identify", "alias", "group") if getattr(item, k) is not None]
        if len(kinds) != 1:
            problems.append(
                smap.diagnostic(where, "an event has exactly one of event:, identify:, alias: or group:")
            )
            continue
        kind = kinds[0]
        problems.extend(
            smap.diagnostic((*where, key), f"{key}: goes with {owner}:", at_key=True)
            for key, owner in (("properties", "event"), ("message_id", "event"), ("traits", "group"))
            if key in given and kind != owner
        )
        if item.user is not None:
            declared(item.user, (*where, "user"))
        for key in ("anonymous", "alias"):
            if key in given and not str(getattr(item, key) or "").strip():
                problems.append(smap.diagnostic((*where, key), f"{key}: needs an id", at_key=True))
        if item.anonymous is not None and item.anonymous in users:
            problems.append(
                smap.diagnostic(
                    (*where, "anonymous"),
                    f"'{item.anonymous}' is a user declared under users:; write user: {item.anonymous} "
                    "(anonymous: names a visitor's anonymousId)",
                    at_key=True,
                )
            )
        user = item.user
        if kind == "alias":
            assert item.alias is not None
            if item.user is None or item.anonymous is not None:
                problems.append(
                    smap.diagnostic(
                        where,
                        "an alias names the new id in user: and the previous one in alias:, without anonymous:",
                    )
                )
            elif item.alias == item.user:
                problems.append(
                    smap.diagnostic((*where, "alias"), "alias: names the previous id: not user: itself", at_key=True)
                )
            if item.alias not in known:
                aliased.append(item.alias)
            events.append(Step(offset, user, alias=item.alias))
            continue
        if user is None and item.anonymous is None:
            if only_user is None:
                problems.append(
                    smap.diagnostic(
                        where, "user: or anonymous: is required when the scenario names several people"
                    )
                )
            user = only_user
        if item.event is not None:
            problems.extend(_event_checked(item.event, item.properties, where, declarations, smap))
            message_id = item.message_id or f"{path.stem}-{index}"
            event = Event(item.event, start + timedelta(seconds=offset), item.properties, message_id)
            events.append(Step(offset, user, event=event, anonymous=item.anonymous))
        elif item.group is not None:
            traits = dict(item.traits)
            events.append(Step(offset, user, traits=traits, anonymous=item.anonymous, group=item.group))
        else:
            traits = dict(item.identify or {})
            channels = traits.pop("opted_out", None)
            problems.extend(_traits_checked(traits, (*where, "identify"), declarations, smap))
            out = None if channels is None else frozenset(channels)
            events.append(Step(offset, user, traits=traits, opted_out=out, anonymous=item.anonymous))
    anonymous_names = list(dict.fromkeys([*anonymous_ids, *aliased]))
    graph = None if problems else replay(start, users, opted, events)

    def who(want: ExpectDoc, where: tuple[str | int, ...]) -> tuple[str, str]:
        """The expected person's id in the final graph, and how the file named them."""
        if want.user is not None and want.anonymous is not None:
            problems.append(
                smap.diagnostic(where, "an expectation names its person by user: or anonymous:, not both")
            )
            return "", ""
        if want.user is not None:
            declared(want.user, (*where, "user"))
            person = None if graph is None else graph.lookup("user_id", want.user)
            return person or want.user, want.user
        if want.anonymous is not None:
            if want.anonymous not in anonymous_names:
                hint = (
                    f"; '{want.anonymous}' is a user: write user: {want.anonymous}"
                    if want.anonymous in users
                    else did_you_mean(want.anonymous, anonymous_names)
                )
                problems.append(
                    smap.diagnostic(
                        (*where, "anonymous"), f"no event names anonymous '{want.anonymous}'{hint}", at_key=True
                    )
                )
            person = None if graph is None else graph.lookup("anonymous_id", want.anonymous)
            return person or want.anonymous, f"anonymous {want.anonymous}"
        persons = [] if graph is None else sorted(p for p in graph.persons if p not in graph.merged_into)
        if graph is not None and len(persons) != 1:
            problems.append(
                smap.diagnostic(where, "user: or anonymous: is required when the scenario has several people")
            )
        return (persons[0], "") if len(persons) == 1 else ("", "")

    expectations: list[Expectation] = []
    last = -1
    for index, want in enumerate(doc.expect):
        offset = parse_offset(want.at)
        if offset < last:
            problems.append(
                smap.diagnostic(("expect", index, "at"), "expectations must be listed in time order")
            )
        last = offset
        journey = want.journey
        if journey is None:
            if len(journeys) != 1:
                problems.append(
                    smap.diagnostic(
                        ("expect", index), "journey is required when the scenario has several journeys"
                    )
                )
            journey = journeys[0] if journeys else ""
        elif journey not in project.journeys:
            problems.append(
                smap.diagnostic(
                    ("expect", index, "journey"),
                    f"unknown journey '{journey}'{did_you_mean(journey, project.journeys)}",
                )
            )
        if (want.exit is None) == (want.send is None):
            problems.append(smap.diagnostic(("expect", index), "an expectation has either send: or exit:"))
        problems.extend(
            smap.diagnostic(("expect", index, key), message, at_key=True)
            for key, message in _unsupported(want)
        )
        person, written = who(want, ("expect", index))
        expectations.append(
            Expectation(
                at=offset,
                user=person,
                journey=journey,
                send=want.send,
                template=want.template,
                status=want.status,
                reason=want.reason,
                variant=want.variant,
                contains=want.contains,
                exit=want.exit,
                line=smap.value(("expect", index)).line,
                at_written=str(want.at).strip(),
                who=written,
            )
        )
    population = None
    if doc.population is not None:
        population = _population(doc.population, project, journeys, users, smap, problems)
        if doc.expect:
            problems.append(
                smap.diagnostic(
                    ("expect",),
                    "a scenario with a population is a forecast: its generated users' outcomes cannot be "
                    "expected one by one; run it with nurture report JOURNEY --scenario FILE, and keep "
                    "expectations in a test without population:",
                    at_key=True,
                )
            )
    until = None
    if doc.until is not None:
        try:
            until = parse_offset(doc.until)
        except ValueError as exc:
            problems.append(smap.diagnostic(("until",), str(exc)))
    yearly = [
        name
        for name in journeys
        if name in project.journeys
        and (trigger := project.journeys[name].date_trigger) is not None
        and trigger.yearly
    ]
    if yearly and doc.until is None:
        problems.append(
            smap.diagnostic(
                ("scenario",),
                f"journey {yearly[0]} starts a run every year for ever: give the scenario an end, "
                "e.g. until: 400d (no date trigger starts a run after it)",
                at_key=True,
            )
        )
    if problems:
        raise CompileError(problems)
    return Scenario(
        doc.scenario,
        str(path),
        start,
        journeys,
        users,
        opted,
        events,
        expectations,
        population,
        until,
        frozenset(doc.paused),
    )


def _traits_checked(
    traits: Mapping[str, Any], where: tuple[str | int, ...], declarations: Declarations, smap: SourceMap
) -> list[Diagnostic]:
    """The traits a scenario gives a person against the declared traits (when there are some):
    an undeclared name at its key, a value of another type at the value."""
    return [
        smap.diagnostic((*where, fault.name), fault.describe("trait"), at_key=fault.type is None)
        for fault in trait_faults(declarations, traits, undeclared=True)
    ]


def _event_checked(
    name: str,
    properties: Mapping[str, Any],
    where: tuple[str | int, ...],
    declarations: Declarations,
    smap: SourceMap,
) -> list[Diagnostic]:
    """An event a scenario sends against the declared events (when there are some): the event's
    name, then its properties as the event API checks them, and none it does not declare. A
    required property may be left out unless ``enforce_declarations`` is on (the event API takes
    such an event otherwise)."""
    if declarations.events is None:
        return []
    if name not in declarations.events:
        return [smap.diagnostic((*where, "event"), unknown_event(name, declarations))]
    return [
        _at_fault(fault, where, properties, smap)
        for fault in property_faults(declarations, name, properties, undeclared=True)
        if fault.name in properties or declarations.enforce
    ]


def _at_fault(fault: Fault, where: tuple[str | int, ...], properties: Mapping[str, Any], smap: SourceMap) -> Diagnostic:
    """A property's fault where it is written; a missing one at the event."""
    if fault.name not in properties:
        return smap.diagnostic((*where, "event"), fault.describe("property"))
    return smap.diagnostic((*where, "properties", fault.name), fault.describe("property"), at_key=fault.type is None)


def _drawn_faults(specs: Mapping[str, Any], faults: Callable[[Mapping[str, Any]], Iterator[Fault]]) -> Iterator[Fault]:
    """The first fault of each generated trait or property, over every choice its spec may draw."""
    for name, spec in specs.items():
        yield from itertools.islice((f for value in examples(spec) for f in faults({name: value})), 1)


def _generated_event_checked(
    name: str, specs: Mapping[str, Any], where: tuple[str | int, ...], declarations: Declarations, smap: SourceMap
) -> list[Diagnostic]:
    """A population's event as :func:`_event_checked` checks a written one, each property over
    every choice it may draw."""
    if declarations.events is None or name not in declarations.events:
        return _event_checked(name, {}, where, declarations, smap)
    first = {key: next(examples(spec)) for key, spec in specs.items()}
    missing = [f for f in property_faults(declarations, name, first) if f.name not in first and declarations.enforce]

    def faults(given: Mapping[str, Any]) -> Iterator[Fault]:
        return (f for f in property_faults(declarations, name, given, undeclared=True) if f.name in given)

    return [_at_fault(fault, where, specs, smap) for fault in [*missing, *_drawn_faults(specs, faults)]]


def _offset_range(value: str | int) -> tuple[int, int]:
    """``2h`` or ``0s..2d`` as (low, high) seconds."""
    low, sep, high = str(value).partition("..")
    first = parse_offset(low.strip() if sep else value)
    last = parse_offset(high.strip()) if sep else first
    if last < first:
        raise ValueError(f"'{value}' runs backwards: write the earlier offset first")
    return first, last


def _population(
    doc: PopulationDoc,
    project: Project,
    journeys: list[str],
    users: dict[str, dict[str, Any]],
    smap: SourceMap,
    problems: list[Diagnostic],
) -> Population:
    """The population block, checked against the project: positions of every mistake in ``problems``."""
    where: tuple[str | int, ...] = ("population",)
    declarations = project.settings.declarations
    splits = {
        step.experiment: step.variants
        for name in journeys
        if name in project.journeys
        for step in ir.walk(project.journeys[name].steps)
        if isinstance(step, ir.Split)
    }
    if "{n}" not in doc.user:
        problems.append(smap.diagnostic((*where, "user"), "the user id needs {n}, the user's number, e.g. user{n}"))
    else:
        taken = [u for u in users if _numbered(doc.user, u, doc.count)]
        if taken:
            problems.append(
                smap.diagnostic(
                    (*where, "user"), f"generated user ids would clash with users: {', '.join(sorted(taken))}"
                )
            )

    def values(raw: dict[str, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
        out = {}
        for key, value in raw.items():
            try:
                out[key] = value_spec(value)
            except ValueError as exc:
                problems.append(smap.diagnostic((*path, key), str(exc)))
        return out

    specs = []
    for index, item in enumerate(doc.events):
        at = (*where, "events", index)
        after_entry = item.after is not None
        offset = (0, 0)
        if (item.at is None) == (item.after is None):
            problems.append(smap.diagnostic(at, "a generated event has either at: (from the start) or after: (from the user's first event)"))
        elif index == 0 and after_entry:
            problems.append(smap.diagnostic((*at, "after"), "the first event is the user's entry: give it at:, from the start", at_key=True))
        else:
            key = "after" if after_entry else "at"
            try:
                offset = _offset_range(item.after if after_entry else item.at)  # type: ignore[arg-type]
            except ValueError as exc:
                problems.append(smap.diagnostic((*at, key), str(exc)))
        rates = []
        for experiment, by_name in item.by_variant.items():
            variants = splits.get(experiment)
            if variants is None:
                problems.append(
                    smap.diagnostic(
                        (*at, "by_variant", experiment),
                        f"no split of the scenario's journeys runs experiment '{experiment}'{did_you_mean(experiment, splits)}",
                        at_key=True,
                    )
                )
                continue
            names = [v.name for v in variants]
            problems.extend(
                smap.diagnostic(
                    (*at, "by_variant", experiment, name),
                    f"experiment '{experiment}' has no variant '{name}'{did_you_mean(name, names)}",
                    at_key=True,
                )
                for name in by_name
                if name not in names
            )
            rates.append(VariantRates(experiment, variants, dict(by_name)))
        segments = []
        for number, segment in enumerate(item.by_segment):
            try:
                segments.append(SegmentRate(compile_expression(segment.if_), segment.probability))
            except ExpressionError as exc:
                problems.append(smap.diagnostic((*at, "by_segment", number, "if"), exc.message))
        properties = values(item.properties, (*at, "properties"))
        problems.extend(_generated_event_checked(item.event, properties, at, declarations, smap))
        specs.append(
            EventSpec(
                item.event,
                offset,
                after_entry,
                properties,
                item.probability,
                tuple(rates),
                tuple(segments),
            )
        )
    traits = values(doc.traits, (*where, "traits"))
    problems.extend(
        smap.diagnostic((*where, "traits", fault.name), fault.describe("trait"), at_key=fault.type is None)
        for fault in _drawn_faults(traits, lambda given: trait_faults(declarations, given, undeclared=True))
    )
    return Population(doc.count, doc.seed, doc.user, traits, tuple(specs))


def _numbered(template: str, user_id: str, count: int) -> bool:
    """Whether ``user_id`` is one of the ids ``template`` generates for numbers 1 to ``count``."""
    head, _, tail = template.partition("{n}")
    middle = user_id[len(head) : len(user_id) - len(tail)] if user_id.startswith(head) and user_id.endswith(tail) else ""
    return middle.isdigit() and not middle.startswith("0") and 1 <= int(middle) <= count


_SEND_KEYS = ("template", "status", "reason", "variant", "contains")


def _unsupported(want: ExpectDoc) -> list[tuple[str, str]]:
    """Keys no outcome of the expectation's kind carries: it could never match, so the file is wrong."""
    given = want.model_fields_set
    if want.exit is not None:
        only = "an exit expectation is compared on at, user, journey and exit only"
        return [
            (key, f"{only}: remove {key}:" + (" (the variant is on the sends after the split)" if key == "variant" else ""))
            for key in _SEND_KEYS
            if key in given
        ]
    status = want.status or "sent"
    found = []
    if "reason" in given and status == "sent":
        found.append(("reason", "a sent message has no reason: add status: skipped or failed, or remove reason:"))
    if "contains" in given and status == "skipped":
        found.append(("contains", "a skipped send has no text to look in: remove contains:"))
    return found


def observe(scenario: Scenario, outcomes: Sequence[Outcome]) -> list[Observed]:
    """Actual outcomes as offsets from the scenario start, rounded to whole seconds, each with
    the person its run had as they are at the end (a merged person is the survivor)."""
    out = []
    start = scenario.start
    person = scenario.identities().canonical
    for item in outcomes:
        at = round((item.at - start).total_seconds())
        s = item.send
        user = person(item.user)
        if s is not None:
            out.append(
                Observed(at, user, item.journey, s.channel, s.template, s.status, s.reason, s.variant, s.text)
            )
        else:
            out.append(Observed(at, user, item.journey, exit=item.exit))
    out.sort(key=_offset)
    return out


_offset = operator.attrgetter("at")


@dataclass
class Verdict:
    scenario: Scenario
    actual: list[Observed]
    missing: list[Expectation]
    extra: list[Observed]

    @property
    def passed(self) -> bool:
        return not self.missing and not self.extra

    def report(self) -> str:
        """Expected against actual, with the differences marked."""
        lines = [f"expected ({len(self.scenario.expect)}):"]
        missing = {id(m) for m in self.missing}
        for want in self.scenario.expect:
            mark = "-" if id(want) in missing else " "
            lines.append(f"  {mark} {want.describe()}")
        lines.append(f"actual ({len(self.actual)}):")
        extra = {id(e) for e in self.extra}
        for got in self.actual:
            mark = "+" if id(got) in extra else " "
            lines.append(f"  {mark} {got.describe()}")
        lines.append("  (- expected but missing, + happened but not expected)")
        return "\n".join(lines)


def compare(scenario: Scenario, outcomes: Sequence[Outcome]) -> Verdict:
    """Match expectations to outcomes: as a set per instant, in time order across instants."""
    actual = observe(scenario, outcomes)
    unmatched = list(actual)
    missing = []
    for want in scenario.expect:
        found = next((got for got in unmatched if want.matches(got)), None)
        if found is None:
            missing.append(want)
        else:
            unmatched.remove(found)
    return Verdict(scenario, actual, missing, unmatched)


class Runtime(Protocol):
    """Something that can play a scenario and report its outcomes."""

    name: str

    async def play(self, scenario: Scenario, project: Project) -> list[Outcome]: ...


def build_simulator(
    scenario: Scenario,
    project: Project,
    deliverer: Deliverer,
    *,
    timeline: bool = True,
    recorder: Recorder | None = None,
) -> Simulator:
    """A simulator loaded with the scenario's users and events (``timeline``, ``recorder``: see Simulator)."""
    sim = Simulator(
        project.select(scenario.journeys),
        deliverer,
        scenario.start,
        timeline=timeline,
        recorder=recorder,
        until=None if scenario.until is None else scenario.instant(scenario.until),
        paused=scenario.paused,
        audiences=project.audiences,
    )
    for user_id, traits in scenario.users.items():
        sim.add_user(user_id, traits, scenario.opted_out.get(user_id, ()))
    for step in scenario.events:
        sim.call(scenario.instant(step.at), step.call(), step.event)
    if scenario.population is not None:
        for person in scenario.population.generate(scenario.start):
            sim.add_user(person.user_id, person.traits)
            for event in person.events:
                sim.track(event.timestamp, person.user_id, event)
    return sim


class SimRuntime:
    """The in-process simulator as a scenario runtime.

    ``render=False`` is the outcome-only mode (see :class:`~nurture.delivery.deliverer.Deliverer`): the
    same outcomes without rendering or delivering, so they carry no text for ``contains``.
    """

    def __init__(self, *, render: bool = True) -> None:
        self.render = render
        self.name = "sim" if render else "sim (outcomes only)"

    async def play(self, scenario: Scenario, project: Project) -> list[Outcome]:
        # A fresh outbox per scenario: its de-duplication by run and step must not span scenarios.
        channels = for_every_channel(Outbox()) if self.render else {}
        deliverer = Deliverer(project.templates, channels, render=self.render)
        sim = build_simulator(scenario, project, deliverer, timeline=False)
        await sim.run()
        return sim.outcomes


def scenario_files(paths: Sequence[Path]) -> list[Path]:
    """Scenario files under the given files and directories, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")))
        else:
            found.append(path)
    return found
