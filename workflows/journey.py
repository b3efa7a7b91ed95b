"""The generic journey workflow: the pure interpreter driven by durable timers and signals.

One workflow execution is one run of one journey for one (user, key). It receives the compiled
journey as input, so a run keeps the version it entered with whatever is deployed later. Events
arrive as ``event`` signals and are judged between commands and during every wait, so a goal
ends a sleeping run at once. Everything non-deterministic (profiles, rendering, providers)
happens in activities.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from nurture.engine.clock import format_instant, parse_instant
    from nurture.engine.interpreter import (
        AwaitEvent,
        Command,
        Deliver,
        Ended,
        Opening,
        ReadProfile,
        Run,
        Sleep,
        WriteTraits,
        opening,
        too_soon,
    )
    from nurture.engine.model import Event, SendResult
    from nurture.language import ir

WORKFLOW_NAME = "JourneyRun"
RECORD_STEPS = "record_steps"
"""Workflow input flag: before each wait the run records the steps it reached and where it waits
(reports). Runs started without it (before this release) replay as they ran."""
START_RIDES = "start_rides"
"""Workflow input flag: the run's start record rides on the first activity that records for it
(its first send, the record before its first wait, a conversion or its end) instead of a local
activity of its own before the first step, which delayed the first send. Runs started without
it (before this release) replay as they ran. An input flag rather than ``workflow.patched``:
a patch would add a marker and a search-attribute upsert to every new run."""

RECORDS_RIDE = "records_ride"
"""Workflow input flag: the record a run writes right after a send rides on that send's activity
(:meth:`~nurture.engine.interpreter.Run.send_rider`): the steps and the wait when a ``wait`` or
``wait_for`` follows the send, the end record when the run completes with it. One local activity
(and its marker) fewer per such send; runs started without it (before this release) replay as
they ran. An input flag for the same reason as :data:`START_RIDES`."""

OPENED = "opened"
"""Workflow input of a run whose router wrote its start and the steps it reaches before its first
wait (:class:`~nurture.engine.interpreter.Opening`): ``entered_at``, the instant the router
entered it at, and ``waiting``, the step of that wait. The run enters at that instant and, when
its first command is that wait, starts its timer without a ``nurture.record_steps`` local activity
(one activation, one marker and two transactions fewer for a journey that sleeps first). Its
start record and those steps still ride on its next activity (across a continue-as-new too),
written only where absent, so a router that died between the start and its write loses nothing.
Runs started without it (before this release) replay as they ran."""

TRAITS = "traits"
"""Workflow input: the person's traits as the router read them with the trigger, given only when
the run's first command reads the profile (:attr:`~nurture.engine.interpreter.Opening.reads_profile`):
the run answers that read with them instead of a ``nurture.read_profile`` local activity (one
marker, one activation and one database read fewer). Runs started without it read as before."""

def run_input(journey: dict[str, Any], user_id: str, key: str, event: dict[str, Any]) -> dict[str, Any]:
    """A new run's input as every router gives it: the journey (its intermediate form), whose run
    it is, its trigger event, and this release's flags for new runs (:data:`RECORD_STEPS`,
    :data:`START_RIDES`, :data:`RECORDS_RIDE`). Routers add what they know besides (``traits``,
    and the scenario runtime's ``run_id`` and ``clock_offset``)."""
    return {
        "journey": journey,
        "user_id": user_id,
        "key": key,
        "event": event,
        RECORD_STEPS: True,
        START_RIDES: True,
        RECORDS_RIDE: True,
    }


def new_run(
    journey: ir.Journey,
    payload: dict[str, Any],
    user_id: str,
    key: str,
    event: dict[str, Any],
    traits: Mapping[str, Any] | None,
    now: datetime,
    *,
    opens: bool = True,
) -> tuple[dict[str, Any], Opening | None]:
    """A new run's input as the event API gives it when the run enters at ``now`` (``payload``: the
    journey's intermediate form): :func:`run_input`, the ``traits`` when the run reads the profile
    first (:data:`TRAITS`) and, when it then waits first and ``opens``, the promise that its
    router writes its start and first steps (:data:`OPENED`); with that run's
    :class:`~nurture.engine.interpreter.Opening`, whose records the router writes (else ``None``)."""
    params = run_input(payload, user_id, key, event)
    begins = opening(journey, user_id=user_id, key=key, event=Event.from_dict(event), now=now, traits=traits)
    if traits is not None and begins.reads_profile:
        params[TRAITS] = dict(traits)
    if not opens or begins.waits is None:
        return params, None
    params[OPENED] = {"entered_at": format_instant(now), "waiting": begins.waits.step_id}
    return params, begins


SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    maximum_attempts=0,
)
"""Provider outages delay sends, never drop them: retried with backoff until they succeed."""

LOCAL = timedelta(seconds=30)

CONTINUE_AFTER = "continue_after"
"""Workflow input: how many history events a run may reach before it continues as new at its
next wait (default :data:`HISTORY_LIMIT`; tests set a small one)."""
HISTORY_LIMIT = 2_000
"""Where a long run starts a fresh history: a run that has handled hundreds of events continues
as new at its next wait, so replaying it (after a worker restart or a cache eviction) stays cheap."""
CARRIED = "carried"
"""Workflow input of a run that continued as new: its state (:meth:`Run.snapshot`), the message
ids it has seen, and signals not yet handled."""
SEEN_LIMIT = 1_000
"""A run remembers the message ids of its latest 1,000 events, to ignore a retried call (the
workflow input ``seen_limit`` sets another number; tests use a small one) ..."""
SEEN_FOR = timedelta(days=7)
""".. and forgets an id after 7 days: retries come within minutes, hours at most."""

MIGRATE_PATCH = "nurture-migrate"
CONTINUE_PATCH = "nurture-continue-as-new"
SEEN_PATCH = "nurture-bounded-seen"


@workflow.defn(name=WORKFLOW_NAME)
class JourneyWorkflow:
    """Runs one journey for one user and key.

    Input (JSON): ``journey`` (the intermediate form), ``user_id``, ``key``, ``event`` (the
    trigger), ``run_id``, ``clock_offset`` (seconds added to workflow time; the scenario
    runner uses it to place the time-skipping server's clock on the scenario's start),
    ``record_steps`` (record the steps reached before each wait; every router sets it), and
    optionally ``continue_after`` and ``seen_limit`` (see :data:`HISTORY_LIMIT` and
    :data:`SEEN_LIMIT`) and ``traits`` (:data:`TRAITS`). A run that continued as new also gets
    ``carried``.
    """

    @workflow.init
    def __init__(self, params: dict[str, Any]) -> None:
        self._inbox: list[dict[str, Any]] = []
        self._signals = 0
        self._handled = 0
        self._waiting = False
        self._state = "starting"
        self._restart: dict[str, Any] | None = None
        self._record_steps = False
        self._migration: dict[str, Any] | None = None
        self._start: dict[str, Any] | None = None
        """The start record, until an activity has carried it (:data:`START_RIDES`)."""
        self._records_ride = bool(params.get(RECORDS_RIDE))
        self._recorded: str | None = None
        """``steps`` or ``end`` when the send just answered wrote the record that comes next
        (:data:`RECORDS_RIDE`), until the run gets there (or goes elsewhere); ``opened`` when the
        router wrote the steps up to the run's first wait (:data:`OPENED`)."""
        self._params = params
        self._seen_limit = int(params.get("seen_limit") or SEEN_LIMIT)
        self._seen: dict[str, float] = {}
        """Message ids seen, in arrival order, with when (workflow time, POSIX seconds)."""
        carried = params.get(CARRIED)
        if carried is not None:
            self._seen = {message_id: at for message_id, at in carried["seen"]}
            self._inbox = list(carried["inbox"])
            self._signals = len(self._inbox)
            self._migration = carried.get("migration")
            self._start = carried.get("start")  # not yet carried by an activity (an opened run)

    @workflow.signal(name="event")
    def event(self, event: dict[str, Any]) -> None:
        """A track event of this run's user; a repeated message id (a retried call) is ignored."""
        self._signals += 1
        message_id = event.get("message_id")
        if message_id is not None:
            if message_id in self._seen:
                self._handled += 1
                return
            now = workflow.now().timestamp()
            self._seen[message_id] = now
            self._forget_old_ids(now)
        self._inbox.append(event)

    def _forget_old_ids(self, now: float) -> None:
        """Keep the latest :data:`SEEN_LIMIT` ids (or ``seen_limit``), none older than :data:`SEEN_FOR`."""
        oldest = next(iter(self._seen.values()))
        too_old = oldest < now - SEEN_FOR.total_seconds()
        if not (too_old or len(self._seen) > self._seen_limit) or not workflow.patched(SEEN_PATCH):
            return  # runs from before the bound (no patch marker) replay keeping every id
        while len(self._seen) > self._seen_limit:
            del self._seen[next(iter(self._seen))]
        for message_id, at in list(self._seen.items()):
            if at >= now - SEEN_FOR.total_seconds():
                break
            del self._seen[message_id]

    @workflow.signal(name="migrate")
    def migrate(self, payload: dict[str, Any]) -> None:
        """Move this run to a newer version of its journey at its next wait (``nurture migrate``):
        ``from_version`` (a run of another version ignores it), ``journey`` (the new version's
        intermediate form) and ``steps`` (each waiting step of the old version to its new step)."""
        self._signals += 1
        if self._migration is not None:
            self._handled += 1  # replaced by the newer plan before it was applied
        self._migration = payload

    @workflow.signal(name="trigger")
    def trigger(self, payload: dict[str, Any]) -> None:
        """A triggering event for this run's (journey, user, key), with the journey to run.

        The event API sends it with signal-with-start when a run may be active: it reaches the
        active run, which applies the re-entry rule, or starts one when none is. (When no run is
        active the API starts the run plainly, and the trigger is the input's event alone.)
        """
        self._signals += 1
        self._inbox.append({"__trigger__": payload})

    @workflow.signal(name="stop")
    def stop(self, reason: str) -> None:
        """End the run from outside with ``reason``, which its end record keeps: ``restarted``
        when a newer trigger replaces it, ``merged`` when its person merged into one with an
        older run of the same journey and key."""
        self._signals += 1
        self._inbox.append({"__stop__": reason})

    @workflow.query(name="progress")
    def progress(self) -> dict[str, Any]:
        """Whether every signal so far has been handled and the run is waiting."""
        return {
            "signals": self._signals,
            "handled": self._handled,
            "waiting": self._waiting,
            "state": self._state,
        }

    @workflow.run
    async def run(self, params: dict[str, Any]) -> dict[str, Any]:
        journey = ir.journey_from_dict(params["journey"])
        self._record_steps = bool(params.get(RECORD_STEPS))
        self._offset = timedelta(seconds=float(params.get("clock_offset", 0)))
        info = workflow.info()
        command: Command | Ended
        carried = params.get(CARRIED)
        if carried is not None:  # a long run continued as new: it goes on waiting where it was
            run, command = Run.restore(journey, carried["run"])
        else:
            opened = params.get(OPENED)
            entered = parse_instant(opened["entered_at"]) if opened else self._now()
            run = Run(
                journey,
                run_id=params.get("run_id") or info.run_id,
                user_id=params["user_id"],
                key=params.get("key", ""),
                event=Event.from_dict(params["event"]),
                entered_at=entered,
            )
            if params.get(START_RIDES):
                self._start = run.start_record(info.workflow_id)
            else:
                await workflow.execute_local_activity(
                    "nurture.record_start", run.start_record(info.workflow_id), start_to_close_timeout=LOCAL
                )
            command = run.start()
            given = params.get(TRAITS)
            if given is not None and isinstance(command, ReadProfile):
                command = run.resume(dict(given), entered)
            if opened and isinstance(command, (Sleep, AwaitEvent)) and command.step_id == opened.get("waiting"):
                self._recorded = OPENED  # the router wrote these steps; they ride again with the next record
        while not isinstance(command, Ended):
            if self._inbox:  # events that arrived while the run was sending or reading
                changed = await self._judge(run, self._inbox.pop(0))
                if changed is not None:
                    command, self._recorded = changed, None
                continue
            command = await self._execute(run, command)
        self._state = f"ended:{command.reason}"
        if self._restart is None:
            self._restart = self._pending_trigger(run)
        if self._recorded != "end" or self._restart is not None:  # else the last send wrote it
            record = run.end_record(info.workflow_id, command.reason, self._now(), continued=self._restart is not None)
            await workflow.execute_local_activity("nurture.record_end", self._riding(record), start_to_close_timeout=LOCAL)
        if self._restart is not None:
            # Same workflow id, fresh history: the new run takes the journey as deployed now.
            workflow.continue_as_new(
                {
                    **run_input(self._restart["journey"], run.user_id, run.key, self._restart["event"]),
                    "clock_offset": self._offset.total_seconds(),
                }
            )
        self._waiting = True
        return {"reason": command.reason, "variants": run.variants}

    def _now(self) -> datetime:
        return workflow.now() + self._offset

    async def _execute(self, run: Run, command: Command) -> Command | Ended:
        recorded, self._recorded = self._recorded, None
        if isinstance(command, ReadProfile):
            traits = await self._traits(run.user_id)
            return run.resume(traits, self._now())
        if isinstance(command, WriteTraits):
            await workflow.execute_local_activity(
                "nurture.write_traits",
                {"user_id": run.user_id, "traits": dict(command.traits)},
                start_to_close_timeout=LOCAL,
            )
            return run.resume(None, self._now())
        if isinstance(command, Deliver):
            self._state = f"sending:{command.request.step_id}"
            payload: dict[str, Any] = {"request": command.request.to_dict(), "now": format_instant(self._now())}
            rider = run.send_rider(workflow.info().workflow_id, steps=self._record_steps) if self._records_ride else None
            if rider is not None:
                payload["after"] = rider
            raw = await workflow.execute_activity(
                "nurture.send",
                self._riding(payload),
                # Short: after a worker crash mid-send, the retry starts this much later.
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=SEND_RETRY,
            )
            rode = bool(raw.pop("rode", False))
            after = run.resume(SendResult.from_dict(raw), self._now())
            if rode and rider is not None and run.rode(rider, after):
                self._recorded = str(rider["kind"])
            return after
        return await self._wait(run, command, recorded=recorded in ("steps", OPENED))

    async def _wait(self, run: Run, command: Sleep | AwaitEvent, *, recorded: bool = False) -> Command | Ended:
        """Sleep until the command's instant, judging every event that arrives meanwhile
        (``recorded``: the send before it, or the router, wrote the record of the steps and this wait)."""
        self._state = f"waiting:{command.step_id}"
        if self._record_steps and not recorded:
            await workflow.execute_local_activity(
                "nurture.record_steps", self._riding(run.steps_record(command)), start_to_close_timeout=LOCAL
            )
        while True:
            if self._migration is not None:
                moved = await self._migrate(run, command)
                if isinstance(moved, Ended):
                    return moved
                command = moved
            if self._history_full() and workflow.patched(CONTINUE_PATCH):
                workflow.continue_as_new(self._carry(run))
            remaining = (command.until - self._now()).total_seconds()
            if remaining <= 0:
                return run.resume(None, self._now())
            self._waiting = True
            try:
                await workflow.wait_condition(
                    lambda: bool(self._inbox) or self._migration is not None, timeout=remaining
                )
            except TimeoutError:
                self._waiting = False
                return run.resume(None, self._now())
            self._waiting = False
            while self._inbox:
                outcome = await self._judge(run, self._inbox.pop(0))
                if outcome is not None:
                    return outcome

    async def _migrate(self, run: Run, command: Sleep | AwaitEvent) -> Sleep | AwaitEvent | Ended:
        """Apply a pending ``migrate`` plan to the waiting run: it ends with the plan's reason, or
        continues at the mapped step of the new version, keeping its state and the instant its
        wait ends. A run of another version (a newer run under the same workflow id) ignores it."""
        plan, self._migration = self._migration, None
        self._handled += 1
        assert plan is not None
        if plan.get("from_version") != run.journey.version or not workflow.patched(MIGRATE_PATCH):
            return command
        if plan.get("end") is not None:
            return run.end(str(plan["end"]), self._now())
        target = plan["steps"].get(command.step_id)
        if target is None:
            return command
        try:
            moved = run.move_to(ir.journey_from_dict(plan["journey"]), target)
        except (ValueError, KeyError, TypeError) as exc:  # not a plan `nurture migrate` checked: no move
            workflow.logger.warning("migrate signal ignored: %s", exc)
            return command
        self._state = f"waiting:{moved.step_id}"
        # Always recorded: the run's row takes the new version and step.
        await workflow.execute_local_activity(
            "nurture.record_steps", self._riding(run.steps_record(moved)), start_to_close_timeout=LOCAL
        )
        return moved

    def _riding(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` carrying the start record when no activity has carried it yet; the
        activity writes the run's row before its own (:data:`START_RIDES`)."""
        if self._start is None:
            return payload
        start, self._start = self._start, None
        return {**payload, "start": start}

    def _history_full(self) -> bool:
        info = workflow.info()
        limit = int(self._params.get(CONTINUE_AFTER) or HISTORY_LIMIT)
        return info.is_continue_as_new_suggested() or info.get_current_history_length() > limit

    def _carry(self, run: Run) -> dict[str, Any]:
        """The input of this run's next history: the same run, waiting where it waits."""
        now = self._now().timestamp()
        seen = [[m, at] for m, at in self._seen.items() if at >= now - SEEN_FOR.total_seconds()]
        return {
            **{k: v for k, v in self._params.items() if k != CARRIED},
            "journey": ir.journey_payload(run.journey),
            "run_id": run.run_id,
            CARRIED: {
                "run": run.snapshot(),
                "seen": seen[-self._seen_limit :],
                "inbox": self._inbox,
                "migration": self._migration,
                "start": self._start,
            },
        }

    async def _judge(self, run: Run, raw: dict[str, Any]) -> Command | Ended | None:
        """Apply one inbox item; a new command or end when it changes the run's course."""
        try:
            if "__stop__" in raw:
                return run.end(str(raw["__stop__"]), self._now())
            if "__trigger__" in raw:
                return self._retrigger(run, raw["__trigger__"])
            event = Event.from_dict(raw)
            traits = await self._traits(run.user_id) if run.event_reads_profile(event) else None
            effect = run.on_event(event, self._now(), traits)
            if effect.converted:
                await workflow.execute_local_activity(
                    "nurture.record_conversion",
                    self._riding(run.conversion_record(event, effect, self._now())),
                    start_to_close_timeout=LOCAL,
                )
            if effect.end is not None:
                return run.end(effect.end, self._now())
            if effect.resume:
                return run.resume(event, self._now())
            return None
        finally:
            self._handled += 1

    def _pending_trigger(self, run: Run) -> dict[str, Any] | None:
        """A trigger that arrived while the run was finishing starts the next run right away."""
        for raw in self._inbox:
            payload = raw.get("__trigger__")
            # The journey as a router sends it (full, or compact: a key at its default left out).
            if payload is None or payload["journey"].get("re_entry") == "once":
                continue
            # re_entry: {after}: the next run may not enter this soon after this one did
            # (journeys compiled before it existed lack the key and replay as they ran).
            if payload["journey"].get("re_entry_after") and too_soon(
                ir.journey_from_dict(payload["journey"]), run.entered_at, self._now()
            ):
                continue
            if payload["event"].get("message_id") != run.event.message_id:
                return dict(payload)
        return None

    def _retrigger(self, run: Run, payload: dict[str, Any]) -> Ended | None:
        """A trigger reaching an active run: ``restart`` ends it and starts anew; others ignore it."""
        event = Event.from_dict(payload["event"])
        if event.message_id is not None and event.message_id == run.event.message_id:
            return None  # signal-with-start delivers the starting event as a signal too
        if payload["journey"].get("re_entry") != "restart":
            return None
        self._restart = payload
        return run.end("restarted", self._now())

    async def _traits(self, user_id: str) -> dict[str, Any]:
        traits: dict[str, Any] = await workflow.execute_local_activity(
            "nurture.read_profile", user_id, start_to_close_timeout=LOCAL
        )
        return traits
