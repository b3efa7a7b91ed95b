"""The journey interpreter: one pure, deterministic engine for every runtime.

A :class:`Run` walks a compiled journey for one (journey, user, key). It never sleeps, reads a
clock, touches a database or renders a template: it *asks* its driver by returning commands
(:class:`Sleep`, :class:`AwaitEvent`, :class:`ReadProfile`, :class:`Deliver`,
:class:`WriteTraits`) and is resumed with the answer and the current time. The in-process
simulator answers from memory on a virtual clock; the Temporal workflow answers with durable
timers, signals and activities. Both therefore produce the same outcomes.

Events that reach a running run go through :meth:`Run.on_event` whatever the run is doing, so a
goal or ``exit_on`` event ends it at once, even mid-sleep or while a send is deferred.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal, cast
from urllib.parse import quote

from nurture.language import ir
from nurture.language.evaluation import MISSING, Expr, is_true, value_of

from .clock import date_instant, format_instant, in_year, next_local_time, parse_instant, read_date, zone
from .holdout import in_holdout
from .model import EndedRun, Event, SendRequest, SendResult

# --- commands a run gives its driver -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sleep:
    """Resume at ``until`` (or earlier, ended, if an event ends the run)."""

    until: datetime
    step_id: str
    reason: Literal["wait", "wait_until", "quiet_hours", "frequency_cap", "rate_limit"]


@dataclass(frozen=True, slots=True)
class AwaitEvent:
    """Resume with the event once :meth:`Run.on_event` accepts one, or with ``None`` at ``until``."""

    step_id: str
    event: str
    until: datetime


@dataclass(frozen=True, slots=True)
class ReadProfile:
    """Resume with the user's current traits (a mapping)."""


@dataclass(frozen=True, slots=True)
class Deliver:
    """Render and deliver; resume with a :class:`nurture.delivery.deliverer.SendResult`."""

    request: SendRequest


@dataclass(frozen=True, slots=True)
class WriteTraits:
    """Set traits on the user's profile; resume with ``None``."""

    step_id: str
    traits: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Ended:
    """The run is over."""

    reason: str


Command = Sleep | AwaitEvent | ReadProfile | Deliver | WriteTraits
NO_DATE = "no_date"
"""How a run ends when the date a ``wait_until`` waits for is missing or cannot be read."""
HELD = ("quiet_hours", "frequency_cap", "rate_limit")
"""Why a send sleeps before it goes out (a deferral), as opposed to a wait step."""


@dataclass(frozen=True, slots=True)
class Reach:
    """A step a run reached, and when; a split's carries the variant it assigned."""

    step_id: str
    at: datetime
    variant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step_id": self.step_id, "at": format_instant(self.at), "variant": self.variant}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reach:
        return cls(data["step_id"], parse_instant(data["at"]), data.get("variant"))


@dataclass(frozen=True, slots=True)
class EventEffect:
    """What an incoming event does to a run."""

    end: str | None = None
    """End reason (``goal`` or ``exit_on``) when the event ends the run."""
    converted: bool = False
    """The event is the run's first conversion."""
    value: float | None = None
    """What the conversion is worth, when the goal declares a ``value``."""
    resume: bool = False
    """The event satisfies the pending ``wait_for``: resume the run with it."""


# --- pure helpers shared with routers ----------------------------------------------------------


def user_scope(user_id: str, traits: Mapping[str, Any]) -> dict[str, Any]:
    return {**traits, "id": user_id}


def run_key(journey: ir.Journey, event: Event | None, traits: Mapping[str, Any], user_id: str) -> str:
    """The run key of a triggering event (``None`` for a date in the traits): the ``key``
    expression's value, or ``""``."""
    if journey.key is None:
        return ""
    event_scope = MISSING if event is None else event.scope()
    scope = {"user": user_scope(user_id, traits), "event": event_scope, "last_event": MISSING, "journey": {"id": journey.id}}
    value = value_of(journey.key, scope)
    return "" if value is MISSING or value is None else str(value)


WORKFLOW_ID_LIMIT = 1000
"""Temporal's limit on a workflow id, in bytes (the server's ``limit.maxIDLength`` default)."""

_DIGEST = 64  # hex characters of a sha256


def workflow_id(journey: str, user_id: str, key: str, *, prefix: str = "nurture") -> str:
    """The one workflow id of (journey, user, key): ``<prefix>/<journey>/<user>/<key>``.

    User ids and keys are percent-quoted, so ids are never ambiguous and always ASCII (length in
    characters is length in bytes). An id that would pass Temporal's limit keeps the readable
    start of each part that is too long, followed by ``#`` and the sha256 of the whole value:
    quoting never leaves a ``#``, so such a part cannot equal a quoted one, and the hash keeps
    values that share their kept start apart. The full values stay in the run and route records.
    """
    head = f"{prefix}/{journey}/"
    user, run = quote(user_id, safe=""), quote(key, safe="")
    room = WORKFLOW_ID_LIMIT - len(head) - 1  # for the user part and the key part
    if len(user) + len(run) <= room:
        return f"{head}{user}/{run}"
    if room < 2 * (_DIGEST + 2):
        raise ValueError(f"journey id too long for a workflow id: {journey!r}")
    half = room // 2
    if len(user) <= half:
        run = _shortened(key, room - len(user))
    elif len(run) <= room - half:
        user = _shortened(user_id, room - len(run))
    else:
        user, run = _shortened(user_id, half), _shortened(key, room - half)
    return f"{head}{user}/{run}"


def _shortened(value: str, size: int) -> str:
    """``value`` in ``size`` characters: its quoted start (whole characters), ``#``, its sha256."""
    room, start = size - _DIGEST - 1, []
    for char in value:
        part = quote(char, safe="")
        room -= len(part)
        if room < 0:
            break
        start.append(part)
    return f"{''.join(start)}#{hashlib.sha256(value.encode()).hexdigest()}"


def trigger_matches(journey: ir.Journey, event: Event, traits: Mapping[str, Any], user_id: str) -> bool:
    """Whether ``event`` starts a run of ``journey`` (name and ``if``); an event carrying a date
    (``trigger: {date, event}``) starts none itself: see :func:`date_plan`."""
    if event.name != journey.trigger.event or journey.date_trigger is not None:
        return False
    scope = {"user": user_scope(user_id, traits), "event": event.scope(), "last_event": MISSING, "journey": {"id": journey.id}}
    return is_true(journey.trigger.cond, scope)


DATE_REACHED = "Date Reached"
"""The event a run started by a date in the person's traits sees as ``event`` (``date``: the value)."""


@dataclass(frozen=True, slots=True)
class DatePlan:
    """What a date trigger waits for, for one (journey, user, key), as the router last saw it."""

    key: str
    date: str | None
    """The date as read; ``None`` when there is none to wait for (a waiting one is given up)."""
    timezone: str
    """The person's zone when the date was read."""
    event: Event | None = None
    """The event that carried the date (the run's ``event``); ``None`` for a date in the traits."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "date": self.date,
            "timezone": self.timezone,
            "event": None if self.event is None else self.event.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatePlan:
        event = data.get("event")
        return cls(data["key"], data.get("date"), data["timezone"], None if event is None else Event.from_dict(event))


def date_plan(
    journey: ir.Journey, event: Event | None, traits: Mapping[str, Any], user_id: str
) -> DatePlan | None:
    """What ``event`` (``None``: a change of the person's traits) tells ``journey``'s date trigger;
    ``None`` when it does not concern it.

    From an event: only the trigger's event whose ``if`` holds; its date replaces the one waited
    for (no readable date gives the wait up). From the traits: every change; the ``if`` is about
    the person, so when it no longer holds the wait is given up too.
    """
    trigger = journey.date_trigger
    if trigger is None or (event is None) != (not journey.trigger.event):
        return None
    if event is not None and event.name != journey.trigger.event:
        return None
    user = user_scope(user_id, traits)
    scope = {"user": user, "event": MISSING if event is None else event.scope(), "last_event": MISSING, "journey": {"id": journey.id}}
    holds = is_true(journey.trigger.cond, scope)
    if event is not None and not holds:
        return None
    value = value_of(trigger.date, scope) if holds else None
    readable = isinstance(value, str) and read_date(value) is not None
    return DatePlan(
        key=run_key(journey, event, traits, user_id),
        date=value if readable and isinstance(value, str) else None,
        timezone=zone(_text(traits.get("timezone")), journey.timezone).key,
        event=event,
    )


def next_date_moment(trigger: ir.DateTrigger, date_text: str, timezone: str, *, since: datetime, after: bool) -> datetime | None:
    """The moment a date trigger starts a run: at or after ``since`` (strictly ``after`` it, for the
    next year's), ``None`` when there is none (the moment of a one-off date has passed)."""
    value = read_date(date_text)
    if value is None:
        return None
    tz = zone(timezone)

    def due(moment: datetime | None) -> bool:
        return moment is not None and (moment > since or (not after and moment == since))

    if not trigger.yearly:
        moment = date_instant(value, offset=trigger.offset, minute=trigger.minute, tz=tz)
        return moment if due(moment) else None
    year = since.astimezone(tz).year
    spread = abs(trigger.offset) // (365 * 86400) + 1  # an offset may move the moment across years
    for candidate in range(max(1, year - spread), min(9999, year + spread + 1) + 1):
        moment = date_instant(in_year(value, candidate), offset=trigger.offset, minute=trigger.minute, tz=tz)
        if due(moment):
            return moment
    return None


def date_event(journey: str, user_id: str, plan: DatePlan, moment: datetime) -> Event:
    """The event of the run a date trigger starts at ``moment``: the carrying event, or
    :data:`DATE_REACHED`; its id is new for each moment (a yearly trigger starts a run a year)."""
    seed = f"{journey}\0{user_id}\0{plan.key}\0{format_instant(moment)}"
    if plan.event is not None:
        seed += f"\0{plan.event.message_id}"
    message_id = "date-" + hashlib.sha256(seed.encode()).hexdigest()[:40]
    if plan.event is not None:
        return replace(plan.event, message_id=message_id)
    return Event(DATE_REACHED, moment, {"date": plan.date}, message_id)


EntryDecision = Literal["start", "restart", "ignore", "paused"]

JOURNEY_PAUSED = "journey_paused"
"""Why a matching trigger started nothing: an operator paused the journey."""


def entry_decision(
    journey: ir.Journey,
    *,
    active: bool,
    ran_before: bool,
    paused: bool = False,
    last_entered_at: datetime | None = None,
    now: datetime | None = None,
) -> EntryDecision:
    """What a matching trigger does at ``now`` given the (journey, user, key)'s history: whether a
    run is active, whether one ever ran, and when the latest one entered (``re_entry: {after}``).

    A paused journey starts no new run and restarts none (``paused``); its runs in flight go on.
    """
    if paused:
        return "paused"
    if journey.re_entry == "once":
        return "ignore" if (active or ran_before) else "start"
    if active:
        return "restart" if journey.re_entry == "restart" else "ignore"
    if too_soon(journey, last_entered_at, now):
        return "ignore"
    return "start"


def too_soon(journey: ir.Journey, last_entered_at: datetime | None, now: datetime | None) -> bool:
    """Whether ``re_entry: {after}`` keeps a new run out at ``now``: the last one entered within it."""
    if not journey.re_entry_after or last_entered_at is None or now is None:
        return False
    return now - last_entered_at < timedelta(seconds=journey.re_entry_after)


@dataclass
class Opening:
    """How a run that a router is about to start begins, worked out by the router (:func:`opening`)
    from what the run itself will be given: its journey, person, key, trigger, entry instant and,
    when it reads the profile first, the traits the router read."""

    run: Run
    first: Command | Ended
    """The run's first command, once a first profile read is answered with the router's traits."""
    reads_profile: bool
    """Whether the run reads the person's profile before anything else (its first step a
    ``wait_until``, or a branch or update on ``user``): a router that has just read the profile
    then hands the traits to the run with its start, which saves the run a profile read of its
    own; other runs' starts carry no traits."""

    @property
    def waits(self) -> Sleep | AwaitEvent | None:
        """The wait the run comes to before any send, read or write (a ``wait``, ``wait_until`` or
        ``wait_for``; not a send held by its delivery policy), if it does: a router then writes the
        run's start and those steps itself (:meth:`records`), and the run only starts its timer."""
        first = self.first
        if isinstance(first, AwaitEvent) or (isinstance(first, Sleep) and first.reason not in HELD):
            return first
        return None

    def records(self, run_id: str, workflow_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The run's start record and the record of the steps it reached up to :attr:`waits`
        (where it waits), as the run itself would write them (reached at its entry)."""
        assert self.waits is not None, "only a run that waits first is opened by its router"
        self.run.run_id = run_id
        return self.run.start_record(workflow_id), self.run.steps_record(self.waits)


def opening(
    journey: ir.Journey,
    *,
    user_id: str,
    key: str,
    event: Event,
    now: datetime,
    traits: Mapping[str, Any] | None = None,
) -> Opening:
    """The :class:`Opening` of a run of ``journey`` that this trigger starts at ``now``; ``traits``
    answer a first profile read (``None``: the router has none to give)."""
    run = Run(journey, run_id="", user_id=user_id, key=key, event=event, entered_at=now)
    first = run.start()
    reads = isinstance(first, ReadProfile)
    if reads and traits is not None:
        first = run.resume(dict(traits), now)
    return Opening(run, first, reads)


def goal_window_end(goal: ir.Goal, *, entered_at: datetime, last_message_at: datetime | None) -> datetime | None:
    """Until when a goal event converts (inclusive); ``None`` when the window has no end.

    A window measured from the last message has not begun before one was sent, so a goal event
    then is no conversion (:func:`goal_window_start`).
    """
    start = goal_window_start(goal, entered_at=entered_at, last_message_at=last_message_at)
    if goal.within is None or start is None:
        return None
    return start + timedelta(seconds=goal.within)


def goal_window_start(goal: ir.Goal, *, entered_at: datetime, last_message_at: datetime | None) -> datetime | None:
    """Where the goal's window begins: the entry, or the latest message (``None`` before one)."""
    return entered_at if goal.measured_from == "entry" else last_message_at


def conversion_value(goal: ir.Goal, scope: Mapping[str, Any]) -> float | None:
    """The goal's ``value`` for one conversion: a number, else ``None`` (nothing to sum)."""
    if goal.value is None:
        return None
    value = value_of(goal.value, scope)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # text that is no number, an integer past a float's range
        return None
    return number if math.isfinite(number) else None


def late_conversion(
    journey: ir.Journey, run: EndedRun, event: Event, traits: Mapping[str, Any]
) -> EventEffect | None:
    """A goal event reaching a run that has ended: a conversion while its window is still open.

    Runs end before their goal window does (a run of three days with ``within: 7d``); their
    conversions are counted until the window ends, by the router, with no workflow kept alive.
    A goal without ``within`` lasts the run's life only. ``None`` when the event converts nothing.
    """
    goal = journey.goal
    if goal is None or goal.event != event.name:
        return None
    start = goal_window_start(goal, entered_at=run.entered_at, last_message_at=run.last_message_at)
    if start is None or goal.within is None or not start <= event.timestamp <= start + timedelta(seconds=goal.within):
        return None
    journey_scope = {"id": journey.id, "key": run.key, "entered_at": format_instant(run.entered_at)}
    user = user_scope(run.user_id, traits)
    scope = {"user": user, "event": event.scope(), "last_event": MISSING, "journey": journey_scope}
    if not is_true(goal.cond, scope):
        return None
    return EventEffect(converted=True, value=conversion_value(goal, scope))


@dataclass
class OpenGoals:
    """Ended runs whose goal window is still open, by user: late conversions for in-memory routers.

    The service asks the ``runs`` table instead (:meth:`DbRecorder.ended_runs_converting`).
    """

    by_user: dict[str, list[tuple[EndedRun, datetime]]] = field(default_factory=dict)

    def add(self, record: Mapping[str, Any]) -> None:
        """Keep an ended run (its ``end_record``) while its goal window is open."""
        if record.get("goal_until") is None:
            return
        run = EndedRun(
            run_id=record["run_id"],
            journey=record["journey"],
            user_id=record["user_id"],
            key=record["key"],
            entered_at=parse_instant(record["entered_at"]),
            last_message_at=None if record["last_message_at"] is None else parse_instant(record["last_message_at"]),
            variants=dict(record.get("variants") or {}),
        )
        self.keep(run, parse_instant(record["goal_until"]))

    def keep(self, run: EndedRun, until: datetime) -> None:
        """Keep an ended run until ``until``, when its goal window closes."""
        self.by_user.setdefault(run.user_id, []).append((run, until))

    def convert(
        self, journeys: Mapping[str, ir.Journey], user_id: str, event: Event, traits: Mapping[str, Any]
    ) -> list[tuple[EndedRun, EventEffect]]:
        """The user's ended runs that ``event`` converts; each converts once, and closed windows go."""
        waiting = self.by_user.get(user_id)
        if not waiting:
            return []
        converted, still_open = [], []
        for run, until in waiting:
            journey = journeys.get(run.journey)
            effect = None if journey is None else late_conversion(journey, run, event, traits)
            if effect is not None:
                converted.append((run, effect))
            elif until >= event.timestamp:
                still_open.append((run, until))
        self.by_user[user_id] = still_open
        return converted


def latest_variant(variants: Mapping[str, str]) -> str | None:
    """The variant of the split a run went through last (``variants`` keeps the order they came)."""
    return list(variants.values())[-1] if variants else None


def late_record(run: EndedRun, event: Event, effect: EventEffect) -> dict[str, Any]:
    """The conversion record of an ended run (a :meth:`Run.conversion_record` made by the router)."""
    return {
        "run_id": run.run_id,
        "journey": run.journey,
        "user_id": run.user_id,
        "event": event.name,
        "variant": latest_variant(run.variants),
        "variants": dict(run.variants),
        "value": effect.value,
        "at": format_instant(event.timestamp),
        "late": True,
    }


def choose_variant(experiment: str, user_id: str, variants: tuple[ir.Variant, ...]) -> ir.Variant:
    """Sticky assignment: a pure function of (experiment, user id) over the declared weights."""
    digest = hashlib.sha256(f"{experiment}:{user_id}".encode()).digest()
    total = sum(v.weight for v in variants)
    point = int.from_bytes(digest[:8], "big") % total
    cumulative = 0
    for variant in variants:
        cumulative += variant.weight
        if point < cumulative:
            return variant
    return variants[-1]


def random_wait(run_id: str, step_id: str, spread: int) -> int:
    """Seconds a random wait adds to its shortest length for one run, 0 to ``spread``.

    A pure function of the run and the step, drawn like a split's variant, so a replayed run
    waits exactly as long as it did the first time and every runtime draws the same length.
    """
    if spread <= 0:
        return 0
    digest = hashlib.sha256(f"{run_id}:{step_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (spread + 1)


# --- the run -----------------------------------------------------------------------------------


class Run:
    """One journey run for one user and key, driven from outside."""

    def __init__(
        self,
        journey: ir.Journey,
        *,
        run_id: str,
        user_id: str,
        key: str,
        event: Event,
        entered_at: datetime,
    ) -> None:
        self.journey = journey
        self.run_id = run_id
        self.user_id = user_id
        self.key = key
        self.event = event
        self.entered_at = entered_at
        self.now = entered_at
        self.last_event: Event | None = None
        self.last_message_at: datetime | None = None
        """When the latest message of this run was sent (a goal may measure its window from it)."""
        self.variants: dict[str, str] = {}
        self.converted = False
        self.reached: list[Reach] = []
        """Steps reached since the driver last took them (:meth:`take_reached`)."""
        self.ended: str | None = None
        self.pending: Command | None = None
        # How the trigger event, the latest wait_for event and the run itself look to conditions
        # and templates: built once (timestamps are formatted) and shared, as no reader writes.
        self._event_scope = event.scope()
        self._last_scope: dict[str, Any] | None = None
        self._journey_scope = {"id": journey.id, "key": key, "entered_at": format_instant(entered_at)}
        self._steps = self._steps_of(journey.steps)

    # driving

    def start(self) -> Command | Ended:
        """Begin; returns the first command."""
        return self._advance(None)

    def resume(self, reply: Any, now: datetime) -> Command | Ended:
        """Answer the pending command at ``now``; returns the next command."""
        self.now = max(self.now, now)
        return self._advance(reply)

    def end(self, reason: str, now: datetime) -> Ended:
        """End the run from outside (goal, exit_on, restarted)."""
        self.now = max(self.now, now)
        self._steps.close()
        self.pending = None
        self.ended = reason
        return Ended(reason)

    def _advance(self, reply: Any) -> Command | Ended:
        try:
            command = self._steps.send(reply)
        except StopIteration as stop:
            self.pending = None
            self.ended = stop.value or "completed"
            return Ended(self.ended)
        self.pending = command
        return command

    # upgrades and continue-as-new: a run moved to another version, or carried to a fresh history

    def move_to(self, journey: ir.Journey, step_id: str) -> Sleep | AwaitEvent:
        """Follow ``journey`` (a newer version) from now on, continuing at its ``step_id``.

        Only a waiting run moves: it keeps what it has (variants, goal window, last event) and the
        instant its wait ends, and waits at ``step_id`` instead; what comes after is the new
        version's. ``ValueError`` (and the run unchanged) when ``step_id`` is no step of
        ``journey`` of a kind that can take this wait (as :func:`nurture.language.migration.
        plan_move` checks for every step beforehand).
        """
        waiting = self.pending
        if not isinstance(waiting, (Sleep, AwaitEvent)):
            raise RuntimeError("only a waiting run can move to another version")
        steps = self._continue_at(journey, step_id, waiting)
        self._steps.close()
        self.journey = journey
        self._steps = steps
        command = self._advance(None)
        assert isinstance(command, (Sleep, AwaitEvent))
        return command

    def snapshot(self) -> dict[str, Any]:
        """Everything a waiting run is, as JSON: :meth:`restore` continues it in a fresh history."""
        waiting = self.pending
        if not isinstance(waiting, (Sleep, AwaitEvent)):
            raise RuntimeError("only a waiting run can be carried over")
        return {
            "run_id": self.run_id,
            "user_id": self.user_id,
            "key": self.key,
            "event": self.event.to_dict(),
            "entered_at": format_instant(self.entered_at),
            "now": format_instant(self.now),
            "last_event": None if self.last_event is None else self.last_event.to_dict(),
            "last_message_at": None if self.last_message_at is None else format_instant(self.last_message_at),
            "variants": dict(self.variants),
            "converted": self.converted,
            "reached": [reach.to_dict() for reach in self.reached],
            "waiting": {
                "step_id": waiting.step_id,
                "until": format_instant(waiting.until),
                "reason": waiting.reason if isinstance(waiting, Sleep) else None,
            },
        }

    @classmethod
    def restore(cls, journey: ir.Journey, snapshot: Mapping[str, Any]) -> tuple[Run, Sleep | AwaitEvent]:
        """The run of a :meth:`snapshot`, waiting where it waited, and the command it waits on."""
        run = cls(
            journey,
            run_id=snapshot["run_id"],
            user_id=snapshot["user_id"],
            key=snapshot["key"],
            event=Event.from_dict(snapshot["event"]),
            entered_at=parse_instant(snapshot["entered_at"]),
        )
        run.now = parse_instant(snapshot["now"])
        if snapshot.get("last_event") is not None:
            run.last_event = Event.from_dict(snapshot["last_event"])
            run._last_scope = run.last_event.scope()
        if snapshot.get("last_message_at") is not None:
            run.last_message_at = parse_instant(snapshot["last_message_at"])
        run.variants = dict(snapshot.get("variants") or {})
        run.converted = bool(snapshot.get("converted"))
        run.reached = [Reach.from_dict(reach) for reach in snapshot.get("reached") or ()]
        spot = snapshot["waiting"]
        until = parse_instant(spot["until"])
        reason = spot.get("reason")
        waiting: Sleep | AwaitEvent = (
            AwaitEvent(spot["step_id"], "", until) if reason is None else Sleep(until, spot["step_id"], reason)
        )
        run._steps = run._continue_at(journey, spot["step_id"], waiting)
        command = run._advance(None)
        assert isinstance(command, (Sleep, AwaitEvent))
        return run, command

    def _continue_at(
        self, journey: ir.Journey, step_id: str, waiting: Sleep | AwaitEvent
    ) -> Generator[Command, Any, str | None]:
        """The steps of ``journey`` from a wait at ``step_id`` on (checked here, before anything
        changes: ``ValueError`` when there is no such step or it cannot take this wait)."""
        path = _path_to(journey.steps, step_id)
        if path is None:
            raise ValueError(f"version {journey.version} has no step {step_id}")
        block, index = path[-1]
        kind = block[index].kind
        if isinstance(waiting, AwaitEvent):
            fits = kind == "wait_for"
        else:
            fits = kind == "send" if waiting.reason in HELD else kind in ("wait", "wait_until")
        if not fits:
            raise ValueError(f"step {step_id} ({kind}) cannot take a run waiting at {waiting.step_id}")
        return self._resume(path, waiting)

    def _resume(
        self, path: list[tuple[tuple[ir.Step, ...], int]], waiting: Sleep | AwaitEvent
    ) -> Generator[Command, Any, str | None]:
        """The wait (ending at ``waiting.until``), what follows it in its block, then in each
        enclosing block."""
        block, index = path[-1]
        reason = yield from self._rewait(block[index], waiting)
        if reason is not None:
            return reason
        for block, index in reversed(path):
            for step in block[index + 1 :]:
                reason = yield from self._step(step)
                if reason is not None:
                    return reason
        return None

    def _rewait(self, step: ir.Step, waiting: Sleep | AwaitEvent) -> Generator[Command, Any, str | None]:
        """``step`` entered at its wait, which ends when ``waiting`` did. A wait is that sleep
        alone; a ``wait_for`` and a held send run as written up to the command they wait on (a
        send's deferral answered here, so nothing is delivered twice), then go on as usual."""
        if isinstance(step, (ir.Wait, ir.WaitUntil)):
            yield Sleep(waiting.until, step.id, "wait" if isinstance(step, ir.Wait) else "wait_until")
            return None
        inner = self._step(step)
        reached = len(self.reached)
        command = next(inner)
        while not isinstance(command, (Sleep, AwaitEvent)):
            if not isinstance(command, Deliver):
                raise RuntimeError(f"step {step.id} does not wait")
            held = waiting.reason if isinstance(waiting, Sleep) and waiting.reason in HELD else "quiet_hours"
            command = inner.send(SendResult(defer_until=waiting.until, defer_reason=cast(Any, held)))
        del self.reached[reached:]  # the step was reached before; only its wait goes on
        command = replace(command, until=waiting.until)
        while True:
            try:
                reply = yield command
                command = inner.send(reply)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            except GeneratorExit:
                inner.close()
                raise

    # events

    def event_reads_profile(self, event: Event) -> bool:
        """Whether judging ``event`` needs the user's traits (a condition reads ``user``)."""
        return any(
            expr is not None and expr.reads_user for expr in self._conditions_for(event)
        )

    def _conditions_for(self, event: Event) -> list[Expr | None]:
        conds: list[Expr | None] = []
        goal = self.journey.goal
        if goal is not None and goal.event == event.name:
            conds.append(goal.cond)
        conds.extend(r.cond for r in self.journey.exit_on if r.event == event.name)
        pending = self.pending
        if isinstance(pending, AwaitEvent) and pending.event == event.name:
            step = self.journey.step(pending.step_id)
            if isinstance(step, ir.WaitFor):
                conds.append(step.cond)
        return conds

    def on_event(
        self, event: Event, now: datetime, traits: Mapping[str, Any] | None = None
    ) -> EventEffect:
        """Judge an event arriving at ``now``; the goal, then ``exit_on``, win over ``wait_for``."""
        if self.ended is not None:
            return EventEffect()
        self.now = max(self.now, now)
        if not self._conditions_for(event):
            return EventEffect()  # no goal, exit_on or pending wait_for names it: skip the scope
        scope = self._scope(traits or {}, event=event)
        converted, value = False, None
        goal = self.journey.goal
        if goal is not None and event.name == goal.event and self._in_window(goal) and is_true(goal.cond, scope):
            converted = not self.converted
            value = conversion_value(goal, scope) if converted else None
            self.converted = True
            if goal.exit:
                return EventEffect(end="goal", converted=converted, value=value)
        for rule in self.journey.exit_on:
            if event.name == rule.event and is_true(rule.cond, scope):
                return EventEffect(end="exit_on", converted=converted, value=value)
        pending = self.pending
        if isinstance(pending, AwaitEvent) and pending.event == event.name:
            step = self.journey.step(pending.step_id)
            assert isinstance(step, ir.WaitFor)
            if is_true(step.cond, scope):
                return EventEffect(converted=converted, value=value, resume=True)
        return EventEffect(converted=converted, value=value)

    def _in_window(self, goal: ir.Goal) -> bool:
        start = goal_window_start(goal, entered_at=self.entered_at, last_message_at=self.last_message_at)
        if start is None:
            return False
        return goal.within is None or self.now - start <= timedelta(seconds=goal.within)

    @property
    def goal_window_end(self) -> datetime | None:
        """Until when a goal event still converts, for the router once the run has ended."""
        goal = self.journey.goal
        if goal is None or self.converted:
            return None
        return goal_window_end(goal, entered_at=self.entered_at, last_message_at=self.last_message_at)

    def take_reached(self) -> list[Reach]:
        """The steps reached since the last call, in order; the driver records them."""
        reached, self.reached = self.reached, []
        return reached

    # what a driver records (the same records on every runtime)

    def start_record(self, workflow_id: str) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow_id": workflow_id,
            "journey": self.journey.id,
            "version": self.journey.version,
            "user_id": self.user_id,
            "key": self.key,
            "trigger_message_id": self.event.message_id,
            "at": format_instant(self.entered_at),
            "holdout": in_holdout(self.user_id, self.journey.policy.holdout),
        }

    def steps_record(self, waiting: Sleep | AwaitEvent | None = None) -> dict[str, Any]:
        """The steps reached since the last record and, before a wait, the step it waits at."""
        held = waiting.reason if isinstance(waiting, Sleep) and waiting.reason in HELD else None
        reached = [reach.to_dict() for reach in self.take_reached()]
        return self._steps_record(reached, None if waiting is None else waiting.step_id, held)

    def _steps_record(self, reached: list[dict[str, Any]], waiting: str | None, deferred: str | None) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "journey": self.journey.id,
            "version": self.journey.version,
            "reached": reached,
            "waiting": waiting,
            "deferred": deferred,
        }

    def end_record(self, workflow_id: str, reason: str, at: datetime, *, continued: bool) -> dict[str, Any]:
        reached = [reach.to_dict() for reach in self.take_reached()]
        return self._end_record(reached, workflow_id, reason, at, continued=continued, last_message_at=self.last_message_at)

    def _end_record(
        self,
        reached: list[dict[str, Any]],
        workflow_id: str,
        reason: str,
        at: datetime,
        *,
        continued: bool,
        last_message_at: datetime | None,
    ) -> dict[str, Any]:
        goal = self.journey.goal
        until = None if goal is None or self.converted else goal_window_end(
            goal, entered_at=self.entered_at, last_message_at=last_message_at
        )
        return {
            **self._steps_record(reached, None, None),
            "workflow_id": workflow_id,
            "user_id": self.user_id,
            "key": self.key,
            "reason": reason,
            "at": format_instant(at),
            "variants": dict(self.variants),
            "continued": continued,
            "entered_at": format_instant(self.entered_at),
            "last_message_at": None if last_message_at is None else format_instant(last_message_at),
            "goal_until": None if until is None else format_instant(until),
        }

    def send_rider(self, workflow_id: str, *, steps: bool) -> dict[str, Any] | None:
        """The record this run writes right after the send it is about to make, when that send
        goes out (:attr:`SendResult.is_message`), for the send's activity to write: the steps
        reached and the wait the run comes to when a ``wait`` or ``wait_for`` follows the send
        (only with ``steps``: runs that record their steps), or its end record when the run
        completes with it. ``None`` when something else follows (the driver then records as
        usual). Everything in it is known before the send; what is reached with it is dated at
        the send's time (:meth:`rode` checks, once the send is answered, that the run came where
        the rider said). The rider's reached steps stay in :attr:`reached` until then."""
        pending = self.pending
        if not isinstance(pending, Deliver):
            return None
        path = _path_to(self.journey.steps, pending.request.step_id)
        if path is None:
            return None
        following = _step_after(path)
        reached = [reach.to_dict() for reach in self.reached]
        if isinstance(following, (ir.Wait, ir.WaitFor)) and steps:
            reached.append(Reach(following.id, self.now).to_dict())
            return {"kind": "steps", "record": self._steps_record(reached, following.id, None)}
        if following is not None:
            return None
        end = self._end_record(reached, workflow_id, "completed", self.now, continued=False, last_message_at=self.now)
        return {"kind": "end", "record": end}

    def rode(self, rider: Mapping[str, Any], command: Command | Ended) -> bool:
        """Whether the send answered just now left the run where ``rider`` (:meth:`send_rider`,
        written by the send's activity) said: waiting at its step, or completed, having reached
        exactly its steps. Then those steps are taken (recorded already) and ``True``; otherwise
        nothing changes and the driver records as usual (reached steps are recorded once each,
        so a step the rider wrote is not counted twice)."""
        record = rider["record"]
        if [reach.step_id for reach in self.reached] != [reach["step_id"] for reach in record["reached"]]:
            return False
        if rider["kind"] == "steps":
            came = isinstance(command, (Sleep, AwaitEvent)) and command.step_id == record["waiting"]
            came = came and not (isinstance(command, Sleep) and command.reason in HELD)
        else:
            came = isinstance(command, Ended) and command.reason == "completed"
        if came:
            self.reached = []
        return came

    def conversion_record(self, event: Event, effect: EventEffect, at: datetime) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "journey": self.journey.id,
            "user_id": self.user_id,
            "event": event.name,
            "variant": self.current_variant,
            "variants": dict(self.variants),
            "value": effect.value,
            "at": format_instant(at),
        }

    # scope

    def _scope(self, traits: Mapping[str, Any], *, event: Event | None = None) -> dict[str, Any]:
        return {
            "user": user_scope(self.user_id, traits),
            "event": self._event_scope if event is None else event.scope(),
            "last_event": MISSING if self._last_scope is None else self._last_scope,
            "journey": self._journey_scope,
        }

    # the steps

    def _steps_of(self, steps: tuple[ir.Step, ...]) -> Generator[Command, Any, str | None]:
        """Run ``steps`` in order; returns the end reason when an ``exit`` step ends the run."""
        for step in steps:
            reason = yield from self._step(step)
            if reason is not None:
                return reason
        return None

    def _step(self, step: ir.Step) -> Generator[Command, Any, str | None]:
        # Everything a step needs is written inline rather than in helper generators: each
        # command passes through every generator of the chain on its way out and back in.
        if not isinstance(step, ir.Split):  # a split is reached with its variant, below
            self.reached.append(Reach(step.id, self.now))
        if isinstance(step, ir.Send):
            request = self._request(step)
            while True:
                result: SendResult = yield Deliver(request)
                if result.defer_until is None:
                    if result.is_message:
                        self.last_message_at = self.now
                    return None
                # Held back by the rate, the send keeps the slot it took; any other deferral
                # gives it up (the send takes a new slot when it is decided again).
                slot = result.defer_until if result.defer_reason == "rate_limit" else None
                if slot != request.rate_slot:
                    request = replace(request, rate_slot=slot)
                yield Sleep(result.defer_until, step.id, result.defer_reason)
        elif isinstance(step, ir.Wait):
            seconds = step.seconds + random_wait(self.run_id, step.id, step.spread)
            yield Sleep(self.now + timedelta(seconds=seconds), step.id, "wait")
        elif isinstance(step, ir.WaitUntil):
            traits = (yield ReadProfile()) or {}
            tz = zone(_text(traits.get("timezone")), self.journey.timezone)
            if step.date is None:
                assert step.minute is not None
                until = next_local_time(self.now, step.minute, step.days, tz)
            else:
                day = read_date(value_of(step.date, self._scope(traits)))
                moment = None if day is None else date_instant(day, offset=step.offset, minute=step.minute, tz=tz)
                if moment is None:
                    return NO_DATE
                if moment <= self.now:
                    return None  # the moment has come already: go on at once
                until = moment
            yield Sleep(until, step.id, "wait_until")
        elif isinstance(step, ir.WaitFor):
            arrived = yield AwaitEvent(step.id, step.event, self.now + timedelta(seconds=step.timeout))
            if arrived is None:
                return (yield from self._steps_of(step.otherwise))
            self.last_event = arrived
            self._last_scope = arrived.scope()
            return (yield from self._steps_of(step.then))
        elif isinstance(step, ir.Branch):
            needs = any(arm.cond.reads_user for arm in step.arms)
            scope = self._scope(((yield ReadProfile()) or {}) if needs else {})
            for arm in step.arms:
                if is_true(arm.cond, scope):
                    return (yield from self._steps_of(arm.steps))
            return (yield from self._steps_of(step.otherwise))
        elif isinstance(step, ir.Split):
            variant = choose_variant(step.experiment, self.user_id, step.variants)
            self.variants.pop(step.experiment, None)  # re-insert: the latest split comes last
            self.variants[step.experiment] = variant.name
            self.reached.append(Reach(step.id, self.now, variant.name))
            return (yield from self._steps_of(variant.steps))
        elif isinstance(step, ir.Update):
            needs = any(t.value.reads_user for t in step.traits)
            scope = self._scope(((yield ReadProfile()) or {}) if needs else {})
            values = {t.name: _plain(value_of(t.value, scope)) for t in step.traits}
            yield WriteTraits(step.id, values)
        elif isinstance(step, ir.Exit):
            return step.reason
        return None

    def _request(self, step: ir.Send) -> SendRequest:
        return SendRequest(
            run_id=self.run_id,
            journey=self.journey.id,
            version=self.journey.version,
            step_id=step.id,
            user_id=self.user_id,
            channels=step.channels,
            template=step.template,
            category=step.category,
            timezone=self.journey.timezone,
            quiet_hours=self.journey.quiet_hours,
            variant=self.current_variant,
            context={"event": self._event_scope, "last_event": self._last_scope, "journey": self._journey_scope},
            topic=step.topic,
            policy=self.journey.policy,
            rate=step.rate or self.journey.rate,
            rate_key=f"{self.journey.id}/{step.id}" if step.rate is not None else self.journey.id,
        )

    @property
    def current_variant(self) -> str | None:
        """The most recently assigned split variant, which sends and conversions carry."""
        return latest_variant(self.variants)


def _path_to(steps: tuple[ir.Step, ...], step_id: str) -> list[tuple[tuple[ir.Step, ...], int]] | None:
    """Where ``step_id`` is: each enclosing block and the index in it, outermost first."""
    for index, step in enumerate(steps):
        if step.id == step_id:
            return [(steps, index)]
        for _, nested in ir.children(step):
            found = _path_to(nested, step_id)
            if found is not None:
                return [(steps, index), *found]
    return None


def _step_after(path: list[tuple[tuple[ir.Step, ...], int]]) -> ir.Step | None:
    """The step a run comes to when the step at ``path`` (:func:`_path_to`) is done: the next in
    its block, or after the enclosing step in the block around it; ``None`` at the journey's end."""
    for block, index in reversed(path):
        if index + 1 < len(block):
            return block[index + 1]
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _plain(value: Any) -> Any:
    """Expression results as storable data: a missing value is stored as null."""
    if value is MISSING:
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
