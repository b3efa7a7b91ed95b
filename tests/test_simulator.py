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


# --- people: anonymous visitors and merges -------------------------------------------------------


def visit(sim: Simulator, offset: timedelta, anonymous: str, name: str, **properties: Any) -> None:
    at = T0 + offset
    sim.track(at, None, Event(name=name, timestamp=at, properties=properties), anonymous_id=anonymous)


async def test_an_anonymous_visitor_is_a_person_whose_runs_reach_them_once_an_address_is_known(
    templates: TemplateStore,
) -> None:
    sim, outbox = simulator(templates, compile_journey(templates, CART))
    visit(sim, timedelta(0), "a1", "Cart Updated", cart_id="c1")
    visit(sim, timedelta(minutes=10), "a1", "Cart Updated", cart_id="c2")
    sim.identify(T0 + timedelta(minutes=30), "u1", {"email": "li@example.com"}, anonymous_id="a1")

    await sim.run()

    # c1's reminder at 1h and c2's at 1h10 both reach the visitor, named u1 since
    assert summary(sim) == [
        (HOUR, "anonymous_id:a1", "reminder", "email", "sent"),
        (timedelta(minutes=70), "anonymous_id:a1", "reminder", "email", "sent"),
    ]
    assert [m.address for m in outbox.messages()] == ["li@example.com"] * 2
    assert sim.people.identities.lookup("user_id", "u1") == "anonymous_id:a1"
    assert not any(e.what == "merged" for e in sim.entries)  # no second person: nothing merged


async def test_a_merge_ends_the_newer_of_two_runs_of_one_journey_and_key(templates: TemplateStore) -> None:
    sim, outbox = simulator(templates, compile_journey(templates, CART))
    sim.add_user("u1", {"email": "u1@example.com"})
    visit(sim, timedelta(0), "a1", "Cart Updated", cart_id="c1")  # the visitor's run is the older
    track(sim, timedelta(minutes=5), "u1", "Cart Updated", cart_id="c1")
    track(sim, timedelta(minutes=6), "u1", "Cart Updated", cart_id="c2")
    sim.identify(T0 + timedelta(minutes=20), "u1", {}, anonymous_id="a1")

    await sim.run()

    assert ends(sim) == [
        (timedelta(minutes=20), "u1", "merged"),
        (HOUR, "anonymous_id:a1", "completed"),
        (timedelta(minutes=66), "u1", "completed"),
    ]
    merged = next(o for o in sim.outcomes if o.exit == "merged")
    assert merged.run_id == "cart:u1:c1:1"
    # the survivor's c1 run (the visitor's) sends to the merged profile's address
    assert [(m.run_id, m.address) for m in outbox.messages()] == [
        ("cart:anonymous_id:a1:c1:1", "u1@example.com"),
        ("cart:u1:c2:1", "u1@example.com"),
    ]
    assert sim.active_runs == 0
    assert any(e.what == "merged" and e.detail == "u1 into anonymous_id:a1" for e in sim.entries)


async def test_once_treats_the_merged_person_as_one(templates: TemplateStore) -> None:
    journey = compile_journey(templates, DRIP.replace("steps:", "re_entry: once\nsteps:", 1))
    sim, _ = simulator(templates, journey)
    sim.add_user("u1", {"email": "u1@example.com", "phone": "+8613800000001"})
    visit(sim, timedelta(minutes=1), "a1", "Signed Up")
    sim.identify(T0 + HOUR, "u1", {}, anonymous_id="a1")
    track(sim, 2 * HOUR, "u1", "Signed Up")  # the merged person's run is active
    track(sim, 10 * DAY, "u1", "Signed Up")  # ... and later has run before

    await sim.run()

    assert ends(sim) == [(3 * DAY + timedelta(minutes=1), "anonymous_id:a1", "completed")]
    refused = [e.at - T0 for e in sim.entries if e.what == "not entered"]
    assert refused == [2 * HOUR, 10 * DAY]
    assert [s[4] for s in summary(sim)] == ["skipped:no_address", "sent", "sent"]


async def test_a_goal_after_the_merge_converts_the_merged_persons_ended_run(templates: TemplateStore) -> None:
    late = NUDGE.replace("goal: {event: Order Completed}", "goal: {event: Order Completed, within: 7d}")
    sim, _ = simulator(templates, compile_journey(templates, late))
    sim.add_user("u1", {"email": "u1@example.com"})
    visit(sim, timedelta(minutes=1), "a1", "Signed Up")  # ends at 1h01 (no address); goal open 7 days
    sim.identify(T0 + 2 * HOUR, "u1", {}, anonymous_id="a1")
    track(sim, DAY, "u1", "Order Completed")

    await sim.run()

    assert [(at - T0, user, journey) for at, user, journey, _ in sim.conversions] == [(DAY, "u1", "nudge")]


async def test_merged_profiles_keep_the_newer_traits_and_every_opt_out(templates: TemplateStore) -> None:
    sim, _ = simulator(templates, compile_journey(templates, DRIP))
    sim.add_user("u1", {"email": "old@example.com", "first_name": "Li", "plan": "free"}, ["sms"])
    sim.identify(T0 + HOUR, None, {"email": "new@example.com", "plan": "pro"}, ["wechat"], anonymous_id="a1")
    sim.identify(T0 + 2 * HOUR, "u1", {"city": "Shanghai"}, anonymous_id="a1")

    await sim.run()

    for name in ("u1", "anonymous_id:a1"):
        profile = sim.profiles.get_now(name)
        assert profile.user_id == "u1"
        assert profile.traits == {"email": "new@example.com", "first_name": "Li", "plan": "pro", "city": "Shanghai"}
        assert profile.opted_out == {"sms", "wechat"}
    assert sim.people.identities.lookup("email", "OLD@example.com") == "u1"
    assert sim.people.identities.lookup("email", "new@example.com") == "u1"


async def test_two_known_users_sharing_an_address_stay_apart_unless_aliased(templates: TemplateStore) -> None:
    sim, outbox = simulator(templates, compile_journey(templates, CART))
    sim.add_user("mum", {"email": "family@example.com"})
    sim.add_user("son", {})
    sim.identify(T0, "son", {"email": "family@example.com"})
    track(sim, timedelta(minutes=1), "mum", "Cart Updated", cart_id="c1")
    track(sim, timedelta(minutes=2), "son", "Cart Updated", cart_id="c1")
    sim.alias(T0 + timedelta(minutes=30), "son", "mum")

    await sim.run()

    conflict = next(e for e in sim.entries if e.what == "not merged")
    assert (conflict.user, conflict.detail) == ("son", "email:family@example.com stays with mum")
    alias = next(e for e in sim.entries if e.what == "alias")
    assert alias.detail == "mum is now son"
    assert ends(sim) == [(timedelta(minutes=30), "son", "merged"), (timedelta(minutes=61), "mum", "completed")]
    assert len(outbox.messages()) == 1


async def test_caps_count_both_peoples_sends_after_a_merge(templates: TemplateStore) -> None:
    capped = CART.replace("journey: cart", "journey: cart\nfrequency_caps: {all: {per_day: 2}}")
    sim, outbox = simulator(templates, compile_journey(templates, capped))
    sim.add_user("u1", {"email": "u1@example.com"})
    track(sim, timedelta(0), "u1", "Cart Updated", cart_id="c1")
    sim.identify(T0 + timedelta(minutes=1), None, {"email": "a1@example.com"}, anonymous_id="a1")
    visit(sim, timedelta(minutes=2), "a1", "Cart Updated", cart_id="c2")
    sim.identify(T0 + 2 * HOUR, "u1", {}, anonymous_id="a1")
    track(sim, 3 * HOUR, "u1", "Cart Updated", cart_id="c3")

    await sim.run()

    assert [s[4] for s in summary(sim)] == ["sent", "sent", "skipped:frequency_cap"]
    assert [m.address for m in outbox.messages()] == ["u1@example.com", "a1@example.com"]


async def test_group_traits_are_shared_by_members_and_read_as_user_group(templates: TemplateStore) -> None:
    teams = DRIP.replace("trigger: {event: Signed Up}", """trigger: {event: Signed Up, if: "user.group.plan == 'team'"}""")
    sim, _ = simulator(templates, compile_journey(templates, teams))
    sim.add_user("u1", {"email": "u1@example.com"})
    sim.add_user("u2", {"email": "u2@example.com"})
    sim.group(T0, "u1", "acme", {"plan": "free"})
    sim.group(T0, "u2", "acme", {})
    sim.group(T0 + HOUR, "u1", "acme", {"plan": "team"})  # every member sees the new plan
    track(sim, 2 * HOUR, "u2", "Signed Up")
    sim.group(T0 + 3 * HOUR, None, "solo", {"plan": "free"}, anonymous_id="a1")
    sim.identify(T0 + 4 * HOUR, "u2", {}, anonymous_id="a1")  # the later group call wins in a merge

    await sim.run()

    assert {o.user for o in sends(sim)} == {"u2"}
    assert sim.profiles.get_now("u1").traits["group"] == {"id": "acme", "plan": "team"}
    assert sim.profiles.get_now("anonymous_id:a1").traits["group"] == {"id": "solo", "plan": "free"}
    entered = [e.at - T0 for e in sim.entries if e.what == "entered"]
    assert entered == [2 * HOUR]
    assert any(e.what == "group" and e.detail == "acme: plan=team" for e in sim.entries)
