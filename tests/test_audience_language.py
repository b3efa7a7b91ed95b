"""Audience files and journeys that name audiences: what compiles to what, and where and how the
compiler reports each mistake (file:line:col, with "did you mean")."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from nurture.cli.main import main
from nurture.language import ir
from nurture.language.audiences import ENTERED, EXITED, Activity
from nurture.language.compiler import CompileResult, compile_project, load_project
from nurture.language.diagnostics import Diagnostic
from nurture.language.evaluation import is_true
from nurture.language.graph import mermaid

ROOT = Path(__file__).resolve().parent.parent
PROJECT = Path(__file__).parent / "projects" / "audiences"

SETTINGS = """\
topics: [promotions, newsletter]
"""

DECLARED = """\
topics: [promotions]
traits:
  interest: string
  first_name: string
events:
  Order Completed:
    properties:
      total: number
  Product Viewed:
    properties:
      price: number
"""

LAPSED = """\
name: Lapsed customers
description: Bought before, not in the last 30 days.
did:
  - {event: Order Completed}
not_did:
  - {event: Order Completed, within: 30d}
"""

WIN_BACK = """\
journey: win_back
trigger:
  audience: lapsed_customers
  if: "user.first_name != 'test'"
steps:
  - send: email
    template: hello
"""


def compile_files(
    tmp_path: Path, audiences: dict[str, str], journeys: dict[str, str] | None = None, settings: str = SETTINGS
) -> CompileResult:
    """A project in ``tmp_path`` with these audience and journey files, compiled."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "nurture.yaml").write_text(settings, encoding="utf-8")
    for folder, files in (("audiences", audiences), ("journeys", journeys or {})):
        (tmp_path / folder).mkdir(exist_ok=True)
        for name, text in files.items():
            (tmp_path / folder / name).write_text(textwrap.dedent(text), encoding="utf-8")
    (tmp_path / "journeys").mkdir(exist_ok=True)
    (tmp_path / "templates" / "email").mkdir(parents=True, exist_ok=True)
    (tmp_path / "templates" / "email" / "hello.mjml").write_text(
        '---\nsubject: "Hello"\n---\n<mjml><mj-body><mj-section><mj-column><mj-text>Hi</mj-text>'
        "</mj-column></mj-section></mj-body></mjml>\n",
        encoding="utf-8",
    )
    return compile_project(tmp_path / "journeys", tmp_path / "templates")


# --- what compiles to what ---------------------------------------------------------------------


def test_an_audience_file_compiles_to_its_clauses(tmp_path: Path) -> None:
    source = """\
        name: Keen Python browsers
        where: 'user.interest == "python"'
        did:
          - {event: Product Viewed, at_least: 3, within: 7d, if: 'event.properties.price > 10'}
        not_did:
          - {event: Order Completed, within: 30d}
        subscribed: [promotions]
        """
    result = compile_files(tmp_path, {"keen.yaml": source})
    assert result.errors == []
    assert result.project is not None
    keen = result.project.audiences["keen"]
    assert keen.name == "Keen Python browsers" and keen.subscribed == ("promotions",)
    assert keen.where is not None and keen.where.source == 'user.interest == "python"'
    [viewed] = keen.did
    assert (viewed.event, viewed.at_least, viewed.within, viewed.within_written) == ("Product Viewed", 3, 7 * 86400, "7d")
    assert viewed.cond is not None and viewed.cond.source == "event.properties.price > 10"
    assert keen.not_did == (Activity("Order Completed", within=30 * 86400),)
    assert keen.source.endswith("keen.yaml")
    assert str(tmp_path / "audiences" / "keen.yaml") in result.checked


def test_a_project_without_audiences_has_none() -> None:
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    assert project.audiences == {}


def test_the_audiences_directory_can_be_named(tmp_path: Path) -> None:
    compile_files(tmp_path, {})
    elsewhere = tmp_path / "segments"
    elsewhere.mkdir()
    (elsewhere / "lapsed_customers.yaml").write_text(LAPSED, encoding="utf-8")
    (tmp_path / "journeys" / "win_back.yaml").write_text(WIN_BACK, encoding="utf-8")
    assert compile_project(tmp_path / "journeys", tmp_path / "templates").project is None
    project = load_project(tmp_path / "journeys", tmp_path / "templates", audiences_dir=elsewhere)
    assert list(project.audiences) == ["lapsed_customers"]


def test_an_audience_trigger_is_an_event_rule_on_the_audience_event(tmp_path: Path) -> None:
    result = compile_files(tmp_path, {"lapsed_customers.yaml": LAPSED}, {"win_back.yaml": WIN_BACK})
    assert result.project is not None, result.errors
    journey = result.project.journeys["win_back"]
    trigger = journey.trigger
    assert trigger.event == ENTERED and trigger.audience == "lapsed_customers"
    assert journey.starts_on == "entering audience lapsed_customers"
    assert trigger.written_if == "user.first_name != 'test'"
    entered = {"event": {"name": ENTERED, "properties": {"audience": "lapsed_customers"}}, "user": {}}
    other = {"event": {"name": ENTERED, "properties": {"audience": "customers"}}, "user": {}}
    tester = {**entered, "user": {"first_name": "test"}}
    assert is_true(trigger.cond, entered)
    assert not is_true(trigger.cond, other) and not is_true(trigger.cond, tester)
    back = ir.journey_from_dict(json.loads(json.dumps(ir.journey_to_dict(journey))))
    assert back == journey and back.version == journey.version
    assert "trigger: entering audience lapsed_customers if user.first_name != 'test'" in mermaid(journey)


def test_on_exit_goal_and_wait_for_name_audiences(tmp_path: Path) -> None:
    journey = """\
        journey: farewell
        trigger: {audience: lapsed_customers, on: exit}
        goal: {audience: lapsed_customers, within: 14d}
        steps:
          - id: wait_for_lapse
            wait_for: {audience: lapsed_customers}
            if: "user.first_name"
            timeout: 3d
            then:
              - send: email
                template: hello
        """
    result = compile_files(tmp_path, {"lapsed_customers.yaml": LAPSED}, {"farewell.yaml": journey})
    assert result.project is not None, result.errors
    farewell = result.project.journeys["farewell"]
    assert farewell.trigger.event == EXITED and farewell.starts_on == "leaving audience lapsed_customers"
    assert farewell.trigger.written_if is None
    goal = farewell.goal
    assert goal is not None and goal.event == ENTERED and goal.within == 14 * 86400
    assert goal.describe == "entering audience lapsed_customers"
    assert goal.cond is not None and goal.cond.source == 'event.properties.audience == "lapsed_customers"'
    wait = farewell.step("wait_for_lapse")
    assert isinstance(wait, ir.WaitFor) and wait.event == ENTERED and wait.audience == "lapsed_customers"
    assert wait.cond is not None and wait.cond.source == 'event.properties.audience == "lapsed_customers" and (user.first_name)'
    assert farewell.listens_for() == frozenset({ENTERED})


def test_a_journey_without_audiences_keeps_its_version(tmp_path: Path) -> None:
    plain = """\
        journey: welcome
        trigger: {event: Signed Up}
        goal: {event: Order Completed, within: 7d}
        steps:
          - wait_for: Order Completed
            timeout: 1d
        """
    before = compile_files(tmp_path / "before", {}, {"welcome.yaml": plain})
    after = compile_files(tmp_path / "after", {"lapsed_customers.yaml": LAPSED}, {"welcome.yaml": plain})
    assert before.project is not None and after.project is not None
    data = ir.journey_to_dict(before.project.journeys["welcome"])
    assert data["trigger"]["audience"] is None
    assert after.project.journeys["welcome"].version == before.project.journeys["welcome"].version
    assert "audience" not in json.dumps(ir._encode(before.project.journeys["welcome"], as_written=False))


# --- mistakes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    audience: str
    line: int
    column: int
    words: tuple[str, ...]
    journey: str = ""
    settings: str = SETTINGS

    @property
    def file(self) -> str:
        return "journeys/win_back.yaml" if self.journey else "audiences/lapsed_customers.yaml"


CASES = [
    Case("unknown key", LAPSED + "not_didd: []\n", 7, 1, ("unknown key 'not_didd'", "did you mean 'not_did'")),
    Case(
        "unknown clause key",
        "did:\n  - {event: Product Viewed, at_lest: 3}\n",
        2,
        29,
        ("unknown key 'at_lest'", "did you mean 'at_least'"),
    ),
    Case("bad duration", "not_did:\n  - {event: Order Completed, within: 30 days}\n", 2, 38, ("30 days",)),
    Case("at least zero", "did:\n  - {event: Order Completed, at_least: 0}\n", 2, 40, ("must be at least 1",)),
    Case(
        "unknown topic",
        "subscribed: [newsletter, promotion]\n",
        1,
        26,
        ("unknown topic 'promotion'", "did you mean 'promotions'"),
    ),
    Case("bad expression", "where: 'user.interest = \"python\"'\n", 1, 8, ("unexpected '='",)),
    Case("where reads the event", "where: 'event.properties.price > 10'\n", 1, 8, ("where: is about the person",)),
    Case("clause reads the journey", "did:\n  - {event: Order Completed, if: 'journey.key'}\n", 2, 34, ("user and event only",)),
    Case("counts audience events", "did:\n  - {event: Audience Entered}\n", 2, 13, ("cannot count 'Audience Entered'",)),
    Case("not a mapping", "- Order Completed\n", 1, 1, ("an audience file is a mapping",)),
    Case(
        "undeclared trait",
        "where: 'user.interst == \"python\"'\n",
        1,
        14,
        ("interst", "did you mean 'interest'"),
        settings=DECLARED,
    ),
    Case(
        "undeclared event",
        "did:\n  - {event: Order Complete}\n",
        2,
        13,
        ("unknown event 'Order Complete'", "did you mean 'Order Completed'"),
        settings=DECLARED,
    ),
    Case(
        "undeclared property",
        "did:\n  - {event: Product Viewed, if: 'event.properties.pricee > 10'}\n",
        2,
        51,
        ("pricee", "did you mean 'price'"),
        settings=DECLARED,
    ),
    Case(
        "unknown audience in a trigger",
        LAPSED,
        3,
        13,
        ("unknown audience 'lapsed_customer'", "did you mean 'lapsed_customers'", "audiences/lapsed_customer.yaml"),
        journey=WIN_BACK.replace("audience: lapsed_customers", "audience: lapsed_customer"),
    ),
    Case(
        "unknown audience in a goal",
        LAPSED,
        3,
        18,
        ("unknown audience 'customers'",),
        journey="journey: win_back\ntrigger: {event: Signed Up}\ngoal: {audience: customers}\nsteps:\n  - wait: 1h\n",
    ),
    Case(
        "unknown audience in wait_for",
        LAPSED,
        4,
        26,
        ("unknown audience 'lapsedcustomers'", "did you mean 'lapsed_customers'"),
        journey="journey: win_back\ntrigger: {event: Signed Up}\nsteps:\n  - wait_for: {audience: lapsedcustomers}\n    timeout: 1d\n",
    ),
    Case(
        "a trigger's on is enter or exit",
        LAPSED,
        1,
        43,
        ("'leave'", "expected 'enter' or 'exit'"),
        journey="trigger: {audience: lapsed_customers, on: leave}\njourney: win_back\nsteps:\n  - wait: 1h\n",
    ),
    Case(
        "an audience trigger has no event",
        LAPSED,
        3,
        3,
        ("unknown key 'event'", "allowed keys: audience, on, if"),
        journey="journey: win_back\ntrigger:\n  event: Signed Up\n  audience: lapsed_customers\nsteps:\n  - wait: 1h\n",
    ),
    Case(
        "an audience goal has no value",
        LAPSED,
        3,
        36,
        ("unknown key 'value'",),
        journey="journey: win_back\ntrigger: {event: Signed Up}\ngoal: {audience: lapsed_customers, value: '1'}\nsteps:\n  - wait: 1h\n",
    ),
    Case(
        "an audience trigger's if is checked against the declarations",
        LAPSED,
        4,
        13,
        ("first_nam", "did you mean 'first_name'"),
        journey=WIN_BACK.replace("user.first_name", "user.first_nam"),
        settings=DECLARED,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_mistakes_are_reported_at_their_place(case: Case, tmp_path: Path) -> None:
    journeys = {"win_back.yaml": case.journey} if case.journey else {}
    result = compile_files(tmp_path, {"lapsed_customers.yaml": case.audience}, journeys, case.settings)
    assert result.project is None
    errors = [d for d in result.errors if d.path.endswith(case.file)]
    assert errors, result.diagnostics
    found = _first(errors, case.words)
    assert (found.line, found.column) == (case.line, case.column), found


def _first(errors: list[Diagnostic], words: tuple[str, ...]) -> Diagnostic:
    for error in errors:
        if all(word in error.message for word in words):
            return error
    raise AssertionError(f"no error says {words}: {[e.message for e in errors]}")


def test_an_audience_file_name_must_be_an_id(tmp_path: Path) -> None:
    result = compile_files(tmp_path, {"Lapsed-Customers.yaml": LAPSED})
    [error] = result.errors
    assert (error.line, error.column) == (1, 1) and "'Lapsed-Customers' is not a valid audience id" in error.message


def test_validate_lists_audiences_and_reports_their_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["--journeys", str(PROJECT / "journeys"), "--templates", str(PROJECT / "templates")]
    result = runner.invoke(main, ["validate", *args])
    assert result.exit_code == 0, result.output
    assert "ok  lapsed_customers" in result.output and "5 audiences valid." in result.output
    assert "trigger: entering audience lapsed_customers" in result.output
    broken = compile_files(tmp_path, {"lapsed_customers.yaml": "did:\n  - {event: Order Completed, within: 30 days}\n"})
    assert broken.project is None
    result = runner.invoke(
        main, ["validate", "--journeys", str(tmp_path / "journeys"), "--templates", str(tmp_path / "templates")]
    )
    assert result.exit_code == 1
    assert "audiences/lapsed_customers.yaml:2:" in result.output
    elsewhere = tmp_path / "segments"
    elsewhere.mkdir()
    (elsewhere / "lapsed_customers.yaml").write_text(LAPSED, encoding="utf-8")
    result = runner.invoke(
        main,
        ["validate", "--journeys", str(tmp_path / "journeys"), "--templates", str(tmp_path / "templates"), "--audiences", str(elsewhere)],
    )
    assert result.exit_code == 0, result.output
