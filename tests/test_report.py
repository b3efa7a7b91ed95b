"""The journey report counts what runs did: scenario files played on both runtimes into a real
database give the numbers their outcomes say, on SQLite and PostgreSQL; the experiment verdicts
follow their rules on synthetic rows; the command and the API show the same report."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support import rows

from channels.outbox import Outbox
from nurture.cli.main import main
from nurture.delivery.deliverer import Deliverer, for_every_channel
from nurture.language import ir
from nurture.language.compiler import Project, load_project
from nurture.reports import stats
from nurture.reports.report import (
    SCHEMA,
    JourneyReport,
    daily_looks,
    journey_report,
    parse_bound,
    render_text,
    report_to_dict,
    walk_counts,
)
from nurture.service import privacy
from nurture.simulation.scenarios import Scenario, build_simulator, load_scenario
from nurture.simulation.simulator import Outcome
from nurture.storage.db import Database
from nurture.storage.feedback import record_event
from nurture.storage.models import FEEDBACK, MessageRecord, RunRecord, StepReach
from nurture.storage.stores import DbRecorder
from workflows.runtime import TemporalRuntime

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "journeys" / "tests"
SCENARIOS = [
    "chat_followup_variant_a.yaml",
    "chat_followup_variant_b.yaml",
    "chat_agent_sms_then_resolved.yaml",
    "chat_agent_sms_no_phone.yaml",
    "cart_restart_same_cart.yaml",
    "cart_goal_after_reminder.yaml",
    "cart_goal_before_reminder.yaml",
    "cart_last_call_wechat_fallback.yaml",
    "cart_emptied_exit.yaml",
    "cart_free_checkout.yaml",
    "cart_quiet_hours_evening.yaml",
    "post_purchase_full.yaml",
    "post_purchase_shipping_no_phone.yaml",
    "post_purchase_two_orders.yaml",
    "purchase_ends_cart_and_starts_post_purchase.yaml",
    "policy_cap_defer_until_room.yaml",
]

WINDOWS = """\
scenario: course launch conversions inside the 7-day goal window count, late ones too; outside it they do not
start: 2026-03-02T10:00:00+08:00
journeys: [course_launch]
users:
  ann: {email: ann@example.com, timezone: Asia/Shanghai}
  bob: {email: bob@example.com, timezone: Asia/Shanghai}
  cat: {email: cat@example.com, timezone: Asia/Shanghai}
events:
  - {at: 0s, user: ann, event: Course Launched, properties: {course_id: k1}}
  - {at: 0s, user: bob, event: Course Launched, properties: {course_id: k1}}
  - {at: 0s, user: cat, event: Course Launched, properties: {course_id: k1}}
  - {at: 1d, user: cat, event: Order Completed, properties: {course_id: k1, total: 99}}
  - {at: 5d, user: ann, event: Order Completed, properties: {course_id: k1, total: 99}}
  - {at: 8d, user: bob, event: Order Completed, properties: {course_id: k1, total: 99}}
"""


def fresh_db(path: Path) -> Database:
    db = Database(f"sqlite:///{path}")
    db.migrate()
    return db


async def play_sim(scenario: Scenario, project: Project, db: Database) -> tuple[list[Outcome], int]:
    """The scenario's outcomes and conversions on the simulator, recorded into ``db``."""
    sim = build_simulator(
        scenario, project, Deliverer(project.templates, for_every_channel(Outbox())), timeline=False
    )
    sim.recorder = DbRecorder(db)
    await sim.run()
    return sim.outcomes, len(sim.conversions)


def reports(db: Database, project: Project, scenario: Scenario) -> dict[str, JourneyReport]:
    return {name: journey_report(db, project.journeys[name]) for name in scenario.journeys}


def check_against_outcomes(report: JourneyReport, journey: ir.Journey, outcomes: list[Outcome]) -> None:
    """Every count the outcomes carry: runs and their ends, and per send step its outcomes, the
    channels that carried them and, after a split, the variant."""
    mine = [o for o in outcomes if o.journey == journey.id]
    ends = Counter(o.exit for o in mine if o.exit is not None)
    assert report.totals.entered == len({o.run_id for o in mine if o.exit is not None})
    assert report.totals.ended == dict(ends) and report.totals.active == 0
    steps = {step.id: step for step in walk_counts(report.steps)}
    for step in ir.walk(journey.steps):
        sends = [o.send for o in mine if o.send is not None and o.send.step_id == step.id]
        if isinstance(step, ir.Send):
            counts = steps[step.id].send
            assert counts is not None
            expected = Counter(s.status if s.status == "sent" else f"{s.status}:{s.reason}" for s in sends)
            assert counts.outcomes == dict(expected), step.id
            assert counts.channels == dict(Counter(s.channel for s in sends if s.status == "sent")), step.id
            assert steps[step.id].reached == len(sends), step.id
    for experiment in report.experiments:
        split = journey.step(experiment.step)
        assert isinstance(split, ir.Split)
        nested = {s.id for variant in split.variants for s in ir.walk(variant.steps)}
        runs_by_variant = Counter(
            variant
            for variant in {
                (o.run_id, o.send.variant) for o in mine if o.send is not None and o.send.step_id in nested
            }
        )
        assert {arm.name: arm.runs for arm in experiment.arms if arm.runs} == {
            variant: count for (_, variant), count in runs_by_variant.items()
        }


@pytest.mark.parametrize("name", SCENARIOS)
async def test_the_report_counts_what_the_scenario_did(name: str, project: Project, tmp_path: Path) -> None:
    scenario = load_scenario(TESTS / name, project)
    db = fresh_db(tmp_path / "report.db")
    outcomes, converted = await play_sim(scenario, project, db)
    found = reports(db, project, scenario)
    for journey_id, report in found.items():
        check_against_outcomes(report, project.journeys[journey_id], outcomes)
    assert sum(report.conversions.converted for report in found.values()) == converted


async def test_a_restarted_run_and_its_successor_count_once_each(project: Project, tmp_path: Path) -> None:
    scenario = load_scenario(TESTS / "cart_restart_same_cart.yaml", project)
    db = fresh_db(tmp_path / "report.db")
    await play_sim(scenario, project, db)
    report = journey_report(db, project.journeys["cart_abandonment"])
    steps = {step.id: step for step in walk_counts(report.steps)}

    assert report.totals.entered == 2 and report.totals.ended == {"completed": 1, "restarted": 1}
    assert steps["wait_before_reminder"].reached == 2  # both runs waited
    assert steps["reminder_email"].reached == 1  # the first was restarted before its reminder
    assert [(stage.stage, stage.runs, stage.drop_off) for stage in report.funnel] == [
        ("entered", 2, 0),
        ("reminder_email", 1, 1),
        ("converted", 0, 1),
    ]


async def test_conversions_count_inside_the_goal_window_only(project: Project, tmp_path: Path) -> None:
    path = tmp_path / "windows.yaml"
    path.write_text(WINDOWS)
    scenario = load_scenario(path, project)
    db = fresh_db(tmp_path / "report.db")
    _, converted = await play_sim(scenario, project, db)
    report = journey_report(db, project.journeys["course_launch"])

    assert converted == 2
    # cat converts during the run (ending it), ann after it ended but inside 7 days; bob too late.
    assert report.totals.entered == 3 and report.totals.ended == {"completed": 2, "goal": 1}
    assert report.conversions.converted == 2 and report.conversions.rate == pytest.approx(2 / 3)
    assert report.conversions.median_seconds == pytest.approx((1 + 5) / 2 * 86400)
    assert report.funnel[-1].stage == "converted" and report.funnel[-1].runs == 2


OFFER = """\
journey: offer_test
trigger:
  event: Signed Up
goal:
  event: Order Completed
  value: "event.properties.total"
  within: 7d
steps:
  - id: pick
    split: offer
    variants:
      treatment:
        weight: 50
        steps:
          - id: nudge
            send: email
            template: welcome
      control:
        weight: 50
        steps: []
"""
OFFER_SCENARIO = """\
scenario: goal values are summed, per run and per variant; the variant named control is the control
start: 2026-03-02T10:00:00Z
users:
  u1: {email: u1@example.com, first_name: One}
  u2: {email: u2@example.com, first_name: Two}
  u3: {email: u3@example.com, first_name: Three}
  u4: {email: u4@example.com, first_name: Four}
  u5: {email: u5@example.com, first_name: Five}
  u6: {email: u6@example.com, first_name: Six}
events:
  - {at: 0s, user: u1, event: Signed Up}
  - {at: 0s, user: u2, event: Signed Up}
  - {at: 0s, user: u3, event: Signed Up}
  - {at: 0s, user: u4, event: Signed Up}
  - {at: 0s, user: u5, event: Signed Up}
  - {at: 0s, user: u6, event: Signed Up}
  - {at: 1d, user: u2, event: Order Completed, properties: {total: 100}}
  - {at: 2d, user: u3, event: Order Completed, properties: {total: 50}}
  - {at: 3d, user: u1, event: Order Completed, properties: {total: 30}}
  - {at: 8d, user: u4, event: Order Completed, properties: {total: 20}}
"""


async def test_goal_values_are_summed_per_run_and_per_variant(tmp_path: Path) -> None:
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    (journeys / "offer_test.yaml").write_text(OFFER)
    (tmp_path / "scenario.yaml").write_text(OFFER_SCENARIO)
    project = load_project(journeys, ROOT / "templates", ROOT / "nurture.yaml")
    scenario = load_scenario(tmp_path / "scenario.yaml", project)
    db = fresh_db(tmp_path / "report.db")
    await play_sim(scenario, project, db)
    report = journey_report(db, project.journeys["offer_test"])

    # u1, u4 and u6 are assigned control, the others treatment (sha256 of "offer:<user>").
    assert report.conversions.converted == 3 and report.conversions.value == 180
    assert report.conversions.value_per_run == 30 and report.conversions.median_seconds == 2 * 86400
    (experiment,) = report.experiments
    assert experiment.control == "control"
    assert [(a.name, a.runs, a.converted, a.value_per_run) for a in experiment.arms] == [
        ("treatment", 3, 2, 50),
        ("control", 3, 1, 10),
    ]
    (comparison,) = experiment.comparisons
    assert (comparison.arm, comparison.against) == ("treatment", "control")
    assert comparison.lift == pytest.approx(1 / 3) and comparison.relative_lift == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name", ["chat_followup_variant_a.yaml", "cart_restart_same_cart.yaml", "post_purchase_two_orders.yaml"]
)
async def test_both_runtimes_report_the_same(
    name: str, project: Project, temporal: TemporalRuntime, tmp_path: Path
) -> None:
    scenario = load_scenario(TESTS / name, project)
    sim_db, durable_db = fresh_db(tmp_path / "sim.db"), fresh_db(tmp_path / "temporal.db")
    await play_sim(scenario, project, sim_db)
    outcomes = await temporal.play(scenario, project, record_to=DbRecorder(durable_db))
    now = datetime(2030, 1, 1, tzinfo=UTC)
    for journey_id in scenario.journeys:
        journey = project.journeys[journey_id]
        durable = journey_report(durable_db, journey, now=now)
        check_against_outcomes(durable, journey, outcomes)
        assert report_to_dict(durable) == report_to_dict(journey_report(sim_db, journey, now=now))


async def test_postgresql_reports_what_sqlite_does(
    project: Project, database: Database, tmp_path: Path
) -> None:
    path = tmp_path / "windows.yaml"
    path.write_text(WINDOWS)
    for scenario in (
        load_scenario(path, project),
        load_scenario(TESTS / "chat_followup_variant_b.yaml", project),
    ):
        lite = fresh_db(tmp_path / f"{scenario.journeys[0]}.db")
        await play_sim(scenario, project, lite)
        await play_sim(scenario, project, database)
        now = datetime(2030, 1, 1, tzinfo=UTC)
        for journey_id in scenario.journeys:
            journey = project.journeys[journey_id]
            assert report_to_dict(journey_report(database, journey, now=now)) == report_to_dict(
                journey_report(lite, journey, now=now)
            )


# --- the range and versions ----------------------------------------------------------------------

START = datetime(2026, 3, 2, tzinfo=UTC)


def seed_split(
    db: Database,
    arms: dict[str, tuple[int, int]],
    *,
    days: int = 10,
    journey: str = "chat_recovery",
    step: str = "followup_copy_test",
    holdout: bool = False,
) -> None:
    """``runs`` runs per arm, ``converted`` of them converting a day after their assignment,
    spread evenly over ``days`` days."""
    with db.session() as session:
        for variant, (runs, converted) in arms.items():
            for number in range(runs):
                run_id = f"{journey}:{variant}:{number}"
                entered = START + timedelta(days=number % days, minutes=number)
                session.add(
                    RunRecord(
                        run_id=run_id,
                        workflow_id=run_id,
                        journey=journey,
                        version="v1",
                        user_id=f"user-{variant}-{number}",
                        status="ended",
                        entered_at=entered,
                        ended_at=entered + timedelta(hours=1),
                        end_reason="completed",
                        converted_at=entered + timedelta(days=1) if number < converted else None,
                        holdout=holdout and variant == "holdout",
                    )
                )
                if not holdout:
                    session.add(
                        StepReach(
                            run_id=run_id,
                            step_id=step,
                            journey=journey,
                            version="v1",
                            variant=variant,
                            reached_at=entered,
                        )
                    )


def only_comparison(report: JourneyReport) -> Any:
    (experiment,) = report.experiments
    (comparison,) = experiment.comparisons
    return comparison


def test_below_a_hundred_runs_per_arm_it_is_too_early(project: Project, tmp_path: Path) -> None:
    db = fresh_db(tmp_path / "report.db")
    seed_split(db, {"a": (37, 30), "b": (41, 2)})
    report = journey_report(db, project.journeys["chat_recovery"])
    comparison = only_comparison(report)

    assert comparison.verdict == "too early" and comparison.winner is None
    assert comparison.p_value is None and comparison.always_valid_p is None
    assert comparison.summary == "too early: 37 and 41 runs so far, need about 100 per variant"
    assert "too early: 37 and 41 runs so far" in render_text(report)


def test_a_winner_is_named_when_the_always_valid_test_says_so(project: Project, tmp_path: Path) -> None:
    db = fresh_db(tmp_path / "report.db")
    seed_split(db, {"a": (1000, 100), "b": (1000, 200)})
    report = journey_report(db, project.journeys["chat_recovery"])
    comparison = only_comparison(report)
    (experiment,) = report.experiments

    assert [(arm.name, arm.runs, arm.converted) for arm in experiment.arms] == [
        ("a", 1000, 100),
        ("b", 1000, 200),
    ]
    assert experiment.control == "a"
    assert comparison.verdict == "winner" and comparison.winner == "b"
    assert comparison.lift == pytest.approx(0.1)
    assert comparison.p_value == pytest.approx(stats.two_proportion_z_test(100, 1000, 200, 1000)[1])  # type: ignore[index]
    interval = stats.difference_interval(100, 1000, 200, 1000)
    assert comparison.lift_interval == interval and interval is not None
    assert comparison.relative_interval == stats.ratio_interval(100, 1000, 200, 1000)
    # Daily looks: each day adds 100 runs per arm; conversions land the day after assignment.
    seen: dict[str, dict[Any, list[float]]] = {"a": {}, "b": {}}
    for arm, converting in (("a", 100), ("b", 200)):
        for number in range(1000):
            day = (START + timedelta(days=number % 10)).date()
            seen[arm].setdefault(day, [0, 0, 0.0])[0] += 1
            if number < converting:
                later = day + timedelta(days=1)
                seen[arm].setdefault(later, [0, 0, 0.0])[1] += 1
    # Looks count once both arms have 100 runs: from the first day on here.
    looks = [look for look in daily_looks(seen["a"], seen["b"]) if min(look[1], look[3]) >= 100]
    assert len(looks) == 11
    expected = stats.always_valid_p_value(looks)
    assert comparison.always_valid_p == pytest.approx(expected) and expected < 0.05
    assert comparison.summary == (
        f"b converts better than a: +10.0 points (95% CI {interval.low * 100:+.1f} to "
        f"{interval.high * 100:+.1f}), always-valid p = {expected:.3f}"
    )


def test_without_enough_evidence_there_is_no_clear_winner_yet(project: Project, tmp_path: Path) -> None:
    db = fresh_db(tmp_path / "report.db")
    seed_split(db, {"a": (300, 30), "b": (300, 33)})
    comparison = only_comparison(journey_report(db, project.journeys["chat_recovery"]))

    assert comparison.verdict == "no clear winner yet" and comparison.winner is None
    assert comparison.p_value is not None and comparison.always_valid_p is not None
    assert comparison.always_valid_p >= 0.05
    assert comparison.summary.startswith("no clear winner yet: b +1.0 points against a")


def test_the_holdout_is_measured_against_everyone_else(project: Project, tmp_path: Path) -> None:
    db = fresh_db(tmp_path / "report.db")
    seed_split(db, {"holdout": (1000, 50), "rest": (4000, 600)}, journey="cart_abandonment", holdout=True)
    report = journey_report(db, project.journeys["cart_abandonment"])

    assert report.holdout is not None
    assert [(arm.name, arm.runs, arm.converted) for arm in report.holdout.arms] == [
        ("holdout", 1000, 50),
        ("messaged", 4000, 600),
    ]
    assert report.holdout.comparison.lift == pytest.approx(0.15 - 0.05)
    assert report.holdout.comparison.verdict == "winner" and report.holdout.comparison.winner == "messaged"
    assert "holdout (no marketing message)" in render_text(report)
    assert journey_report(db, project.journeys["chat_recovery"]).holdout is None


def test_the_range_selects_runs_by_entry_and_versions_are_broken_down(
    project: Project, tmp_path: Path
) -> None:
    db = fresh_db(tmp_path / "report.db")
    seed_split(db, {"a": (100, 10), "b": (100, 20)})
    with db.session() as session:
        session.add(
            RunRecord(
                run_id="old",
                workflow_id="old",
                journey="chat_recovery",
                version="v0",
                user_id="u",
                status="active",
                step="wait_for_resume",
                entered_at=START - timedelta(days=30),
            )
        )
    journey = project.journeys["chat_recovery"]
    everything = journey_report(db, journey)
    assert everything.totals.entered == 201 and everything.totals.active == 1
    assert [(v.version, v.entered, v.active, v.converted) for v in everything.versions] == [
        ("v1", 200, 0, 30),
        ("v0", 1, 1, 0),
    ]
    assert everything.steps[0].waiting == 1
    first_day = journey_report(db, journey, since=START, until=parse_bound("2026-03-02", end=True))
    assert first_day.totals.entered == 20  # ten runs per arm per day
    assert first_day.conversions.converted == 3  # numbers 0 of a, and 0 and 10 of b
    assert only_comparison(first_day).verdict == "too early"
    old = journey_report(db, journey, version="v0")
    assert old.totals.entered == 1 and old.experiments[0].arms[0].runs == 0


def test_a_forgotten_users_runs_stay_counted(project: Project, tmp_path: Path) -> None:
    scenario = load_scenario(TESTS / "chat_followup_variant_b.yaml", project)
    db = fresh_db(tmp_path / "report.db")
    asyncio.run(play_sim(scenario, project, db))
    journey = project.journeys["chat_recovery"]
    before = report_to_dict(journey_report(db, journey, now=START))

    asyncio.run(privacy.forget(db, "tom", temporal=None, actor="test", secret="test-secret-0123456789"))
    assert rows(db, RunRecord, user_id="tom") == [] and rows(db, MessageRecord, user_id="tom") == []
    assert len(rows(db, RunRecord, user_id="")) == 1, "the run is kept, without its user"
    assert report_to_dict(journey_report(db, journey, now=START)) == before


def keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {name for item in value.values() for name in keys(item)}
    if isinstance(value, list):
        return {name for item in value for name in keys(item)}
    return set()


def test_every_field_of_the_document_is_documented(project: Project, tmp_path: Path) -> None:
    db = fresh_db(tmp_path / "report.db")
    seed_split(db, {"a": (100, 10), "b": (100, 20)})
    seed_split(db, {"holdout": (10, 1), "rest": (10, 2)}, journey="chat_recovery", holdout=True)
    doc = report_to_dict(journey_report(db, project.journeys["chat_recovery"]))
    counted = {"a", "b", "completed", *FEEDBACK}  # values of maps, not fields
    documented = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")

    assert doc["holdout"] is not None and doc["experiments"] and doc["steps"][0]["branches"]
    prose = re.sub(r"```.*?```", "", documented, flags=re.S)
    code = " ".join(re.findall(r"`([^`]+)`", prose))  # every field is named in code
    missing = sorted(name for name in keys(doc) - counted if not re.search(rf"\b{name}\b", code))
    assert missing == [], missing


def test_parse_bound_reads_dates_and_instants() -> None:
    assert parse_bound("2026-03-02") == START
    assert parse_bound("2026-03-02", end=True) == START + timedelta(days=1)
    assert parse_bound("2026-03-02T08:00:00+08:00") == START
    assert parse_bound("2026-03-02T00:00:00") == START
    with pytest.raises(ValueError, match="not a date"):
        parse_bound("yesterday")


# --- the command ---------------------------------------------------------------------------------


@pytest.fixture
def home(project: Project, tmp_path: Path) -> Iterator[Path]:
    """A state directory whose database holds the variant-a chat scenario."""
    place = tmp_path / "home"
    place.mkdir()
    db = fresh_db(place / "nurture.db")
    asyncio.run(play_sim(load_scenario(TESTS / "chat_followup_variant_a.yaml", project), project, db))
    db.dispose()
    yield place


def run_cli(*argv: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(
        main,
        [*argv, "--journeys", str(ROOT / "journeys"), "--templates", str(ROOT / "templates")],
        env={"DATABASE_URL": "", **(env or {})},
        catch_exceptions=False,
    )


def test_the_command_prints_the_report(home: Path) -> None:
    result = run_cli("report", "chat_recovery", "--home", str(home))

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Chat recovery (chat_recovery)"
    assert "entered    1" in lines and "ended      1  (completed 1)" in lines
    table = "\n".join(lines)
    assert "\n  else:\n    agent_contact_sms  send sms chat_agent_contact" in table
    assert "\n        followup_email_a  send email chat_followup_a" in table
    assert "experiment chat_followup_copy (step followup_copy_test, control a)" in table
    assert "too early: 1 and 0 runs so far, need about 100 per variant" in table


def test_the_command_prints_json(home: Path, project: Project) -> None:
    result = run_cli("report", "chat_recovery", "--home", str(home), "--json", "--since", "2026-03-01")

    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["schema"] == SCHEMA and doc["journey"] == "chat_recovery"
    assert doc["since"] == "2026-03-01T00:00:00Z" and doc["until"] is None
    assert doc["totals"] == {"entered": 1, "active": 0, "ended": {"completed": 1}}
    assert [arm["runs"] for arm in doc["experiments"][0]["arms"]] == [1, 0]
    later = json.loads(
        run_cli("report", "chat_recovery", "--home", str(home), "--json", "--since", "2026-03-03").output
    )
    assert later["totals"]["entered"] == 0


def test_the_command_refuses_what_it_cannot_report(home: Path, tmp_path: Path) -> None:
    unknown = run_cli("report", "chat_recover", "--home", str(home))
    assert unknown.exit_code == 1 and "unknown journey 'chat_recover'" in unknown.output
    bad = run_cli("report", "chat_recovery", "--home", str(home), "--until", "soon")
    assert bad.exit_code == 2 and "'soon' is not a date" in bad.output
    empty = run_cli("report", "chat_recovery", "--home", str(tmp_path / "nowhere"))
    assert empty.exit_code == 1 and "no database at" in empty.output


def test_provider_feedback_is_counted_per_send_step_once_per_message_and_kind(
    project: Project, tmp_path: Path
) -> None:
    """Feedback recorded the way the webhooks record it, repeats and unknown kinds included."""
    scenario = load_scenario(TESTS / "chat_followup_variant_b.yaml", project)
    db = fresh_db(tmp_path / "report.db")
    asyncio.run(play_sim(scenario, project, db))
    journey = project.journeys["chat_recovery"]
    sent = [m for m in rows(db, MessageRecord, journey="chat_recovery") if m.status == "sent"]
    assert sent, "the scenario sends something"
    first = sent[0]
    for number, event in enumerate(("delivered", "open", "open", "click", "processed", "spamreport")):
        record_event(
            db,
            provider="sendgrid",
            event=event,
            at=START,
            provider_event_id=f"ev-{number}",
            idempotency_key=first.idempotency_key,
        )

    steps = {step.id: step for step in walk_counts(journey_report(db, journey).steps)}
    counts = steps[first.step_id].send
    assert counts is not None
    assert counts.feedback == {"delivered": 1, "bounced": 0, "opened": 1, "clicked": 1, "unsubscribed": 0, "spam": 1}
    # Forgetting the person deletes their feedback events; the message's counts stay.
    asyncio.run(privacy.forget(db, first.user_id, temporal=None, actor="test", secret="test-secret-0123456789"))
    steps = {step.id: step for step in walk_counts(journey_report(db, journey).steps)}
    assert steps[first.step_id].send == counts
