"""Every scenario in journeys/tests passes on both runtimes, with identical outcomes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from nurture.language.compiler import Project
from nurture.simulation.scenarios import Observed, SimRuntime, compare, load_scenario, observe, scenario_files
from workflows.runtime import TemporalRuntime

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = scenario_files([ROOT / "journeys" / "tests"])


def _canonical(items: list[Observed]) -> list[Observed]:
    """Outcomes in time order, same-instant ones in a fixed order (they compare as a set)."""
    return sorted(items, key=lambda o: (o.at, o.user, o.journey, o.exit or "", o.send or "", o.template or ""))


def test_suite_covers_every_mission_journey(project: Project) -> None:
    per_journey: Counter[str] = Counter()
    for path in SCENARIOS:
        for name in load_scenario(path, project).journeys:
            per_journey[name] += 1
    assert len(SCENARIOS) >= 20
    assert set(per_journey) == set(project.journeys)
    assert min(per_journey.values()) >= 4


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
async def test_scenario_on_both_runtimes(path: Path, project: Project, temporal: TemporalRuntime) -> None:
    scenario = load_scenario(path, project)
    simulated = await SimRuntime().play(scenario, project)
    verdict = compare(scenario, simulated)
    assert verdict.passed, "simulator:\n" + verdict.report()
    durable = await temporal.play(scenario, project)
    verdict = compare(scenario, durable)
    assert verdict.passed, "temporal:\n" + verdict.report()
    assert _canonical(observe(scenario, simulated)) == _canonical(observe(scenario, durable))
