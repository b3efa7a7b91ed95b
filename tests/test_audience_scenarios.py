"""Audiences on both runtimes: the scenarios of tests/projects/audiences pass in the simulator
and on Temporal's time-skipping server, with identical outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nurture.language.compiler import Project, load_project
from nurture.simulation.scenarios import SimRuntime, compare, load_scenario, observe, scenario_files
from workflows.runtime import TemporalRuntime

PROJECT = Path(__file__).parent / "projects" / "audiences"
SCENARIOS = scenario_files([PROJECT / "journeys" / "tests"])


@pytest.fixture(scope="module")
def audiences_project() -> Project:
    return load_project(PROJECT / "journeys", PROJECT / "templates", PROJECT / "nurture.yaml")


def test_every_journey_of_the_project_has_scenarios(audiences_project: Project) -> None:
    covered = {name for path in SCENARIOS for name in load_scenario(path, audiences_project).journeys}
    assert covered == set(audiences_project.journeys)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
async def test_scenario_on_both_runtimes(path: Path, audiences_project: Project, temporal: TemporalRuntime) -> None:
    scenario = load_scenario(path, audiences_project)
    simulated = await SimRuntime().play(scenario, audiences_project)
    verdict = compare(scenario, simulated)
    assert verdict.passed, "simulator:\n" + verdict.report()
    durable = await temporal.play(scenario, audiences_project)
    verdict = compare(scenario, durable)
    assert verdict.passed, "temporal:\n" + verdict.report()
    key = lambda o: (o.at, o.user, o.journey, o.exit or "", o.send or "", o.template or "")  # noqa: E731
    assert sorted(observe(scenario, simulated), key=key) == sorted(observe(scenario, durable), key=key)


