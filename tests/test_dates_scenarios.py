"""The date, pacing and eligibility keys on both runtimes: the scenarios of tests/projects/dates
pass in the simulator and on Temporal's time-skipping server, with identical outcomes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from support import play_on_both_runtimes

from nurture.language.compiler import Project, load_project
from nurture.language.diagnostics import CompileError
from nurture.simulation.scenarios import SimRuntime, load_scenario, scenario_files
from workflows.runtime import TemporalRuntime

PROJECT = Path(__file__).parent / "projects" / "dates"
SCENARIOS = scenario_files([PROJECT / "journeys" / "tests"])


@pytest.fixture(scope="module")
def dates_project() -> Project:
    return load_project(PROJECT / "journeys", PROJECT / "templates", PROJECT / "nurture.yaml")


def test_every_journey_of_the_project_has_scenarios(dates_project: Project) -> None:
    covered = {name for path in SCENARIOS for name in load_scenario(path, dates_project).journeys}
    assert covered == set(dates_project.journeys)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
async def test_scenario_on_both_runtimes(path: Path, dates_project: Project, temporal: TemporalRuntime) -> None:
    await play_on_both_runtimes(path, dates_project, temporal)


def test_a_yearly_date_trigger_needs_the_scenario_to_end(dates_project: Project, tmp_path: Path) -> None:
    source = (PROJECT / "journeys" / "tests" / "birthday_every_year.yaml").read_text(encoding="utf-8")
    endless = tmp_path / "endless.yaml"
    endless.write_text(source.replace("until: 400d\n", ""), encoding="utf-8")
    with pytest.raises(CompileError) as caught:
        load_scenario(endless, dates_project)
    [problem] = caught.value.diagnostics
    assert "starts a run every year for ever" in problem.message and problem.line == 1
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(source.replace("until: 400d", "until: next year"), encoding="utf-8")
    with pytest.raises(CompileError, match="is not an offset"):
        load_scenario(wrong, dates_project)


async def test_until_ends_the_dates_not_the_runs(dates_project: Project) -> None:
    """No date trigger starts a run after until; nothing else is cut short."""
    scenario = load_scenario(PROJECT / "journeys" / "tests" / "birthday_every_year.yaml", dates_project)
    short = dataclasses.replace(scenario, until=363 * 86400)
    outcomes = await SimRuntime().play(short, dates_project)
    assert sorted({(o.user, o.at.date().isoformat()) for o in outcomes}) == [
        ("leap", "2027-02-28"),
        ("mei", "2026-03-05"),
        ("sam", "2026-03-20"),
    ]
