"""Every scenario in journeys/tests passes on both runtimes, with identical outcomes; every key of an
expectation is checked."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest
from support import LATE, late_only, play_on_both_runtimes

from nurture.language.compiler import Project
from nurture.language.diagnostics import CompileError
from nurture.simulation.scenarios import (
    Expectation,
    ExpectDoc,
    Observed,
    SimRuntime,
    compare,
    load_scenario,
    scenario_files,
)
from workflows.runtime import TemporalRuntime

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = scenario_files([ROOT / "journeys" / "tests"])


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
    await play_on_both_runtimes(path, project, temporal)


# --- every key of an expectation is checked --------------------------------------------------------

BASE = ROOT / "journeys" / "tests" / "chat_agent_sms_no_phone.yaml"
SMS = "{at: 1h, user: sara, journey: chat_recovery, send: sms, template: chat_agent_contact, status: skipped, reason: no_address}"
EMAIL = '{at: 25h, user: sara, journey: chat_recovery, send: email, template: chat_followup_b, variant: b, contains: "chat_7786"}'
END = "{at: 25h, user: sara, journey: chat_recovery, exit: completed}"

# One wrong value per key an expectation accepts.
WRONG = {
    "at": (SMS, SMS.replace("at: 1h", "at: 2h")),
    "user": (SMS, SMS.replace("user: sara", "user: ann")),
    "anonymous": (SMS, SMS.replace("user: sara", "anonymous: v1")),
    "journey": (SMS, SMS.replace("journey: chat_recovery", "journey: cart_abandonment")),
    "send": (SMS, SMS.replace("send: sms", "send: wechat")),
    "template": (SMS, SMS.replace("template: chat_agent_contact", "template: chat_followup_b")),
    "status": (SMS, SMS.replace("status: skipped", "status: failed")),
    "reason": (SMS, SMS.replace("reason: no_address", "reason: opted_out")),
    "variant": (EMAIL, EMAIL.replace("variant: b", "variant: a")),
    "contains": (EMAIL, EMAIL.replace('contains: "chat_7786"', 'contains: "chat_0000"')),
    "exit": (END, END.replace("exit: completed", "exit: goal")),
}


def _scenario(tmp_path: Path, old: str, new: str) -> Path:
    text = BASE.read_text(encoding="utf-8").replace("users:\n", "users:\n  ann: {email: ann@example.com}\n")
    text = text.replace("events:\n", "events:\n  - {at: 0s, anonymous: v1, event: Page Viewed}\n")
    assert old in text
    path = tmp_path / "scenario.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def test_every_key_of_an_expectation_has_a_wrong_value_below() -> None:
    assert set(WRONG) == set(ExpectDoc.model_fields)


async def test_the_scenario_passes_as_written(tmp_path: Path, project: Project) -> None:
    scenario = load_scenario(_scenario(tmp_path, SMS, SMS), project)
    assert compare(scenario, await SimRuntime().play(scenario, project)).passed


@pytest.mark.parametrize("key", sorted(WRONG))
async def test_a_wrong_value_of_any_key_fails_the_scenario(key: str, tmp_path: Path, project: Project) -> None:
    scenario = load_scenario(_scenario(tmp_path, *WRONG[key]), project)
    verdict = compare(scenario, await SimRuntime().play(scenario, project))
    assert not verdict.passed, f"a wrong {key} passed:\n{verdict.report()}"


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        (END, END.replace("}", ", variant: b}"), "variant", "an exit expectation is compared on at, user, journey and exit only"),
        (END, END.replace("}", ", template: chat_followup_b}"), "template", "remove template:"),
        (END, END.replace("}", ", status: sent}"), "status", "remove status:"),
        (EMAIL, EMAIL.replace("}", ", reason: no_address}"), "reason", "a sent message has no reason"),
        (SMS, SMS.replace("}", ', contains: "Grace"}'), "contains", "a skipped send has no text"),
    ],
    ids=["exit-variant", "exit-template", "exit-status", "sent-reason", "skipped-contains"],
)
def test_a_key_that_cannot_be_checked_is_a_load_error_at_its_line(
    old: str, new: str, key: str, message: str, tmp_path: Path, project: Project
) -> None:
    path = _scenario(tmp_path, old, new)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if new in text)

    with pytest.raises(CompileError) as caught:
        load_scenario(path, project)

    (found,) = caught.value.diagnostics
    assert (found.path, found.line) == (str(path), line)
    assert found.key.endswith(f"].{key}")
    assert message in found.message


def test_an_exit_expectation_compares_every_field_it_holds() -> None:
    ended = Observed(90000, "sara", "chat_recovery", exit="completed")
    assert Expectation(90000, "sara", "chat_recovery", exit="completed").matches(ended)
    assert not Expectation(90000, "sara", "chat_recovery", exit="completed", variant="b").matches(ended)
    assert not Expectation(90000, "sara", "chat_recovery", exit="completed", template="x").matches(ended)
    assert not Expectation(90000, "sara", "chat_recovery", send="email").matches(ended)


def test_reports_show_offsets_as_written_and_never_in_weeks(tmp_path: Path, project: Project) -> None:
    scenario = load_scenario(_scenario(tmp_path, EMAIL, EMAIL.replace("at: 25h", "at: 1d1h")), project)
    wrong = Expectation(30 * 86400, "sara", "chat_recovery", exit="completed", at_written="30d")

    report = compare(scenario, []).report()

    assert "    1d1h  sara  chat_recovery  send: email chat_followup_b" in report
    assert wrong.describe().startswith("     30d  sara")
    assert Observed(30 * 86400, "sara", "chat_recovery", exit="completed").describe().startswith("     30d  sara")


# --- people: users, anonymous visitors, aliases and groups ----------------------------------------

PEOPLE = """\
scenario: people
start: 2026-03-02T10:00:00+08:00
journeys: [cart_abandonment]
users:
  u1: {email: li@example.com}
  u2: {email: wei@example.com}
events:
  - {at: 0s, anonymous: a1, event: Cart Updated, properties: {cart_id: c1, item_count: 1}}
  - {at: 1m, user: u1, event: Cart Updated, properties: {cart_id: c2, item_count: 1}}
  - {at: 2m, user: u3, anonymous: a1, identify: {phone: "+8613800138000"}}
expect:
  - {at: 1h, anonymous: a1, send: email, template: cart_reminder, status: skipped, reason: no_address}
  - {at: 1h1m, user: u1, send: email, template: cart_reminder}
"""


def _people(tmp_path: Path, old: str, new: str) -> Path:
    assert old in PEOPLE
    path = tmp_path / "people.yaml"
    path.write_text(PEOPLE.replace(old, new, 1), encoding="utf-8")
    return path


def test_people_are_named_by_user_or_anonymous(tmp_path: Path, project: Project) -> None:
    scenario = load_scenario(_people(tmp_path, "", ""), project)
    # u3 is named by the identify, so it needs no users: entry; the visitor a1 is that person
    assert [want.user for want in scenario.expect] == ["anonymous_id:a1", "u1"]
    assert scenario.identities().lookup("user_id", "u3") == "anonymous_id:a1"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("anonymous: a1, event", "user: a1, event", "unknown user 'a1'; 'a1' is an anonymous id here: write anonymous: a1"),
        ("user: u1, event", "user: u11, event", "unknown user 'u11' (did you mean 'u1'?); declare it under users:"),
        ("anonymous: a1, event", "anonymous: u2, event", "'u2' is a user declared under users:; write user: u2"),
        ("user: u3, anonymous: a1, identify: {phone: \"+8613800138000\"}", "user: u3, alias: ''", "alias: needs an id"),
        ("user: u3, anonymous: a1, identify: {phone: \"+8613800138000\"}", "anonymous: a1, alias: u1", "an alias names the new id in user: and the previous one in alias:"),
        ("user: u3, anonymous: a1, identify: {phone: \"+8613800138000\"}", "user: u1, alias: u1", "alias: names the previous id: not user: itself"),
        ("identify: {phone: \"+8613800138000\"}", "event: Signed Up, alias: u2", "an event has exactly one of event:, identify:, alias: or group:"),
        ("identify: {phone: \"+8613800138000\"}", "identify: {}, traits: {plan: pro}", "traits: goes with group:"),
        ("{at: 1m, user: u1, event", "{at: 1m, event", "user: or anonymous: is required when the scenario names several people"),
        ("{at: 1h, anonymous: a1", "{at: 1h, anonymous: a11", "no event names anonymous 'a11' (did you mean 'a1'?)"),
        ("{at: 1h, anonymous: a1", "{at: 1h, anonymous: u1", "no event names anonymous 'u1'; 'u1' is a user: write user: u1"),
        ("{at: 1h, anonymous: a1", "{at: 1h, user: u3, anonymous: a1", "an expectation names its person by user: or anonymous:, not both"),
        ("{at: 1h1m, user: u1", "{at: 1h1m", "user: or anonymous: is required when the scenario has several people"),
    ],
    ids=[
        "user-is-anonymous",
        "unknown-user",
        "anonymous-is-a-user",
        "empty-alias",
        "alias-without-user",
        "alias-of-itself",
        "two-kinds",
        "traits-without-group",
        "event-without-person",
        "unknown-anonymous",
        "expected-anonymous-is-a-user",
        "expected-both",
        "expected-without-person",
    ],
)
def test_a_wrong_person_is_a_load_error_at_its_line(
    old: str, new: str, message: str, tmp_path: Path, project: Project
) -> None:
    path = _people(tmp_path, old, new)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if new in text)

    with pytest.raises(CompileError) as caught:
        load_scenario(path, project)

    assert [(d.line, d.message) for d in caught.value.diagnostics if message in d.message] != [], [
        (d.line, d.message) for d in caught.value.diagnostics
    ]
    assert all(d.path == str(path) and d.line == line for d in caught.value.diagnostics)


@pytest.mark.parametrize("name", ["anonymous: a1", "user: u3"])
async def test_an_expectation_may_name_the_person_by_any_of_their_ids(
    name: str, tmp_path: Path, project: Project
) -> None:
    scenario = load_scenario(_people(tmp_path, "{at: 1h, anonymous: a1", "{at: 1h, " + name), project)

    verdict = compare(scenario, await SimRuntime().play(scenario, project))

    assert verdict.missing == [], verdict.report()  # the later last calls are left unexpected here
    assert scenario.expect[0].user == "anonymous_id:a1"
    assert f"  {name.replace('user: ', '').replace(':', '')}  " in scenario.expect[0].describe()


async def test_the_simulated_timeline_shows_identity_calls(project: Project) -> None:
    from nurture.cli.main import _timeline

    text = await _timeline(ROOT / "journeys" / "tests" / "identity_merge_ends_the_newer_cart_run.yaml", project)

    assert re.search(r"u1\s+identify\s+as u1 \+ anonymous laptop-22: phone=\+8613100131000", text)
    assert re.search(r"u1\s+merged\s+anonymous_id:laptop-22 into u1", text)
    assert re.search(r"anonymous_id:laptop-22 cart_abandonment\s+ended\s+merged", text)
    assert text.endswith("matches the expectations\n")


def test_only_a_run_late_by_the_machine_is_played_again() -> None:
    """``late_only``: the same outcomes, some up to a few seconds late; nothing else qualifies."""
    sent = Observed(at=7200, user="u1", journey="cart_abandonment", send="email", template="cart_reminder")
    ended = Observed(at=18000, user="u1", journey="cart_abandonment", exit="exit_on")
    expected = [sent, ended]
    assert late_only(expected, [dataclasses.replace(sent, at=7201), ended])
    assert late_only(expected, [ended, dataclasses.replace(sent, at=7200 + LATE)])
    assert not late_only(expected, [dataclasses.replace(sent, at=7200 + LATE + 1), ended])
    assert not late_only(expected, [dataclasses.replace(sent, at=7199), ended])  # early: not the machine
    assert not late_only(expected, [dataclasses.replace(sent, at=7201, template="cart_last_call"), ended])
    assert not late_only(expected, [sent])
