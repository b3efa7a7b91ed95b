"""The ``nurture`` command on the repository's journeys, templates and scenarios."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nurture.cli.main import main

ROOT = Path(__file__).parents[1]
JOURNEYS = ROOT / "journeys"
TEMPLATES = ROOT / "templates"
PROJECT_JOURNEYS = ("cart_abandonment", "chat_recovery", "course_launch", "post_purchase", "welcome_series")
SCENARIO = JOURNEYS / "tests" / "cart_reminder_then_last_call.yaml"


def nurture(*args: str | Path, journeys: Path = JOURNEYS, templates: Path = TEMPLATES) -> Result:
    """Run a command with ``--journeys`` and ``--templates`` after its own arguments."""
    argv = [str(a) for a in args] + ["--journeys", str(journeys), "--templates", str(templates)]
    return CliRunner().invoke(main, argv, catch_exceptions=False)


def lines(text: str) -> list[str]:
    return text.rstrip("\n").splitlines()


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The repository's journeys, templates and nurture.yaml copied under ``tmp_path``."""
    shutil.copytree(JOURNEYS, tmp_path / "journeys")
    shutil.copytree(TEMPLATES, tmp_path / "templates")
    shutil.copy(ROOT / "nurture.yaml", tmp_path / "nurture.yaml")
    return tmp_path


# --- validate ------------------------------------------------------------------------------------


def test_validate_lists_every_journey() -> None:
    result = nurture("validate")

    assert result.exit_code == 0, result.output
    listed = [line.split()[1] for line in lines(result.stdout) if line.startswith("ok ")]
    assert sorted(listed) == list(PROJECT_JOURNEYS)
    assert lines(result.stdout)[-1] == f"{len(PROJECT_JOURNEYS)} journeys valid."


def test_validate_reports_a_misspelled_key_with_its_position(copy: Path) -> None:
    path = copy / "journeys" / "cart_abandonment.yaml"
    source = path.read_text(encoding="utf-8")
    assert source.count("    timeout: 23h\n") == 1
    path.write_text(source.replace("    timeout: 23h\n", "    timout: 23h\n"), encoding="utf-8")
    source_lines = path.read_text(encoding="utf-8").splitlines()
    line = next(n for n, text in enumerate(source_lines, 1) if "timout:" in text)
    column = source_lines[line - 1].index("timout") + 1

    result = nurture("validate", journeys=copy / "journeys", templates=copy / "templates")

    assert result.exit_code == 1
    output = lines(result.output)
    headline = next(i for i, text in enumerate(output) if f"{path}:{line}:{column}:" in text)
    assert "unknown key 'timout'" in output[headline]
    assert "(did you mean 'timeout'?)" in output[headline]
    code, caret = output[headline + 2], output[headline + 3]
    assert re.match(rf"^\s*{line} \|", code), code
    assert "timout: 23h" in code
    assert re.match(r"^\s*\|\s*\^$", caret), caret
    assert caret.index("^") == code.index("timout")  # the caret sits under the key
    assert any("'timeout' is required" in text for text in output)
    assert "nothing was compiled" in output[-1]


def test_validate_reports_an_unknown_template_with_a_suggestion(copy: Path) -> None:
    path = copy / "journeys" / "welcome_series.yaml"
    source = path.read_text(encoding="utf-8")
    path.write_text(source.replace("template: popular_courses", "template: popular_course"), encoding="utf-8")
    line = next(
        n for n, text in enumerate(path.read_text().splitlines(), 1) if "template: popular_course" in text
    )

    result = nurture("validate", journeys=copy / "journeys", templates=copy / "templates")

    assert result.exit_code == 1
    headline = next(text for text in lines(result.output) if text.startswith(f"{path}:{line}:"))
    assert "did you mean 'popular_courses'" in headline


def test_validate_reports_an_unknown_filter_in_a_template_instead_of_crashing(copy: Path) -> None:
    path = copy / "templates" / "email" / "welcome.mjml"
    source = path.read_text(encoding="utf-8")
    assert 'default("there")' in source
    path.write_text(source.replace('default("there")', "defualt('there')"), encoding="utf-8")
    text_lines = path.read_text(encoding="utf-8").splitlines()
    line = next(n for n, text in enumerate(text_lines, 1) if "defualt" in text)
    column = text_lines[line - 1].index("defualt") + 1

    result = nurture("validate", journeys=copy / "journeys", templates=copy / "templates")

    assert result.exit_code == 1
    assert f"{path}:{line}:{column}: unknown filter 'defualt' (did you mean 'default'?)" in lines(result.output)
    assert "nothing was compiled" in lines(result.output)[-1]


# --- schema and graph ----------------------------------------------------------------------------


def test_schema_prints_the_json_schema_of_journey_files() -> None:
    result = CliRunner().invoke(main, ["schema"], catch_exceptions=False)

    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert "steps" in schema["properties"]
    assert schema["properties"]["steps"]["type"] == "array"
    assert {"journey", "trigger", "steps"} <= set(schema.get("required", []))


def test_graph_prints_a_mermaid_flowchart_with_every_step() -> None:
    result = nurture("graph", "cart_abandonment")

    assert result.exit_code == 0, result.output
    assert lines(result.stdout)[0] == "flowchart TD"
    for step_id in (
        "wait_before_reminder",
        "reminder_email",
        "wait_for_checkout",
        "remember_free_checkout",
        "end_free_checkout",
        "last_call_sms",
    ):
        assert step_id in result.stdout


@pytest.mark.parametrize(
    ("name", "hint"),
    [("cart_abandonmnt", "did you mean 'cart_abandonment'?"), ("welcome", "did you mean 'welcome_series'?")],
)
def test_graph_of_an_unknown_journey_suggests_a_name(name: str, hint: str) -> None:
    result = nurture("graph", name)

    assert result.exit_code != 0
    assert f"unknown journey '{name}'" in result.output
    assert hint in result.output


def test_graph_of_an_unrelated_name_fails() -> None:
    result = nurture("graph", "nope")

    assert result.exit_code != 0
    assert "unknown journey 'nope'" in result.output
    assert "flowchart" not in result.output


# --- simulate and test ---------------------------------------------------------------------------


def test_simulate_prints_the_timeline_of_a_scenario() -> None:
    result = nurture("simulate", SCENARIO)

    assert result.exit_code == 0, result.output
    output = lines(result.stdout)
    assert output[0].startswith("scenario: ")
    sent = [text for text in output if re.search(r"\bsent\b", text)]
    assert len(sent) == 2
    assert "email cart_reminder" in sent[0]
    assert "sms cart_last_call" in sent[1]
    assert any(re.search(r"\bended\s+completed\b", text) for text in output)
    assert output[-1] == "matches the expectations"


def test_test_runs_every_scenario_and_summarises() -> None:
    scenarios = sorted((JOURNEYS / "tests").glob("*.yaml"))

    result = nurture("test", JOURNEYS / "tests")

    assert result.exit_code == 0, result.output
    last = lines(result.stdout)[-1]
    assert re.fullmatch(r"\d+ passed, 0 failed", last)
    assert last == f"{len(scenarios)} passed, 0 failed"
    assert sum(text.startswith("PASS ") for text in lines(result.stdout)) == len(scenarios)


def test_test_shows_expected_against_actual_on_a_wrong_expectation(tmp_path: Path) -> None:
    text = SCENARIO.read_text(encoding="utf-8")
    wrong = text.replace(
        "{at: 1h, user: u1, journey: cart_abandonment, send: email",
        "{at: 2h, user: u1, journey: cart_abandonment, send: email",
    )
    assert wrong != text
    scenario = tmp_path / "wrong.yaml"
    scenario.write_text(wrong, encoding="utf-8")

    result = nurture("test", scenario)

    assert result.exit_code == 1
    output = lines(result.stdout)
    assert output[-1] == "0 passed, 1 failed"
    assert any(line.startswith("FAIL ") and str(scenario) in line for line in output)
    expected = next(i for i, line in enumerate(output) if line.startswith("expected"))
    actual = next(i for i, line in enumerate(output) if line.startswith("actual"))
    assert expected < actual
    missing = [line for line in output[expected:actual] if line.lstrip().startswith("- ")]
    extra = [line for line in output[actual:] if line.lstrip().startswith("+ ")]
    assert len(missing) == 1 and "cart_reminder" in missing[0]
    assert len(extra) == 1 and "cart_reminder" in extra[0]
