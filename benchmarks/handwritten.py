"""A journey written by hand as a Temporal workflow: the baseline of ``benchmarks/overhead.py``.

What a developer would write for "send, wait, send, wait, send" without Nurture: the same sends
(the ``nurture.send`` activity with the same payload shape, timeout and retry policy as
``JourneyRun``) and the same waits (``workflow.sleep``), and nothing else: no interpreter, no
run records, no signal inbox.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

WORKFLOW_NAME = "HandwrittenJourney"

SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    maximum_attempts=0,
)


@workflow.defn(name=WORKFLOW_NAME)
class HandwrittenJourney:
    """Input (JSON): ``journey`` (a name for the records), ``user_id``, ``key``, ``event`` (as
    templates see it), ``wait_seconds``, and ``sends``: ``{step_id, channel, template}`` each,
    with a wait between two sends; optionally ``until``, an ISO-8601 instant slept until before
    the first send (``benchmarks/sleepers.py``: a ``wait_until`` written by hand)."""

    @workflow.run
    async def run(self, params: dict[str, Any]) -> dict[str, Any]:
        run_id = workflow.info().run_id
        journey = {"id": params["journey"], "key": params["key"], "entered_at": workflow.now().isoformat()}
        if params.get("until"):
            remaining = (datetime.fromisoformat(params["until"]) - workflow.now()).total_seconds()
            if remaining > 0:
                await workflow.sleep(remaining)
        for index, send in enumerate(params["sends"]):
            if index:
                await workflow.sleep(params["wait_seconds"])
            request = {
                "run_id": run_id,
                "journey": params["journey"],
                "version": "handwritten",
                "step_id": send["step_id"],
                "user_id": params["user_id"],
                "channels": [send["channel"]],
                "template": send["template"],
                "category": "transactional",
                "timezone": "UTC",
                "quiet_hours": None,
                "variant": None,
                "context": {"event": params["event"], "last_event": None, "journey": journey},
            }
            await workflow.execute_activity(
                "nurture.send",
                {"request": request, "now": workflow.now().isoformat()},
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=SEND_RETRY,
            )
        return {"reason": "completed"}
