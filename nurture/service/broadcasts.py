"""Driving a broadcast occurrence: stream the audience, start one journey run per member, paced.

:class:`Broadcaster` is used by ``nurture broadcast start|cancel|status``, by the API's
``/v1/broadcasts/{id}`` endpoints and by the API's scheduler (:meth:`Broadcaster.run_schedules`),
which starts the occurrences of scheduled broadcasts as they fall due.

One occurrence is driven by one process at a time: the driver holds a lease on the occurrence's
row (renewed every few seconds; a driver that dies loses it when it runs out) and writes its
cursor only while it holds it. It reads the audience a page at a time in person order
(``audience_members``, keyset paging), starts each member's run with the workflow id of
(broadcast, occurrence, person) and a reject-duplicate policy, and moves the cursor past a page
once every run of it has been started. Starting again (a crash, a second command) goes on after
the cursor; the page it died in is started again and Temporal refuses the runs that exist. So each
member gets one run per occurrence, and a run sends each step once (its send ledger).

Starts are paced by the broadcast's ``rate`` (evenly spaced) and bounded to
:data:`CONCURRENCY` calls in flight. Cancelling marks the occurrence ``cancelled``; its driver
stops starting at its next lease renewal (and stops the runs of the page in flight), then every
active run of the occurrence is sent the ``stop`` signal and ends with reason
``broadcast_cancelled``: a message a run already sent stays sent, nothing more goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from nurture.engine.interpreter import workflow_id
from nurture.engine.model import Event
from nurture.language import ir
from nurture.language.broadcasts import (
    CATCH_UP,
    Broadcast,
    Occurrence,
    current_occurrence,
    occurrence_journey,
)
from nurture.language.compiler import Project
from nurture.language.diagnostics import did_you_mean
from nurture.storage.broadcasts import (
    Occurrences,
    Progress,
    activate_routes,
    active_run_ids,
    members_after,
    progress,
)
from nurture.storage.db import Database
from nurture.storage.models import BroadcastOccurrence
from nurture.storage.stores import store_versions
from workflows.journey import WORKFLOW_NAME, run_input

log = logging.getLogger("nurture.broadcast")

PAGE = 500
"""Members read per page of the audience (and the most run starts between two cursor writes)."""
CONCURRENCY = 64
"""Run starts in flight at once, whatever the rate."""
LEASE = timedelta(seconds=30)
"""How long a driver's hold on an occurrence lasts without renewal (renewed every third of it)."""
CANCELLED = "broadcast_cancelled"
"""The end reason of runs stopped by cancelling their occurrence."""
EVENT = "Broadcast"
"""The name of the event a broadcast run starts with (``event.properties`` has ``broadcast`` and
``occurrence``)."""


class BroadcastError(Exception):
    """A broadcast that cannot be started, cancelled or shown; the message says why."""


class Busy(BroadcastError):
    """Another process drives the occurrence now."""


@dataclass(frozen=True)
class Started:
    """What one drive of an occurrence did."""

    occurrence: str
    status: str
    """``done``, ``cancelled``, ``lost`` (the lease went to another driver) or ``stopped`` (asked to)."""
    started: int
    existing: int


def owner_name() -> str:
    """This driver's name in the lease: host, process and a random part."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Pacer:
    """Evenly spaced permits: one every ``spacing`` seconds (none with no spacing)."""

    def __init__(self, spacing: float) -> None:
        self.spacing = spacing
        self._next = time.monotonic()

    async def wait(self) -> None:
        if self.spacing <= 0:
            return
        now = time.monotonic()
        at = max(self._next, now)
        self._next = at + self.spacing
        if at > now:
            await asyncio.sleep(at - now)


class Broadcaster:
    """Starts, cancels and reports a project's broadcasts against one database and Temporal."""

    def __init__(
        self,
        project: Project,
        db: Database,
        client: Client | None,
        task_queue: str,
        *,
        page: int = PAGE,
        concurrency: int = CONCURRENCY,
        lease: timedelta = LEASE,
    ) -> None:
        self.project = project
        self.db = db
        self.client = client
        self.task_queue = task_queue
        self.page = page
        self.concurrency = concurrency
        self.lease = lease
        self.occurrences = Occurrences(db)
        self._driving: dict[tuple[str, str], asyncio.Task[Started]] = {}

    def broadcast(self, broadcast_id: str) -> Broadcast:
        found = self.project.broadcasts.get(broadcast_id)
        if found is None:
            known = ", ".join(sorted(self.project.broadcasts)) or "none"
            raise BroadcastError(
                f"unknown broadcast '{broadcast_id}'{did_you_mean(broadcast_id, self.project.broadcasts)} "
                f"(broadcasts: {known})"
            )
        return found

    def occurrence(self, broadcast: Broadcast, now: datetime | None = None) -> Occurrence:
        """The occurrence a start now starts."""
        found = current_occurrence(broadcast, now or datetime.now(UTC), self.project.settings.timezone)
        if found is None:
            assert broadcast.schedule is not None
            raise BroadcastError(
                f"broadcast '{broadcast.id}' has no occurrence due in the last day "
                f"(cron: {broadcast.schedule.written}); the API starts each one when it falls due"
            )
        return found

    def open(self, broadcast: Broadcast, occurrence: Occurrence) -> BroadcastOccurrence:
        """The occurrence's row, created by the first start."""
        journey = occurrence_journey(broadcast, occurrence.moment)
        row = self.occurrences.open(
            broadcast.id,
            occurrence.key,
            audience=broadcast.audience,
            journey=ir.journey_to_dict(journey),
            version=journey.version,
        )
        # Stored like a deployed journey version: every API process routes the events its runs
        # listen for, and `nurture migrate` can move them.
        store_versions(self.db, [ir.journey_from_dict(row.journey)])
        return row

    async def start(
        self,
        broadcast_id: str,
        *,
        occurrence: Occurrence | None = None,
        owner: str | None = None,
        on_page: Callable[[BroadcastOccurrence], Awaitable[None] | None] | None = None,
    ) -> Started:
        """Drive an occurrence (by default the one due now) until every member is started, it is
        cancelled, or the lease is lost. :class:`Busy` when another driver holds it."""
        broadcast = self.broadcast(broadcast_id)
        chosen = occurrence or self.occurrence(broadcast)
        row = await asyncio.to_thread(self.open, broadcast, chosen)
        if row.status != "running":
            return Started(row.occurrence, row.status, 0, 0)
        me = owner or owner_name()
        if not await asyncio.to_thread(self.occurrences.acquire, broadcast.id, row.occurrence, me, self.lease):
            current = await asyncio.to_thread(self.occurrences.get, broadcast.id, row.occurrence)
            if current is not None and current.status != "running":
                return Started(current.occurrence, current.status, 0, 0)
            holder = "another process" if current is None else current.lease_owner
            raise Busy(f"broadcast '{broadcast.id}' ({row.occurrence}) is being started by {holder}")
        return await _Drive(self, broadcast, row, me, on_page).run()

    def drives(self, broadcast_id: str, occurrence: str) -> bool:
        """Whether this process is driving the occurrence now."""
        task = self._driving.get((broadcast_id, occurrence))
        return task is not None and not task.done()

    def spawn(self, broadcast_id: str, occurrence: Occurrence | None = None) -> asyncio.Task[Started] | None:
        """Drive in the background (the API), once per occurrence per process; ``None`` when this
        process already drives it."""
        broadcast = self.broadcast(broadcast_id)
        chosen = occurrence or self.occurrence(broadcast)
        key = (broadcast.id, chosen.key)
        running = self._driving.get(key)
        if running is not None and not running.done():
            return None
        task = asyncio.create_task(self.start(broadcast.id, occurrence=chosen))
        self._driving[key] = task
        task.add_done_callback(_log_outcome)
        return task

    async def cancel(self, broadcast_id: str, occurrence: str | None = None) -> tuple[BroadcastOccurrence, int]:
        """Cancel an occurrence (by default the latest): no more runs start, and every active run
        ends with reason ``broadcast_cancelled``. The occurrence and how many runs were stopped."""
        broadcast = self.broadcast(broadcast_id)
        row = await asyncio.to_thread(self._row, broadcast, occurrence)
        await asyncio.to_thread(self.occurrences.cancel, broadcast.id, row.occurrence)
        # The driver, wherever it runs, notices at its next renewal and lets go of the lease.
        deadline = time.monotonic() + self.lease.total_seconds() + 1
        while time.monotonic() < deadline and await asyncio.to_thread(self.occurrences.held, broadcast.id, row.occurrence):
            await asyncio.sleep(0.2)
        stopped = await self.stop_runs(broadcast, row.occurrence)
        final = await asyncio.to_thread(self.occurrences.get, broadcast.id, row.occurrence)
        assert final is not None
        return final, stopped

    async def stop_runs(self, broadcast: Broadcast, occurrence: str) -> int:
        """Send ``stop`` (``broadcast_cancelled``) to every active run of the occurrence."""
        client = self._client()
        journey, after, stopped = broadcast.journey.id, None, 0
        while True:
            ids = await asyncio.to_thread(active_run_ids, self.db, journey, occurrence, after, self.page)
            if not ids:
                return stopped
            stopped += sum(await asyncio.gather(*(_stop(client, wid) for wid in ids)))
            after = ids[-1]

    def status(self, broadcast_id: str, occurrence: str | None = None) -> Progress:
        broadcast = self.broadcast(broadcast_id)
        row = self._row(broadcast, occurrence)
        return progress(self.db, row, broadcast.journey.id)

    def _row(self, broadcast: Broadcast, occurrence: str | None) -> BroadcastOccurrence:
        row = (
            self.occurrences.latest(broadcast.id)
            if occurrence is None
            else self.occurrences.get(broadcast.id, occurrence)
        )
        if row is None:
            which = "" if occurrence is None else f" occurrence {occurrence}"
            raise BroadcastError(f"broadcast '{broadcast.id}'{which} has not been started")
        return row

    def _client(self) -> Client:
        if self.client is None:
            raise BroadcastError("broadcasts need Temporal: it is not connected")
        return self.client

    async def run_schedules(self, every: float = 30.0) -> None:
        """The API's scheduler: every ``every`` seconds, start each scheduled broadcast's
        occurrence that is due (each at most once: the occurrence row and the lease see to it)."""
        while True:
            await self.start_due(datetime.now(UTC))
            await asyncio.sleep(every)

    async def start_due(self, now: datetime) -> list[str]:
        """Spawn a driver for every scheduled occurrence due at ``now`` and not finished; their keys."""
        spawned = []
        for broadcast in self.project.broadcasts.values():
            if broadcast.schedule is None:
                continue
            found = current_occurrence(broadcast, now, self.project.settings.timezone)
            if found is None or found.due is None or found.due > now or now - found.due > CATCH_UP:
                continue
            row = await asyncio.to_thread(self.occurrences.get, broadcast.id, found.key)
            if row is not None and (row.status != "running" or self.occurrences.held(broadcast.id, found.key)):
                continue
            if self.spawn(broadcast.id, found) is not None:
                spawned.append(f"{broadcast.id}/{found.key}")
        return spawned



def _log_outcome(task: asyncio.Task[Started]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if isinstance(error, Busy):
        log.info("%s", error)
    elif error is not None:
        log.error("broadcast driver failed: %s", error, exc_info=error)
    else:
        done = task.result()
        log.info("broadcast occurrence %s %s: %d started", done.occurrence, done.status, done.started)


async def _stop(client: Client, wid: str) -> int:
    try:
        await client.get_workflow_handle(wid).signal("stop", CANCELLED)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return 0
    return 1


class _Drive:
    """One driver's pass over an occurrence (it holds the lease)."""

    def __init__(
        self,
        broadcaster: Broadcaster,
        broadcast: Broadcast,
        row: BroadcastOccurrence,
        owner: str,
        on_page: Callable[[BroadcastOccurrence], Awaitable[None] | None] | None,
    ) -> None:
        self.b = broadcaster
        self.broadcast = broadcast
        self.row = row
        self.owner = owner
        self.on_page = on_page
        self.journey = ir.journey_from_dict(row.journey)
        self.payload = ir.journey_payload(self.journey)  # a run's input: the compact form
        self.listens = sorted(self.journey.listens_for())
        self.pacer = Pacer(broadcast.rate.spacing if broadcast.rate is not None else 0.0)
        self.slots = asyncio.Semaphore(broadcaster.concurrency)
        self.stop: str | None = None
        self.event = Event(
            EVENT,
            row.created_at,
            {"broadcast": broadcast.id, "occurrence": row.occurrence},
            f"broadcast:{broadcast.id}:{row.occurrence}",
        ).to_dict()

    async def run(self) -> Started:
        keeper = asyncio.create_task(self._keep_lease())
        started = existing = 0
        clean = False
        try:
            cursor = self.row.cursor
            while self.stop is None:
                people = await asyncio.to_thread(
                    members_after, self.b.db, self.broadcast.audience, cursor, self.b.page
                )
                if not people:
                    break
                outcomes = await asyncio.gather(*(self._start_one(person) for person in people))
                new = [(wid, person) for person, (wid, how) in zip(people, outcomes, strict=True) if how == "started"]
                had = sum(1 for _, how in outcomes if how == "existing")
                if self.stop == "cancelled":  # runs of this page may not have recorded themselves yet
                    await asyncio.gather(*(_stop(self.b._client(), wid) for wid, _ in new))
                if self.listens:
                    await asyncio.to_thread(
                        activate_routes,
                        self.b.db,
                        new,
                        journey=self.journey.id,
                        key=self.row.occurrence,
                        listens=self.listens,
                    )
                # A page cut short (stopped meanwhile) keeps the cursor: a later driver does it again.
                whole = all(how != "skipped" for _, how in outcomes)
                cursor = people[-1] if whole else cursor
                moved = await asyncio.to_thread(
                    self.b.occurrences.advance,
                    self.broadcast.id,
                    self.row.occurrence,
                    self.owner,
                    cursor,
                    len(new),
                    had,
                )
                started += len(new)
                existing += had
                if not moved:
                    self.stop = self.stop or "lost"
                if self.on_page is not None:
                    current = await asyncio.to_thread(self.b.occurrences.get, self.broadcast.id, self.row.occurrence)
                    maybe = self.on_page(current or self.row)
                    if maybe is not None:
                        await maybe
            if self.stop is None:
                await asyncio.to_thread(self.b.occurrences.finish, self.broadcast.id, self.row.occurrence, self.owner)
            clean = True
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if clean or self.stop is not None:
                await asyncio.to_thread(self.b.occurrences.release, self.broadcast.id, self.row.occurrence, self.owner)
        status = "done" if self.stop is None else self.stop
        return Started(self.row.occurrence, status, started, existing)

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self.b.lease.total_seconds() / 3)
            if not await asyncio.to_thread(
                self.b.occurrences.renew, self.broadcast.id, self.row.occurrence, self.owner, self.b.lease
            ):
                current = await asyncio.to_thread(self.b.occurrences.get, self.broadcast.id, self.row.occurrence)
                self.stop = "cancelled" if current is not None and current.status == "cancelled" else "lost"
                return

    async def _start_one(self, person: str) -> tuple[str, str]:
        """Start ``person``'s run: its workflow id, and ``started``, ``existing`` (Temporal has
        it already) or ``skipped`` (the driver was stopped first)."""
        wid = workflow_id(self.journey.id, person, self.row.occurrence)
        async with self.slots:
            if self.stop is not None:
                return wid, "skipped"
            await self.pacer.wait()
            if self.stop is not None:
                return wid, "skipped"
            try:
                await self.b._client().start_workflow(
                    WORKFLOW_NAME,
                    run_input(self.payload, person, self.row.occurrence, self.event),
                    id=wid,
                    task_queue=self.b.task_queue,
                    id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                )
            except WorkflowAlreadyStartedError:
                return wid, "existing"
        return wid, "started"
