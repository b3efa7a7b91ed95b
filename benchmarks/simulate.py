"""Journeys simulated per second: the in-process simulator against Temporal, side by side.

    python benchmarks/simulate.py [--rounds-temporal 2] [--seconds 5]

Every runtime plays the same scenario files (journeys/tests) and each play is checked against
the scenario's expectations; a scenario that fails stops the benchmark. A "journey" is one run
(one workflow execution on Temporal). The rows:

- temporal: the durable workflow on Temporal's time-skipping test server, ``--rounds-temporal``
  passes over the scenarios after a warm-up;
- simulator, full rendering: every message rendered (MJML compiled once per template, Jinja per
  recipient) and delivered to the outbox, as ``nurture test`` does; repeated for ``--seconds``;
- simulator, outcomes only: the same send rules and outcomes without rendering or delivering
  (``SimRuntime(render=False)``); outcomes carry no text, so each scenario is checked with its
  ``contains`` expectations ignored. Repeated for ``--seconds``.

docs/performance.md records results and explains them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nurture.language.compiler import Project, load_project  # noqa: E402
from nurture.simulation.scenarios import Runtime, Scenario, SimRuntime, compare, load_scenario, scenario_files  # noqa: E402
from workflows.runtime import TemporalRuntime  # noqa: E402


async def measure(
    runtime: Runtime, scenarios: list[Scenario], project: Project, *, rounds: int = 0, seconds: float = 0
) -> tuple[int, float, float]:
    """Play every scenario ``rounds`` times (or until ``seconds``).

    Returns the journeys run, the elapsed wall-clock seconds and the CPU seconds this process used
    meanwhile: for the simulator they match on an idle machine, and CPU well below wall time means
    other work took the processor.
    """
    runs = 0
    done = 0
    start, cpu = time.perf_counter(), time.process_time()
    while True:
        for scenario in scenarios:
            outcomes = await runtime.play(scenario, project)
            if not compare(scenario, outcomes).passed:
                raise SystemExit(f"{runtime.name}: {scenario.path} did not pass; measure nothing")
            runs += len({o.run_id for o in outcomes})
        done += 1
        elapsed = time.perf_counter() - start
        if (rounds and done >= rounds) or (seconds and elapsed >= seconds):
            return runs, elapsed, time.process_time() - cpu


def without_contains(scenario: Scenario) -> Scenario:
    """The scenario with its ``contains`` checks dropped: outcome-only sends carry no text."""
    expect = [dataclasses.replace(want, contains=None) for want in scenario.expect]
    return dataclasses.replace(scenario, expect=expect)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--rounds-temporal", type=int, default=2, help="passes over the scenarios on Temporal"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to run each simulator mode")
    args = parser.parse_args()
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    scenarios = [load_scenario(p, project) for p in scenario_files([ROOT / "journeys" / "tests"])]
    bare = [without_contains(s) for s in scenarios]
    ignored = sum(1 for s in scenarios for want in s.expect if want.contains is not None)
    print(
        f"{len(scenarios)} scenarios, {len(project.journeys)} journeys; "
        f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}"  # other work on the machine slows the simulator rows most
    )

    async with TemporalRuntime(project.templates) as temporal:
        await measure(temporal, scenarios[:3], project, rounds=1)  # warm up the worker
        rows = [
            (
                "temporal (time-skipping server)",
                *await measure(temporal, scenarios, project, rounds=args.rounds_temporal),
            )
        ]
    for label, runtime, played in (
        ("simulator, full rendering", SimRuntime(), scenarios),
        ("simulator, outcomes only (*)", SimRuntime(render=False), bare),
    ):
        await measure(runtime, played, project, rounds=1)  # warm up caches
        rows.append((label, *await measure(runtime, played, project, seconds=args.seconds)))

    base = rows[0][1] / rows[0][2]
    print(f"{'runtime':<34}{'journeys':>10}{'seconds':>10}{'cpu s':>8}{'journeys/s':>14}{'vs temporal':>13}")
    for label, runs, elapsed, cpu in rows:
        rate = runs / elapsed
        print(f"{label:<34}{runs:>10}{elapsed:>10.2f}{cpu:>8.2f}{rate:>14.1f}{rate / base:>12.0f}x")
    print(
        f"(*) no rendering or delivery: outcomes carry no message text, so the {ignored} "
        "`contains` expectations are ignored; every other expectation is checked"
    )


if __name__ == "__main__":
    asyncio.run(main())
