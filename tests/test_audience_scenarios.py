"""Audiences on both runtimes: the scenarios of tests/projects/audiences pass in the simulator
and on Temporal's time-skipping server, with identical outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import play_on_both_runtimes

from nurture.language.compiler import Project, load_project
from nurture.simulation.scenarios import load_scenario, scenario_files
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
    await play_on_both_runtimes(path, audiences_project, temporal)


