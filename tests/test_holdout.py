"""The project-wide holdout (global control group): who is in it, how ``nurture.yaml`` declares it,
and that its users get no marketing message from any journey on either runtime, while
transactional sends still go out and every run records whether its user is held out."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import on_schedule, rows, send_request

from channels import DeliveryResult
from channels.outbox import Outbox
from nurture.delivery.deliverer import Deliverer, MemoryHistory, for_every_channel
from nurture.engine.holdout import in_holdout
from nurture.engine.interpreter import choose_variant
from nurture.engine.model import Profile, SendRequest, SendResult
from nurture.language import ir
from nurture.language.compiler import Project, Settings, load_project, load_settings
from nurture.language.diagnostics import DiagnosticSink
from nurture.language.templates import RenderedMessage, TemplateStore
from nurture.simulation.scenarios import build_simulator, compare, load_scenario
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord, RunRecord
from nurture.storage.stores import DbRecorder
from workflows.runtime import TemporalRuntime

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = 'holdout: {percent: 5, salt: "2026-q1"}\n'
SCENARIO = Path(__file__).parent / "scenarios" / "holdout_every_journey.yaml"
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
    # Keys added later still, unset here (dates, pacing, re-entry gaps, audiences), at every level.
    for key in ("rate", "re_entry_after", "date_trigger"):
        data.pop(key)

    def drop_later(value: object) -> None:
        if isinstance(value, dict):
            for key in [k for k in ("spread", "rate", "date", "offset", "audience") if value.get(k, "set") in (None, 0)]:
                value.pop(key)
            for nested in value.values():
                drop_later(nested)
        elif isinstance(value, list):
            for nested in value:
                drop_later(nested)

    drop_later(data)
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


# --- sending ---------------------------------------------------------------------------------------


class Counting:
    """An idempotent channel that counts what it is asked to deliver."""

    provider = "outbox"
    idempotent = True

    def __init__(self) -> None:
        self.delivered: list[str] = []

    async def deliver(self, message: RenderedMessage, envelope: object) -> DeliveryResult:
        self.delivered.append(message.template)
        return DeliveryResult("outbox", str(len(self.delivered)))


@pytest.fixture
def templates(tmp_path: Path) -> TemplateStore:
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "hello.txt").write_text("Hi {{ user.first_name }}", encoding="utf-8")
    return TemplateStore(tmp_path)


NOW = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
HELD = ir.Policy(holdout=ir.Holdout(5, "2026-q1"))


def profile(user_id: str, **traits: object) -> Profile:
    return Profile(user_id, {"phone": "+8613800138000", "first_name": "Ting", **traits})


@pytest.mark.parametrize("render", [True, False], ids=["render", "outcomes-only"])
async def test_a_held_out_users_marketing_send_is_skipped_and_nothing_is_sent(
    templates: TemplateStore, render: bool
) -> None:
    channel, history = Counting(), MemoryHistory()
    deliverer = Deliverer(templates, for_every_channel(channel), render=render, history=history)

    held = await deliverer.send(send_request(user_id="ting", policy=HELD), profile("ting"), NOW)
    other = await deliverer.send(send_request(user_id="rui", policy=HELD), profile("rui"), NOW)
    receipt = await deliverer.send(
        send_request(user_id="ting", step_id="s2", policy=HELD, category="transactional"), profile("ting"), NOW
    )

    assert held.outcome is not None and (held.outcome.label, held.outcome.channel) == ("skipped:holdout", "sms")
    assert other.outcome is not None and other.outcome.label == "sent"
    assert receipt.outcome is not None and receipt.outcome.label == "sent"
    assert channel.delivered == (["hello", "hello"] if render else [])
    assert set(history.sends) == {"rui"}  # a held-out send is no message: no cap counts it


@pytest.mark.parametrize(
    ("changes", "user", "otherwise"),
    [
        ({"topic": "promotions"}, Profile("ting", {"phone": "+8613800138000"}, frozenset({"promotions"})), "topic_opted_out"),
        ({}, Profile("ting", {"phone": "+8613800138000"}, frozenset({"sms", "email"})), "opted_out"),
        ({}, Profile("ting"), "no_address"),
        ({"quiet_hours": ir.QuietHours(0, 23 * 60 + 59)}, profile("ting"), "deferred"),
    ],
    ids=["topic-opt-out", "channel-opt-out", "no-address", "quiet-hours"],
)
async def test_the_holdout_is_decided_before_opt_outs_addresses_and_quiet_hours(
    templates: TemplateStore, changes: dict[str, object], user: Profile, otherwise: str
) -> None:
    deliverer = Deliverer(templates, for_every_channel(Counting()))

    def label(result: SendResult) -> str:
        return "deferred" if result.outcome is None else str(result.outcome.reason)

    assert label(await deliverer.send(send_request(user_id="ting", **changes), user, NOW)) == otherwise
    held = await deliverer.send(send_request(user_id="ting", policy=HELD, **changes), user, NOW)
    assert label(held) == "holdout"


# --- both runtimes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["simulator", "temporal"])
async def test_held_out_users_get_no_marketing_from_any_journey(
    runtime: str, held_project: Project, temporal: TemporalRuntime, database: Database
) -> None:
    scenario = load_scenario(SCENARIO, held_project)
    recorder = DbRecorder(database)
    if runtime == "simulator":
        sim = build_simulator(scenario, held_project, Deliverer(held_project.templates, for_every_channel(Outbox())))
        sim.recorder = recorder
        await sim.run()
        outcomes = sim.outcomes
    else:
        outcomes = await temporal.play(scenario, held_project, record_to=recorder)
    # Recording into a real database takes real time, which the time-skipping clock counts.
    verdict = compare(scenario, on_schedule(scenario, outcomes) if runtime == "temporal" else outcomes)
    assert verdict.passed, verdict.report()

    # Every run records whether its user is held out: ting's two runs are, rui's are not.
    runs = rows(database, RunRecord)
    assert sorted((r.user_id, r.journey, r.holdout) for r in runs) == [
        ("rui", "post_purchase", False),
        ("rui", "welcome_series", False),
        ("ting", "post_purchase", True),
        ("ting", "welcome_series", True),
    ]
    skipped = rows(database, MessageRecord, status="skipped")
    assert sorted((m.user_id, m.step_id, m.reason) for m in skipped) == [
        ("ting", "accessory_wechat", "holdout"),
        ("ting", "popular_courses_email", "holdout"),
        ("ting", "usage_guide_email", "holdout"),
        ("ting", "welcome_email", "holdout"),
    ]
    sent = rows(database, MessageRecord, user_id="ting", status="sent")
    assert [(m.template, m.channel) for m in sent] == [("shipping_notice", "sms")]
