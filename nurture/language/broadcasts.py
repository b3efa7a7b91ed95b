"""Broadcasts (``broadcasts/<id>.yaml``): the journey step language sent to an audience, once or on
a schedule, started by a command rather than by an event.

A broadcast file names an ``audience``, an optional ``schedule`` (``at`` a wall time, or a five-field
``cron``, in the project's time zone or each person's) and an optional start ``rate``; the rest
(``steps``, ``goal``, ``exit_on``, policy settings) is a journey's, checked by the same passes of
:mod:`nurture.language.compiler` and compiled to a :class:`nurture.language.ir.Journey` whose id is
``broadcast:<id>``. Each occurrence of a broadcast runs that journey for each member, with a first
step that waits for the occurrence's moment (:func:`occurrence_journey`), so the journey workflow
runs broadcasts unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import AfterValidator, Field, ValidationError, model_validator

from . import ir
from .diagnostics import DiagnosticSink, did_you_mean
from .document import Doc, Ident, RateText, _fail, checked_by
from .expressions import compile_expression
from .schema import Usage
from .templates import TemplateStore

if TYPE_CHECKING:
    from .compiler import Settings

PREFIX = "broadcast:"
"""Journey ids of broadcasts: ``broadcast:<id>``, so runs and reports tell them from journeys."""
START_STEP = "scheduled"
"""The id of the wait each occurrence's runs begin with (the occurrence's moment)."""
_AT = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2})$")
_HEAD = ("name", "description", "audience", "schedule", "rate")
_JOURNEY_KEYS = ("goal", "exit_on", "timezone", "quiet_hours", "frequency_caps", "on_cap", "channel_order", "steps")
_JOURNEY_ONLY = {
    "journey": "a broadcast's id is its file name: remove journey",
    "trigger": "a broadcast has no trigger: its audience says who and its schedule (or a start command) when",
    "key": "a broadcast runs once per person and occurrence: remove key",
    "re_entry": "a broadcast runs once per person and occurrence: remove re_entry",
}


# --- cron ----------------------------------------------------------------------------------------

_NAMES = {
    3: {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)},
    4: {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
}
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_FIELDS = ("minute", "hour", "day of month", "month", "day of week")


class CronError(ValueError):
    """A cron expression that cannot be read; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class Cron:
    """A five-field cron expression (minute, hour, day of month, month, day of week) on a wall clock.

    As in classic cron, when both days are restricted a day matches either; ``0`` and ``7`` are
    Sunday; names (``MON``, ``JAN``) are accepted in any case.
    """

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    """0 = Sunday."""
    any_day: bool
    any_weekday: bool

    def _day_matches(self, day: datetime) -> bool:
        weekday = (day.weekday() + 1) % 7
        if day.month not in self.months:
            return False
        if self.any_day or self.any_weekday:
            return day.day in self.days and weekday in self.weekdays
        return day.day in self.days or weekday in self.weekdays

    def next_after(self, wall: datetime) -> datetime | None:
        """The first matching wall time strictly after ``wall`` (naive), within eight years."""
        start = wall.replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        for _ in range(366 * 8):
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        moment = day.replace(hour=hour, minute=minute)
                        if moment >= start:
                            return moment
            day += timedelta(days=1)
        return None

    def latest_until(self, wall: datetime, within: timedelta) -> datetime | None:
        """The last matching wall time at or before ``wall`` and after ``wall - within``."""
        end = wall.replace(second=0, microsecond=0)
        day = end.replace(hour=0, minute=0)
        while day > end - within - timedelta(days=1):
            if self._day_matches(day):
                for hour in sorted(self.hours, reverse=True):
                    for minute in sorted(self.minutes, reverse=True):
                        moment = day.replace(hour=hour, minute=minute)
                        if end - within < moment <= end:
                            return moment
            day -= timedelta(days=1)
        return None


def parse_cron(text: str) -> Cron:
    """:class:`Cron` of ``text``; :class:`CronError` naming the field at fault."""
    parts = text.split()
    if len(parts) != 5:
        raise CronError(
            f"'{text}' is not a cron expression: write five fields (minute hour day-of-month month "
            'day-of-week), e.g. "0 9 * * MON"'
        )
    sets = [_cron_field(part, index) for index, part in enumerate(parts)]
    weekdays = frozenset(d % 7 for d in sets[4])
    return Cron(
        minutes=sets[0],
        hours=sets[1],
        days=sets[2],
        months=sets[3],
        weekdays=weekdays,
        any_day=parts[2] == "*",
        any_weekday=parts[4] == "*",
    )


def _cron_value(text: str, index: int) -> int:
    names = _NAMES.get(index, {})
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        hint = did_you_mean(text.lower(), names) if names else ""
        raise CronError(f"'{text}' is not a {_FIELDS[index]}{hint}")
    low, high = _RANGES[index]
    if not low <= int(text) <= high:
        raise CronError(f"{_FIELDS[index]} {text} is out of range {low}-{high}")
    return int(text)


def _cron_field(text: str, index: int) -> frozenset[int]:
    low, high = _RANGES[index]
    found: set[int] = set()
    for item in text.split(","):
        body, _, step_text = item.partition("/")
        if step_text and not (step_text.isdigit() and int(step_text) > 0):
            raise CronError(f"'{item}': the step after / is a whole number above 0 ({_FIELDS[index]})")
        step = int(step_text) if step_text else 1
        if body == "*":
            first, last = low, high
        elif "-" in body:
            start, _, end = body.partition("-")
            first, last = _cron_value(start, index), _cron_value(end, index)
            if first > last:
                raise CronError(f"'{body}' runs backwards ({_FIELDS[index]})")
        else:
            first = last = _cron_value(body, index)
            if step_text:
                last = high
        found.update(range(first, last + 1, step))
    return frozenset(found)


# --- the document --------------------------------------------------------------------------------


def parse_at(text: str) -> datetime:
    """The wall time of ``at: "2026-12-10 09:00"`` (naive); ``ValueError`` when it is none."""
    match = _AT.match(text.strip())
    if match is None:
        raise ValueError(f"'{text}' is not a date and time: write \"YYYY-MM-DD HH:MM\", e.g. \"2026-12-10 09:00\"")
    year, month, day, hour, minute = (int(g) for g in match.groups())
    try:
        return datetime(year, month, day, hour, minute)
    except ValueError as exc:
        raise ValueError(f"'{text}' is not a date and time: {exc}") from None


check_at = checked_by("at", parse_at, ValueError)
check_cron = checked_by("cron", parse_cron, CronError)


class ScheduleDoc(Doc):
    """When a broadcast starts by itself: once ``at`` a wall time, or on every ``cron`` match."""

    at: Annotated[str, AfterValidator(check_at)] | None = Field(
        None, description='Wall time of a one-off broadcast, "YYYY-MM-DD HH:MM".'
    )
    cron: Annotated[str, AfterValidator(check_cron)] | None = Field(
        None, description='Five-field cron on the wall clock, e.g. "0 9 * * MON".'
    )
    timezone: Literal["project", "person"] = Field(
        "project", description="Whose wall clock: the project's time zone, or each person's own."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleDoc:
        if (self.at is None) == (self.cron is None):
            raise _fail("schedule", "a schedule has either at: (once) or cron: (recurring), not both or neither")
        return self


class BroadcastDoc(Doc):
    """The keys of a broadcast file that are not a journey's."""

    name: str | None = None
    description: str | None = None
    audience: Ident = Field(description="The audience (audiences/<id>.yaml) whose members get it.")
    schedule: ScheduleDoc | None = Field(None, description="Absent: it starts only by command.")
    rate: RateText | None = Field(None, description="At most so many runs started per unit of time.")


# --- the compiled form ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Schedule:
    at: datetime | None
    """The wall time of a one-off broadcast."""
    cron: Cron | None
    written: str
    """``at`` or ``cron`` as written, for display."""
    person_time: bool
    """The wall clock is each person's (their ``timezone`` trait), not the project's."""


@dataclass(frozen=True, slots=True)
class Broadcast:
    """One compiled broadcast: who (``audience``), when, how fast, and the journey each member runs."""

    id: str
    name: str
    audience: str
    journey: ir.Journey
    """Id ``broadcast:<id>``; no trigger (no event starts it)."""
    schedule: Schedule | None = None
    rate: ir.Rate | None = None
    """Runs started per unit of time (``None``: as fast as the concurrency bound allows)."""
    description: str = ""
    source: str = ""


def journey_id(broadcast_id: str) -> str:
    return f"{PREFIX}{broadcast_id}"


def occurrence_journey(broadcast: Broadcast, moment: str | None) -> ir.Journey:
    """The journey an occurrence's runs take: the broadcast's, first waiting for ``moment``.

    ``moment`` is ISO text: a wall time without offset (each person's clock) or an instant with
    one (the project's). ``None`` (started by command, no schedule): no wait.
    """
    journey = broadcast.journey
    if moment is None:
        return journey
    taken = {step.id for step in ir.walk(journey.steps)}
    step_id = START_STEP
    while step_id in taken:
        step_id += "_"
    wait = ir.WaitUntil(id=step_id, minute=None, date=compile_expression(repr(moment)))
    journey = dataclasses.replace(journey, steps=(wait, *journey.steps))
    return dataclasses.replace(journey, version=ir.content_version(journey))


def occurrence_moment(schedule: Schedule, wall: datetime, project_zone: str) -> str:
    """The ISO text of an occurrence's moment (see :func:`occurrence_journey`)."""
    if schedule.person_time:
        return wall.isoformat(timespec="minutes")
    return wall.replace(tzinfo=ZoneInfo(project_zone)).astimezone(UTC).isoformat(timespec="minutes")


# --- compiling -----------------------------------------------------------------------------------


def compile_broadcast_text(
    text: str,
    path: str,
    templates: TemplateStore,
    settings: Settings,
    sink: DiagnosticSink,
    checked_templates: set[tuple[str, str]] | None = None,
    *,
    usage: Usage | None = None,
    audiences: Collection[str] | None = None,
) -> Broadcast | None:
    """Compile one broadcast file's text; ``path`` names it in messages and gives its id."""
    from .compiler import (
        _check_declared,
        _validation_diagnostics,
        build_journey,
        check_file_id,
        compile_rate,
        load_mapping,
        title,
        validate_journey,
    )

    before = len(sink.errors)
    loaded = load_mapping(text, path, sink, "a broadcast file is a mapping with audience: and steps:")
    if loaded is None:
        return None
    data, smap = loaded
    broadcast_id = check_file_id(path, "broadcast", sink)
    allowed = (*_HEAD, *_JOURNEY_KEYS)
    for key in data:
        if key in _JOURNEY_ONLY:
            sink.add(smap.diagnostic((key,), _JOURNEY_ONLY[key], at_key=True))
        elif key not in allowed:
            hint = did_you_mean(str(key), allowed) or f"; allowed keys: {', '.join(allowed)}"
            sink.add(smap.diagnostic((key,), f"unknown key '{key}'{hint}", at_key=True))
    head_data = {k: data[k] for k in _HEAD if k in data}
    head: BroadcastDoc | None = None
    try:
        head = BroadcastDoc.model_validate(head_data)
    except ValidationError as exc:
        sink.extend(_validation_diagnostics(exc, head_data, smap))
    if head is not None and audiences is not None and head.audience not in audiences:
        known = f"defined audiences: {', '.join(sorted(audiences))}" if audiences else "no audiences are defined"
        sink.add(
            smap.diagnostic(
                ("audience",),
                f"unknown audience '{head.audience}'{did_you_mean(head.audience, audiences)}; {known} "
                f"(add audiences/{head.audience}.yaml)",
            )
        )
    journey_data: dict[str, Any] = {k: data[k] for k in _JOURNEY_KEYS if k in data}
    journey_data["journey"] = broadcast_id
    journey_data["trigger"] = {"event": "broadcast"}
    doc = validate_journey(journey_data, smap, path, templates, sink, checked_templates, settings)
    _check_declared({**journey_data, "trigger": None}, smap, templates, sink, settings, usage or Usage())
    if doc is None or head is None or len(sink.errors) > before:
        return None
    built = build_journey(doc, settings, path)
    built = dataclasses.replace(
        built,
        id=journey_id(broadcast_id),
        name=head.name or title(broadcast_id),
        description=head.description or "",
        trigger=ir.EventRule(event=""),
    )
    built = dataclasses.replace(built, version=ir.content_version(built))
    return Broadcast(
        id=broadcast_id,
        name=built.name,
        audience=head.audience,
        journey=built,
        schedule=_schedule(head.schedule),
        rate=compile_rate(head.rate),
        description=built.description,
        source=path,
    )


def _schedule(doc: ScheduleDoc | None) -> Schedule | None:
    if doc is None:
        return None
    if doc.at is not None:
        return Schedule(at=parse_at(doc.at), cron=None, written=doc.at, person_time=doc.timezone == "person")
    assert doc.cron is not None
    return Schedule(at=None, cron=parse_cron(doc.cron), written=doc.cron, person_time=doc.timezone == "person")


# --- occurrences ---------------------------------------------------------------------------------

EARLIEST = ZoneInfo("Etc/GMT-14")
"""The first zone to reach any wall time (UTC+14): a ``timezone: person`` occurrence is started
when its wall time comes there, and each run waits for it in its person's own zone."""
ONCE = "once"
"""The occurrence of a broadcast without a schedule: it is sent once, whenever started."""
CATCH_UP = timedelta(days=1)
"""How late an occurrence may still be started (a scheduler that was down): later ones are skipped."""


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One sending of a broadcast: its key (``once``, or the wall time it is scheduled for), the
    moment its runs wait for (:func:`occurrence_journey`), and when it is due to be started."""

    key: str
    moment: str | None = None
    due: datetime | None = None
    """UTC; ``None``: whenever it is started."""


def _due(schedule: Schedule, wall: datetime, project_zone: str) -> datetime:
    zone = EARLIEST if schedule.person_time else ZoneInfo(project_zone)
    return wall.replace(tzinfo=zone).astimezone(UTC)


def _occurrence(schedule: Schedule, wall: datetime, project_zone: str) -> Occurrence:
    return Occurrence(
        key=wall.isoformat(timespec="minutes"),
        moment=occurrence_moment(schedule, wall, project_zone),
        due=_due(schedule, wall, project_zone),
    )


def current_occurrence(broadcast: Broadcast, now: datetime, project_zone: str) -> Occurrence | None:
    """The occurrence a start command (or the scheduler) starts at ``now``: ``once`` without a
    schedule; the one-off's own (due or not: its runs wait for the moment); for a cron schedule the
    latest one due within :data:`CATCH_UP`, ``None`` when there is none."""
    schedule = broadcast.schedule
    if schedule is None:
        return Occurrence(ONCE)
    if schedule.at is not None:
        return _occurrence(schedule, schedule.at, project_zone)
    assert schedule.cron is not None
    zone = EARLIEST if schedule.person_time else ZoneInfo(project_zone)
    wall = now.astimezone(zone).replace(tzinfo=None)
    latest = schedule.cron.latest_until(wall, CATCH_UP)
    return None if latest is None else _occurrence(schedule, latest, project_zone)


def next_occurrence(broadcast: Broadcast, now: datetime, project_zone: str) -> Occurrence | None:
    """The next occurrence due after ``now`` (for messages and status), ``None`` when none is."""
    schedule = broadcast.schedule
    if schedule is None:
        return None
    if schedule.at is not None:
        found = _occurrence(schedule, schedule.at, project_zone)
        return found if found.due is not None and found.due > now else None
    assert schedule.cron is not None
    zone = EARLIEST if schedule.person_time else ZoneInfo(project_zone)
    wall = schedule.cron.next_after(now.astimezone(zone).replace(tzinfo=None))
    return None if wall is None else _occurrence(schedule, wall, project_zone)
