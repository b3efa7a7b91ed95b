"""Scenario populations: generated users and events, deterministic, with the probabilities they
declare; a forecast recorded into a database holds exactly the simulator's outcomes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from nurture.cli.main import main
from nurture.delivery.deliverer import Deliverer
from nurture.engine.interpreter import choose_variant
from nurture.language import ir
from nurture.language.compiler import Project
from nurture.language.diagnostics import CompileError
from nurture.language.schema import Declarations
from nurture.reports.forecast import play_into, scratch_database
from nurture.simulation.population import Person
from nurture.simulation.scenarios import Scenario, build_simulator, load_scenario
from nurture.storage.stores import DbRecorder

ROOT = Path(__file__).resolve().parents[1]
FORECAST = ROOT / "journeys" / "forecasts" / "chat_followup_copy.yaml"

BASE = """\
scenario: generated
start: 2026-03-02T10:00:00+08:00
journeys: [chat_recovery]
population:
  count: {count}
  seed: {seed}
  traits: {{email: "user{{n}}@example.com", locale: [en, zh-CN], score: 1..5}}
  events:
    - {{event: Chat Interrupted, at: 0s..2d, properties: {{chat_id: "chat-{{n}}", total: 40.0..120.0}}}}
    - event: Ticket Resolved
      after: 26h..3d
      probability: 0.1
      by_variant: {{chat_followup_copy: {{a: 0.2, b: 0.6}}}}
      by_segment: [{{if: "user.score == 5", probability: 1}}, {{if: "user.score >= 4", probability: 0}}]
      properties: {{chat_id: "chat-{{n}}"}}
"""


def _load(tmp_path: Path, project: Project, body: str) -> Scenario:
    """``body`` against the project without its declarations: BASE's trait and property are the
    generator's, not the example project's (tests/test_declarations.py checks populations)."""
    path = tmp_path / "population.yaml"
    path.write_text(body)
    settings = dataclasses.replace(project.settings, declarations=Declarations())
    return load_scenario(path, dataclasses.replace(project, settings=settings))


def _people(scenario: Scenario) -> list[Person]:
    assert scenario.population is not None
    return list(scenario.population.generate(scenario.start))


def _variants(project: Project) -> tuple[ir.Variant, ...]:
    (split,) = (s for s in ir.walk(project.journeys["chat_recovery"].steps) if isinstance(s, ir.Split))
    return split.variants


def _within(hits: int, trials: int, p: float) -> bool:
    """``hits`` is within five standard deviations of Binomial(trials, p)'s mean."""
    return abs(hits - trials * p) <= 5 * math.sqrt(trials * p * (1 - p)) + 1


def test_the_same_seed_draws_the_same_users_and_events(tmp_path: Path, project: Project) -> None:
    first = _people(_load(tmp_path, project, BASE.format(count=500, seed=7)))
    again = _people(_load(tmp_path, project, BASE.format(count=500, seed=7)))
    other = _people(_load(tmp_path, project, BASE.format(count=500, seed=8)))

    assert first == again
    assert first != other
    assert [p.user_id for p in first] == [f"user{n}" for n in range(1, 501)]
    assert first[41].traits["email"] == "user42@example.com"
    assert {p.traits["locale"] for p in first} == {"en", "zh-CN"}
    assert {p.traits["score"] for p in first} == {1, 2, 3, 4, 5}
    entries = [p.events[0] for p in first]
    assert all(e.properties["chat_id"] == f"chat-{n}" for n, e in enumerate(entries, 1))
    assert all(40.0 <= e.properties["total"] <= 120.0 for e in entries)
    start = _load(tmp_path, project, BASE.format(count=1, seed=7)).start
    assert all(0 <= (e.timestamp - start).total_seconds() <= 2 * 86400 for e in entries)
    for person in first:
        for later in person.events[1:]:
            gap = (later.timestamp - person.events[0].timestamp).total_seconds()
            assert 26 * 3600 <= gap <= 3 * 86400


def test_probabilities_follow_the_first_segment_then_the_engines_variant(tmp_path: Path, project: Project) -> None:
    people = _people(_load(tmp_path, project, BASE.format(count=20000, seed=3)))
    variants = _variants(project)
    trials: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for person in people:
        score = person.traits["score"]
        group = (
            "score5" if score == 5 else "score4" if score == 4
            else choose_variant("chat_followup_copy", person.user_id, variants).name
        )
        trials[group] += 1
        hits[group] += len(person.events) - 1

    assert hits["score5"] == trials["score5"]  # the first matching segment wins...
    assert hits["score4"] == 0  # ...over later ones and over the variant
    assert _within(hits["a"], trials["a"], 0.2)
    assert _within(hits["b"], trials["b"], 0.6)
    assert not _within(hits["a"], trials["a"], 0.6)


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        ("probability: 0.1", "probablity: 0.1", "probablity", "unknown key 'probablity' (did you mean 'probability'?)"),
        ("seed: 1", "seed: 1\n  colour: red", "colour", "allowed keys: count, seed, user, traits, events"),
        ("probability: 0.1", "probability: 1.5", "probability", "less than or equal to 1"),
        ("after: 26h..3d", "after: 3d..26h", "after", "runs backwards"),
        ("after: 26h..3d", "after: soon", "after", "is not an offset"),
        ("{chat_followup_copy: {a: 0.2", "{chat_followup_cpy: {a: 0.2", "chat_followup_cpy", "did you mean 'chat_followup_copy'"),
        ("{a: 0.2, b: 0.6}", "{a: 0.2, c: 0.6}", "c", "has no variant 'c'"),
        ('"user.score >= 4"', '"user.score >>= 4"', "if", ""),
        ("score: 1..5", "score: 5..1", "score", "runs backwards"),
        ("at: 0s..2d", "after: 0s..2d", "after", "the first event is the user's entry"),
    ],
    ids=["misspelt-key", "unknown-key", "probability", "backwards", "offset", "experiment", "variant", "segment", "range", "first-after"],
)
def test_a_bad_population_is_a_load_error_at_its_line(
    old: str, new: str, key: str, message: str, tmp_path: Path, project: Project
) -> None:
    body = BASE.format(count=10, seed=1)
    assert old in body
    body = body.replace(old, new)
    line = next(n for n, text in enumerate(body.splitlines(), 1) if new.splitlines()[-1] in text)

    with pytest.raises(CompileError) as caught:
        _load(tmp_path, project, body)

    (found,) = caught.value.diagnostics
    assert found.line == line
    assert key in found.key
    assert message in found.message


def test_a_population_scenario_is_a_forecast_without_expectations(tmp_path: Path, project: Project) -> None:
    body = BASE.format(count=10, seed=1) + "expect:\n  - {at: 1h, user: user1, send: sms}\n"
    with pytest.raises(CompileError) as caught:
        _load(tmp_path, project, body)
    (found,) = (d for d in caught.value.diagnostics if "population" in d.message)
    assert "a scenario with a population is a forecast" in found.message
    assert found.line == body.splitlines().index("expect:") + 1


def test_generated_ids_may_not_clash_with_written_users(tmp_path: Path, project: Project) -> None:
    body = BASE.format(count=10, seed=1) + "users:\n  user7: {email: seven@example.com}\n  user11: {}\n"
    with pytest.raises(CompileError) as caught:
        _load(tmp_path, project, body)
    (found,) = caught.value.diagnostics
    assert "clash with users: user7" in found.message


async def test_written_users_and_events_play_alongside_the_population(tmp_path: Path, project: Project) -> None:
    body = BASE.format(count=50, seed=1) + (
        "users:\n  sara: {email: sara@example.com}\n"
        "events:\n  - {at: 0s, user: sara, event: Chat Interrupted, properties: {chat_id: c1}}\n"
    )
    scenario = _load(tmp_path, project, body)
    sim = build_simulator(scenario, project, Deliverer(project.templates, {}, render=False), timeline=False)
    await sim.run()
    ended = Counter(o.user for o in sim.outcomes if o.exit is not None)
    assert ended["sara"] == 1
    assert len(ended) == 51


def _sql(db: object, query: str) -> dict[tuple[object, ...], int]:
    with db.engine.connect() as connection:  # type: ignore[attr-defined]
        return {tuple(row[:-1]): row[-1] for row in connection.execute(text(query))}


async def test_a_forecast_database_holds_the_simulators_own_outcomes(project: Project) -> None:
    scenario = load_scenario(FORECAST, project)
    assert scenario.population is not None
    scenario.population = dataclasses.replace(scenario.population, count=3000)

    with scratch_database() as db:
        sim = await play_into(scenario, project, db)
        runs = _sql(db, "select status, end_reason, count(*) from runs group by 1, 2")
        reached = _sql(db, "select step_id, count(*) from step_reaches group by 1")
        assigned = _sql(db, "select variant, count(*) from step_reaches where step_id = 'followup_copy_test' group by 1")
        messages = _sql(db, "select step_id, status, reason, count(*) from messages group by 1, 2, 3")
        converted = _sql(
            db,
            "select json_extract(variants, '$.chat_followup_copy'), count(*) from runs "
            "where converted_at is not null group by 1",
        )

    ends = Counter(o.exit for o in sim.outcomes if o.exit is not None)
    assert runs == {("ended", reason): n for reason, n in ends.items()}
    assert sum(ends.values()) == 3000
    sends = Counter((o.send.step_id, o.send.status, o.send.reason) for o in sim.outcomes if o.send)
    assert messages == dict(sends)
    by_variant = Counter(o.send.variant for o in sim.outcomes if o.send and o.send.variant)
    assert assigned == {(v,): n for v, n in by_variant.items()}
    assert set(by_variant) == {"a", "b"}
    assert reached[("followup_copy_test",)] == sum(by_variant.values())
    assert reached[("wait_for_resume",)] == 3000
    assert reached[("agent_contact_sms",)] == sum(n for (step, _, _), n in sends.items() if step == "agent_contact_sms")
    conversions = Counter(variant for _, _, _, variant in sim.conversions)
    assert converted == {(v,): n for v, n in conversions.items()}
    # The declared rates show through: b's follow-up converts more often than a's.
    rate = {v: conversions[v] / by_variant[v] for v in ("a", "b")}
    assert 0.08 < rate["a"] < rate["b"] < 0.2


def test_nurture_test_refuses_a_forecast() -> None:
    paths = ["--journeys", str(ROOT / "journeys"), "--templates", str(ROOT / "templates")]
    result = CliRunner().invoke(main, ["test", str(FORECAST), *paths], catch_exceptions=False)
    assert result.exit_code == 1
    assert "a scenario with a population is a forecast, not a test" in result.output
    assert result.output.rstrip().endswith("0 passed, 1 failed")


def _rows(db: object) -> dict[str, list[tuple[object, ...]]]:
    """Every recorded row, without the columns a database fills in itself."""
    tables = {
        "runs": "select * from runs order by run_id",
        "step_reaches": "select * from step_reaches order by run_id, step_id",
        "messages": "select * from messages order by idempotency_key",
    }
    out = {}
    with db.engine.connect() as connection:  # type: ignore[attr-defined]
        for table, query in tables.items():
            result = connection.execute(text(query))
            keep = [i for i, name in enumerate(result.keys()) if name not in ("id", "created_at", "updated_at")]
            out[table] = [tuple(row[i] for i in keep) for row in result]
    return out


async def test_the_batch_recorder_writes_the_rows_the_workers_recorder_writes(project: Project) -> None:
    scenario = load_scenario(FORECAST, project)
    assert scenario.population is not None
    scenario.population = dataclasses.replace(scenario.population, count=300)

    with scratch_database() as batched, scratch_database() as direct:
        await play_into(scenario, project, batched)
        deliverer = Deliverer(project.templates, {}, render=False)
        sim = build_simulator(scenario, project, deliverer, timeline=False, recorder=DbRecorder(direct))
        await sim.run()
        expected, actual = _rows(direct), _rows(batched)

    assert len(expected["runs"]) == 300
    assert any(row[-2] for row in expected["step_reaches"])  # quiet hours deferred some follow-ups
    assert actual == expected


def _report(*args: str | Path) -> tuple[int, str]:
    paths = ["--journeys", str(ROOT / "journeys"), "--templates", str(ROOT / "templates")]
    result = CliRunner().invoke(main, ["report", *map(str, args), *paths])
    return result.exit_code, result.output


def _smaller_forecast(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "forecast.yaml"
    path.write_text(FORECAST.read_text().replace("count: 10000", f"count: {count}"))
    return path


def test_the_forecast_report_counts_the_simulators_outcomes(tmp_path: Path, project: Project) -> None:
    path = _smaller_forecast(tmp_path, 2000)
    code, output = _report("chat_recovery", "--scenario", path, "--json")
    assert code == 0, output
    report = json.loads(output)

    with scratch_database() as db:
        sim = asyncio.run(play_into(load_scenario(path, project), project, db))
    ends = Counter(o.exit for o in sim.outcomes if o.exit is not None)
    assigned = Counter(o.send.variant for o in sim.outcomes if o.send and o.send.variant)
    converted = Counter(variant for _, _, _, variant in sim.conversions)
    assert report["totals"] == {"entered": 2000, "active": 0, "ended": dict(ends)}
    assert report["conversions"]["converted"] == len(sim.conversions)
    (experiment,) = report["experiments"]
    assert experiment["experiment"] == "chat_followup_copy"
    assert {a["name"]: (a["runs"], a["converted"]) for a in experiment["arms"]} == {
        v: (assigned[v], converted[v]) for v in ("a", "b")
    }


def test_the_forecast_report_reads_as_the_live_one() -> None:
    code, output = _report("chat_recovery", "--scenario", FORECAST)
    assert code == 0, output
    assert output.startswith("Chat recovery (chat_recovery)\n")
    assert "entered    10000\n" in output
    assert "experiment chat_followup_copy (step followup_copy_test, control a)" in output
    assert "b converts better than a" in output


def test_a_forecast_of_another_journey_or_a_broken_file_is_refused(tmp_path: Path) -> None:
    code, output = _report("cart_abandonment", "--scenario", FORECAST)
    assert code == 1
    assert "the scenario does not play journey 'cart_abandonment' (its journeys: chat_recovery)" in output

    broken = _smaller_forecast(tmp_path, 10)
    broken.write_text(broken.read_text().replace("probability: 0.3", "probability: 3"))
    line = broken.read_text().splitlines().index("      probability: 3") + 1
    code, output = _report("chat_recovery", "--scenario", broken)
    assert code == 1
    assert f"{broken}:{line}:" in output
