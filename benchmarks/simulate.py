"""Journeys simulated per second: the in-process simulator against Temporal, side by side.

    python benchmarks/simulate.py [--rounds-temporal 2] [--seconds 5]

Both runtimes play the same scenario files (journeys/tests): the durable workflow on Temporal's
time-skipping test server, then the in-process simulator, repeated until ``--seconds`` have
passed. A "journey" is one run (one workflow execution). Both modes render every message (MJML
cached, Jinja per recipient), as the scenarios' ``contains`` checks need. The last line is the
ratio; docs/performance.md records results.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nurture.compiler import Project, load_project  # noqa: E402
from nurture.scenarios import Runtime, Scenario, SimRuntime, compare, load_scenario, scenario_files  # noqa: E402
from workflows.runtime import TemporalRuntime  # noqa: E402


async def measure(runtime: Runtime, scenarios: list[Scenario], project: Project, *, rounds: int = 0, seconds: float = 0) -> tuple[int, float]:
    """Play every scenario ``rounds`` times (or until ``seconds``); (journeys run, elapsed)."""
    runs = 0
    done = 0
    start = time.perf_counter()
    while True:
        for scenario in scenarios:
            outcomes = await runtime.play(scenario, project)
            if not compare(scenario, outcomes).passed:
                raise SystemExit(f"{runtime.name}: {scenario.path} did not pass; measure nothing")
            runs += len({o.run_id for o in outcomes})
        done += 1
        elapsed = time.perf_counter() - start
        if (rounds and done >= rounds) or (seconds and elapsed >= seconds):
            return runs, elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-temporal", type=int, default=2, help="passes over the scenarios on Temporal")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to run the simulator")
    args = parser.parse_args()
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    scenarios = [load_scenario(p, project) for p in scenario_files([ROOT / "journeys" / "tests"])]
    print(f"{len(scenarios)} scenarios, {len(project.journeys)} journeys; python {platform.python_version()}, {platform.machine()}")

    async with TemporalRuntime(project.templates) as temporal:
        await measure(temporal, scenarios[:3], project, rounds=1)  # warm up the worker
        t_runs, t_elapsed = await measure(temporal, scenarios, project, rounds=args.rounds_temporal)
    sim = SimRuntime()
    await measure(sim, scenarios, project, rounds=1)  # warm up caches
    s_runs, s_elapsed = await measure(sim, scenarios, project, seconds=args.seconds)

    t_rate, s_rate = t_runs / t_elapsed, s_runs / s_elapsed
    print(f"{'runtime':<34}{'journeys':>10}{'seconds':>10}{'journeys/s':>14}")
    print(f"{'temporal (time-skipping server)':<34}{t_runs:>10}{t_elapsed:>10.2f}{t_rate:>14.1f}")
    print(f"{'simulator (in-process)':<34}{s_runs:>10}{s_elapsed:>10.2f}{s_rate:>14.1f}")
    print(f"ratio simulator/temporal: {s_rate / t_rate:.0f}x")


if __name__ == "__main__":
    asyncio.run(main())
