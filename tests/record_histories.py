"""Record workflow histories for the replay test: ``python tests/record_histories.py RELEASE``.

Run it when a release changes workflow behaviour on purpose (behind ``workflow.patched``), into a
new folder (``v1``: the first release; ``v2``: runs record the steps they reach before each wait),
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

SCENARIOS = [
    "welcome_full_series",
    "cart_reminder_then_last_call",
    "cart_restart_same_cart",
    "post_purchase_vip",
    "chat_followup_variant_b",
    "welcome_quiet_hours_new_york",
]


async def record(dest: Path) -> None:
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    dest.mkdir(parents=True, exist_ok=True)
    async with TemporalRuntime() as runtime:
        for name in SCENARIOS:
            scenario = load_scenario(ROOT / "journeys" / "tests" / f"{name}.yaml", project)
            await runtime.play(scenario, project)
            for number, handle in enumerate(runtime.handles.values(), 1):
                history = await handle.fetch_history()
                target = dest / f"{name}-{number}.json"
                target.write_text(history.to_json(), encoding="utf-8")
                print(f"wrote {target.relative_to(ROOT)} ({len(history.events)} events)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/record_histories.py RELEASE   (a new folder under tests/histories)")
    asyncio.run(record(ROOT / "tests" / "histories" / sys.argv[1]))
