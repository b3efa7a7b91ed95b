"""The project-wide holdout (global control group): who is in it, and how ``nurture.yaml`` declares it."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from support import send_request

from nurture.engine.holdout import in_holdout
from nurture.engine.interpreter import choose_variant
from nurture.engine.model import SendRequest
from nurture.language import ir
from nurture.language.compiler import Project, Settings, load_project, load_settings
from nurture.language.diagnostics import DiagnosticSink

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = 'holdout: {percent: 5, salt: "2026-q1"}\n'
IDS = [f"user-{n}" for n in range(100_000)]


def with_holdout(root: Path, holdout: str = HOLDOUT) -> Path:
    """The project's own ``nurture.yaml`` with ``holdout`` added, written under ``root``."""
    config = root / "nurture.yaml"
    config.write_text((ROOT / "nurture.yaml").read_text(encoding="utf-8") + holdout, encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def held_project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The mission journeys, compiled with a 5% holdout (salt ``2026-q1``): ``ting`` is in it."""
    return load_project(ROOT / "journeys", ROOT / "templates", with_holdout(tmp_path_factory.mktemp("project")))


# --- membership ------------------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [5, 2.5, 0.25, 50])
def test_the_share_held_out_is_the_percent(percent: float) -> None:
    held = sum(in_holdout(user, ir.Holdout(percent, "2026-q1")) for user in IDS)
    share = percent / 100
    expected, sd = len(IDS) * share, math.sqrt(len(IDS) * share * (1 - share))
    # Five standard deviations of the binomial count: a correct draw misses with odds below 1e-6.
    assert abs(held - expected) <= 5 * sd, (held, expected)


def test_membership_is_the_documented_formula_and_the_same_on_every_call() -> None:
    holdout = ir.Holdout(5, "2026-q1")
    bucket = int.from_bytes(hashlib.sha256(b"2026-q1:ting").digest()[:8], "big") % 10_000
    assert bucket == 202  # the example in docs/journeys.md: below 5 x 100
    assert in_holdout("ting", holdout) and not in_holdout("rui", holdout)
    first = [user for user in IDS[:20_000] if in_holdout(user, holdout)]
    assert first == [user for user in IDS[:20_000] if in_holdout(user, ir.Holdout(5.0, "2026-q1"))]
    assert not in_holdout("ting", None)


def test_a_new_salt_draws_a_new_group() -> None:
    q1 = {user for user in IDS if in_holdout(user, ir.Holdout(5, "2026-q1"))}
    q2 = {user for user in IDS if in_holdout(user, ir.Holdout(5, "2026-q2"))}
    assert abs(len(q1) - len(q2)) < 500
    # Independent draws share about 5% of their members (250 here), far from all of them.
    assert len(q1 & q2) < 2 * 0.05 * len(q1)


def test_a_larger_share_with_the_same_salt_keeps_every_member() -> None:
    small = {user for user in IDS if in_holdout(user, ir.Holdout(2.5, "2026-q1"))}
    large = {user for user in IDS if in_holdout(user, ir.Holdout(5, "2026-q1"))}
    assert small < large


def test_membership_is_independent_of_experiments() -> None:
    """Held-out users fall into a split's variants in its proportions, so neither group is skewed."""
    variants = (ir.Variant("a", 50, ()), ir.Variant("b", 50, ()))
    held = [user for user in IDS if in_holdout(user, ir.Holdout(5, "2026-q1"))]
    in_a = sum(choose_variant("chat_followup_copy", user, variants).name == "a" for user in held)
    assert abs(in_a - len(held) / 2) <= 5 * math.sqrt(len(held) / 4)


# --- nurture.yaml ----------------------------------------------------------------------------------


def test_the_project_holdout_is_in_every_journey(held_project: Project, project: Project) -> None:
    holdout = ir.Holdout(5.0, "2026-q1")
    assert held_project.settings.policy.holdout == holdout
    assert {j.id: j.policy.holdout for j in held_project.journeys.values()} == dict.fromkeys(
        held_project.journeys, holdout
    )
    # The holdout changes what journeys do, so it changes their versions ...
    for journey_id, journey in project.journeys.items():
        assert journey.policy.holdout is None
        assert held_project.journeys[journey_id].version != journey.version
    # ... and they reach the workflow and the send activity intact.
    journey = held_project.journeys["welcome_series"]
    assert ir.journey_from_dict(json.loads(json.dumps(ir.journey_to_dict(journey)))) == journey
    request = send_request(policy=journey.policy)
    assert SendRequest.from_dict(json.loads(json.dumps(request.to_dict()))).policy.holdout == holdout


def test_journeys_of_a_project_without_a_holdout_keep_their_version(project: Project) -> None:
    journey = project.journeys["post_purchase"]
    # The version as it was computed before policies had a holdout: without the key.
    data = ir.journey_to_dict(journey)
    for key in ("version", "source"):
        data.pop(key)
    data["policy"].pop("holdout")
    for step in data["steps"]:
        step.pop("written", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert journey.version == hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def test_a_new_salt_makes_new_versions(tmp_path: Path, held_project: Project) -> None:
    config = with_holdout(tmp_path, HOLDOUT.replace("2026-q1", "2026-q2"))
    other = load_project(ROOT / "journeys", ROOT / "templates", config)
    assert other.journeys["welcome_series"].version != held_project.journeys["welcome_series"].version


@pytest.mark.parametrize(
    ("holdout", "line", "message"),
    [
        ('holdout: {percent: 0, salt: "q1"}', 1, "the holdout percent must be more than 0 and less than 100, got 0"),
        ('holdout: {percent: 100, salt: "q1"}', 1, "must be more than 0 and less than 100, got 100"),
        ('holdout: {percent: -5, salt: "q1"}', 1, "must be more than 0 and less than 100, got -5"),
        ('holdout: {percent: 2.555, salt: "q1"}', 1, "at most 2 decimals (users are drawn in steps of 0.01%), got 2.555"),
        ('holdout: {percent: "5%", salt: "q1"}', 1, "expected a number, got '5%' (text)"),
        ('holdout: {percent: true, salt: "q1"}', 1, "expected a number, got true (a boolean)"),
        ("holdout: {percent: 5}", 1, "'salt' is required (any text; a new salt draws a new group"),
        ('holdout: {salt: "q1"}', 1, "'percent' is required (the share of users held out, e.g. percent: 5)"),
        ('holdout: {percent: 5, salt: ""}', 1, "must not be empty"),
        ("holdout: {percent: 5, salt: 2026}", 1, "expected text, got 2026 (a number); quote it"),
        ('holdout: {percnt: 5, salt: "q1"}', 1, "unknown key 'percnt' (did you mean 'percent'?)"),
        ("holdout: 5", 1, "expected a mapping ('key: value' lines), got 5 (a number)"),
        ('holdout:\n  salt: "q1"\n  percent: 120', 3, "must be more than 0 and less than 100, got 120"),
    ],
)
def test_a_bad_holdout_is_a_compile_error_at_its_line(tmp_path: Path, holdout: str, line: int, message: str) -> None:
    config = tmp_path / "nurture.yaml"
    config.write_text(f"timezone: UTC\n{holdout}\n", encoding="utf-8")
    sink = DiagnosticSink()
    assert load_settings(config, sink) == Settings()
    headlines = [d.headline() for d in sink.errors]
    assert {(d.path, d.line) for d in sink.errors} == {(str(config), line + 1)}, headlines
    assert any(message in d.message for d in sink.errors), headlines
