"""Broadcast files: how they compile into a journey, how mistakes are reported (file:line:col,
did-you-mean), cron arithmetic, and the occurrence a start or the scheduler picks."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nurture.engine.interpreter import ReadProfile, Run, Sleep
from nurture.engine.model import Event
from nurture.language import ir
from nurture.language.audiences import Audience
from nurture.language.broadcasts import (
    ONCE,
    Broadcast,
    CronError,
    compile_broadcast_text,
    current_occurrence,
    next_occurrence,
    occurrence_journey,
    parse_cron,
)
from nurture.language.compiler import CompileResult, Settings, compile_project
from nurture.language.diagnostics import Diagnostic, DiagnosticSink
from nurture.language.templates import TemplateStore

ROOT = Path(__file__).resolve().parents[1]
PATH = "broadcasts/launch.yaml"
AUDIENCES = {"python_fans": Audience(id="python_fans")}


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> TemplateStore:
    root = tmp_path_factory.mktemp("templates")
    (root / "email").mkdir()
    (root / "email" / "launch.mjml").write_text(
        '---\nsubject: "New course"\n---\n<mjml><mj-body><mj-section><mj-column><mj-text>Hi</mj-text>'
        "</mj-column></mj-section></mj-body></mjml>\n",
        encoding="utf-8",
    )
    return TemplateStore(root)


def compile_broadcast(
    text: str, templates: TemplateStore, audiences: dict[str, Audience] | None = AUDIENCES
) -> tuple[Broadcast | None, list[Diagnostic]]:
    sink = DiagnosticSink()
    settings = Settings(timezone="Asia/Shanghai", topics=("courses",))
    found = compile_broadcast_text(textwrap.dedent(text), PATH, templates, settings, sink, audiences=audiences)
    return found, sink.items


def only_error(text: str, templates: TemplateStore, **kwargs: object) -> Diagnostic:
    found, diagnostics = compile_broadcast(text, templates, **kwargs)  # type: ignore[arg-type]
    errors = [d for d in diagnostics if d.severity == "error"]
    assert found is None and len(errors) == 1, errors
    return errors[0]


LAUNCH = """\
    name: Python course launch
    audience: python_fans
    schedule: {at: "2026-12-10 09:00", timezone: person}
    rate: 5000/h
    goal: {event: Order Completed, within: 7d}
    steps:
      - send: email
        template: launch
        topic: courses
      - wait: 1d
      - branch:
          - if: "user.plan == 'pro'"
            then:
              - exit: pro
      - send: email
        template: launch
"""


def test_a_broadcast_compiles_to_a_journey_marked_as_a_broadcast(templates: TemplateStore) -> None:
    found, diagnostics = compile_broadcast(LAUNCH, templates)
    assert found is not None, diagnostics
    assert (found.id, found.name, found.audience) == ("launch", "Python course launch", "python_fans")
    assert found.journey.id == "broadcast:launch" and found.journey.trigger.event == ""
    assert found.rate == ir.Rate(count=5000, per=3600, written="5000/h")
    assert found.journey.rate is None, "a broadcast's rate paces its starts, not its sends"
    assert found.journey.goal is not None and found.journey.goal.within == 7 * 86400
    assert [s.kind for s in found.journey.steps] == ["send", "wait", "branch", "send"]
    assert found.schedule is not None and found.schedule.person_time
    assert found.schedule.at == datetime(2026, 12, 10, 9, 0)
    assert found.journey.timezone == "Asia/Shanghai", "the project's zone for people without one"


def test_an_occurrence_waits_for_its_moment_in_the_persons_zone(templates: TemplateStore) -> None:
    found, _ = compile_broadcast(LAUNCH, templates)
    assert found is not None
    now = datetime(2026, 12, 9, 12, 0, tzinfo=UTC)
    occurrence = current_occurrence(found, now, "Asia/Shanghai")
    assert occurrence is not None and occurrence.key == "2026-12-10T09:00"
    assert occurrence.due == datetime(2026, 12, 9, 19, 0, tzinfo=UTC), "09:00 comes first at UTC+14"
    journey = occurrence_journey(found, occurrence.moment)
    assert journey.steps[0] == ir.WaitUntil(id="scheduled", minute=None, date=journey.steps[0].date)  # type: ignore[union-attr]
    assert journey.version != found.journey.version
    run = Run(journey, run_id="r1", user_id="u1", key=occurrence.key, event=Event("Broadcast", now), entered_at=now)
    assert isinstance(run.start(), ReadProfile)
    sleep = run.resume({"timezone": "America/New_York"}, now)
    assert isinstance(sleep, Sleep) and sleep.until == datetime(2026, 12, 10, 14, 0, tzinfo=UTC)
    run = Run(journey, run_id="r2", user_id="u2", key=occurrence.key, event=Event("Broadcast", now), entered_at=now)
    run.start()
    sleep = run.resume({}, now)  # no zone of their own: the project's
    assert isinstance(sleep, Sleep) and sleep.until == datetime(2026, 12, 10, 1, 0, tzinfo=UTC)


def test_an_occurrence_in_the_projects_zone_is_one_instant(templates: TemplateStore) -> None:
    found, _ = compile_broadcast(LAUNCH.replace("timezone: person", "timezone: project"), templates)
    assert found is not None
    occurrence = current_occurrence(found, datetime(2026, 12, 1, tzinfo=UTC), "Asia/Shanghai")
    assert occurrence is not None and occurrence.moment == "2026-12-10T01:00+00:00"
    journey = occurrence_journey(found, occurrence.moment)
    now = datetime(2026, 12, 9, tzinfo=UTC)
    run = Run(journey, run_id="r1", user_id="u1", key=occurrence.key, event=Event("Broadcast", now), entered_at=now)
    run.start()
    sleep = run.resume({"timezone": "America/New_York"}, now)
    assert isinstance(sleep, Sleep) and sleep.until == datetime(2026, 12, 10, 1, 0, tzinfo=UTC)


def test_without_a_schedule_there_is_one_occurrence_and_no_wait(templates: TemplateStore) -> None:
    found, _ = compile_broadcast(LAUNCH.replace('    schedule: {at: "2026-12-10 09:00", timezone: person}\n', ""), templates)
    assert found is not None and found.schedule is None
    occurrence = current_occurrence(found, datetime.now(UTC), "UTC")
    assert occurrence is not None and (occurrence.key, occurrence.moment) == (ONCE, None)
    assert occurrence_journey(found, None) is found.journey


def test_a_cron_occurrence_is_the_latest_due_within_a_day(templates: TemplateStore) -> None:
    text = LAUNCH.replace('{at: "2026-12-10 09:00", timezone: person}', '{cron: "0 9 * * MON"}')
    found, diagnostics = compile_broadcast(text, templates)
    assert found is not None, diagnostics
    monday_10 = datetime(2026, 12, 7, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
    occurrence = current_occurrence(found, monday_10, "Asia/Shanghai")
    assert occurrence is not None and occurrence.key == "2026-12-07T09:00"
    assert occurrence.due == datetime(2026, 12, 7, 1, 0, tzinfo=UTC)
    assert current_occurrence(found, monday_10 + timedelta(days=2), "Asia/Shanghai") is None
    upcoming = next_occurrence(found, monday_10, "Asia/Shanghai")
    assert upcoming is not None and upcoming.key == "2026-12-14T09:00"


def test_cron_fields() -> None:
    cron = parse_cron("*/15 9-17 * * mon-fri")
    assert cron.next_after(datetime(2026, 12, 5, 12, 0)) == datetime(2026, 12, 7, 9, 0), "Saturday: on to Monday"
    assert cron.next_after(datetime(2026, 12, 7, 9, 0)) == datetime(2026, 12, 7, 9, 15)
    both = parse_cron("0 8 1 * SUN")  # the 1st or any Sunday, as classic cron
    assert both.next_after(datetime(2026, 11, 30, 9, 0)) == datetime(2026, 12, 1, 8, 0)
    assert both.next_after(datetime(2026, 12, 1, 9, 0)) == datetime(2026, 12, 6, 8, 0)
    assert parse_cron("0 0 * * 7").weekdays == frozenset({0})
    for text, message in (
        ("0 9 * *", "five fields"),
        ("0 25 * * *", "hour 25 is out of range 0-23"),
        ("0 9 * * MOM", "did you mean 'mon'"),
        ("0 9 5-1 * *", "runs backwards"),
        ("*/0 9 * * *", "step after /"),
    ):
        with pytest.raises(CronError, match=message):
            parse_cron(text)


@pytest.mark.parametrize(
    ("change", "line", "column", "message"),
    [
        (("audience: python_fans", "audience: python_fan"), 2, 11, "unknown audience 'python_fan' (did you mean 'python_fans'?)"),
        (("rate: 5000/h", "rate: 5000/hour"), 4, 7, "is not a rate"),
        (("rate: 5000/h", "rat: 5000/h"), 4, 1, "unknown key 'rat' (did you mean 'rate'?)"),
        (("goal:", "trigger: {event: Signed Up}\ngoal:"), 5, 1, "a broadcast has no trigger"),
        (('{at: "2026-12-10 09:00", timezone: person}', '{at: "2026-12-10 9am"}'), 3, 16, "is not a date and time"),
        (('{at: "2026-12-10 09:00", timezone: person}', '{at: "2026-02-30 09:00"}'), 3, 16, "day is out of range"),
        (('{at: "2026-12-10 09:00", timezone: person}', '{cron: "0 9 * * MON", at: "2026-12-10 09:00"}'), 3, 11, "either at: (once) or cron:"),
        (('{at: "2026-12-10 09:00", timezone: person}', '{cron: "0 9 * * MON", timezone: local}'), 3, 43, "'local' (text) is not allowed; expected 'project' or 'person'"),
        (('{at: "2026-12-10 09:00", timezone: person}', '{cron: "0 9 * * MON", tz: person}'), 3, 33, "unknown key 'tz'; allowed keys: at, cron, timezone"),
        (("template: launch\n    topic", "template: lanch\n    topic"), 8, 15, "no email template 'lanch' (did you mean 'launch'?)"),
        (("topic: courses", "topic: course"), 9, 12, "unknown topic 'course' (did you mean 'courses'?)"),
        (("  - wait: 1d", "  - wait: 1 day"), 10, 11, "not a duration"),
    ],
)
def test_mistakes_are_reported_where_they_are(
    templates: TemplateStore, change: tuple[str, str], line: int, column: int, message: str
) -> None:
    text = textwrap.dedent(LAUNCH).replace(*change, 1)
    error = only_error(text, templates)
    assert (error.path, error.line, error.column) == (PATH, line, column), error
    assert message in error.message


def test_a_missing_audience_or_steps_is_named(templates: TemplateStore) -> None:
    _, diagnostics = compile_broadcast("name: Launch\n", templates)
    messages = {d.message for d in diagnostics}
    assert "'audience' is required" in messages
    assert any(m.startswith("'steps' is required") for m in messages)


def test_audiences_are_checked_only_against_known_ones(templates: TemplateStore) -> None:
    error = only_error(LAUNCH, templates, audiences={})
    assert "unknown audience 'python_fans'; no audiences are defined (add audiences/python_fans.yaml)" in error.message
    found, _ = compile_broadcast(LAUNCH, templates, audiences=None)
    assert found is not None


def test_a_project_compiles_its_broadcasts_directory(tmp_path: Path) -> None:
    broadcasts, audiences = tmp_path / "broadcasts", tmp_path / "audiences"
    broadcasts.mkdir()
    audiences.mkdir()
    (broadcasts / "launch.yaml").write_text(
        "audience: python_fans\nsteps:\n  - send: email\n    template: course_launch\n", encoding="utf-8"
    )
    (broadcasts / "broken.yaml").write_text("audience: python_fans\nsteps: []\n", encoding="utf-8")

    def compile_it() -> CompileResult:
        return compile_project(
            ROOT / "journeys",
            ROOT / "templates",
            ROOT / "nurture.yaml",
            audiences_dir=audiences,
            broadcasts_dir=broadcasts,
        )

    # The project's audience files are what a broadcast may name.
    result = compile_it()
    found = [(Path(e.path).name, e.line, "unknown audience 'python_fans'" in e.message) for e in result.errors]
    assert found == [("broken.yaml", 1, True), ("broken.yaml", 2, False), ("launch.yaml", 1, True)]
    (audiences / "python_fans.yaml").write_text("where: user.vip\n", encoding="utf-8")
    result = compile_it()
    [error] = result.errors
    assert (Path(error.path).name, error.line, error.message) == ("broken.yaml", 2, "must not be empty")
    (broadcasts / "broken.yaml").unlink()
    result = compile_it()
    assert result.project is not None and list(result.project.broadcasts) == ["launch"]
    assert result.project.broadcasts["launch"].journey.id == "broadcast:launch"


def test_a_broadcast_in_two_files_or_with_a_bad_file_name_is_reported(tmp_path: Path) -> None:
    """As for an audience: the second file of one id is named with the first, and an id must be a
    valid one."""
    broadcasts = tmp_path / "broadcasts"
    broadcasts.mkdir()
    source = "audience: python_fans\nsteps:\n  - send: email\n    template: course_launch\n"
    for name in ("launch.yaml", "launch.yml", "Big-Launch.yaml"):
        (broadcasts / name).write_text(source, encoding="utf-8")
    (tmp_path / "audiences").mkdir()
    (tmp_path / "audiences" / "python_fans.yaml").write_text("where: user.vip\n", encoding="utf-8")
    result = compile_project(
        ROOT / "journeys",
        ROOT / "templates",
        ROOT / "nurture.yaml",
        audiences_dir=tmp_path / "audiences",
        broadcasts_dir=broadcasts,
    )
    found = [(Path(e.path).name, e.line, e.message) for e in result.errors]
    assert found == [
        (
            "Big-Launch.yaml",
            1,
            "'Big-Launch' is not a valid broadcast id: name the file with lowercase letters, digits and _, "
            "starting with a letter",
        ),
        ("Big-Launch.yaml", 1, "'Big-Launch' is not a valid id: use lowercase letters, digits and _, starting with a letter"),
        ("launch.yml", 0, "broadcast 'launch' is also defined in launch.yaml: keep one file"),
    ]
