"""Event routing for the service: from an accepted event to workflow signals, without scans.

A ``track`` event first reaches the user's active runs that listen for its name (goal,
``exit_on``, ``wait_for``), found through the ``routes`` table by user id. Then every journey it
triggers starts a run on the workflow id of (journey, user, key) (:func:`start_run`): a plain
start when the routes show no active run, and otherwise a signal-with-start, which reaches the
active run, which applies the re-entry rule (``restart`` ends itself and continues as a new run;
``after_exit`` and ``once`` ignore it).
``once`` is also checked against the ``runs`` table, so it holds beyond Temporal's retention.

Every call first resolves to a person (:class:`~nurture.storage.identities.DbIdentities`, the
rules of docs/identity.md): routes, runs and workflow ids are the person's. A call that merges two
people ends the newer of two active runs of one journey and key with the ``stop`` signal (reason
``merged``); a trigger for a (journey, key) whose active run moved to the person in a merge goes to
that run (signal ``trigger``), so re-entry rules apply to the merged person as one.

Routing is at least once. The event is stored first and marked routed only when every route and
journey has had it; one that fails part-way (Temporal, the database) or whose process dies stays
unrouted, and is routed again, whole, by the retry of the call (same ``messageId``) or by
:meth:`Ingest.route_unrouted`, which every API process calls when it starts and every minute
after. An identity call that merged people stays unrouted in the same way until the runs the merge ends have had their stop signal. Routing twice is harmless: a run ignores an
event or trigger it has seen, and a run the event started that has ended since is not started
again (the ``runs`` table records each run's trigger).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from nurture.engine.identity import MERGED, Identifier, call_identifiers
from nurture.engine.interpreter import (
    JOURNEY_PAUSED,
    DatePlan,
    date_plan,
    late_conversion,
    late_record,
    run_key,
    too_soon,
    trigger_matches,
    workflow_id,
)
from nurture.engine.model import EndedRun, Event, Profile
from nurture.language.compiler import Project
from nurture.language.ir import Journey, journey_payload
from nurture.storage.audiences import AUDIENCE_EVENTS, AudienceStore, Change, Evaluated
from nurture.storage.console import PausedJourneys, paused_journeys
from nurture.storage.db import Database
from nurture.storage.identities import ActiveRoute, Applied, DbIdentities, active_routes
from nurture.storage.models import EventRow, utcnow
from nurture.storage.stores import (
    DateTriggers,
    DbProfiles,
    DbRecorder,
    Events,
    OptOuts,
    Routes,
    activate_routes,
    ended_runs_converting,
    had_run,
    has_run,
    last_entry,
    listened_events,
    mark_routed,
    record_opening,
    run_started_by,
    stored_version_count,
)
from workflows.dates import DATE_WORKFLOW, PLAN_SIGNAL, date_params
from workflows.journey import OPENED, WORKFLOW_NAME, new_run

from .groupcommit import GroupCommit
from .observability import count_conversion

log = logging.getLogger("nurture.ingest")


ROUTING_GRACE = 5.0
"""Seconds after which an unrouted event is taken to be left behind by a process that died, not
being routed by a live request: the API's start-up routes those received before it started, this
long after it started."""

ROUTABLE_FRESH = 1.0
"""Seconds a router trusts its set of listened-for event names. In a rolling upgrade a newer API
process stores a journey version that may listen for an event no older one did: an event whose
name is not in the set makes this router count the stored versions (at most once in this time)
and, when there are more, read what they listen for."""

RE_ENTRY_ONCE = "re_entry_once"
"""Why a matching trigger started nothing: the journey's ``re_entry: once`` and an earlier run."""
RE_ENTRY_AFTER = "re_entry_after"
"""Why a trigger started nothing under ``re_entry: {after}``: the latest run entered too recently."""

TRANSIENT = (RPCError, OperationalError)
"""Failures a later attempt may not meet: Temporal or the database unavailable or timing out."""


async def start_run(
    client: Client, params: Mapping[str, Any], *, wid: str, task_queue: str, once: bool, running: bool
) -> str | None:
    """Start the run of a trigger, as the event API does: ``params`` is the workflow input.

    A run of the same workflow id may be in flight (``running``: the person's routes show one);
    it must get the trigger, to apply the re-entry rule, so the start is a signal-with-start whose
    ``trigger`` signal repeats the input's event and journey. When the routes show none, which is
    nearly always, the start is a plain one: the trigger travels in the input alone, saving the
    run a history event and its first task a signal. A run the routes did not show yet (another
    process starting it at this moment) fails the plain start, and the signal-with-start follows.

    ``once`` (``re_entry: once``): no start where any run of the id ever was; both starts then
    raise :class:`WorkflowAlreadyStartedError`.

    Returns the new run's id when the plain start started it, for the router to write what the
    input's :data:`~workflows.journey.OPENED` promises; ``None`` after a signal-with-start, which
    may have started nothing, and whose run (if new) records its opening itself."""
    policy = WorkflowIDReusePolicy.REJECT_DUPLICATE if once else WorkflowIDReusePolicy.ALLOW_DUPLICATE
    if not running:
        try:
            handle = await client.start_workflow(
                WORKFLOW_NAME, params, id=wid, task_queue=task_queue, id_reuse_policy=policy
            )
            return handle.result_run_id
        except WorkflowAlreadyStartedError:
            pass  # in flight after all (or, for ``once``, ever run): as below
    await client.start_workflow(
        WORKFLOW_NAME,
        {name: value for name, value in params.items() if name != OPENED},
        id=wid,
        task_queue=task_queue,
        id_reuse_policy=policy,
        start_signal="trigger",
        start_signal_args=[{"event": params["event"], "journey": params["journey"]}],
    )
    return None


class NotRouted(Exception):
    """Routing failed part-way: the event stays stored as unrouted, for the retry to route."""


@dataclass
class Routed:
    """What one event did."""

    duplicate: bool = False
    """The ``messageId`` was seen before and routed: nothing happened."""
    rerouted: bool = False
    """The ``messageId`` was seen before but its routing had not finished: it was routed now."""
    triggered: list[str] = field(default_factory=list)
    """Workflow ids that got a trigger (started, or judged by the active run)."""
    signalled: list[str] = field(default_factory=list)
    """Workflow ids of active runs the event was delivered to."""
    skipped: list[str] = field(default_factory=list)
    """Journeys the event matched but could not enter (``once``, or paused)."""
    skip_reasons: dict[str, str] = field(default_factory=dict)
    """Why each skipped journey was skipped: ``re_entry_once``, ``re_entry_after`` or ``journey_paused``."""
    converted: list[str] = field(default_factory=list)
    """Ended runs whose goal window was still open and that this event converted."""
    person: str | None = None
    """The person the event is about."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "person": self.person,
            "duplicate": self.duplicate,
            "rerouted": self.rerouted,
            "triggered": self.triggered,
            "signalled": self.signalled,
            "skipped": self.skipped,
            "skip_reasons": self.skip_reasons,
        }


class Activation(TypedDict):
    """A started run's route, to make active (:func:`~nurture.storage.stores.activate_routes`)."""

    workflow_id: str
    user_id: str
    journey: str
    key: str
    listens: Sequence[str]


@dataclass
class Started:
    """A run the event started: its route, and the opening its router writes with it
    (:func:`~nurture.storage.stores.record_opening`) when the run waits first."""

    route: Activation
    opening: tuple[dict[str, Any], dict[str, Any]] | None = None


@dataclass
class RoutingReads:
    """What routing one event reads before it signals and starts anything."""

    routes: list[ActiveRoute]
    paused: frozenset[str]
    ended: list[EndedRun]
    ran: dict[tuple[str, str], bool]
    """Whether the person had a run of each (journey, key) of a ``once`` journey the event triggers."""


class Ingest:
    """Accepts events and identifies for a compiled project."""

    def __init__(
        self, project: Project, db: Database, client: Client | None, task_queue: str, *, secret: str = ""
    ) -> None:
        """``client`` may be ``None`` for a profile-only router (identify works without Temporal,
        unless it merges people with runs to end). ``secret`` keys the audit log's hashes."""
        self.project = project
        self.db = db
        self.client = client
        self.task_queue = task_queue
        self.events = Events(db)
        self.routes = Routes(db)
        self.date_triggers = DateTriggers(db)
        self.profiles = DbProfiles(db)
        self.identities = DbIdentities(db, secret=secret)
        self.recorder = DbRecorder(db)
        self._finishing: GroupCommit[tuple[Sequence[Started], str | None]] = GroupCommit(self._finish_together)
        """Routing's last writes of events finishing at the same time, made together."""
        self._goals: dict[str, list[str]] = {}
        """Journeys (and broadcasts) by goal event name: which ended runs an event may still convert."""
        self._converting = {
            **{j.id: j for j in project.journeys.values()},
            **{b.journey.id: b.journey for b in project.broadcasts.values()},
        }
        """The journeys whose ended runs a goal event may convert, broadcasts' included."""
        for journey in self._converting.values():
            if journey.goal is not None and journey.goal.within is not None:
                self._goals.setdefault(journey.goal.event, []).append(journey.id)
        self._payloads = {j.id: journey_payload(j) for j in project.journeys.values()}
        self._listens = {j.id: sorted(j.listens_for()) for j in project.journeys.values()}
        self._versions = stored_version_count(db)  # counted first: a version stored meanwhile is read later
        self._looked = time.monotonic()
        self._routable = frozenset(
            {j.trigger.event for j in project.journeys.values()}
            | {name for listens in self._listens.values() for name in listens}
            | {name for b in project.broadcasts.values() for name in b.journey.listens_for()}
            | set(self._goals)
            | listened_events(db)
        )
        """Event names some journey (or a stored older version, whose runs may still be in
        flight) triggers on, a run may wait for, or a goal converts on: any other event (most
        page views, say) is stored as routed, with nothing to route."""
        self._triggers = frozenset(j.trigger.event for j in project.journeys.values())
        self.audiences = AudienceStore(db, project.audiences, routable=self._routable)
        """Audience membership, kept in the transaction of each call that may change it."""
        self.paused = PausedJourneys(db)
        self._dated_by_event: dict[str, list[Journey]] = {}
        """Journeys whose date trigger reads its date from an event, by that event's name."""
        self._dated_by_traits = [
            j for j in project.journeys.values() if j.date_trigger is not None and not j.trigger.event
        ]
        """Journeys whose date trigger reads its date from the person's traits."""
        self._date_sources = " ".join(
            expr.source
            for j in self._dated_by_traits
            for expr in (j.date_trigger.date if j.date_trigger else None, j.trigger.cond)
            if expr is not None
        )
        """The expressions date triggers read the traits with: which trait names matter to them."""
        for journey in project.journeys.values():
            if journey.date_trigger is not None and journey.trigger.event:
                self._dated_by_event.setdefault(journey.trigger.event, []).append(journey)

    @staticmethod
    def plans_trait_dates(project: Project) -> bool:
        """Whether a journey of ``project`` starts on a date in the traits (identify needs Temporal)."""
        return any(j.date_trigger is not None and not j.trigger.event for j in project.journeys.values())

    async def track(
        self, identifiers: Sequence[Identifier] | str, event: Event, *, anonymous_id: str | None = None
    ) -> Routed:
        """Resolve the person the event is about (``identifiers``, or a userId) (creating or merging as the identity rules say),
        store the event (once per message id) and route it. A repeat routes the stored event
        again only if its routing never finished, once the call that stored it is surely over.
        :class:`NotRouted` when routing fails."""
        assert event.message_id is not None, "the API assigns a message id to every event"
        listened = event.name in self._routable or await self._newly_listened(event.name)
        received = utcnow()
        record = EventRow(
            message_id=event.message_id,
            kind="track",
            anonymous_id=anonymous_id,
            name=event.name,
            properties=dict(event.properties),
            timestamp=event.timestamp.astimezone(UTC),
            received_at=received,
            routed_at=None if listened else received,
        )
        if isinstance(identifiers, str):
            identifiers = call_identifiers(identifiers, None)
        applied, reads = await asyncio.to_thread(self._store, identifiers, event, record)
        if applied is not None:
            await self._end_merged(applied.merged_away)
            if record.routed_at is not None:
                if applied.merged_away:  # stored unrouted until the runs it ended had their stop
                    await asyncio.to_thread(self.events.routed, event.message_id)
                await self._route_audience_events(applied.person, applied.events)
                return Routed(person=applied.person)
            routed = await self._route(applied.person, event, again=False, profile=applied.profile, reads=reads)
            await self._route_audience_events(applied.person, applied.events)
            return routed
        while True:
            unrouted = await asyncio.to_thread(self.events.unrouted, message_id=event.message_id)
            if not unrouted:
                return Routed(duplicate=True)
            [(stored_user, stored, received_at, _)] = unrouted
            # A young one is most likely still being routed by the call that stored it (a
            # concurrent retry): its answer is awaited, not raced.
            if datetime.now(UTC) - received_at >= timedelta(seconds=ROUTING_GRACE):
                return await self._route(stored_user, stored, again=True)
            await asyncio.sleep(0.05)

    def _store(
        self, identifiers: Sequence[Identifier], event: Event, record: EventRow
    ) -> tuple[Applied | None, RoutingReads | None]:
        """The track call applied with its event stored (:meth:`DbIdentities.apply`), then what
        routing reads, when the event is routed right away: one trip to a thread for both (a trip
        costs 0.1 to 0.15 ms of CPU). No reads when the event is a repeat, needs no routing or
        merged persons (the runs the merge ends are ended first), or when reading fails (routing
        reads again, and reports it)."""
        applied = self.identities.apply(identifiers, at=event.timestamp, record=record, upkeep=self._upkeep)
        if applied is None or record.routed_at is not None or applied.merged_away or applied.profile is None:
            return applied, None
        person, traits = applied.person, applied.profile.traits
        entries = self._entries(event, traits, person)
        try:
            return applied, self._read_routing(person, event, entries, new=applied.plan.created is not None)
        except TRANSIENT:
            return applied, None

    async def _newly_listened(self, name: str) -> bool:
        """Whether a journey version stored since this router last looked (by a newer API
        process) listens for ``name``; looked up at most once per :data:`ROUTABLE_FRESH`."""
        now = time.monotonic()
        if now - self._looked < ROUTABLE_FRESH:
            return False
        self._looked = now
        count = await asyncio.to_thread(stored_version_count, self.db)
        if count != self._versions:
            self._routable = self._routable | await asyncio.to_thread(listened_events, self.db)
            self._versions = count
        return name in self._routable

    async def route_unrouted(self, before: datetime) -> int:
        """Route every track event received before ``before`` whose routing never finished (its
        process died); how many were routed. One that fails again stays for the next time."""
        try:
            left = await asyncio.to_thread(self.events.unrouted, before=before)
        except TRANSIENT as exc:
            log.warning("unrouted events not read, so not routed until the next start: %s", exc)
            return 0
        routed = 0
        for user_id, event, _, kind in left:
            try:
                if kind == "track":
                    await self._route(user_id, event, again=True)
                else:
                    assert event.message_id is not None
                    await self._finish_merge(user_id, event.message_id)
            except NotRouted as exc:
                log.warning("event %s still not routed: %s", event.message_id, exc.__cause__)
                continue
            routed += 1
        return routed

    async def _route(
        self,
        user_id: str,
        event: Event,
        *,
        again: bool,
        profile: Profile | None = None,
        reads: RoutingReads | None = None,
    ) -> Routed:
        """Every route and journey gets the event, each on its own: one failing leaves the others
        routed, and the event unrouted, so routing it again reaches the one that failed.
        ``profile`` and ``reads``: as the call that stored the event found them, when it did."""
        assert event.message_id is not None, "the API assigns a message id to every event"
        failures: list[Exception] = []
        payload = event.to_dict()
        try:
            if again:  # merged since it was stored, perhaps by this very call
                user_id = await asyncio.to_thread(self.identities.survivor, user_id)
                await self._end_merged(await asyncio.to_thread(self.identities.merged_away, user_id))
            if profile is None:  # else as the call that stored the event left it
                profile = await asyncio.to_thread(self.profiles.read, user_id)
            if reads is None:
                # Once journeys it may start are checked in the same session when this is its first
                # routing (a retry first asks whether it started the run itself).
                entries = [] if again else self._entries(event, profile.traits, user_id)
                reads = await asyncio.to_thread(self._read_routing, user_id, event, entries)
        except TRANSIENT as exc:
            raise NotRouted(f"event {event.message_id} not routed: {exc}") from exc
        routes = reads.routes
        routed = Routed(rerouted=again, person=user_id)
        if event.name in self._goals:
            try:
                await self._convert_ended(user_id, event, profile.traits, routed, reads.ended)
            except TRANSIENT as exc:
                failures.append(exc)
        for route in routes:
            if event.name not in route.listens:
                continue
            try:
                if await self._signal(route.workflow_id, "event", payload):
                    routed.signalled.append(route.workflow_id)
            except TRANSIENT as exc:
                failures.append(exc)
        activations: list[Started] = []
        for journey in self.project.journeys.values():
            if trigger_matches(journey, event, profile.traits, user_id):
                if journey.id in reads.paused:  # runs in flight got the event above; no new run starts
                    routed.skipped.append(journey.id)
                    routed.skip_reasons[journey.id] = JOURNEY_PAUSED
                    continue
                key = run_key(journey, event, profile.traits, user_id)
                try:
                    await self._trigger(
                        journey,
                        user_id,
                        key,
                        payload,
                        routed,
                        again=again,
                        routes=routes,
                        ran=reads.ran.get((journey.id, key)),
                        activations=activations,
                        traits=profile.traits,
                    )
                except TRANSIENT as exc:
                    failures.append(exc)
        for journey in self._dated_by_event.get(event.name, ()):
            plan = date_plan(journey, event, profile.traits, user_id)
            if plan is not None:
                try:
                    await self._plan_date(journey, user_id, plan)
                except TRANSIENT as exc:
                    failures.append(exc)
        try:
            await self._finish_routing(activations, None if failures else event.message_id)
        except TRANSIENT as exc:
            failures.append(exc)
        if failures:
            raise NotRouted(
                f"event {event.message_id} not routed to {len(failures)} run(s): {failures[0]}"
            ) from failures[0]
        return routed

    def _entries(self, event: Event, traits: Mapping[str, Any], user_id: str) -> list[tuple[str, str]]:
        """The (journey, key) of each ``re_entry: once`` journey the event triggers: whether the
        person had a run of it is read with the routes."""
        return [
            (journey.id, run_key(journey, event, traits, user_id))
            for journey in self.project.journeys.values()
            if journey.re_entry == "once" and trigger_matches(journey, event, traits, user_id)
        ]

    def _read_routing(
        self, user_id: str, event: Event, entries: Sequence[tuple[str, str]], *, new: bool = False
    ) -> RoutingReads:
        """What routing the event reads, on one connection without a transaction (each read is one
        statement): the person's active routes, the paused journeys (when the event triggers
        some), ended runs it may convert, and for each of ``entries`` whether the person had a run.

        ``new``: the person was created by the call that stored the event (a first contact: a
        sign-up, a guest's order). Routes and runs are only ever written for a person who exists,
        and forgetting a person deletes their routes and takes their id off their runs, so such a
        person has none: only the paused journeys are read."""
        triggers = event.name in self._triggers
        goals = None if new else self._goals.get(event.name)
        if new and not triggers:  # nothing to read: no connection taken
            return RoutingReads(routes=[], paused=frozenset(), ended=[], ran=dict.fromkeys(entries, False))
        with self.db.autocommit() as session:
            return RoutingReads(
                routes=[] if new else active_routes(session, user_id),
                paused=paused_journeys(session) if triggers else frozenset(),
                ended=ended_runs_converting(session, user_id, goals, event.timestamp) if goals else [],
                ran={(journey, key): not new and had_run(session, journey, user_id, key) for journey, key in entries},
            )

    async def _finish_routing(self, activations: Sequence[Started], message_id: str | None) -> None:
        """The routes of the runs the event started made active, with the openings of those that
        wait first, then (``message_id``, when every route and journey had it) the event marked
        routed, committed after them, so a failure to mark it keeps the routes. Without openings
        (most events) these writes go with those of the other events finishing meanwhile
        (:meth:`_finish_together`); with them, the routes and openings commit together, on their own."""
        if not activations and message_id is None:
            return
        if all(started.opening is None for started in activations):
            await self._finishing.submit((activations, message_id))
            return
        await asyncio.to_thread(self._finish_opened, activations, message_id)

    def _finish_together(self, finished: Sequence[tuple[Sequence[Started], str | None]]) -> None:
        """Routing's last writes for ``finished`` events, with no openings among them: each write
        one statement that commits on its own (no ``BEGIN`` and ``COMMIT`` round trips), every
        route before any mark, so an event marked routed always has its routes. Safe to repeat
        (:class:`~nurture.service.groupcommit.GroupCommit` writes a failed group's events again
        one by one)."""
        routes = [started.route for activations, _ in finished for started in activations]
        marks = [message_id for _, message_id in finished if message_id is not None]
        with self.db.autocommit() as session:
            # In key order, as every API process writes them: two never wait on each other's rows.
            activate_routes(session, sorted(routes, key=lambda route: route["workflow_id"]))
            mark_routed(session, sorted(marks))

    def _finish_opened(self, activations: Sequence[Started], message_id: str | None) -> None:
        """:meth:`_finish_routing` where some run waits first: its routes and openings in one
        transaction, then the mark."""
        with self.db.session() as session:
            activate_routes(session, [started.route for started in activations])
            for started in activations:
                if started.opening is not None:
                    record_opening(session, *started.opening)
            if message_id is not None:
                session.commit()
                mark_routed(session, [message_id])

    async def identify(
        self,
        identifiers: Sequence[Identifier] | str,
        traits: Mapping[str, Any],
        *,
        message_id: str,
        event: Event,
        opted_out: OptOuts | None = None,
        kind: str = "identify",
        anonymous_id: str | None = None,
        explicit: bool = False,
        group: tuple[str, Mapping[str, Any]] | None = None,
    ) -> Applied | None:
        """Apply an identity call (``identify``, ``alias`` with ``explicit``, ``group`` with
        ``group``) in one transaction with its record: resolve or create the person, merge,
        merge traits and opt-outs, set the group; then end the runs a merge ends. ``None`` for a
        repeated ``message_id`` (which finishes ending them, if an earlier attempt did not).
        ``identifiers`` may be a userId: the call names it and the address traits.
        :class:`NotRouted` when a run could not be stopped: the retry finishes it."""
        if isinstance(identifiers, str):
            identifiers = call_identifiers(identifiers, None, traits)
        call = EventRow(
            message_id=message_id,
            kind=kind,
            anonymous_id=anonymous_id,
            name=None if group is None else group[0],
            properties=dict(traits if group is None else group[1]),
            timestamp=event.timestamp.astimezone(UTC),
            routed_at=utcnow(),
        )
        applied = await asyncio.to_thread(
            self.identities.apply,
            identifiers,
            at=event.timestamp,
            explicit=explicit,
            record=call,
            traits=traits,
            opted_out=opted_out,
            group=group,
            upkeep=self._upkeep,
        )
        if applied is None:
            left = await asyncio.to_thread(self.events.unrouted, message_id=message_id)
            for person, *_ in left:
                await self._finish_merge(person, message_id)
            if self._dated_by_traits and self.client is not None and identifiers:
                # A retry: the first attempt may have failed to tell the dates, so tell them again.
                first = identifiers[0]
                found = await asyncio.to_thread(self.identities.resolve, first.kind, first.value)
                if found is not None:
                    await self._plan_dates(found, None)
            return None
        if applied.merged_away:
            await self._finish_merge(applied.person, message_id, applied.merged_away)
        if self.client is not None:  # else routed by the API's audience upkeep once it connects
            await self._route_audience_events(applied.person, applied.events)
        merged = [gone for _, gone in applied.plan.merges]
        if self._dated_by_traits and self.client is not None and (merged or self._touches_dates(traits, group)):
            await self._plan_dates(applied.person, applied.profile, merged)
        return applied

    def _upkeep(
        self, session: Session, applied: Applied, record: EventRow | None, *, traits: bool, opt_outs: bool
    ) -> list[Event]:
        """Audience upkeep in the call's transaction (:meth:`DbIdentities.apply`): the events of
        the entries and exits it made, stored, for the caller to route."""
        if not self.audiences.audiences:
            return []
        merged = [gone for _, gone in applied.plan.merges]
        if merged:
            changes = self.audiences.merged(session, applied.person, merged)
        else:
            tracked = record is not None and record.kind == "track" and record.name in self.audiences.events
            if not (tracked or traits or opt_outs):
                return []
            assert applied.profile is not None
            event = None
            if tracked and record is not None and record.name is not None:
                event = Event(record.name, record.timestamp, record.properties, record.message_id)
            changes = self.audiences.upkeep(session, applied.profile, event=event, traits=traits, opt_outs=opt_outs)
        return [change.event for change in changes]

    async def _route_audience_events(self, person: str, events: Sequence[Event]) -> list[Routed]:
        """Route the entries and exits a call made like any event; one that fails stays stored
        unrouted, for :meth:`route_audience_events` to route (the call itself succeeded)."""
        done = []
        for event in events:
            if event.name not in self._routable or self.client is None:
                continue
            try:
                done.append(await self._route(person, event, again=False))
            except NotRouted as exc:
                log.warning("audience event %s kept unrouted: %s", event.message_id, exc.__cause__)
        return done

    async def _route_changes(self, changes: Sequence[Change]) -> None:
        by_person: dict[str, list[Event]] = {}
        for change in changes:
            by_person.setdefault(change.person, []).append(change.event)
        for person, events in by_person.items():
            await self._route_audience_events(person, events)

    async def sweep_audiences(self, now: datetime | None = None) -> list[Change]:
        """The time sweep (people whose membership changes with time alone, and people whose
        traits or opt-outs changed outside the API), then its entries and exits routed."""
        changes = await asyncio.to_thread(self.audiences.sweep, now)
        await self._route_changes(changes)
        return changes

    async def evaluate_audiences(self) -> list[Evaluated]:
        """Evaluate every audience version not yet evaluated over the stored population (a new
        audience finds the people who qualified before it existed), then route the entries."""
        done = []
        for audience in await asyncio.to_thread(self.audiences.deploy):
            evaluated = await asyncio.to_thread(self.audiences.evaluate_all, audience.id)
            log.info(
                "audience %s (version %s) evaluated from scratch: %d members, %d changes",
                audience.id,
                audience.version,
                evaluated.members,
                len(evaluated.changes),
            )
            await self._route_changes(evaluated.changes)
            done.append(evaluated)
        return done

    async def route_audience_events(self) -> int:
        """Route the audience events left unrouted (Temporal was down, or they were made outside
        a call), once older than :data:`ROUTING_GRACE`; how many were routed."""
        before = datetime.now(UTC) - timedelta(seconds=ROUTING_GRACE)
        left = await asyncio.to_thread(self.events.unrouted, before=before, names=sorted(AUDIENCE_EVENTS))
        routed = 0
        for user_id, event, _, _ in left:
            try:
                await self._route(user_id, event, again=True)
            except NotRouted as exc:
                log.warning("audience event %s still not routed: %s", event.message_id, exc.__cause__)
                continue
            routed += 1
        return routed

    async def _finish_merge(self, person: str, message_id: str, ending: Sequence[str] | None = None) -> None:
        """Stop the runs a merge ends (``ending``, else the person's as they are now), then mark
        the call that merged routed."""
        try:
            if ending is None:
                person = await asyncio.to_thread(self.identities.survivor, person)
                ending = await asyncio.to_thread(self.identities.merged_away, person)
            await self._end_merged(ending)
            await asyncio.to_thread(self.events.routed, message_id)
        except TRANSIENT as exc:
            raise NotRouted(f"call {message_id} merged people but did not end their runs: {exc}") from exc

    async def _end_merged(self, workflow_ids: Sequence[str]) -> None:
        """Send each run a merge ends the ``stop`` signal (reason ``merged``) and deactivate its
        route; a run already gone is done with."""
        if not workflow_ids:
            return
        if self.client is None:
            raise NotRouted(f"{len(workflow_ids)} run(s) to end after a merge need Temporal")
        for wid in workflow_ids:
            try:
                await self._signal(wid, "stop", MERGED)
            except TRANSIENT as exc:
                raise NotRouted(f"run {wid} not stopped after a merge: {exc}") from exc
            await asyncio.to_thread(self.routes.deactivate, wid)

    def _touches_dates(self, traits: Mapping[str, Any], group: tuple[str, Mapping[str, Any]] | None) -> bool:
        """Whether a call with these traits (or this group) may change a date read from the traits:
        a name it sets appears in a date trigger's expressions, or it moves the person's zone. Text
        is compared, so a name that merely looks alike also counts (one harmless signal more)."""
        names = {*traits, *(("group",) if group is not None else ())}
        return "timezone" in names or any(name in self._date_sources for name in names)

    async def _plan_dates(self, person: str, profile: Profile | None, merged: Sequence[str] = ()) -> None:
        """Date triggers reading the person's traits wait for the date the traits now hold; those
        of people merged into them wait for nothing (the survivor's traits say what is waited for).
        :class:`NotRouted` when Temporal cannot be told: the retry of the call tells them."""
        if profile is None:
            profile = await asyncio.to_thread(self.profiles.read, person)
        try:
            for journey in self._dated_by_traits:
                plan = date_plan(journey, None, profile.traits, person)
                if plan is None:
                    continue
                for gone in merged:
                    await self._plan_date(journey, gone, DatePlan(plan.key, None, plan.timezone))
                await self._plan_date(journey, person, plan)
        except TRANSIENT as exc:
            raise NotRouted(f"the dates of {person}'s traits were not told: {exc}") from exc

    async def _plan_date(self, journey: Journey, user_id: str, plan: DatePlan) -> None:
        """Tell the (journey, person, key)'s date trigger workflow what to wait for, starting it."""
        assert self.client is not None, "date triggers need a Temporal client"
        wid = workflow_id(journey.id, user_id, plan.key, prefix="nurture-date")
        if plan.date is None:  # nothing to wait for: tell a waiting one, start none
            with contextlib.suppress(RPCError):
                await self.client.get_workflow_handle(wid).signal(PLAN_SIGNAL, plan.to_dict())
            return
        # Recorded first, so forgetting the person finds every workflow that may hold their id.
        await asyncio.to_thread(self.date_triggers.add, wid, user_id=user_id, journey=journey.id)
        await self.client.start_workflow(
            DATE_WORKFLOW,
            date_params(journey, user_id, plan),
            id=wid,
            task_queue=self.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            start_signal=PLAN_SIGNAL,
            start_signal_args=[plan.to_dict()],
        )

    async def date_reached(self, journey: str, user_id: str, key: str, event: Event) -> None:
        """A date trigger's moment (the worker's ``nurture.date_reached`` activity): the journey is
        triggered as by an event, re-entry rules included. Routing it twice (a retried activity)
        starts one run: the moment's event id is recorded with the run."""
        deployed = self.project.journeys.get(journey)
        if deployed is None or deployed.date_trigger is None:
            log.info("date of %s reached, but journey %s no longer starts on a date", user_id, journey)
            return
        if journey in await asyncio.to_thread(self.paused.all):
            log.info("date of %s reached, but journey %s is paused: no run starts", user_id, journey)
            return
        person = await asyncio.to_thread(self.identities.survivor, user_id)  # merged since, perhaps
        routes = await asyncio.to_thread(self.routes.active_for, person)
        await self._trigger(deployed, person, key, event.to_dict(), Routed(), again=True, routes=routes)

    async def _convert_ended(
        self, user_id: str, event: Event, traits: Mapping[str, Any], routed: Routed, ended: Sequence[EndedRun]
    ) -> None:
        """Conversions of the user's ended runs whose goal window is still open (no workflow is
        kept alive for them; ``ended``, read with the routes); each run converts once, so routing
        the event again adds nothing."""
        for run in ended:
            effect = late_conversion(self._converting[run.journey], run, event, traits)
            if effect is None:
                continue
            if await asyncio.to_thread(self.recorder.convert, run.run_id, event.timestamp, effect.value):
                routed.converted.append(run.run_id)
                count_conversion(late_record(run, event, effect))

    async def _trigger(
        self,
        journey: Journey,
        user_id: str,
        key: str,
        event: dict[str, Any],
        routed: Routed,
        *,
        again: bool,
        routes: Sequence[ActiveRoute] = (),
        ran: bool | None = None,
        activations: list[Started] | None = None,
        traits: Mapping[str, Any] | None = None,
    ) -> None:
        """Trigger ``journey`` for the person: its run started (:func:`start_run`), unless the
        re-entry rule keeps them out. ``ran``: whether (journey, person, key) had a run, when read
        already. ``activations``: where the started run's route goes, with its opening when it
        waits first (:data:`~workflows.journey.OPENED`), for the caller to write; else the route
        is made active here and the run records its own opening. ``traits``: the person's, as
        just read; the run gets them when it would read them first
        (:data:`~workflows.journey.TRAITS`)."""
        wid = workflow_id(journey.id, user_id, key)
        for route in routes:
            # A run that moved to this person in a merge, under the merged-away person's workflow
            # id: the trigger goes to it, which applies the re-entry rule.
            if route.journey == journey.id and route.key == key and route.workflow_id != wid:
                trigger = {"event": event, "journey": self._payloads[journey.id]}
                if await self._signal(route.workflow_id, "trigger", trigger):
                    routed.triggered.append(route.workflow_id)
                    return
        started = await asyncio.to_thread(run_started_by, self.db, journey.id, event["message_id"]) if again else None
        if started == "ended":
            # The first routing started it, then failed elsewhere or died: another start would
            # be a second run.
            routed.triggered.append(wid)
            return
        once = journey.re_entry == "once"
        # A run this event started and that is still active gets its trigger again (it ignores
        # it) and its route; any other earlier run means ``once`` keeps the user out.
        if once and started is None and (
            ran if ran is not None else await asyncio.to_thread(has_run, self.db, journey.id, user_id, key)
        ):
            routed.skipped.append(journey.id)
            routed.skip_reasons[journey.id] = RE_ENTRY_ONCE
            return
        # re_entry: {after}: no new run until that long after the latest one entered.
        if journey.re_entry_after and started is None:
            entered = await asyncio.to_thread(last_entry, self.db, journey.id, user_id, key)
            if too_soon(journey, entered, datetime.now(UTC)):
                routed.skipped.append(journey.id)
                routed.skip_reasons[journey.id] = RE_ENTRY_AFTER
                return
        # A run that waits first is opened here (its start and first steps written with its route).
        params, opens = new_run(
            journey, self._payloads[journey.id], user_id, key, event, traits, datetime.now(UTC), opens=activations is not None
        )
        assert self.client is not None, "routing track events needs a Temporal client"
        try:
            run_id = await start_run(
                self.client,
                params,
                wid=wid,
                task_queue=self.task_queue,
                once=once,
                running=any(route.workflow_id == wid for route in routes),
            )
        except WorkflowAlreadyStartedError:
            routed.skipped.append(journey.id)
            routed.skip_reasons[journey.id] = RE_ENTRY_ONCE
            return
        activation = Activation(
            workflow_id=wid, user_id=user_id, journey=journey.id, key=key, listens=self._listens[journey.id]
        )
        if activations is None:
            await asyncio.to_thread(self.routes.activate, **activation)
        else:
            opened = opens.records(run_id, wid) if opens is not None and run_id is not None else None
            activations.append(Started(activation, opened))
        routed.triggered.append(wid)

    async def _signal(self, wid: str, name: str, payload: Mapping[str, Any] | str) -> bool:
        assert self.client is not None, "routing track events needs a Temporal client"
        try:
            await self.client.get_workflow_handle(wid).signal(name, payload)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            log.info("route %s had no running workflow; deactivated", wid)
            await asyncio.to_thread(self.routes.deactivate, wid)
            return False
        return True
