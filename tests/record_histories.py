"""Record workflow histories for the replay test: ``python tests/record_histories.py RELEASE``.

Run it when a release changes workflow behaviour on purpose (behind ``workflow.patched``), into a
new folder (``v1``: the first release; ``v2``: runs record the steps they reach before each wait;
``v3``: random waits, waits for a date, send rates, re-entry gaps and the date trigger workflow;
``v4``: a run moved to a new version mid-``wait_for`` and a long run that continued as new;
``v5``: the start record rides on the run's first recording activity, ``start_rides``; ``v6``:
a run whose first command reads the profile gets the traits with its start, ``traits``; ``v7``:
the record after a send rides on the send's activity, ``records_ride``; ``v8``: a run that
waits first is opened by its router, ``opened``; ``v9``: the journey in a run's input, its
continue-as-new and a migration's signal leaves out the fields at their defaults,
``journey_payload``), and
keep the older ones: each proves that runs started on an older release still replay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from temporalio.client import WorkflowHandle  # noqa: E402
from temporalio.testing import WorkflowEnvironment  # noqa: E402
from temporalio.worker import Worker  # noqa: E402

from channels.outbox import Outbox  # noqa: E402
from nurture.delivery.deliverer import Deliverer, MemoryProfiles, for_every_channel  # noqa: E402
from nurture.engine.model import Event  # noqa: E402
from nurture.language import ir  # noqa: E402
from nurture.language.compiler import load_project  # noqa: E402
from nurture.language.migration import plan_move  # noqa: E402
from nurture.simulation.scenarios import load_scenario  # noqa: E402
from workflows.activities import JourneyActivities  # noqa: E402
from workflows.journey import CONTINUE_AFTER, JourneyWorkflow, run_input  # noqa: E402
from workflows.runtime import MemoryRecorder, TemporalRuntime, binary, quiet_runtime  # noqa: E402
from workflows.sandbox import workflow_runner  # noqa: E402

SCENARIOS = {
    ROOT: [
        "welcome_full_series",
        "cart_reminder_then_last_call",
        "cart_restart_same_cart",
        "post_purchase_vip",
        "chat_followup_variant_b",
        "welcome_quiet_hours_new_york",
    ],
    # Random waits, waits for a date, send rates and re-entry gaps (since v3).
    ROOT / "tests" / "projects" / "dates": [
        "announcement_spread",
        "renewal_three_days_before_at_ten",
        "renewal_past_missing_and_bad_dates",
        "paced_launch_spreads_sends",
        "browse_at_most_once_a_week",
        "birthday_every_year",
        "renewal_heads_up_from_the_event",
    ],
}


async def record(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    async with TemporalRuntime() as runtime:
        for home, names in SCENARIOS.items():
            project = load_project(home / "journeys", home / "templates", home / "nurture.yaml")
            for name in names:
                scenario = load_scenario(home / "journeys" / "tests" / f"{name}.yaml", project)
                await runtime.play(scenario, project)
                runs = [(f"{name}-{n}", h) for n, h in enumerate(runtime.handles.values(), 1)]
                dates = [(f"{name}-date-{n}", h) for n, h in enumerate(runtime.dates.values(), 1)]
                for stem, handle in runs + dates:
                    history = await handle.fetch_history()
                    target = dest / f"{stem}.json"
                    target.write_text(history.to_json(), encoding="utf-8")
                    print(f"wrote {target.relative_to(ROOT)} ({len(history.events)} events)")


async def record_upgrades(dest: Path) -> None:
    """A cart_abandonment run moved to a new version while it waits for checkout, and one that
    receives many events and continues as new (both runs of its chain are written)."""
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    old = project.journeys["cart_abandonment"]
    wait_for = old.steps[2]
    assert isinstance(wait_for, ir.WaitFor)
    longer = dataclasses.replace(wait_for, timeout=47 * 3600)
    changed = dataclasses.replace(old, steps=(*old.steps[:2], longer, *old.steps[3:]))
    new = dataclasses.replace(changed, version=ir.content_version(changed))
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server"), runtime=quiet_runtime()
    )
    queue = f"record-{uuid.uuid4().hex[:8]}"
    activities = JourneyActivities(
        Deliverer(project.templates, for_every_channel(Outbox())), MemoryProfiles(), MemoryRecorder()
    )
    try:
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[JourneyWorkflow],
            activities=list(activities.all()),
            workflow_runner=workflow_runner(),
        ):

            async def start(user: str, **options: Any) -> WorkflowHandle[Any, Any]:
                now = await env.get_current_time()
                event = Event("Cart Updated", now, {"cart_id": "c-1", "item_count": 1}, message_id=f"m-{user}")
                params = run_input(ir.journey_payload(old), user, "c-1", event.to_dict())
                started = await env.client.start_workflow(
                    JourneyWorkflow.run,
                    {**params, **options},
                    id=f"record-{user}",
                    task_queue=queue,
                )
                await env.sleep(timedelta(hours=2))  # past the reminder: waiting for checkout
                return env.client.get_workflow_handle(started.id)

            moved = await start("migrated")
            await moved.signal("migrate", plan_move(old, new).signal(new))
            await env.sleep(timedelta(days=3))  # past the longer timeout of the new version
            await moved.result()
            await write(dest / "migrated-1.json", moved)

            long = await start("continued", **{CONTINUE_AFTER: 40})
            first = (await long.describe()).run_id
            for number in range(20):
                now = await env.get_current_time()
                await long.signal("event", Event("Page Viewed", now, message_id=f"view-{number}").to_dict())
            await env.sleep(timedelta(days=2))
            await long.result()
            await write(dest / "continued-1.json", env.client.get_workflow_handle(long.id, run_id=first))
            await write(dest / "continued-2.json", long)
    finally:
        await env.shutdown()


async def write(target: Path, handle: WorkflowHandle[Any, Any]) -> None:
    history = await handle.fetch_history()
    target.write_text(history.to_json(), encoding="utf-8")
    print(f"wrote {target.relative_to(ROOT)} ({len(history.events)} events)")


async def record_all(dest: Path) -> None:
    await record(dest)
    await record_upgrades(dest)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/record_histories.py RELEASE   (a new folder under tests/histories)")
    asyncio.run(record_all(ROOT / "tests" / "histories" / sys.argv[1]))
