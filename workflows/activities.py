"""Activities of the journey workflow: profiles, sends and run records.

Everything with side effects or non-deterministic inputs lives here, behind small protocols,
so the same activities run against in-memory stores (scenario runner) and the database
(the service).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from channels import TransientError
from nurture.delivery.deliverer import Deliverer, ProfileStore
from nurture.engine.clock import parse_instant
from nurture.engine.model import Recorder, SendRequest


class JourneyActivities:
    """The activity implementations, bound to their stores."""

    def __init__(self, deliverer: Deliverer, profiles: ProfileStore, recorder: Recorder) -> None:
        self.deliverer = deliverer
        self.profiles = profiles
        self.recorder = recorder

    @activity.defn(name="nurture.send")
    async def send(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Render and deliver one send step; returns a SendResult as JSON."""
        await self._start(payload)
        request = SendRequest.from_dict(payload["request"])
        now = parse_instant(payload["now"])
        profile = await self.profiles.get(request.user_id)
        try:
            result = await self.deliverer.send(request, profile, now)
        except TransientError as exc:
            # Retried by the workflow's retry policy; a provider's Retry-After sets the next delay.
            delay = None if exc.retry_after is None else timedelta(seconds=exc.retry_after)
            raise ApplicationError(str(exc), type=f"transient:{exc.reason}", next_retry_delay=delay) from exc
        answer = result.to_dict()
        # The record the run writes next (``records_ride``), with the message, when the send went
        # out on its first attempt: a retried send is late, and the run dates what follows it itself.
        then = payload.get("after") if result.is_message and activity.info().attempt == 1 else None
        if result.outcome is not None:
            await self.recorder.send(request, result.outcome, then)
            if then is not None:
                answer["rode"] = True
        return answer

    @activity.defn(name="nurture.read_profile")
    async def read_profile(self, user_id: str) -> dict[str, Any]:
        """The user's traits as they are now."""
        profile = await self.profiles.get(user_id)
        return dict(profile.traits)

    @activity.defn(name="nurture.write_traits")
    async def write_traits(self, payload: dict[str, Any]) -> None:
        """Apply an ``update`` step."""
        await self.profiles.update(payload["user_id"], payload["traits"])

    @activity.defn(name="nurture.record_start")
    async def record_start(self, payload: dict[str, Any]) -> None:
        await self.recorder.start(payload)

    @activity.defn(name="nurture.record_end")
    async def record_end(self, payload: dict[str, Any]) -> None:
        await self.recorder.end(await self._start(payload))

    @activity.defn(name="nurture.record_conversion")
    async def record_conversion(self, payload: dict[str, Any]) -> None:
        await self.recorder.conversion(await self._start(payload))

    @activity.defn(name="nurture.record_steps")
    async def record_steps(self, payload: dict[str, Any]) -> None:
        """Steps reached, and the step the run now waits at (reports read both)."""
        await self.recorder.steps(await self._start(payload))

    async def _start(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The run's start record when it rides on this activity (``start_rides`` runs: the first
        activity that records for a run writes its row first); the payload without it."""
        start = payload.get("start")
        if start is None:
            return payload
        await self.recorder.start(start)
        return {name: value for name, value in payload.items() if name != "start"}

    def all(self) -> Sequence[Callable[..., Any]]:
        """Every activity, for ``Worker(activities=...)``."""
        return [
            self.send,
            self.read_profile,
            self.write_traits,
            self.record_start,
            self.record_end,
            self.record_conversion,
            self.record_steps,
        ]
