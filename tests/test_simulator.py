"""The in-process runtime: routing, timers, profiles and the real send rules on a virtual clock.

Every test compiles a small journey against a throwaway template directory and plays events
through :class:`nurture.simulation.simulator.Simulator` with a real :class:`nurture.delivery.deliverer.Deliverer` and
the outbox channel, then looks at the outcomes, the timeline entries and what the outbox holds.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from channels.outbox import Outbox
from nurture.delivery.deliverer import Deliverer
from nurture.engine.interpreter import Deliver, Run
from nurture.engine.model import Event, Profile
from nurture.language import ir
from nurture.language.compiler import Settings, compile_text
from nurture.language.diagnostics import DiagnosticSink
from nurture.language.templates import TemplateStore
from nurture.simulation.simulator import Outcome, Simulator

T0 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # Monday 10:00 in Shanghai
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> TemplateStore:
    """A ``note`` template for every channel that names the step's event."""
    root = tmp_path_factory.mktemp("templates")
    for channel in ("email", "sms", "wechat"):
        (root / channel).mkdir()
    (root / "email" / "note.mjml").write_text(
        '---\nsubject: "Note for {{ user.id }}"\n---\n'
        "<mjml><mj-body><mj-section><mj-column><mj-text>"
        "Hello {{ user.first_name | default('there') }} about {{ event.name }}"
        "</mj-text></mj-column></mj-section></mj-body></mjml>\n",
        encoding="utf-8",
    )
    (root / "sms" / "note.txt").write_text("SMS note for {{ user.id }}\n", encoding="utf-8")
    (root / "wechat" / "note.yaml").write_text(
        'template_id: tpl-1\ndata:\n  first: "WeChat note for {{ user.id }}"\n', encoding="utf-8"
    )
    return TemplateStore(root)


def compile_journey(templates: TemplateStore, text: str) -> ir.Journey:
    source = textwrap.dedent(text)
    journey_id = next(
        line.split(":", 1)[1].strip() for line in source.splitlines() if line.startswith("journey:")
    )
    sink = DiagnosticSink()
    journey = compile_text(source, f"journeys/{journey_id}.yaml", templates, Settings(), sink)
    assert sink.items == [], "\n".join(d.headline() for d in sink.items)
    assert journey is not None
    return journey


def simulator(templates: TemplateStore, *journeys: ir.Journey) -> tuple[Simulator, Outbox]:
    outbox = Outbox()
    deliverer = Deliverer(templates, {"email": outbox, "sms": outbox, "wechat": outbox})
    return Simulator(list(journeys), deliverer, T0), outbox


def track(sim: Simulator, offset: timedelta, user: str, name: str, **properties: Any) -> None:
    at = T0 + offset
    sim.track(at, user, Event(name=name, timestamp=at, properties=properties))


def sends(sim: Simulator) -> list[Outcome]:
    return [o for o in sim.outcomes if o.send is not None]


def ends(sim: Simulator) -> list[tuple[timedelta, str, str | None]]:
    return [(o.at - T0, o.user, o.exit) for o in sim.outcomes if o.exit is not None]


def summary(sim: Simulator) -> list[tuple[timedelta, str, str, str, str]]:
    """Each send as (offset, user, step, channel, status[:reason])."""
    out = []
    for o in sends(sim):
        assert o.send is not None
        out.append((o.at - T0, o.user, o.send.step_id, o.send.channel, o.send.label))
    return out


# --- one send per user per step ------------------------------------------------------------------

DRIP = """
journey: drip
trigger: {event: Signed Up}
steps:
  - id: hello
    send: email
    template: note
  - wait: 1d
  - id: tip
    send: sms
    template: note
    fallback: [wechat]
  - wait: 2d
  - id: last
    send: email
    template: note
"""


async def test_many_users_get_exactly_one_message_per_step(templates: TemplateStore) -> None:
    journey = compile_journey(templates, DRIP)
    sim, outbox = simulator(templates, journey)
    users = [f"u{n:03d}" for n in range(100)]
    addresses: dict[str, set[str]] = {}
    for n, user in enumerate(users):
        traits: dict[str, Any] = {"email": f"{user}@example.com"}
        if n % 2:
            traits["phone"] = f"+86138000{n:05d}"
        else:
            traits["wechat_openid"] = f"openid-{user}"
        addresses[user] = {str(v) for v in traits.values()}
        sim.add_user(user, traits)
        track(sim, timedelta(minutes=n * 7), user, "Signed Up")
        # a second sign-up while the run is active is ignored (after_exit), not a second series
        track(sim, timedelta(minutes=n * 7) + 20 * HOUR, user, "Signed Up")

    await sim.run()

    per_step = Counter((o.user, o.send.step_id) for o in sends(sim) if o.send is not None)
    assert per_step == Counter({(user, step): 1 for user in users for step in ("hello", "tip", "last")})
    assert all(o.send is not None and o.send.status == "sent" for o in sends(sim))
    assert Counter(exit for _, _, exit in ends(sim)) == Counter({"completed": 100})
    assert sim.active_runs == 0

    messages = outbox.messages()
    assert len(messages) == 300
    keys = [m.idempotency_key for m in messages]
    assert len(set(keys)) == 300
    expected_keys = {f"{o.run_id}:{o.send.step_id}" for o in sends(sim) if o.send is not None}
    assert set(keys) == expected_keys
    channels = Counter(m.message.channel for m in messages)
    assert channels == Counter({"email": 200, "sms": 50, "wechat": 50})
    # each user's messages went to that user's addresses only
    for record in messages:
        assert record.run_id is not None
        assert record.address in addresses[record.run_id.split(":")[1]]


async def test_sends_happen_at_the_right_virtual_times(templates: TemplateStore) -> None:
    journey = compile_journey(templates, DRIP)
    sim, _ = simulator(templates, journey)
    sim.add_user("u1", {"email": "u1@example.com", "phone": "+8613800000001"})
    track(sim, timedelta(minutes=5), "u1", "Signed Up")

    await sim.run()

    five = timedelta(minutes=5)
    assert summary(sim) == [
        (five, "u1", "hello", "email", "sent"),
        (five + DAY, "u1", "tip", "sms", "sent"),
        (five + 3 * DAY, "u1", "last", "email", "sent"),
    ]
    assert ends(sim) == [(five + 3 * DAY, "u1", "completed")]


# --- re-entry ------------------------------------------------------------------------------------

CART = """
journey: cart
trigger: {event: Cart Updated}
key: "event.properties.cart_id"
re_entry: restart
steps:
  - wait: 1h
  - id: reminder
    send: email
    template: note
"""


async def test_restart_ends_the_old_run_and_starts_a_new_one(templates: TemplateStore) -> None:
    journey = compile_journey(templates, CART)
    sim, outbox = simulator(templates, journey)
    sim.add_user("u1", {"email": "u1@example.com"})
    track(sim, timedelta(0), "u1", "Cart Updated", cart_id="c1")
    track(sim, timedelta(minutes=10), "u1", "Cart Updated", cart_id="c2")
    track(sim, timedelta(minutes=30), "u1", "Cart Updated", cart_id="c1")

    await sim.run()

    restarted = [o for o in sim.outcomes if o.exit == "restarted"]
    assert [(o.at - T0, o.run_id) for o in restarted] == [(timedelta(minutes=30), "cart:u1:c1:1")]
    assert summary(sim) == [
        (timedelta(minutes=70), "u1", "reminder", "email", "sent"),  # c2, untouched by c1's restart
        (timedelta(minutes=90), "u1", "reminder", "email", "sent"),  # c1's new run
    ]
    assert [o.run_id for o in sends(sim)] == ["cart:u1:c2:1", "cart:u1:c1:2"]
    assert ends(sim) == [
        (timedelta(minutes=30), "u1", "restarted"),
        (timedelta(minutes=70), "u1", "completed"),
        (timedelta(minutes=90), "u1", "completed"),
    ]
    assert len(outbox.messages()) == 2


async def test_once_never_starts_a_second_run(templates: TemplateStore) -> None:
    journey = compile_journey(templates, DRIP.replace("steps:", "re_entry: once\nsteps:", 1))
    sim, _ = simulator(templates, journey)
    sim.add_user("u1", {"email": "u1@example.com", "phone": "+8613800000001"})
    track(sim, timedelta(0), "u1", "Signed Up")
    track(sim, 10 * DAY, "u1", "Signed Up")

    await sim.run()

    assert len(sends(sim)) == 3
    assert ends(sim) == [(3 * DAY, "u1", "completed")]
    assert any(e.what == "not entered" and e.at == T0 + 10 * DAY for e in sim.entries)


# --- profiles ------------------------------------------------------------------------------------

VIP = """
journey: vip_check
trigger: {event: Order Completed}
steps:
  - wait: 1d
  - branch:
      - if: "user.vip"
        then: [{id: vip_note, send: email, template: note}]
      - else: [{id: plain_note, send: sms, template: note}]
"""


async def test_an_identify_between_steps_changes_what_a_later_branch_sees(templates: TemplateStore) -> None:
    journey = compile_journey(templates, VIP)
    sim, _ = simulator(templates, journey)
    for user, vip in (("promoted", False), ("unchanged", False), ("demoted", True)):
        sim.add_user(user, {"email": f"{user}@example.com", "phone": "+8613800000001", "vip": vip})
        track(sim, timedelta(0), user, "Order Completed")
    sim.identify(T0 + 12 * HOUR, "promoted", {"vip": True})
    sim.identify(T0 + 12 * HOUR, "demoted", {"vip": False})

    await sim.run()

    assert sorted(summary(sim)) == [
        (DAY, "demoted", "plain_note", "sms", "sent"),
        (DAY, "promoted", "vip_note", "email", "sent"),
        (DAY, "unchanged", "plain_note", "sms", "sent"),
    ]


async def test_an_identify_adding_an_address_counts_from_then_on(templates: TemplateStore) -> None:
    journey = compile_journey(templates, DRIP)
    sim, _ = simulator(templates, journey)
    sim.add_user("u1", {"email": "u1@example.com"})
    track(sim, timedelta(0), "u1", "Signed Up")
    sim.identify(T0 + 2 * DAY, "u1", {"phone": "+8613800000001"})

    await sim.run()

    assert summary(sim) == [
        (timedelta(0), "u1", "hello", "email", "sent"),
        (DAY, "u1", "tip", "sms", "skipped:no_address"),
        (3 * DAY, "u1", "last", "email", "sent"),
    ]


# --- goals and ordering --------------------------------------------------------------------------

NUDGE = """
journey: nudge
trigger: {event: Signed Up}
goal: {event: Order Completed}
steps:
  - wait: 1h
  - id: nudge_email
    send: email
    template: note
"""


async def test_a_goal_at_the_instant_a_wait_ends_beats_the_send(templates: TemplateStore) -> None:
    journey = compile_journey(templates, NUDGE)
    sim, outbox = simulator(templates, journey)
    sim.add_user("buyer", {"email": "buyer@example.com"})
    sim.add_user("browser", {"email": "browser@example.com"})
    track(sim, timedelta(0), "buyer", "Signed Up")
    track(sim, timedelta(0), "browser", "Signed Up")
    track(sim, HOUR, "buyer", "Order Completed", total=10)

    await sim.run()

    assert summary(sim) == [(HOUR, "browser", "nudge_email", "email", "sent")]
    assert sorted(ends(sim)) == [(HOUR, "browser", "completed"), (HOUR, "buyer", "goal")]
    assert [(at - T0, user, journey_id) for at, user, journey_id, _ in sim.conversions] == [
        (HOUR, "buyer", "nudge")
    ]
    assert [m.address for m in outbox.messages()] == ["browser@example.com"]


async def test_a_goal_during_a_long_wait_ends_the_run_at_once(templates: TemplateStore) -> None:
    journey = compile_journey(templates, NUDGE.replace("wait: 1h", "wait: 30d"))
    sim, outbox = simulator(templates, journey)
    sim.add_user("u1", {"email": "u1@example.com"})
    track(sim, timedelta(0), "u1", "Signed Up")
    track(sim, 2 * HOUR, "u1", "Order Completed")

    await sim.run()

    assert ends(sim) == [(2 * HOUR, "u1", "goal")]
    assert outbox.messages() == []
    converted = [e for e in sim.entries if e.what == "converted"]
    assert [(e.at - T0, e.user, e.journey, e.detail) for e in converted] == [
        (2 * HOUR, "u1", "nudge", "Order Completed")
    ]


async def test_a_goal_without_exit_is_a_converted_entry_and_the_run_goes_on(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        NUDGE.replace("goal: {event: Order Completed}", "goal: {event: Order Completed, exit: false}"),
    )
    sim, _ = simulator(templates, journey)
    sim.add_user("u1", {"email": "u1@example.com"})
    track(sim, timedelta(0), "u1", "Signed Up")
    track(sim, timedelta(minutes=10), "u1", "Order Completed")
    track(sim, timedelta(minutes=20), "u1", "Order Completed")

    await sim.run()

    assert [e.at - T0 for e in sim.entries if e.what == "converted"] == [timedelta(minutes=10)]
    assert len(sim.conversions) == 1
    assert summary(sim) == [(HOUR, "u1", "nudge_email", "email", "sent")]
    assert ends(sim) == [(HOUR, "u1", "completed")]


# --- quiet hours ---------------------------------------------------------------------------------

PROMO = """
journey: promo
trigger: {event: Promo Due}
timezone: Asia/Shanghai
quiet_hours: {start: "21:00", end: "08:00"}
steps:
  - id: promo_email
    send: email
    template: note
"""
RECEIPT = """
journey: receipt
trigger: {event: Order Completed}
timezone: Asia/Shanghai
quiet_hours: {start: "21:00", end: "08:00"}
steps:
  - id: receipt_sms
    send: sms
    template: note
    category: transactional
"""


async def test_a_marketing_send_in_quiet_hours_is_deferred_and_a_transactional_one_is_not(
    templates: TemplateStore,
) -> None:
    sim, outbox = simulator(templates, compile_journey(templates, PROMO), compile_journey(templates, RECEIPT))
    sim.add_user("li", {"email": "li@example.com", "phone": "+8613800000001"})
    sim.add_user("ann", {"email": "ann@example.com", "phone": "+12125550100", "timezone": "America/New_York"})
    ten_pm_shanghai = 12 * HOUR  # T0 is 10:00 in Shanghai; 22:00 there is 09:00 in New York
    for user in ("li", "ann"):
        track(sim, ten_pm_shanghai, user, "Promo Due")
        track(sim, ten_pm_shanghai, user, "Order Completed")

    await sim.run()

    eight_am_shanghai = T0 + 22 * HOUR
    by_step = {(o.user, o.send.step_id): o.at for o in sends(sim) if o.send is not None}
    assert by_step == {
        ("li", "receipt_sms"): T0 + ten_pm_shanghai,
        ("li", "promo_email"): eight_am_shanghai,
        ("ann", "receipt_sms"): T0 + ten_pm_shanghai,
        ("ann", "promo_email"): T0 + ten_pm_shanghai,  # 09:00 in her own zone: not quiet
    }
    assert eight_am_shanghai == datetime(2026, 3, 3, 8, 0, tzinfo=SHANGHAI)
    assert all(o.send is not None and o.send.status == "sent" for o in sends(sim))
    deferred = [e for e in sim.entries if e.what == "deferred"]
    assert [(e.at, e.user, e.step) for e in deferred] == [(T0 + ten_pm_shanghai, "li", "promo_email")]
    assert len(outbox.messages()) == 4


async def test_an_invalid_user_zone_falls_back_to_the_journey_zone(templates: TemplateStore) -> None:
    sim, _ = simulator(templates, compile_journey(templates, PROMO))
    sim.add_user("day", {"email": "day@example.com", "timezone": "Europe"})
    sim.add_user("night", {"email": "night@example.com", "timezone": "Mars/Base"})
    track(sim, timedelta(0), "day", "Promo Due")  # 10:00 in Shanghai
    track(sim, 12 * HOUR, "night", "Promo Due")  # 22:00 in Shanghai

    await sim.run()

    assert sorted(summary(sim)) == [
        (timedelta(0), "day", "promo_email", "email", "sent"),
        (22 * HOUR, "night", "promo_email", "email", "sent"),
    ]


async def test_a_deferred_send_still_ends_at_once_on_a_goal(templates: TemplateStore) -> None:
    journey = compile_journey(templates, PROMO.replace("steps:", "goal: {event: Order Completed}\nsteps:", 1))
    sim, outbox = simulator(templates, journey)
    sim.add_user("li", {"email": "li@example.com"})
    track(sim, 12 * HOUR, "li", "Promo Due")
    track(sim, 14 * HOUR, "li", "Order Completed")

    await sim.run()

    assert outbox.messages() == []
    assert sends(sim) == []
    assert ends(sim) == [(14 * HOUR, "li", "goal")]
    whats = [e.what for e in sim.entries if e.user == "li" and e.journey == "promo"]
    assert whats == ["entered", "deferred", "converted", "ended"]


LATE_NIGHT = """
journey: late_night
trigger: {event: Go}
timezone: America/New_York
quiet_hours: {start: "21:00", end: "01:30"}
steps:
  - id: promo
    send: email
    template: note
"""


@pytest.mark.parametrize(
    ("now", "until"),
    [
        ("2026-11-01T05:15:00Z", "2026-11-01T05:30:00Z"),  # 01:15 EDT, the first pass
        ("2026-11-01T06:15:00Z", "2026-11-01T06:30:00Z"),  # 01:15 EST, the second pass
    ],
)
async def test_a_deferral_is_always_later_than_now(templates: TemplateStore, now: str, until: str) -> None:
    # New York repeats 01:00-02:00 on 2026-11-01. A deferral to an instant already past would
    # make the run sleep zero time and defer again at the same instant, for ever.
    journey = compile_journey(templates, LATE_NIGHT)
    at = datetime.fromisoformat(now)
    command = Run(journey, run_id="r1", user_id="u1", key="", event=Event("Go", at), entered_at=at).start()
    assert isinstance(command, Deliver)
    deliverer = Deliverer(templates, {"email": Outbox()})

    result = await deliverer.send(command.request, Profile("u1", {"email": "u1@example.com"}), at)

    assert result.outcome is None
    assert result.defer_until is not None
    assert result.defer_until > at
    assert result.defer_until == datetime.fromisoformat(until)


# --- skipped sends -------------------------------------------------------------------------------

COUPON = """
journey: coupon
trigger: {event: Go}
steps:
  - id: coupon
    send: sms
    template: note
    fallback: [wechat]
  - id: after
    send: email
    template: note
"""


@pytest.mark.parametrize(
    ("traits", "opted_out", "coupon"),
    [
        ({}, [], ("sms", "skipped:no_address")),
        ({"email": "x@example.com"}, ["email"], ("sms", "skipped:no_address")),
        ({"phone": "+8613800000001"}, ["sms"], ("sms", "skipped:opted_out")),
        ({"wechat_openid": "openid-1"}, ["wechat"], ("sms", "skipped:opted_out")),
        ({"phone": "+8613800000001", "wechat_openid": "openid-1"}, ["sms"], ("wechat", "sent")),
        ({"phone": "+8613800000001", "wechat_openid": "openid-1"}, ["wechat"], ("sms", "sent")),
        (
            {"phone": "+8613800000001", "wechat_openid": "openid-1"},
            ["sms", "wechat"],
            ("sms", "skipped:opted_out"),
        ),
    ],
)
async def test_skipped_sends_record_why_and_the_run_goes_on(
    templates: TemplateStore, traits: dict[str, Any], opted_out: list[str], coupon: tuple[str, str]
) -> None:
    sim, outbox = simulator(templates, compile_journey(templates, COUPON))
    sim.add_user("u1", traits, opted_out)
    track(sim, timedelta(0), "u1", "Go")

    await sim.run()

    first, *rest = summary(sim)
    assert first[2:] == ("coupon", *coupon)
    assert [r[2] for r in rest] == ["after"]  # the run went on to the next step
    assert ends(sim) == [(timedelta(0), "u1", "completed")]
    sent = sum(1 for o in sends(sim) if o.send is not None and o.send.status == "sent")
    assert len(outbox.messages()) == sent


async def test_a_transactional_send_ignores_opt_outs(templates: TemplateStore) -> None:
    sim, outbox = simulator(templates, compile_journey(templates, RECEIPT))
    sim.add_user("u1", {"phone": "+8613800000001"}, ["sms"])
    track(sim, timedelta(0), "u1", "Order Completed")

    await sim.run()

    assert summary(sim) == [(timedelta(0), "u1", "receipt_sms", "sms", "sent")]
    assert [m.address for m in outbox.messages()] == ["+8613800000001"]


async def test_timeline_entries_describe_the_run(templates: TemplateStore) -> None:
    sim, _ = simulator(templates, compile_journey(templates, PROMO), compile_journey(templates, NUDGE))
    sim.add_user("li", {"email": "li@example.com"})
    track(sim, 12 * HOUR, "li", "Promo Due")
    track(sim, 12 * HOUR, "li", "Signed Up")
    track(sim, 12 * HOUR + timedelta(minutes=30), "li", "Order Completed")

    await sim.run()

    lines = [(e.at - T0, e.journey, e.step, e.what) for e in sim.entries]
    assert (12 * HOUR, "promo", "promo_email", "deferred") in lines
    assert (12 * HOUR + timedelta(minutes=30), "nudge", "goal", "converted") in lines
    assert (12 * HOUR + timedelta(minutes=30), "nudge", "", "ended") in lines
    assert (22 * HOUR, "promo", "promo_email", "sent") in lines
    sent_line = next(e for e in sim.entries if e.what == "sent")
    assert sent_line.detail.startswith("email note")
    assert "Note for li" in sent_line.detail
