"""The valid path: the project's journeys compile, and what they compile to is stable and complete."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nurture.language import ir
from nurture.language.compiler import CompileResult, Settings, compile_project, compile_text, load_settings
from nurture.language.diagnostics import DiagnosticSink
from nurture.language.document import journey_schema
from nurture.language.durations import format_duration
from nurture.language.graph import mermaid
from nurture.language.source import load_yaml
from nurture.language.templates import TemplateStore

ROOT = Path(__file__).parents[1]
PROJECT_JOURNEYS = ("cart_abandonment", "chat_recovery", "course_launch", "post_purchase", "welcome_series")


@pytest.fixture(scope="module")
def compiled() -> CompileResult:
    return compile_project(ROOT / "journeys", ROOT / "templates")


def compile_source(
    text: str, path: str = "journeys/welcome.yaml", settings: Settings | None = None
) -> ir.Journey:
    sink = DiagnosticSink()
    journey = compile_text(
        textwrap.dedent(text), path, TemplateStore(ROOT / "templates"), settings or Settings(), sink
    )
    assert sink.items == [], "\n".join(d.headline() for d in sink.items)
    assert journey is not None
    return journey


def step_ids(journey: ir.Journey) -> list[str]:
    return [step.id for step in ir.walk(journey.steps)]


# --- the project's own journeys --------------------------------------------------------------------


def test_project_journeys_compile_without_errors(compiled: CompileResult) -> None:
    assert [d.headline() for d in compiled.diagnostics] == []
    assert compiled.errors == []
    assert compiled.project is not None
    assert sorted(compiled.project.journeys) == list(PROJECT_JOURNEYS)
    assert len(compiled.checked) == len(PROJECT_JOURNEYS)


def test_project_journeys_use_the_project_defaults(compiled: CompileResult) -> None:
    assert compiled.project is not None
    for journey in compiled.project.journeys.values():
        assert journey.timezone == "Asia/Shanghai"
        assert journey.quiet_hours == ir.QuietHours(start=21 * 60, end=8 * 60)
        assert Path(journey.source).stem == journey.id


@pytest.mark.parametrize("journey_id", PROJECT_JOURNEYS)
def test_journey_round_trips_through_json(compiled: CompileResult, journey_id: str) -> None:
    assert compiled.project is not None
    journey = compiled.project.journeys[journey_id]

    data = json.loads(json.dumps(ir.journey_to_dict(journey)))
    back = ir.journey_from_dict(data)

    assert back == journey
    assert ir.journey_to_dict(back) == data
    assert ir.content_version(back) == journey.version


@pytest.mark.parametrize("journey_id", PROJECT_JOURNEYS)
def test_a_runs_compact_journey_round_trips_and_leaves_out_only_defaults(compiled: CompileResult, journey_id: str) -> None:
    assert compiled.project is not None
    journey = compiled.project.journeys[journey_id]
    full, compact = ir.journey_to_dict(journey), ir.journey_payload(journey)

    assert ir.journey_from_dict(json.loads(json.dumps(compact))) == journey
    assert len(json.dumps(compact)) < len(json.dumps(full))

    def left_out(whole: Any, part: Any, at: str) -> list[str]:
        """The paths of keys ``part`` lacks, each after checking it holds what decoding gives back."""
        if isinstance(whole, dict):
            missing = [f"{at}.{k}" for k in whole if k not in part]
            return missing + [m for k in part for m in left_out(whole[k], part[k], f"{at}.{k}")]
        if isinstance(whole, list):
            assert len(whole) == len(part), at
            return [m for i, (w, p) in enumerate(zip(whole, part, strict=True)) for m in left_out(w, p, f"{at}[{i}]")]
        assert whole == part, at
        return []

    # Only fields left at their defaults are dropped: the journey's own settings all stay.
    dropped = left_out(full, compact, "journey")
    assert dropped, "nothing left out"
    assert not {"journey.id", "journey.version", "journey.steps", "journey.trigger"} & set(dropped)


def test_versions_are_stable_across_compiles(compiled: CompileResult) -> None:
    again = compile_project(ROOT / "journeys", ROOT / "templates")
    assert compiled.project is not None and again.project is not None
    first = {j.id: j.version for j in compiled.project.journeys.values()}
    second = {j.id: j.version for j in again.project.journeys.values()}
    assert first == second
    assert len(set(first.values())) == len(first)


# --- versions --------------------------------------------------------------------------------------

JOURNEY = """\
    journey: welcome
    trigger:
      event: Signed Up
    steps:
      - send: email
        template: welcome
      - wait: 1d
      - send: email
        template: popular_courses
"""


def test_version_changes_when_a_step_changes() -> None:
    original = compile_source(JOURNEY)
    same = compile_source(JOURNEY)
    longer_wait = compile_source(JOURNEY.replace("wait: 1d", "wait: 2d"))
    transactional = compile_source(JOURNEY + "        category: transactional\n")

    assert same.version == original.version
    assert longer_wait.version != original.version
    assert transactional.version != original.version
    assert transactional.version != longer_wait.version


def test_version_ignores_where_the_file_is() -> None:
    here = compile_source(JOURNEY, "journeys/welcome.yaml")
    elsewhere = compile_source(JOURNEY, "/srv/marketing/campaigns/welcome.yaml")

    assert here.source != elsewhere.source
    assert here.version == elsewhere.version


def test_version_ignores_comments_and_layout() -> None:
    plain = compile_source(JOURNEY)
    commented = compile_source(
        """\
        # The welcome series.
        journey: welcome
        trigger: {event: Signed Up}
        steps:
          - {send: email, template: welcome}   # at sign-up
          - wait: 24h
          - {send: email, template: popular_courses}
        """
    )
    assert commented.version == plain.version


# --- durations as written --------------------------------------------------------------------------

DURATIONS = """\
    journey: welcome
    trigger:
      event: Signed Up
    goal: {event: Order Completed, within: 1d12h}
    steps:
      - wait: 30d
      - wait_for: Order Completed
        timeout: 2w
        else:
          - wait: 90m
      - send: email
        template: welcome
"""


def test_durations_are_shown_as_written() -> None:
    journey = compile_source(DURATIONS)
    back = ir.journey_from_dict(json.loads(json.dumps(ir.journey_to_dict(journey))))

    chart = mermaid(back)

    assert "wait 30d" in chart and "4w" not in chart
    assert "up to 2w" in chart and "14d" not in chart
    assert "wait 90m" in chart and "1h30m" not in chart
    assert "within 1d12h" in chart and "36h" not in chart


def test_the_spelling_of_a_duration_is_not_part_of_the_version() -> None:
    same = DURATIONS.replace("30d", "720h").replace("2w", "14d").replace("90m", "1h30m").replace("1d12h", "36h")
    assert same != DURATIONS
    assert compile_source(same).version == compile_source(DURATIONS).version
    assert compile_source(DURATIONS.replace("30d", "31d")).version != compile_source(DURATIONS).version


def test_a_duration_nobody_wrote_is_shown_in_days_at_most() -> None:
    assert format_duration(30 * 86400) == "30d"
    assert format_duration(14 * 86400 + 7200) == "14d2h"
    assert format_duration(5400) == "1h30m"
    assert format_duration(0) == "0s"


# --- step ids --------------------------------------------------------------------------------------

NESTED = """\
    journey: welcome
    trigger:
      event: Signed Up
    steps:
      - send: email
        template: welcome
      - wait: 1d
      - wait_for: Order Completed
        timeout: 1d
        then:
          - wait: 1h
          - update: {buyer: true}
        else:
          - exit: no_order
      - id: last_call
        wait_for: Order Completed
        timeout: 1d
        else:
          - send: sms
            template: welcome_coupon
      - branch:
          - if: "user.vip"
            then:
              - wait: 1h
          - else:
              - wait: 2h
      - split: subject_test
        variants:
          a: {weight: 1, steps: [{wait: 1h}]}
          b: {weight: 1}
"""


def test_generated_step_ids_follow_positions_and_parent_ids() -> None:
    journey = compile_source(NESTED)
    assert step_ids(journey) == [
        "s1",
        "s2",
        "s3",
        "s3.then.1",
        "s3.then.2",
        "s3.else.1",
        "last_call",
        "last_call.else.1",
        "s5",
        "s5.arm1.1",
        "s5.else.1",
        "s6",
        "s6.a.1",
    ]
    assert isinstance(journey.step("last_call.else.1"), ir.Send)
    assert isinstance(journey.step("s3.else.1"), ir.Exit)


def test_generated_step_ids_are_the_same_on_every_compile() -> None:
    assert step_ids(compile_source(NESTED)) == step_ids(compile_source(NESTED))


def test_ids_under_an_explicit_id_survive_inserting_steps_before_it() -> None:
    edited = NESTED.replace("  - wait: 1d\n", "  - wait: 1d\n      - wait: 2h\n", 1)
    ids = step_ids(compile_source(edited))
    assert ids[:4] == ["s1", "s2", "s3", "s4"]
    assert "last_call.else.1" in ids


def test_step_ids_are_unique_even_when_an_explicit_id_looks_generated() -> None:
    """An explicit ``id: s2`` on the first step must not end up shared with the generated ``s2``."""
    sink = DiagnosticSink()
    journey = compile_text(
        textwrap.dedent(
            """\
            journey: welcome
            trigger:
              event: Signed Up
            steps:
              - id: s2
                wait: 1h
              - wait: 2h
            """
        ),
        "journeys/welcome.yaml",
        TemplateStore(ROOT / "templates"),
        Settings(),
        sink,
    )
    if journey is None:
        assert any("s2" in d.message for d in sink.errors)
    else:
        ids = step_ids(journey)
        assert len(ids) == len(set(ids)), ids


def test_compiled_journey_resolves_values() -> None:
    journey = compile_source(
        """\
        journey: welcome
        trigger:
          event: Signed Up
          if: "event.properties.plan == 'pro'"
        goal:
          event: Order Completed
          within: 7d
        steps:
          - wait: 1d12h
          - wait_until: "09:30"
            days: [fri, mon]
          - send: sms
            template: welcome_coupon
            fallback: [wechat]
            category: transactional
        """
    )
    wait, wait_until, send = journey.steps
    assert journey.name == "Welcome"
    assert journey.trigger.cond is not None
    assert journey.trigger.cond.source == "event.properties.plan == 'pro'"
    assert journey.goal == ir.Goal(event="Order Completed", within=7 * 86400)
    assert wait == ir.Wait(id="s1", seconds=36 * 3600)
    assert wait_until == ir.WaitUntil(id="s2", minute=9 * 60 + 30, days=(0, 4))
    assert send == ir.Send(
        id="s3", channel="sms", template="welcome_coupon", fallback=("wechat",), category="transactional"
    )


# --- project defaults ------------------------------------------------------------------------------


def write_project(root: Path, config: str | None) -> tuple[Path, Path]:
    journeys = root / "journeys"
    journeys.mkdir()
    (journeys / "plain.yaml").write_text(
        "journey: plain\ntrigger: {event: Signed Up}\nsteps:\n  - wait: 1d\n", encoding="utf-8"
    )
    (journeys / "own.yaml").write_text(
        "journey: own\n"
        "trigger: {event: Signed Up}\n"
        "timezone: America/New_York\n"
        'quiet_hours: {start: "22:30", end: "07:00"}\n'
        "steps:\n  - wait: 1d\n",
        encoding="utf-8",
    )
    if config is not None:
        (root / "nurture.yaml").write_text(config, encoding="utf-8")
    return journeys, root / "templates"


def test_project_defaults_fill_journeys_without_their_own(tmp_path: Path) -> None:
    journeys, templates = write_project(
        tmp_path, 'timezone: Europe/Berlin\nquiet_hours: {start: "20:00", end: "09:00"}\n'
    )
    result = compile_project(journeys, templates)
    assert result.errors == []
    assert result.project is not None

    plain = result.project.journeys["plain"]
    assert plain.timezone == "Europe/Berlin"
    assert plain.quiet_hours == ir.QuietHours(start=20 * 60, end=9 * 60)

    own = result.project.journeys["own"]
    assert own.timezone == "America/New_York"
    assert own.quiet_hours == ir.QuietHours(start=22 * 60 + 30, end=7 * 60)


def test_without_project_defaults_journeys_use_utc_and_no_quiet_hours(tmp_path: Path) -> None:
    journeys, templates = write_project(tmp_path, None)
    result = compile_project(journeys, templates)
    assert result.project is not None
    plain = result.project.journeys["plain"]
    assert plain.timezone == "UTC"
    assert plain.quiet_hours is None


def test_an_explicit_config_file_is_used(tmp_path: Path) -> None:
    journeys, templates = write_project(tmp_path, "timezone: Europe/Berlin\n")
    other = tmp_path / "staging.yaml"
    other.write_text("timezone: Asia/Tokyo\n", encoding="utf-8")
    result = compile_project(journeys, templates, other)
    assert result.project is not None
    assert result.project.journeys["plain"].timezone == "Asia/Tokyo"


def test_project_defaults_change_the_version() -> None:
    berlin = compile_source(JOURNEY, settings=Settings(timezone="Europe/Berlin"))
    tokyo = compile_source(JOURNEY, settings=Settings(timezone="Asia/Tokyo"))
    assert berlin.timezone == "Europe/Berlin"
    assert berlin.version != tokyo.version


def test_a_mistake_in_the_project_defaults_is_reported_in_that_file(tmp_path: Path) -> None:
    journeys, templates = write_project(tmp_path, "timezone: Europe/Berln\nquite_hours: {}\n")
    result = compile_project(journeys, templates)
    assert result.project is None
    found = sorted((Path(d.path).name, d.line, d.key) for d in result.errors)
    assert found == [("nurture.yaml", 1, "timezone"), ("nurture.yaml", 2, "quite_hours")]
    messages = " ".join(d.message for d in result.errors)
    assert "did you mean 'Europe/Berlin'?" in messages
    assert "did you mean 'quiet_hours'?" in messages


# --- JSON schema -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = journey_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def load_journey(name: str) -> dict[str, object]:
    path = ROOT / "journeys" / f"{name}.yaml"
    data, _ = load_yaml(path.read_text(encoding="utf-8"), str(path))
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize("journey_id", PROJECT_JOURNEYS)
def test_schema_accepts_the_project_journeys(validator: Any, journey_id: str) -> None:
    errors = [e.message for e in validator.iter_errors(load_journey(journey_id))]
    assert errors == []


def test_schema_rejects_an_unknown_top_level_key(validator: Any) -> None:
    data = load_journey("welcome_series")
    data["trigers"] = data.pop("trigger")
    messages = [e.message for e in validator.iter_errors(data)]
    assert any("'trigers' was unexpected" in m for m in messages), messages
    assert any("'trigger' is a required property" in m for m in messages), messages


def test_schema_rejects_empty_steps_and_unknown_channels(validator: Any) -> None:
    data = load_journey("welcome_series")
    assert not validator.is_valid({**data, "steps": []})
    assert not validator.is_valid({**data, "steps": [{"send": "fax", "template": "welcome"}]})
    assert validator.is_valid({**data, "steps": [{"send": "sms", "template": "welcome"}]})


def test_the_project_file_refuses_an_empty_quiet_window(tmp_path: Path) -> None:
    (tmp_path / "nurture.yaml").write_text('quiet_hours: {start: "22:00", end: "22:00"}\n', encoding="utf-8")
    sink = DiagnosticSink()

    load_settings(tmp_path / "nurture.yaml", sink)

    (error,) = sink.errors
    assert (error.line, error.message) == (1, "quiet hours start and end are equal: the window would be empty")


def test_an_unquoted_off_turns_a_channels_quiet_hours_off(tmp_path: Path) -> None:
    (tmp_path / "nurture.yaml").write_text(
        'quiet_hours:\n  start: "21:00"\n  end: "08:00"\n  email: off\n  sms: "off"\n', encoding="utf-8"
    )
    sink = DiagnosticSink()

    settings = load_settings(tmp_path / "nurture.yaml", sink)

    assert sink.errors == []
    assert settings.policy.quiet_by_channel == (ir.ChannelQuiet("email", None), ir.ChannelQuiet("sms", None))


def test_a_journey_in_two_files_is_an_error(tmp_path: Path) -> None:
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    (tmp_path / "templates").mkdir()
    body = "journey: greet\ntrigger: {event: Signed Up}\nsteps:\n  - wait: 1h\n"
    (journeys / "greet.yaml").write_text(body, encoding="utf-8")
    (journeys / "greet.yml").write_text(body.replace("1h", "2h"), encoding="utf-8")

    result = compile_project(journeys, tmp_path / "templates")

    assert result.project is None
    assert [d.message for d in result.errors] == ["journey 'greet' is also defined in greet.yaml: keep one file"]


GOAL_JOURNEY = """
journey: welcome
trigger: {event: Signed Up}
goal: {event: Order Completed, within: 7d%s}
steps:
  - send: email
    template: welcome
"""


def test_a_goal_may_measure_from_the_last_message_and_carry_a_value() -> None:
    journey = compile_source(GOAL_JOURNEY % ', from: last_message, value: "event.properties.total"')
    assert journey.goal is not None
    assert journey.goal.measured_from == "last_message"
    assert journey.goal.value is not None and journey.goal.value.source == "event.properties.total"
    back = ir.journey_from_dict(json.loads(json.dumps(ir.journey_to_dict(journey))))
    assert back == journey


def test_goal_options_left_at_their_defaults_keep_the_version_a_journey_had() -> None:
    plain = compile_source(GOAL_JOURNEY % "")
    # The version as it was computed before goals had `value` and `from`: without those keys.
    data = ir.journey_to_dict(plain)
    for key in ("version", "source"):
        data.pop(key)
    for goal_key in ("value", "measured_from", "within_written", "audience"):
        data["goal"].pop(goal_key)
    data["trigger"].pop("audience")
    data["policy"].pop("holdout")
    data.pop("rate")
    data.pop("re_entry_after")
    data.pop("date_trigger")
    for step in data["steps"]:
        for later in ("written", "spread", "rate", "date", "offset", "audience"):  # keys added since
            step.pop(later, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert plain.version == hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
    assert compile_source(GOAL_JOURNEY % ", from: last_message").version != plain.version
    assert compile_source(GOAL_JOURNEY % ', value: "event.properties.total"').version != plain.version
