"""Smoke test of ``benchmarks/report.py`` on 1,000 runs: the bulk seeding writes consistent rows
into the migrated tables, with the schema's indexes intact, and the journey report gives the
numbers the floor queries give (what the benchmark times side by side)."""

from __future__ import annotations

import sys
from pathlib import Path

from sqlalchemy import inspect

from nurture.language.compiler import load_project
from nurture.reports.report import journey_report, walk_counts
from nurture.storage.db import Database

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report as bench  # noqa: E402  (benchmarks/ is a script directory, not a package)


def test_seeded_runs_and_floor(database: Database) -> None:
    postgres = database.engine.dialect.name == "postgresql"
    indexes_before = {
        t: sorted(i["name"] or "" for i in inspect(database.engine).get_indexes(t)) for t in bench.TABLES
    }
    bench.Loader(database.url).load(bench.Seeder(["v1", "v0"], seed=3), 1000, batch=300)
    indexes_after = {
        t: sorted(i["name"] or "" for i in inspect(database.engine).get_indexes(t)) for t in bench.TABLES
    }
    assert indexes_after == indexes_before

    got = bench.floor(database, bench.floor_queries(postgres))

    runs = got["runs by version, status, end reason"]
    assert sum(row[3] for row in runs) == 1000
    statuses = {(row[1], row[2]) for row in runs}
    assert (
        ("active", None) in statuses and ("ended", "completed") in statuses and ("ended", "goal") in statuses
    )
    active = sum(row[3] for row in runs if row[1] == "active")
    assert sum(row[2] for row in got["waiting per step"]) == active

    reached: dict[str, int] = {}
    variants: dict[str | None, int] = {}
    for _version, step, variant, count, *_ in got["reached, deferrals, variants per step"]:
        reached[step] = reached.get(step, 0) + count
        if step == bench.SPLIT:
            variants[variant] = variants.get(variant, 0) + count
    assert reached["welcome_sms"] == 1000  # every run reaches the first step, fewer the later ones
    assert reached["welcome_sms"] > reached["wait_2"] > reached["survey_email"] > 0
    assert set(variants) == {"a", "b", "control"}
    assert reached["offer_email_a"] == variants["a"] and "offer_email_control" not in reached

    messages: dict[str, int] = {}
    for step, status, _reason, channel, count in got["messages by step, status, reason, channel"]:
        messages[step] = messages.get(step, 0) + count
        assert status in {"sent", "skipped", "failed"} and channel in {"sms", "email", "wechat"}
    assert messages == {step: n for step, n in reached.items() if step in bench.SENDS}
    assert {row[1] for row in got["feedback per step"]} >= {"delivered", "open", "click"}
    conversions = {row[0]: row for row in got["conversions per variant"]}
    assert sum(row[1] for row in conversions.values()) == reached[bench.SPLIT]
    assert got["median time to convert"][0][0] > 0

    journey = load_project(Path(bench.__file__).parent / "report_journeys", ROOT / "templates").journeys[
        bench.JOURNEY
    ]
    report = journey_report(database, journey)
    assert report.totals.entered == 1000 and report.totals.active == active
    ended: dict[str, int] = {}
    for _version, status, reason, count, *_ in runs:
        if status == "ended":
            ended[reason] = ended.get(reason, 0) + count
    assert report.totals.ended == ended
    assert {s.id: s.reached for s in walk_counts(report.steps)} == reached
    waiting: dict[str, int] = {}
    for _version, step, count in got["waiting per step"]:
        waiting[step] = waiting.get(step, 0) + count
    assert {s.id: s.waiting for s in walk_counts(report.steps) if s.waiting} == waiting
    sends = {s.id: s.send for s in walk_counts(report.steps) if s.send is not None}
    assert {step: sum(send.outcomes.values()) for step, send in sends.items() if send.outcomes} == messages
    assert sends["reminder_email"].feedback["opened"] == sum(
        count
        for step, event, count in got["feedback per step"]
        if (step, event) == ("reminder_email", "open")
    )
    (experiment,) = report.experiments
    assert {arm.name: (arm.runs, arm.converted) for arm in experiment.arms} == {
        name: (row[1], row[2]) for name, row in conversions.items()
    }
