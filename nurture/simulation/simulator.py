"""The in-process runtime: journeys on a virtual clock, for previews, scenarios and benchmarks.

It routes events exactly as the service does (an event reaches the person's active runs first,
then may start or restart runs) and answers the interpreter's commands from memory. Every call
names its person by the identity rules (:mod:`nurture.simulation.people`): an anonymous visitor
is a person of their own, and an identify or alias that merges two people moves the merged
person's runs, history, profile and sends to the survivor. Nothing
sleeps: a heap of due instants is popped in order. At one instant, events come before timers,
so a goal arriving exactly when a wait ends wins over the send that would follow.

With audiences, every call is followed by the person's audience upkeep
(:mod:`nurture.simulation.audiences`), and each membership that changes, after the call or
when a window passes, is the person's track event ``Audience Entered`` or ``Audience Exited``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from nurture.delivery.deliverer import Deliverer, MemoryHistory, MemoryProfiles, MemoryRates
from nurture.engine.identity import MERGED, Plan, RunSlot
from nurture.engine.interpreter import (
    HELD,
    JOURNEY_PAUSED,
    AwaitEvent,
    Command,
    DatePlan,
    Deliver,
    Ended,
    OpenGoals,
    ReadProfile,
    Run,
    Sleep,
    WriteTraits,
    date_event,
    date_plan,
    entry_decision,
    late_record,
    next_date_moment,
    run_key,
    trigger_matches,
)
from nurture.engine.model import EndedRun, Event, Recorder, SendOutcome
from nurture.language import ir
from nurture.language.audiences import ENTERED, EXITED, PROPERTY, Audience
from nurture.language.migration import Migration

from .audiences import Change, Upkeep
from .people import Call, People, SlotKey, join_counts, join_slots


@dataclass(frozen=True, slots=True)
class Outcome:
    """A send outcome or a run end: what scenarios assert."""

    at: datetime
    user: str
    """The person id the run had (a person merged since resolves to the survivor)."""
    journey: str
    run_id: str
    send: SendOutcome | None = None
    exit: str | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of a simulated timeline, outcomes and everything in between."""

    at: datetime
    user: str
    journey: str
    step: str
    what: str
    detail: str = ""


_EVENT, _TIMER = 0, 1


@dataclass
class _Live:
    run: Run
    token: int = 0


@dataclass
class Simulator:
    """Runs journeys for many users against scheduled events on a virtual clock."""

    journeys: list[ir.Journey]
    """The journeys that events can start, fixed when the simulator is made."""
    deliverer: Deliverer
    start: datetime
    profiles: MemoryProfiles = field(default_factory=MemoryProfiles)
    timeline: bool = True
    """Record :attr:`entries`, the step-by-step timeline; outcomes are recorded either way."""
    until: datetime | None = None
    """Date triggers start no run after this instant (a yearly one would go on for ever)."""
    recorder: Recorder | None = None
    """Also receives every run record (start, steps, sends, conversions, end), as the workflow's
    activities do: a database recorder makes a report of a simulation."""
    paused: frozenset[str] = frozenset()
    """Journeys an operator paused: their triggers start no run; runs in flight go on."""
    audiences: Mapping[str, Audience] = field(default_factory=dict)
    """The project's audiences, kept current for every person (their changes are events)."""
    now: datetime = field(init=False)
    outcomes: list[Outcome] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    conversions: list[tuple[datetime, str, str, str | None]] = field(default_factory=list)
    """(when, user, journey, variant) of every conversion, late ones (after the run ended) included."""

    def __post_init__(self) -> None:
        self.now = self.start
        # Caps and rates count this simulation's own sends; opt-outs providers report land in its
        # profiles.
        if self.deliverer.history is None:
            self.deliverer.history = MemoryHistory()
        if self.deliverer.rates is None:
            self.deliverer.rates = MemoryRates()
        if self.deliverer.profiles is None:
            self.deliverer.profiles = self.profiles
        history = self.deliverer.history
        self.people = People(self.profiles, history if isinstance(history, MemoryHistory) else None)
        self._queue: list[tuple[datetime, int, int, Any]] = []
        self._seq = itertools.count()
        self._active: dict[tuple[str, str, str], _Live] = {}
        self._by_user: dict[str, list[_Live]] = {}
        self._history: dict[tuple[str, str, str], int] = {}
        self._entered: dict[tuple[str, str, str], datetime] = {}
        """When the latest run of each (journey, user, key) entered (``re_entry: {after}``)."""
        self._by_id = {journey.id: journey for journey in self.journeys}
        self._open_goals = OpenGoals()
        self._date_plans: dict[tuple[str, str, str], int] = {}
        """The latest date plan of each (journey, user, key): an earlier one's moment starts nothing."""
        self.upkeep = Upkeep(self.audiences)
        self._wakes: set[datetime] = set()
        """Moments an audience standing changes at that are in the queue."""
        self._index_triggers()

    def _index_triggers(self) -> None:
        """Which journeys each event (or a person's date) may start, from :attr:`journeys`."""
        self._triggered_by: dict[str, list[ir.Journey]] = {}
        """Journeys by trigger event name, in declared order: most events start nothing."""
        self._dated_by_event: dict[str, list[ir.Journey]] = {}
        """Journeys whose date trigger reads its date from an event, by that event's name."""
        self._dated_by_traits = [j for j in self.journeys if j.date_trigger is not None and not j.trigger.event]
        """Journeys whose date trigger reads its date from the person's traits."""
        for journey in self.journeys:
            if journey.date_trigger is not None:
                if journey.trigger.event:
                    self._dated_by_event.setdefault(journey.trigger.event, []).append(journey)
                continue
            self._triggered_by.setdefault(journey.trigger.event, []).append(journey)

    # scheduling input

    def add_user(self, user_id: str, traits: Mapping[str, Any], opted_out: Iterable[str] = ()) -> None:
        """A person known from the start, with these traits (their addresses identify them); a date
        in their traits is waited for from the start."""
        person = self.people.add_user(user_id, traits, opted_out, self.start)
        for journey in self._dated_by_traits:
            self._plan_date(journey, person, None)
        if self.upkeep:  # the audiences the person starts in are entered at the start
            heapq.heappush(self._queue, (self.start, _EVENT, next(self._seq), ("audiences", person)))

    def track(self, at: datetime, user_id: str | None, event: Event, anonymous_id: str | None = None) -> None:
        self.call(at, Call("track", user_id, anonymous_id), event)

    def identify(
        self,
        at: datetime,
        user_id: str | None,
        traits: Mapping[str, Any],
        opted_out: Iterable[str] | None = None,
        anonymous_id: str | None = None,
    ) -> None:
        out = None if opted_out is None else frozenset(opted_out)
        self.call(at, Call("identify", user_id, anonymous_id, dict(traits), out))

    def alias(self, at: datetime, user_id: str, previous_id: str) -> None:
        self.call(at, Call("alias", user_id, previous=previous_id))

    def group(
        self,
        at: datetime,
        user_id: str | None,
        group_id: str,
        traits: Mapping[str, Any],
        anonymous_id: str | None = None,
    ) -> None:
        self.call(at, Call("group", user_id, anonymous_id, dict(traits), group=group_id))

    def upgrade(self, at: datetime, journey: ir.Journey, migration: Migration | None = None) -> None:
        """Deploy ``journey`` (a new version) at ``at``: new runs take it, and runs in flight of
        ``migration.from_version`` end or move to it as the plan says (without a plan they finish
        on the version they entered with)."""
        if migration is not None and migration.to_version not in (None, journey.version):
            raise ValueError(f"the plan moves runs to version {migration.to_version}, not {journey.version}")
        heapq.heappush(self._queue, (at, _EVENT, next(self._seq), ("upgrade", journey, migration)))

    def call(self, at: datetime, call: Call, event: Event | None = None) -> None:
        """Schedule a call (a track's ``event`` with it)."""
        heapq.heappush(self._queue, (at, _EVENT, next(self._seq), ("call", call, event)))

    # running

    async def run(self, until: datetime | None = None) -> None:
        """Process everything due, in order, until the queue is empty (or ``until``)."""
        while self._queue:
            at, _, _, item = self._queue[0]
            if until is not None and at > until:
                break
            heapq.heappop(self._queue)
            self.now = max(self.now, at)
            if item[0] == "upgrade":
                await self._upgrade(item[1], item[2])
            elif item[0] == "call":
                call, event = item[1], item[2]
                plan = self.people.apply(call, self.now)
                if self.timeline:
                    self._note_call(call, plan)
                for kept, merged in plan.merges:
                    await self._merge(kept, merged)
                if event is not None:
                    await self._on_track(plan.person, event)
                else:  # the person's traits may hold a new date
                    for journey in self._dated_by_traits:
                        self._plan_date(journey, plan.person, None)
                if self.upkeep:
                    await self._audiences(self.upkeep.touch(self.profiles.get_now(plan.person), self.now, event))
            elif item[0] == "audiences":
                await self._audiences(self.upkeep.touch(self.profiles.get_now(item[1]), self.now))
            elif item[0] == "wake":
                self._wakes.discard(at)
                await self._audiences(self.upkeep.advance(self.now, self.profiles.get_now))
            elif item[0] == "date":
                await self._date_reached(*item[1:])
            else:
                live, token = item[1], item[2]
                if live.token == token and live.run.ended is None:
                    await self._drive(live, live.run.resume(None, self.now))

    async def _audiences(self, changes: list[Change]) -> None:
        """Each membership change is the person's audience event, processed as a track event;
        the next moment a standing changes by itself is queued."""
        for change in changes:
            await self._on_track(change.person, change.event())
        due = self.upkeep.next_due()
        if due is not None and due not in self._wakes:
            self._wakes.add(due)
            heapq.heappush(self._queue, (due, _EVENT, next(self._seq), ("wake",)))

    async def _upgrade(self, journey: ir.Journey, migration: Migration | None) -> None:
        self.journeys = [journey if known.id == journey.id else known for known in self.journeys]
        self._by_id[journey.id] = journey
        self._index_triggers()
        if self.timeline:
            self._note("", journey.id, "", "deployed", f"version {journey.version}")
        if migration is None:
            return
        for live in list(self._active.values()):
            run = live.run
            if run.journey.id != migration.journey or run.journey.version != migration.from_version:
                continue
            if migration.end_reason is not None:
                await self._finish(live, run.end(migration.end_reason, self.now))
                continue
            # Between two items every active run waits: it moves at once, keeping its wake-up.
            waiting = run.pending
            assert isinstance(waiting, (Sleep, AwaitEvent))
            target = migration.steps.get(waiting.step_id)
            if target is None:
                continue  # the plan names no place for this wait: the run stays on its version
            if self.timeline:
                self._note(run.user_id, journey.id, target, "moved", f"from {waiting.step_id} of {migration.from_version}")
            await self._drive(live, run.move_to(journey, target))

    def _note_call(self, call: Call, plan: Plan) -> None:
        """Timeline lines of an identify, alias or group call, and of the merges it made."""
        person = plan.person
        if call.kind == "identify":
            changes = [f"{k}={v}" for k, v in call.traits.items()]
            if call.opted_out is not None:
                changes.append(f"opted_out=[{', '.join(sorted(call.opted_out))}]")
            names = f"as {call.names()}" if call.anonymous is not None or call.user != person else ""
            detail = ": ".join(part for part in (names, ", ".join(changes)) if part)
            self._note(person, "", "", "identify", detail)
        elif call.kind == "alias":
            self._note(person, "", "", "alias", f"{call.previous} is now {call.user}")
        elif call.kind == "group":
            shared = ", ".join(f"{k}={v}" for k, v in call.traits.items())
            self._note(person, "", "", "group", f"{call.group}" + (f": {shared}" if shared else ""))
        for kept, merged in plan.merges:
            self._note(kept, "", "", "merged", f"{merged} into {kept}")
        for ident in plan.conflicts:
            owner = self.people.identities.resolve(ident)
            self._note(person, "", "", "not merged", f"{ident.label()} stays with {owner}")

    async def _merge(self, kept: str, merged: str) -> None:
        """``merged`` joined ``kept``: its runs carry on as ``kept``'s, except that of two active
        runs of one journey and key the later one ends ``merged``; re-entry history joins."""

        def active(slot: SlotKey, live: _Live) -> RunSlot | None:
            run = live.run
            return None if run.ended is not None else RunSlot(slot[0], slot[2], run.run_id, run.entered_at)

        losers = join_slots(self._active, kept, merged, active)
        join_counts(self._history, kept, merged)
        self.upkeep.merge(kept, merged)
        for slot in [s for s in self._entered if s[1] == merged]:
            target, at = (slot[0], kept, slot[2]), self._entered.pop(slot)
            self._entered[target] = max(at, self._entered.get(target, at))
        traits_dated = {journey.id for journey in self._dated_by_traits}
        for slot in [s for s in self._date_plans if s[1] == merged and s[0] in traits_dated]:
            del self._date_plans[slot]  # the survivor's traits say which date is waited for now
        self._by_user.setdefault(kept, []).extend(self._by_user.pop(merged, []))
        for live in losers:
            await self._finish(live, live.run.end(MERGED, self.now))

    async def _on_track(self, user_id: str, event: Event) -> None:
        if self.timeline:
            audience = f" {event.properties.get(PROPERTY)}" if event.name in (ENTERED, EXITED) else ""
            self._note(user_id, "", "", "event", event.name + audience)
        if self.people.merged:
            self.people.open_goals(self._open_goals, user_id)
        if self._open_goals.by_user.get(user_id):
            traits = self.profiles.get_now(user_id).traits
            for ended, effect in self._open_goals.convert(self._by_id, user_id, event, traits):
                record = late_record(ended, event, effect)
                self._converted(user_id, ended.journey, record["variant"], event, "converted after the run")
                if self.recorder is not None:
                    await self.recorder.conversion(record)
        for live in list(self._by_user.get(user_id, ())):
            run = live.run
            fresh = self.profiles.get_now(user_id).traits if run.event_reads_profile(event) else None
            effect = run.on_event(event, self.now, fresh)
            if effect.converted:
                self._converted(user_id, run.journey.id, run.current_variant, event, "converted")
                if self.recorder is not None:
                    await self.recorder.conversion(run.conversion_record(event, effect, self.now))
            if effect.end is not None:
                await self._finish(live, run.end(effect.end, self.now))
            elif effect.resume:
                live.token += 1
                await self._drive(live, run.resume(event, self.now))
        for journey in self._triggered_by.get(event.name, ()):
            traits = self.profiles.get_now(user_id).traits
            if not trigger_matches(journey, event, traits, user_id):
                continue
            await self._trigger(journey, user_id, run_key(journey, event, traits, user_id), event)
        for journey in self._dated_by_event.get(event.name, ()):
            self._plan_date(journey, user_id, event)

    async def _trigger(self, journey: ir.Journey, user_id: str, key: str, event: Event) -> None:
        """A trigger for (journey, user, key): the re-entry rule starts, restarts or ignores."""
        slot = (journey.id, user_id, key)
        current = self._active.get(slot)
        decision = entry_decision(
            journey,
            active=current is not None,
            ran_before=slot in self._history,
            paused=journey.id in self.paused,
            last_entered_at=self._entered.get(slot),
            now=self.now,
        )
        if decision == "paused":
            if self.timeline:
                self._note(user_id, journey.id, "", "not entered", JOURNEY_PAUSED)
            return
        if decision == "ignore":
            if self.timeline:
                self._note(user_id, journey.id, "", "not entered", f"re_entry {journey.re_entry}")
            return
        if decision == "restart" and current is not None:
            await self._finish(current, current.run.end("restarted", self.now))
        await self._enter(journey, user_id, key, event)

    def _plan_date(self, journey: ir.Journey, user_id: str, event: Event | None) -> None:
        """A date trigger waits for the date ``event`` (``None``: the traits) now holds, instead of
        any it waited for."""
        plan = date_plan(journey, event, self.profiles.get_now(user_id).traits, user_id)
        if plan is None:
            return
        slot = (journey.id, user_id, plan.key)
        token = self._date_plans[slot] = self._date_plans.get(slot, 0) + 1
        self._date_next(journey, user_id, plan, token, after=False)

    def _date_next(self, journey: ir.Journey, user_id: str, plan: DatePlan, token: int, *, after: bool) -> None:
        assert journey.date_trigger is not None
        moment = None
        if plan.date is not None:
            moment = next_date_moment(journey.date_trigger, plan.date, plan.timezone, since=self.now, after=after)
        if moment is None or (self.until is not None and moment > self.until):
            return
        heapq.heappush(self._queue, (moment, _EVENT, next(self._seq), ("date", journey, user_id, plan, token)))
        if self.timeline:
            self._note(user_id, journey.id, "", "date", f"enters {self._local(moment)}")

    async def _date_reached(self, journey: ir.Journey, user_id: str, plan: DatePlan, token: int) -> None:
        if self._date_plans.get((journey.id, user_id, plan.key)) != token:
            return  # a later date took its place
        person = self.people.identities.canonical(user_id)  # a date from an event of a person merged since
        await self._trigger(journey, person, plan.key, date_event(journey.id, person, plan, self.now))
        assert journey.date_trigger is not None
        if journey.date_trigger.yearly:
            self._date_next(journey, user_id, plan, token, after=True)

    def _converted(self, user_id: str, journey: str, variant: str | None, event: Event, what: str) -> None:
        self.conversions.append((self.now, user_id, journey, variant))
        if self.timeline:
            self._note(user_id, journey, "goal", what, event.name)

    async def _enter(self, journey: ir.Journey, user_id: str, key: str, event: Event) -> None:
        slot = (journey.id, user_id, key)
        number = self._history.get(slot, 0) + 1
        self._history[slot] = number
        self._entered[slot] = self.now
        run_id = f"{journey.id}:{user_id}:{key}:{number}"
        live = _Live(Run(journey, run_id=run_id, user_id=user_id, key=key, event=event, entered_at=self.now))
        self._active[slot] = live
        self._by_user.setdefault(user_id, []).append(live)
        if self.timeline:
            self._note(user_id, journey.id, "", "entered", f"key={key}" if key else "")
        if self.recorder is not None:
            await self.recorder.start(live.run.start_record(run_id))
        await self._drive(live, live.run.start())

    async def _drive(self, live: _Live, command: Command | Ended) -> None:
        run = live.run
        while True:
            if isinstance(command, Deliver):
                if self.recorder is not None:
                    await self.recorder.steps(run.steps_record())
                profile = self.profiles.get_now(run.user_id)
                result = await self.deliverer.send(command.request, profile, self.now)
                if result.outcome is not None:
                    self._record_send(run, result.outcome)
                    if self.recorder is not None:
                        await self.recorder.send(command.request, result.outcome)
                command = run.resume(result, self.now)
            elif isinstance(command, Ended):
                await self._finish(live, command)
                return
            elif isinstance(command, ReadProfile):
                command = run.resume(self.profiles.get_now(run.user_id).traits, self.now)
            elif isinstance(command, WriteTraits):
                self.profiles.update_now(run.user_id, command.traits)  # untimed, as on every runtime
                if self.timeline:
                    detail = ", ".join(f"{k}={v}" for k, v in command.traits.items())
                    self._note(run.user_id, run.journey.id, command.step_id, "update", detail)
                command = run.resume(None, self.now)
            elif isinstance(command, Sleep):
                await self._waits(run, command)
                self._schedule(live, command.until)
                if self.timeline:
                    held = command.reason in HELD
                    verb = "deferred" if held else "waiting"
                    until = f"until {self._local(command.until)}"
                    if held:
                        until += f" ({command.reason.replace('_', ' ')})"
                    self._note(run.user_id, run.journey.id, command.step_id, verb, until)
                return
            else:
                assert isinstance(command, AwaitEvent)
                await self._waits(run, command)
                self._schedule(live, command.until)
                if self.timeline:
                    detail = f"{command.event} until {self._local(command.until)}"
                    self._note(run.user_id, run.journey.id, command.step_id, "waiting for", detail)
                return

    async def _waits(self, run: Run, command: Sleep | AwaitEvent) -> None:
        """Record the steps reached and where the run now waits (the workflow does so too)."""
        if self.recorder is not None:
            await self.recorder.steps(run.steps_record(command))
        else:
            run.take_reached()

    def _local(self, instant: datetime) -> str:
        """An instant in the simulation's own zone (its start's offset), for timelines."""
        return instant.astimezone(self.start.tzinfo).strftime("%a %m-%d %H:%M")

    def _schedule(self, live: _Live, until: datetime) -> None:
        live.token += 1
        heapq.heappush(self._queue, (until, _TIMER, next(self._seq), ("timer", live, live.token)))

    def _record_send(self, run: Run, outcome: SendOutcome) -> None:
        self.outcomes.append(Outcome(self.now, run.user_id, run.journey.id, run.run_id, send=outcome))
        if not self.timeline:
            return
        what: Literal["sent", "skipped", "failed"] = outcome.status
        detail = f"{outcome.channel} {outcome.template}"
        if outcome.reason:
            detail += f" ({outcome.reason})"
        if outcome.variant:
            detail += f" [variant {outcome.variant}]"
        if outcome.preview:
            detail += f": {outcome.preview}"
        self._note(run.user_id, run.journey.id, outcome.step_id, what, detail)

    async def _finish(self, live: _Live, ended: Ended) -> None:
        run = live.run
        if self.recorder is not None:
            record = run.end_record(run.run_id, ended.reason, self.now, continued=False)
            self._open_goals.add(record)
            await self.recorder.end(record)
        else:
            run.take_reached()
            if (until := run.goal_window_end) is not None:
                ended_run = EndedRun(
                    run.run_id, run.journey.id, run.user_id, run.key, run.entered_at, run.last_message_at, run.variants
                )
                self._open_goals.keep(ended_run, until)
        person = self.people.identities.canonical(run.user_id)
        slot = (run.journey.id, person, run.key)
        if self._active.get(slot) is live:
            del self._active[slot]
        runs = self._by_user.get(person, [])
        if live in runs:
            runs.remove(live)
        live.token += 1
        self.outcomes.append(Outcome(self.now, run.user_id, run.journey.id, run.run_id, exit=ended.reason))
        if self.timeline:
            self._note(run.user_id, run.journey.id, "", "ended", ended.reason)

    def _note(self, user: str, journey: str, step: str, what: str, detail: str = "") -> None:
        self.entries.append(Entry(self.now, user, journey, step, what, detail))

    @property
    def active_runs(self) -> int:
        return len(self._active)
