"""Record workflow histories for the replay test: ``python tests/record_histories.py RELEASE``.

Run it when a release changes workflow behaviour on purpose (behind ``workflow.patched``), into a
new folder (``v1``: the first release; ``v2``: runs record the steps they reach before each wait;
``v3``: random waits, waits for a date, send rates, re-entry gaps and the date trigger workflow),
and keep the older ones: each proves that runs started on an older release still replay.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nurture.language.compiler import load_project  # noqa: E402
from nurture.simulation.scenarios import load_scenario  # noqa: E402
from workflows.runtime import TemporalRuntime  # noqa: E402

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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/record_histories.py RELEASE   (a new folder under tests/histories)")
    asyncio.run(record(ROOT / "tests" / "histories" / sys.argv[1]))
