"""Date triggers on Temporal: one small workflow per (journey, person, key) waits for the moment.

A router that sees a date (an event carrying it, or a change of the person's traits) sends the
plan with signal-with-start on the workflow id ``<prefix>-date/<journey>/<user>/<key>``: the first
plan starts the workflow, a later one (a new date, or none) replaces what it waits for. At the
moment, the ``nurture.date_reached`` activity gives the router the trigger, which it applies like
any other (re-entry rules included); a yearly trigger then waits for the next year's moment, in a
fresh history each year.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from temporalio import activity, workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from nurture.engine.clock import format_instant, parse_instant
    from nurture.engine.interpreter import DatePlan, date_event, next_date_moment
    from nurture.engine.model import Event
    from nurture.language import ir

DATE_WORKFLOW = "DateTrigger"
PLAN_SIGNAL = "plan"

REACHED_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    maximum_attempts=0,
)
"""An outage of the router delays the entry, never drops it."""


class DateRouter(Protocol):
    """Applies a date trigger's moment: the service's event router, or the scenario runtime's."""

    async def date_reached(self, journey: str, user_id: str, key: str, event: Event) -> None: ...


class DateActivities:
    """The date trigger's activity, bound to the router that starts runs."""

    def __init__(self, router: DateRouter | None = None) -> None:
        self.router = router

    @activity.defn(name="nurture.date_reached")
    async def date_reached(self, payload: dict[str, Any]) -> None:
        """The moment has come: trigger the journey for the person and key."""
        assert self.router is not None, "no router for date triggers"
        event = Event.from_dict(payload["event"])
        await self.router.date_reached(payload["journey"], payload["user_id"], payload["key"], event)

    def all(self) -> Sequence[Callable[..., Any]]:
        return [self.date_reached]


def date_params(
    journey: ir.Journey, user_id: str, plan: DatePlan, *, until: datetime | None = None, clock_offset: float = 0
) -> dict[str, Any]:
    """The workflow's input for ``plan`` (``until``: no run starts after it; scenarios only)."""
    assert journey.date_trigger is not None
    return {
        "journey": journey.id,
        "trigger": ir.to_dict(journey.date_trigger),
        "user_id": user_id,
        "plan": plan.to_dict(),
        "until": None if until is None else format_instant(until),
        "clock_offset": clock_offset,
    }


@workflow.defn(name=DATE_WORKFLOW)
class DateTriggerWorkflow:
    """Waits for the moment of a date trigger's latest plan and reports it to the router."""

    def __init__(self) -> None:
        self._plans: list[dict[str, Any]] = []
        self._signals = 0
        self._handled = 0
        self._next: datetime | None = None
        self._fired = 0

    @workflow.signal(name=PLAN_SIGNAL)
    def plan(self, plan: dict[str, Any]) -> None:
        """A new plan (the date as the router now reads it) replaces the one waited for."""
        self._signals += 1
        self._plans.append(plan)

    @workflow.query(name="progress")
    def progress(self) -> dict[str, Any]:
        """Signals seen and handled, and the next moment (``None``: it is about to end)."""
        return {
            "signals": self._signals,
            "handled": self._handled,
            "next": None if self._next is None else format_instant(self._next),
            "fired": self._fired,
        }

    @workflow.run
    async def run(self, params: dict[str, Any]) -> int:
        trigger = ir.from_dict(ir.DateTrigger, params["trigger"])
        plan = DatePlan.from_dict(params["plan"])
        until = None if params.get("until") is None else parse_instant(params["until"])
        offset = timedelta(seconds=float(params.get("clock_offset", 0)))
        since = parse_instant(params["since"]) if params.get("since") else workflow.now() + offset
        after = bool(params.get("after"))
        fired: datetime | None = None
        while True:
            if self._plans:  # the latest plan wins; its moment is counted from now
                plan = DatePlan.from_dict(self._plans[-1])
                self._handled += len(self._plans)
                self._plans.clear()
                now = workflow.now() + offset
                # A moment that has just started a run is not taken again.
                since, after = now, fired is not None and fired >= now
            moment = None
            if plan.date is not None:
                moment = next_date_moment(trigger, plan.date, plan.timezone, since=since, after=after)
            if moment is None or (until is not None and moment > until):
                self._next = None
                if self._plans:
                    continue
                return self._fired
            self._next = moment
            remaining = (moment - (workflow.now() + offset)).total_seconds()
            if remaining > 0:
                try:
                    await workflow.wait_condition(lambda: bool(self._plans), timeout=remaining)
                    continue
                except TimeoutError:
                    pass
            event = date_event(params["journey"], params["user_id"], plan, moment)
            await workflow.execute_activity(
                "nurture.date_reached",
                {"journey": params["journey"], "user_id": params["user_id"], "key": plan.key, "event": event.to_dict()},
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=REACHED_RETRY,
            )
            self._fired += 1
            fired = moment
            if not trigger.yearly:
                since, after = moment, True  # nothing more of this plan; a new plan may follow
                plan = DatePlan(plan.key, None, plan.timezone, plan.event)
                continue
            # Next year's moment, in a fresh history (a birthday's workflow lives for years).
            self._next = None
            if not self._plans:
                workflow.continue_as_new({**params, "plan": plan.to_dict(), "since": format_instant(moment), "after": True})
            since, after = moment, True
