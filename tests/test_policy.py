"""The delivery policy: frequency caps in the user's calendar, channel order, and the project file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from freezegun import freeze_time
from support import send_request

from nurture.delivery.deliverer import Deliverer, MemoryHistory
from nurture.delivery.policy import cap_free_at, channel_order, history_start
from nurture.engine.model import Profile
from nurture.language.compiler import compile_project
from nurture.language.ir import Cap, ChannelQuiet, Policy, QuietHours
from nurture.language.templates import RenderedMessage, TemplateStore
from nurture.storage.db import Database
from nurture.storage.stores import DbHistory, DbLedger

ROOT = Path(__file__).resolve().parents[1]
SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
DAILY_2_WEEKLY_5 = (Cap("all", per_day=2, per_week=5),)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def test_a_day_cap_frees_at_the_users_local_midnight() -> None:
    sent = [(at("2026-03-02T10:00+08:00"), "email"), (at("2026-03-02T11:00+08:00"), "sms")]
    now = at("2026-03-02T19:00+08:00")
    assert cap_free_at(now, SHANGHAI, DAILY_2_WEEKLY_5, sent, "wechat") == at("2026-03-03T00:00+08:00")
    # The same two sends are on the previous local day for a user in New York at 08:00 on 03-03 ...
    assert cap_free_at(at("2026-03-02T21:00-05:00"), NEW_YORK, DAILY_2_WEEKLY_5, sent, "email") is None
    # ... but on the same day when they happened on 03-02 New York time.
    late = [(at("2026-03-02T09:00-05:00"), "email"), (at("2026-03-02T10:00-05:00"), "email")]
    assert cap_free_at(at("2026-03-02T21:00-05:00"), NEW_YORK, DAILY_2_WEEKLY_5, late, "email") == at(
        "2026-03-03T00:00-05:00"
    )


def test_a_week_cap_counts_seven_local_days_and_frees_when_the_oldest_day_leaves() -> None:
    days = ["2026-03-02", "2026-03-02", "2026-03-03", "2026-03-05", "2026-03-06"]
    sent = [(at(f"{day}T10:00+08:00"), "email") for day in days]
    now = at("2026-03-06T18:00+08:00")
    # 03-09 still counts 03-03..03-09 = 3 sends (room); 03-07 and 03-08 still hold five.
    assert cap_free_at(now, SHANGHAI, DAILY_2_WEEKLY_5, sent, "email") == at("2026-03-09T00:00+08:00")
    assert history_start(now, SHANGHAI) == at("2026-02-28T00:00+08:00")


def test_channel_caps_count_only_their_channel() -> None:
    caps = (Cap("sms", per_day=1),)
    sent = [(at("2026-03-02T10:00+08:00"), "sms"), (at("2026-03-02T10:05+08:00"), "email")]
    now = at("2026-03-02T12:00+08:00")
    assert cap_free_at(now, SHANGHAI, caps, sent, "email") is None
    assert cap_free_at(now, SHANGHAI, caps, sent, "sms") == at("2026-03-03T00:00+08:00")


def test_local_midnight_on_a_daylight_saving_day() -> None:
    # Clocks go forward in New York on 2026-03-08: midnight is still EST (UTC-5), 08:00 is EDT.
    sent = [(at("2026-03-07T14:00-05:00"), "email"), (at("2026-03-07T15:00-05:00"), "email")]
    free = cap_free_at(at("2026-03-07T20:00-05:00"), NEW_YORK, DAILY_2_WEEKLY_5, sent, "email")
    assert free == datetime(2026, 3, 8, 5, 0, tzinfo=UTC)


def test_channel_order_for_auto() -> None:
    policy = Policy(channel_order=("email", "wechat", "sms"))
    assert channel_order((), policy, {"preferred_channel": "sms"}) == ("sms", "email", "wechat")
    assert channel_order((), policy, {"preferred_channel": "fax"}) == ("email", "wechat", "sms")
    assert channel_order((), Policy(channel_order=("email",)), {"preferred_channel": "sms"}) == ("email",)
    assert channel_order(("sms", "wechat"), policy, {"preferred_channel": "email"}) == ("sms", "wechat")


def test_quiet_hours_per_channel() -> None:
    default = QuietHours(21 * 60, 8 * 60)
    policy = Policy(
        quiet_by_channel=(ChannelQuiet("sms", QuietHours(20 * 60, 10 * 60)), ChannelQuiet("email", None))
    )
    assert policy.quiet_for("sms", default) == QuietHours(20 * 60, 10 * 60)
    assert policy.quiet_for("email", default) is None
    assert policy.quiet_for("wechat", default) == default


@pytest.fixture
def templates(tmp_path: Path) -> TemplateStore:
    (tmp_path / "sms").mkdir()
    (tmp_path / "sms" / "hello.txt").write_text("Hi {{ user.first_name }}", encoding="utf-8")
    return TemplateStore(tmp_path)


class Box:
    provider = "outbox"
    idempotent = True

    async def deliver(self, message: RenderedMessage, envelope: object) -> object:
        from channels import DeliveryResult

        return DeliveryResult("outbox", "x")


USER = Profile("u1", {"phone": "+8613800138000", "first_name": "Li", "timezone": "Asia/Shanghai"})


async def test_transactional_sends_are_never_counted_or_held(templates: TemplateStore) -> None:
    history = MemoryHistory()
    deliverer = Deliverer(templates, {"sms": Box()}, history=history)
    policy = Policy(caps=(Cap("all", per_day=1),))
    now = at("2026-03-02T10:00+08:00")
    first = await deliverer.send(send_request(channels=("sms",), step_id="a", policy=policy), USER, now)
    capped = await deliverer.send(send_request(channels=("sms",), step_id="b", policy=policy), USER, now)
    receipt = await deliverer.send(
        send_request(channels=("sms",), step_id="c", policy=policy, category="transactional"), USER, now
    )
    assert [r.outcome.label if r.outcome else None for r in (first, capped, receipt)] == [
        "sent",
        "skipped:frequency_cap",
        "sent",
    ]
    assert len(history.sends["u1"]) == 1


async def test_defer_waits_for_room_then_quiet_hours(templates: TemplateStore) -> None:
    deliverer = Deliverer(templates, {"sms": Box()}, history=MemoryHistory())
    policy = Policy(caps=(Cap("all", per_day=1),), on_cap="defer")
    quiet = QuietHours(21 * 60, 8 * 60)
    now = at("2026-03-02T10:00+08:00")
    await deliverer.send(send_request(channels=("sms",), step_id="a", policy=policy), USER, now)

    held = await deliverer.send(
        send_request(channels=("sms",), step_id="b", policy=policy, quiet_hours=quiet), USER, now
    )
    assert (held.defer_until, held.defer_reason) == (at("2026-03-03T00:00+08:00"), "frequency_cap")
    assert held.defer_until is not None
    again = await deliverer.send(
        send_request(channels=("sms",), step_id="b", policy=policy, quiet_hours=quiet), USER, held.defer_until
    )
    assert (again.defer_until, again.defer_reason) == (at("2026-03-03T08:00+08:00"), "quiet_hours")


async def test_db_history_counts_a_message_from_the_moment_it_is_claimed(
    templates: TemplateStore, database: Database
) -> None:
    """Two journeys sending to one user a moment apart: the second sees the first's row while the
    first is still with its provider, by the row's wall-clock creation time."""
    history, ledger = DbHistory(database), DbLedger(database)
    message = RenderedMessage(channel="sms", template="hello", locale=None, text="Hi")
    with freeze_time("2026-03-02T02:00:00Z"):
        await ledger.claim(send_request(step_id="first"), "sms", "twilio", "+8613800138000", message)
        now = datetime.now(UTC)
        assert [channel for _, channel in await history.sent("u1", now - timedelta(hours=1))] == ["sms"]
    with freeze_time("2026-03-03T02:00:00Z"):
        today = history_start(datetime.now(UTC), SHANGHAI) + timedelta(days=6)
        assert await history.sent("u1", today) == []
    # A transactional message never counts.
    await ledger.claim(
        send_request(step_id="t", category="transactional"), "sms", "twilio", "+86138", message
    )
    assert len(await history.sent("u1", at("2026-01-01T00:00Z"))) == 1


def test_policy_in_nurture_yaml_and_journey_overrides(tmp_path: Path) -> None:
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    (tmp_path / "nurture.yaml").write_text(
        "frequency_caps: {all: {per_day: 2, per_week: 5}, sms: {per_day: 1}}\n"
        "channel_order: [wechat, sms]\n"
        "topics: [promotions]\n",
        encoding="utf-8",
    )
    (journeys / "promo.yaml").write_text(
        "journey: promo\ntrigger: {event: Go}\non_cap: defer\nfrequency_caps: {all: {per_day: 1}}\n"
        "steps:\n  - {send: auto, template: welcome_coupon, topic: promotions}\n",
        encoding="utf-8",
    )
    result = compile_project(journeys, ROOT / "templates")
    assert result.errors == [], [d.headline() for d in result.errors]
    assert result.project is not None
    policy = result.project.journeys["promo"].policy
    assert policy.caps == (Cap("all", per_day=1),)  # the journey's caps replace the project's
    assert (policy.on_cap, policy.channel_order) == ("defer", ("wechat", "sms"))
    assert policy.caps != result.project.settings.policy.caps


@pytest.mark.parametrize(
    ("project", "step", "message"),
    [
        (
            "topics: [promotions]\n",
            "{send: sms, template: welcome_coupon, topic: promotion}",
            "unknown topic 'promotion' (did you mean 'promotions'?)",
        ),
        (
            "topics: [promotions]\n",
            "{send: sms, template: welcome_coupon, topic: promotions, category: transactional}",
            "a transactional send ignores subscriptions",
        ),
        (
            "",
            "{send: auto, template: welcome_coupon, fallback: [sms]}",
            "send: auto falls back through channel_order by itself",
        ),
        ("", "{send: auto, template: welcome}", "no sms template 'welcome'"),
        (
            "frequency_caps: {all: {}}\n",
            "{send: sms, template: welcome_coupon}",
            "a cap needs per_day, per_week or both",
        ),
        ("topics: [sms]\n", "{send: sms, template: welcome_coupon}", "'sms' is a channel, not a topic"),
        (
            "channel_order: [sms, sms]\n",
            "{send: sms, template: welcome_coupon}",
            "each channel is listed once",
        ),
    ],
)
def test_policy_mistakes_are_compile_errors(tmp_path: Path, project: str, step: str, message: str) -> None:
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    (tmp_path / "nurture.yaml").write_text(project or "timezone: UTC\n", encoding="utf-8")
    (journeys / "promo.yaml").write_text(
        f"journey: promo\ntrigger: {{event: Go}}\nsteps:\n  - {step}\n", encoding="utf-8"
    )
    errors = [d.headline() for d in compile_project(journeys, ROOT / "templates").errors]
    assert any(message in error for error in errors), errors
