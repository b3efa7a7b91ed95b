"""Event routing for the service: from an accepted event to workflow signals, without scans.

A ``track`` event first reaches the user's active runs that listen for its name (goal,
``exit_on``, ``wait_for``), found through the ``routes`` table by user id. Then every journey it
triggers gets a signal-with-start on the workflow id of (journey, user, key): that starts a run
when none is active, and otherwise reaches the active run, which applies the re-entry rule
(``restart`` ends itself and continues as a new run; ``after_exit`` and ``once`` ignore it).
``once`` is also checked against the ``runs`` table, so it holds beyond Temporal's retention.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from nurture.engine.interpreter import run_key, trigger_matches, workflow_id
from nurture.engine.model import Event
from nurture.language.compiler import Project
from nurture.language.ir import Journey, journey_to_dict
from nurture.storage.db import Database
from nurture.storage.stores import DbProfiles, Events, OptOuts, Routes, has_run
from workflows.journey import WORKFLOW_NAME

log = logging.getLogger("nurture.ingest")


@dataclass
class Routed:
    """What one event did."""

    duplicate: bool = False
    """The ``messageId`` was seen before: nothing happened."""
    triggered: list[str] = field(default_factory=list)
    """Workflow ids that got a trigger (started, or judged by the active run)."""
    signalled: list[str] = field(default_factory=list)
    """Workflow ids of active runs the event was delivered to."""
    skipped: list[str] = field(default_factory=list)
    """Journeys the event matched but could not enter (``once``)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "duplicate": self.duplicate,
            "triggered": self.triggered,
            "signalled": self.signalled,
            "skipped": self.skipped,
        }


class Ingest:
    """Accepts events and identifies for a compiled project."""

    def __init__(self, project: Project, db: Database, client: Client | None, task_queue: str) -> None:
        """``client`` may be ``None`` for a profile-only router (identify works without Temporal)."""
        self.project = project
        self.db = db
        self.client = client
        self.task_queue = task_queue
        self.events = Events(db)
        self.routes = Routes(db)
        self.profiles = DbProfiles(db)
        self._payloads = {j.id: journey_to_dict(j) for j in project.journeys.values()}
        self._listens = {j.id: sorted(j.listens_for()) for j in project.journeys.values()}

    async def track(self, user_id: str, event: Event) -> Routed:
        """Store the event (once per message id) and route it."""
        assert event.message_id is not None, "the API assigns a message id to every event"
        fresh = await asyncio.to_thread(
            self.events.add,
            message_id=event.message_id,
            kind="track",
            user_id=user_id,
            name=event.name,
            properties=event.properties,
            timestamp=event.timestamp,
        )
        if not fresh:
            return Routed(duplicate=True)
        try:
            return await self._route(user_id, event)
        except RPCError:
            # Stored but not (fully) routed: forget it so the client's retry, with the same
            # messageId, is routed instead of dropped as a duplicate. Runs ignore repeats.
            await asyncio.to_thread(self.events.forget, event.message_id)
            raise

    async def _route(self, user_id: str, event: Event) -> Routed:
        routed = Routed()
        payload = event.to_dict()
        for route in await asyncio.to_thread(self.routes.active_for, user_id):
            if event.name in route.listens and await self._signal(route.workflow_id, "event", payload):
                routed.signalled.append(route.workflow_id)
        profile = await asyncio.to_thread(self.profiles.read, user_id)
        for journey in self.project.journeys.values():
            if trigger_matches(journey, event, profile.traits, user_id):
                key = run_key(journey, event, profile.traits, user_id)
                await self._trigger(journey, user_id, key, payload, routed)
        return routed

    async def identify(
        self,
        user_id: str,
        traits: Mapping[str, Any],
        *,
        message_id: str,
        event: Event,
        opted_out: OptOuts | None = None,
    ) -> bool:
        """Merge traits (and opt-outs) into the profile in one transaction; ``False`` for a
        repeated ``message_id``."""
        fresh = await asyncio.to_thread(
            self.events.add,
            message_id=message_id,
            kind="identify",
            user_id=user_id,
            name=None,
            properties=dict(traits),
            timestamp=event.timestamp,
        )
        if fresh:
            await asyncio.to_thread(self.profiles.merge, user_id, traits, opted_out)
        return fresh

    async def _trigger(
        self, journey: Journey, user_id: str, key: str, event: dict[str, Any], routed: Routed
    ) -> None:
        wid = workflow_id(journey.id, user_id, key)
        once = journey.re_entry == "once"
        if once and await asyncio.to_thread(has_run, self.db, journey.id, user_id, key):
            routed.skipped.append(journey.id)
            return
        params = {"journey": self._payloads[journey.id], "user_id": user_id, "key": key, "event": event}
        assert self.client is not None, "routing track events needs a Temporal client"
        try:
            await self.client.start_workflow(
                WORKFLOW_NAME,
                params,
                id=wid,
                task_queue=self.task_queue,
                id_reuse_policy=(
                    WorkflowIDReusePolicy.REJECT_DUPLICATE if once else WorkflowIDReusePolicy.ALLOW_DUPLICATE
                ),
                start_signal="trigger",
                start_signal_args=[{"event": event, "journey": self._payloads[journey.id]}],
            )
        except WorkflowAlreadyStartedError:
            routed.skipped.append(journey.id)
            return
        await asyncio.to_thread(
            self.routes.activate,
            wid,
            user_id=user_id,
            journey=journey.id,
            key=key,
            listens=self._listens[journey.id],
        )
        routed.triggered.append(wid)

    async def _signal(self, wid: str, name: str, payload: Mapping[str, Any]) -> bool:
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
