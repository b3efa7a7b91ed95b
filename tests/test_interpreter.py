"""The pure run engine, driven by hand: every command it gives and every answer it gets.

Journeys are compiled from small YAML strings against a throwaway template directory, then a
:class:`nurture.engine.interpreter.Run` is driven the way the simulator and the workflow drive it:
``ReadProfile`` is answered with a traits dict, ``Deliver`` with a ``SendResult``, ``WriteTraits``
with ``None``, and sleeps are resumed at the instant they asked for.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nurture.engine.interpreter import (
    AwaitEvent,
    Command,
    Deliver,
    Ended,
    EventEffect,
    Reach,
    ReadProfile,
    Run,
    Sleep,
    WriteTraits,
    choose_variant,
    entry_decision,
    late_conversion,
    opening,
    run_key,
    trigger_matches,
)
from nurture.engine.model import EndedRun, Event, SendOutcome, SendResult
from nurture.language import ir
from nurture.language.compiler import Settings, compile_text
from nurture.language.diagnostics import DiagnosticSink
from nurture.language.templates import TemplateStore

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # a Monday
"""Entry instant of most runs below."""


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> TemplateStore:
    """One template named ``note`` for every channel, and ``offer_a`` / ``offer_b`` emails."""
    root = tmp_path_factory.mktemp("templates")
    (root / "email").mkdir()
    (root / "sms").mkdir()
    (root / "wechat").mkdir()
    for name in ("note", "offer_a", "offer_b"):
        (root / "email" / f"{name}.mjml").write_text(
            "---\nsubject: \"Hello {{ user.first_name | default('there') }}\"\n---\n"
            "<mjml><mj-body><mj-section><mj-column><mj-text>"
            f"{name} for {{{{ user.id }}}}</mj-text></mj-column></mj-section></mj-body></mjml>\n",
            encoding="utf-8",
        )
    (root / "sms" / "note.txt").write_text("Note for {{ user.id }}\n", encoding="utf-8")
    (root / "wechat" / "note.yaml").write_text(
        'template_id: tpl-1\ndata:\n  first: "Note for {{ user.id }}"\n', encoding="utf-8"
    )
    return TemplateStore(root)


def compile_journey(templates: TemplateStore, text: str, settings: Settings | None = None) -> ir.Journey:
    """Compile journey source (its ``journey:`` id names the file) and insist on no diagnostics."""
    source = textwrap.dedent(text)
    journey_id = next(
        line.split(":", 1)[1].strip() for line in source.splitlines() if line.startswith("journey:")
    )
    sink = DiagnosticSink()
    journey = compile_text(source, f"journeys/{journey_id}.yaml", templates, settings or Settings(), sink)
    assert sink.items == [], "\n".join(d.headline() for d in sink.items)
    assert journey is not None
    return journey


def event(name: str, at: datetime = T0, **properties: Any) -> Event:
    return Event(name=name, timestamp=at, properties=properties)


def new_run(
    journey: ir.Journey,
    *,
    user_id: str = "u1",
    key: str = "",
    trigger: Event | None = None,
    at: datetime = T0,
    run_id: str = "run-1",
) -> Run:
    start = trigger if trigger is not None else event(journey.trigger.event, at)
    return Run(journey, run_id=run_id, user_id=user_id, key=key, event=start, entered_at=at)


def sent(step_id: str, at: datetime = T0) -> SendResult:
    """A delivery answer: the message went out."""
    return SendResult(
        outcome=SendOutcome(step_id=step_id, channel="email", template="note", status="sent", at=at)
    )


def answer(
    run: Run,
    command: Command | Ended,
    *,
    traits: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    log: list[Command | Ended] | None = None,
) -> Command | Ended:
    """Answer profile reads, sends and trait writes until the run sleeps, waits or ends."""
    at = now if now is not None else run.now
    while True:
        if log is not None:
            log.append(command)
        if isinstance(command, ReadProfile):
            command = run.resume(dict(traits or {}), at)
        elif isinstance(command, Deliver):
            command = run.resume(sent(command.request.step_id, at), at)
        elif isinstance(command, WriteTraits):
            command = run.resume(None, at)
        else:
            return command


def drive_to_end(run: Run, *, traits: Mapping[str, Any] | None = None) -> list[Command | Ended]:
    """Run to the end: sleeps resumed at their instant, every ``wait_for`` timing out."""
    log: list[Command | Ended] = []
    command = answer(run, run.start(), traits=traits, log=log)
    while not isinstance(command, Ended):
        assert isinstance(command, (Sleep, AwaitEvent))
        command = answer(run, run.resume(None, command.until), traits=traits, now=command.until, log=log)
    return log


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# --- wait ----------------------------------------------------------------------------------------


def test_wait_sleeps_exactly_the_duration_from_now(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: waits
        trigger: {event: Go}
        steps:
          - wait: 1d12h
          - id: short
            wait: 90s
        """,
    )
    run = new_run(journey)

    first = run.start()
    assert first == Sleep(T0 + timedelta(days=1, hours=12), "s1", "wait")
    second = run.resume(None, first.until)
    assert second == Sleep(T0 + timedelta(days=1, hours=12, seconds=90), "short", "wait")
    assert run.resume(None, second.until) == Ended("completed")
    assert run.ended == "completed"


# --- wait_until ----------------------------------------------------------------------------------

WAIT_UNTIL = """
journey: morning
trigger: {event: Go}
timezone: Asia/Shanghai
steps:
  - id: at_ten
    wait_until: "TIME"
DAYS
"""


def wait_until_instant(
    templates: TemplateStore,
    at: datetime,
    time: str,
    traits: Mapping[str, Any],
    days: str = "",
) -> datetime:
    journey = compile_journey(templates, WAIT_UNTIL.replace("TIME", time).replace("DAYS", days))
    run = new_run(journey, at=at)
    assert run.start() == ReadProfile()  # the zone is the user's, read when the step starts
    command = run.resume(dict(traits), at)
    assert isinstance(command, Sleep)
    assert command.reason == "wait_until" and command.step_id == "at_ten"
    return command.until


def test_wait_until_uses_the_user_zone_before_the_journey_zone(templates: TemplateStore) -> None:
    # 12:00Z is 07:00 in New York (EST) and 20:00 in Shanghai.
    new_york = wait_until_instant(templates, T0, "10:00", {"timezone": "America/New_York"})
    shanghai = wait_until_instant(templates, T0, "10:00", {})

    assert new_york == utc("2026-03-02T10:00:00-05:00")
    assert shanghai == utc("2026-03-03T10:00:00+08:00")


@pytest.mark.parametrize("bad_zone", ["Mars/Olympus_Mons", "Europe", 8])
def test_wait_until_with_an_invalid_user_zone_uses_the_journey_zone(
    templates: TemplateStore, bad_zone: object
) -> None:
    assert wait_until_instant(templates, T0, "10:00", {"timezone": bad_zone}) == utc(
        "2026-03-03T10:00:00+08:00"
    )


@pytest.mark.parametrize(
    ("local_now", "expected"),
    [
        ("2026-03-02T10:00:00+08:00", "2026-03-03T10:00:00+08:00"),  # exactly 10:00: tomorrow
        ("2026-03-02T09:59:59+08:00", "2026-03-02T10:00:00+08:00"),
        ("2026-03-02T10:00:01+08:00", "2026-03-03T10:00:00+08:00"),
    ],
)
def test_wait_until_is_strictly_after_now(templates: TemplateStore, local_now: str, expected: str) -> None:
    assert wait_until_instant(templates, utc(local_now), "10:00", {}) == utc(expected)


def test_wait_until_with_days_skips_to_the_next_allowed_day(templates: TemplateStore) -> None:
    friday_late = utc("2026-03-06T11:00:00+08:00")
    days = "    days: [mon, tue, wed, thu, fri]"

    assert wait_until_instant(templates, friday_late, "10:00", {}, days) == utc("2026-03-09T10:00:00+08:00")
    friday_early = utc("2026-03-06T09:00:00+08:00")
    assert wait_until_instant(templates, friday_early, "10:00", {}, days) == utc("2026-03-06T10:00:00+08:00")


@pytest.mark.parametrize(
    ("tz", "now", "time", "expected"),
    [
        # New York springs forward on 2026-03-08 at 02:00 EST: 02:30 does not exist, 03:30 EDT.
        ("America/New_York", "2026-03-07T12:00:00Z", "02:30", "2026-03-08T07:30:00Z"),
        ("America/New_York", "2026-03-07T12:00:00Z", "08:00", "2026-03-07T13:00:00Z"),  # EST
        ("America/New_York", "2026-03-07T14:00:00Z", "08:00", "2026-03-08T12:00:00Z"),  # EDT
        # ... and falls back on 2026-11-01 at 02:00 EDT: 01:30 happens twice, the first is EDT.
        ("America/New_York", "2026-10-31T12:00:00Z", "01:30", "2026-11-01T05:30:00Z"),
        # Berlin springs forward on 2026-03-29 at 02:00 CET and falls back on 2026-10-25 at 03:00.
        ("Europe/Berlin", "2026-03-28T12:00:00Z", "02:30", "2026-03-29T01:30:00Z"),
        ("Europe/Berlin", "2026-03-28T12:00:00Z", "08:00", "2026-03-29T06:00:00Z"),
        ("Europe/Berlin", "2026-10-24T12:00:00Z", "02:30", "2026-10-25T00:30:00Z"),
        ("Europe/Berlin", "2026-10-24T12:00:00Z", "08:00", "2026-10-25T07:00:00Z"),
    ],
)
def test_wait_until_across_daylight_saving_changes(
    templates: TemplateStore, tz: str, now: str, time: str, expected: str
) -> None:
    assert wait_until_instant(templates, utc(now), time, {"timezone": tz}) == utc(expected)


# --- send ----------------------------------------------------------------------------------------

SENDS = """
journey: sends
trigger: {event: Go}
steps:
  - id: reminder
    send: email
    template: note
    fallback: [sms, wechat]
  - id: receipt
    send: sms
    template: note
    category: transactional
"""


def test_send_asks_for_delivery_with_channels_category_and_idempotency_key(templates: TemplateStore) -> None:
    journey = compile_journey(templates, SENDS)
    run = new_run(journey, run_id="sends:u1::1", trigger=event("Go", coupon="X1"))

    first = run.start()
    assert isinstance(first, Deliver)
    request = first.request
    assert request.channels == ("email", "sms", "wechat")
    assert request.category == "marketing"
    assert request.template == "note"
    assert request.step_id == "reminder"
    assert request.user_id == "u1"
    assert request.journey == "sends" and request.version == journey.version
    assert request.idempotency_key == "sends:u1::1:reminder"
    assert request.context["event"]["properties"] == {"coupon": "X1"}

    second = run.resume(sent("reminder"), T0)
    assert isinstance(second, Deliver)
    assert second.request.channels == ("sms",)
    assert second.request.category == "transactional"
    assert second.request.idempotency_key == "sends:u1::1:receipt"
    assert run.resume(sent("receipt"), T0) == Ended("completed")


def test_a_deferred_send_sleeps_then_delivers_the_same_request_again(templates: TemplateStore) -> None:
    journey = compile_journey(templates, SENDS)
    run = new_run(journey)
    later = T0 + timedelta(hours=9)

    first = run.start()
    assert isinstance(first, Deliver)
    pause = run.resume(SendResult(defer_until=later), T0)
    assert pause == Sleep(later, "reminder", "quiet_hours")
    again = run.resume(None, later)
    assert again == first  # same step, same idempotency key: one message at most
    after = run.resume(sent("reminder", later), later)
    assert isinstance(after, Deliver) and after.request.step_id == "receipt"


# --- wait_for ------------------------------------------------------------------------------------

WAIT_FOR = """
journey: checkout
trigger: {event: Cart Updated}
goal:
  event: Order Completed
  if: "event.properties.total > 0"
steps:
  - id: wait_checkout
    wait_for: Checkout Started
    if: "event.properties.step == 'payment'"
    timeout: 1d
    then:
      - id: remember
        update: {stage: "{{ last_event.properties.step }}"}
    else:
      - id: timed_out
        exit: no_checkout
  - id: by_size
    branch:
      - if: "last_event.properties.x > 10"
        then: [{id: big, exit: big_checkout}]
      - else: [{id: small, exit: small_checkout}]
"""


def test_wait_for_resumed_with_the_event_runs_then_and_sets_last_event(templates: TemplateStore) -> None:
    journey = compile_journey(templates, WAIT_FOR)
    run = new_run(journey)

    waiting = run.start()
    assert waiting == AwaitEvent("wait_checkout", "Checkout Started", T0 + timedelta(days=1))
    at = T0 + timedelta(hours=2)
    arrived = event("Checkout Started", at, step="payment", x=11)
    assert run.on_event(arrived, at) == EventEffect(resume=True)

    command = run.resume(arrived, at)
    assert command == WriteTraits("remember", {"stage": "payment"})
    assert run.last_event == arrived
    assert run.resume(None, at) == Ended("big_checkout")


def test_last_event_is_the_wait_for_event_not_the_trigger(templates: TemplateStore) -> None:
    journey = compile_journey(templates, WAIT_FOR)
    run = new_run(journey, trigger=event("Cart Updated", x=50))
    run.start()
    arrived = event("Checkout Started", T0, step="payment", x=3)

    assert answer(run, run.resume(arrived, T0)) == Ended("small_checkout")


def test_wait_for_timeout_runs_else(templates: TemplateStore) -> None:
    journey = compile_journey(templates, WAIT_FOR)
    run = new_run(journey)
    waiting = run.start()
    assert isinstance(waiting, AwaitEvent)

    assert run.resume(None, waiting.until) == Ended("no_checkout")
    assert run.last_event is None


def test_a_wait_for_whose_if_is_false_does_not_resume(templates: TemplateStore) -> None:
    journey = compile_journey(templates, WAIT_FOR)
    run = new_run(journey)
    run.start()

    assert run.on_event(event("Checkout Started", step="address"), T0) == EventEffect()
    assert run.on_event(event("Checkout Started"), T0) == EventEffect()  # missing: falsy
    assert run.on_event(event("Checkout Started", step="payment"), T0) == EventEffect(resume=True)


def test_an_event_for_another_step_name_is_ignored(templates: TemplateStore) -> None:
    journey = compile_journey(templates, WAIT_FOR)
    run = new_run(journey)
    run.start()

    assert run.on_event(event("Checkout Completed", step="payment"), T0) == EventEffect()
    assert run.on_event(event("Page Viewed", step="payment"), T0) == EventEffect()
    assert run.ended is None


# --- events: goal and exit_on --------------------------------------------------------------------

GOAL = """
journey: goal_window
trigger: {event: Signed Up}
goal:
  event: Order Completed
  if: "event.properties.total > 0"
  within: 2d
steps:
  - wait: 7d
  - send: email
    template: note
"""


def test_a_goal_within_the_window_ends_the_run_and_converts(templates: TemplateStore) -> None:
    journey = compile_journey(templates, GOAL)
    run = new_run(journey)
    run.start()
    at = T0 + timedelta(days=1)

    effect = run.on_event(event("Order Completed", at, total=10), at)

    assert effect == EventEffect(end="goal", converted=True)
    assert run.converted
    assert run.end("goal", at) == Ended("goal")
    assert run.ended == "goal"


def test_a_goal_whose_if_is_false_does_nothing(templates: TemplateStore) -> None:
    journey = compile_journey(templates, GOAL)
    run = new_run(journey)
    run.start()

    assert run.on_event(event("Order Completed", total=0), T0) == EventEffect()
    assert not run.converted


def test_a_goal_just_inside_the_window_counts_and_after_it_does_nothing(templates: TemplateStore) -> None:
    journey = compile_journey(templates, GOAL)
    inside = new_run(journey)
    inside.start()
    late = new_run(journey)
    late.start()
    edge = T0 + timedelta(days=2)
    before, after = edge - timedelta(seconds=1), edge + timedelta(seconds=1)

    assert inside.on_event(event("Order Completed", before, total=5), before).end == "goal"
    assert late.on_event(event("Order Completed", after, total=5), after) == EventEffect()
    assert not late.converted and late.ended is None
    # the run goes on as if nothing happened
    assert isinstance(late.resume(None, T0 + timedelta(days=7)), Deliver)


def test_a_goal_without_exit_converts_once_and_the_run_continues(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: soft_goal
        trigger: {event: Signed Up}
        goal: {event: Order Completed, exit: false}
        steps:
          - wait: 1d
          - id: tips
            send: email
            template: note
        """,
    )
    run = new_run(journey)
    sleeping = run.start()
    assert isinstance(sleeping, Sleep)

    first = run.on_event(event("Order Completed"), T0 + timedelta(hours=1))
    second = run.on_event(event("Order Completed"), T0 + timedelta(hours=2))

    assert first == EventEffect(converted=True)
    assert second == EventEffect(converted=False)
    assert run.ended is None
    command = run.resume(None, sleeping.until)
    assert isinstance(command, Deliver) and command.request.step_id == "tips"
    assert run.resume(sent("tips"), sleeping.until) == Ended("completed")


EXIT_ON = """
journey: cart
trigger: {event: Cart Updated}
key: "event.properties.cart_id"
exit_on:
  - event: Cart Emptied
    if: "event.properties.cart_id == journey.key"
steps:
  - wait: 1h
"""


def test_exit_on_with_a_condition_ends_the_run_only_when_it_holds(templates: TemplateStore) -> None:
    journey = compile_journey(templates, EXIT_ON)
    run = new_run(journey, key="c1", trigger=event("Cart Updated", cart_id="c1"))
    run.start()

    assert run.on_event(event("Cart Emptied", cart_id="c2"), T0) == EventEffect()
    assert run.on_event(event("Cart Emptied", cart_id="c1"), T0) == EventEffect(end="exit_on")


def test_the_goal_wins_over_a_wait_for_waiting_for_the_same_event(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: race
        trigger: {event: Cart Updated}
        goal: {event: Order Completed}
        exit_on: [{event: Cart Emptied}]
        steps:
          - wait_for: Order Completed
            timeout: 1d
            then: [{exit: bought}]
          - wait_for: Cart Emptied
            timeout: 1d
            then: [{exit: emptied}]
        """,
    )
    goal_run = new_run(journey)
    assert isinstance(goal_run.start(), AwaitEvent)
    assert goal_run.on_event(event("Order Completed"), T0) == EventEffect(end="goal", converted=True)

    exit_run = new_run(journey)
    waiting = exit_run.start()
    assert isinstance(waiting, AwaitEvent)
    second = exit_run.resume(None, waiting.until)
    assert isinstance(second, AwaitEvent) and second.event == "Cart Emptied"
    assert exit_run.on_event(event("Cart Emptied"), waiting.until) == EventEffect(end="exit_on")


def test_event_reads_profile_only_when_a_relevant_condition_reads_user(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: profile_reads
        trigger: {event: Go}
        goal: {event: Order Completed, if: "user.vip and event.properties.total > 0"}
        exit_on:
          - {event: Unsubscribed}
          - {event: Cart Emptied, if: "event.properties.cart_id == journey.key"}
        steps:
          - id: wait_first
            wait: 1h
          - id: wait_review
            wait_for: Review Posted
            if: "user.reviewer"
            timeout: 1d
        """,
    )
    run = new_run(journey)
    run.start()

    assert run.event_reads_profile(event("Order Completed"))
    assert not run.event_reads_profile(event("Unsubscribed"))
    assert not run.event_reads_profile(event("Cart Emptied"))
    assert not run.event_reads_profile(event("Review Posted"))  # not waiting for it yet
    waiting = run.resume(None, T0 + timedelta(hours=1))
    assert isinstance(waiting, AwaitEvent)
    assert run.event_reads_profile(event("Review Posted"))
    assert not run.event_reads_profile(event("Page Viewed"))

    now = T0 + timedelta(hours=2)
    assert run.on_event(event("Review Posted"), now, {}) == EventEffect()
    assert run.on_event(event("Review Posted"), now, {"reviewer": True}) == EventEffect(resume=True)
    assert run.on_event(event("Order Completed", total=5), now, {"vip": False}) == EventEffect()
    assert run.on_event(event("Order Completed", total=5), now, {"vip": True}).end == "goal"


def test_events_after_the_end_do_nothing(templates: TemplateStore) -> None:
    journey = compile_journey(templates, GOAL)
    run = new_run(journey)
    run.start()

    assert run.end("restarted", T0 + timedelta(minutes=5)) == Ended("restarted")
    assert run.ended == "restarted"
    assert run.pending is None
    assert run.on_event(event("Order Completed", total=10), T0) == EventEffect()
    assert not run.converted


# --- branch --------------------------------------------------------------------------------------


def test_branch_reads_the_profile_when_it_runs_not_at_entry(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: vip_check
        trigger: {event: Go}
        steps:
          - wait: 1d
          - branch:
              - if: "user.vip"
                then: [{exit: vip}]
              - if: "user.orders > 3"
                then: [{exit: regular}]
              - else: [{exit: newcomer}]
        """,
    )

    def ending(traits: Mapping[str, Any]) -> Ended | Command:
        run = new_run(journey)
        first = run.start()
        assert isinstance(first, Sleep)  # nothing is read at entry
        assert run.resume(None, first.until) == ReadProfile()
        return run.resume(dict(traits), first.until)

    assert ending({"vip": True, "orders": 9}) == Ended("vip")
    assert ending({"vip": False, "orders": 9}) == Ended("regular")
    assert ending({"orders": 2}) == Ended("newcomer")
    assert ending({}) == Ended("newcomer")


def test_branch_on_event_data_alone_does_not_read_the_profile(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: by_event
        trigger: {event: Go}
        steps:
          - branch:
              - if: "event.properties.amount >= 100"
                then: [{exit: large}]
        """,
    )
    assert new_run(journey, trigger=event("Go", amount=100)).start() == Ended("large")
    assert new_run(journey, trigger=event("Go", amount=99)).start() == Ended("completed")


def test_an_exit_inside_a_branch_ends_the_whole_run(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: nested_exit
        trigger: {event: Go}
        steps:
          - branch:
              - if: "event.properties.stop"
                then: [{exit: stopped}]
          - send: email
            template: note
        """,
    )
    assert new_run(journey, trigger=event("Go", stop=True)).start() == Ended("stopped")
    assert isinstance(new_run(journey, trigger=event("Go")).start(), Deliver)


# --- split ---------------------------------------------------------------------------------------

SPLIT = """
journey: experiment
trigger: {event: Go}
steps:
  - id: pick
    split: subject_test
    variants:
      a: {weight: 50, steps: [{id: send_a, send: email, template: offer_a}]}
      b: {weight: 30, steps: [{id: send_b, send: email, template: offer_b}]}
      control: {weight: 20, steps: []}
"""


def reference_variant(experiment: str, user_id: str, weights: list[tuple[str, int]]) -> str:
    """The README's formula, written out independently of the engine."""
    digest = hashlib.sha256(f"{experiment}:{user_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") % sum(w for _, w in weights)
    for name, weight in weights:
        if point < weight:
            return name
        point -= weight
    raise AssertionError("unreachable")


def first_template(journey: ir.Journey, user_id: str, run_id: str = "run-1") -> str | None:
    command = new_run(journey, user_id=user_id, run_id=run_id).start()
    return command.request.template if isinstance(command, Deliver) else None


def test_split_is_sticky_per_user_across_runs(templates: TemplateStore) -> None:
    journey = compile_journey(templates, SPLIT)
    for user_id in (f"user-{n}" for n in range(40)):
        templates_seen = {first_template(journey, user_id, run_id=f"r{n}") for n in range(3)}
        assert len(templates_seen) == 1


def test_split_sends_carry_the_variant(templates: TemplateStore) -> None:
    journey = compile_journey(templates, SPLIT)
    weights = [("a", 50), ("b", 30), ("control", 20)]
    user_a = next(f"u{n}" for n in range(1000) if reference_variant("subject_test", f"u{n}", weights) == "a")
    user_b = next(f"u{n}" for n in range(1000) if reference_variant("subject_test", f"u{n}", weights) == "b")

    for user_id, name in ((user_a, "a"), (user_b, "b")):
        run = new_run(journey, user_id=user_id)
        command = run.start()
        assert isinstance(command, Deliver)
        assert command.request.template == f"offer_{name}"
        assert command.request.step_id == f"send_{name}"
        assert command.request.variant == name
        assert run.current_variant == name


def test_sends_carry_the_most_recent_split_even_when_an_experiment_is_reused(
    templates: TemplateStore,
) -> None:
    # Reusing an experiment name keeps a user in the same arm for a later message; the send after
    # the second `subject_test` split must carry that split's variant, not the `cta_test` one.
    journey = compile_journey(
        templates,
        """
        journey: reuse
        trigger: {event: Go}
        steps:
          - split: subject_test
            variants:
              a: {weight: 1, steps: [{id: first_a, send: email, template: offer_a}]}
              b: {weight: 1, steps: [{id: first_b, send: email, template: offer_b}]}
          - split: cta_test
            variants:
              x: {weight: 1, steps: [{id: second_x, send: email, template: note}]}
              y: {weight: 1, steps: [{id: second_y, send: email, template: note}]}
          - split: subject_test
            variants:
              a: {weight: 1, steps: [{id: third_a, send: email, template: offer_a}]}
              b: {weight: 1, steps: [{id: third_b, send: email, template: offer_b}]}
        """,
    )
    for user_id in ("u1", "u2", "u3", "u4"):
        subject = reference_variant("subject_test", user_id, [("a", 1), ("b", 1)])
        cta = reference_variant("cta_test", user_id, [("x", 1), ("y", 1)])
        log = drive_to_end(new_run(journey, user_id=user_id))
        carried = [(c.request.step_id, c.request.variant) for c in log if isinstance(c, Deliver)]
        assert carried == [
            (f"first_{subject}", subject),
            (f"second_{cta}", cta),
            (f"third_{subject}", subject),
        ]


def test_a_holdout_variant_sends_nothing(templates: TemplateStore) -> None:
    journey = compile_journey(templates, SPLIT)
    weights = [("a", 50), ("b", 30), ("control", 20)]
    holdout = next(
        f"u{n}" for n in range(1000) if reference_variant("subject_test", f"u{n}", weights) == "control"
    )

    run = new_run(journey, user_id=holdout)
    assert run.start() == Ended("completed")
    assert run.current_variant == "control"


def test_split_distribution_follows_the_weights(templates: TemplateStore) -> None:
    journey = compile_journey(templates, SPLIT)
    step = journey.steps[0]
    assert isinstance(step, ir.Split)
    total = 20_000
    counts = {"a": 0, "b": 0, "control": 0}
    for n in range(total):
        counts[choose_variant(step.experiment, f"user-{n}", step.variants).name] += 1

    for name, weight in (("a", 50), ("b", 30), ("control", 20)):
        assert abs(counts[name] / total * 100 - weight) <= 2, counts


def test_choose_variant_matches_the_documented_formula(templates: TemplateStore) -> None:
    variants = (
        ir.Variant("first", 7, ()),
        ir.Variant("none", 0, ()),
        ir.Variant("second", 2, ()),
        ir.Variant("third", 1, ()),
    )
    weights = [(v.name, v.weight) for v in variants]
    chosen = set()
    for n in range(2000):
        user_id = f"customer-{n}"
        name = choose_variant("onboarding_v2", user_id, variants).name
        assert name == reference_variant("onboarding_v2", user_id, weights)
        chosen.add(name)
    assert chosen == {"first", "second", "third"}  # a weight of 0 is never chosen


def test_choose_variant_depends_on_the_experiment_name() -> None:
    variants = (ir.Variant("a", 1, ()), ir.Variant("b", 1, ()))
    one = [choose_variant("exp_one", f"u{n}", variants).name for n in range(200)]
    two = [choose_variant("exp_two", f"u{n}", variants).name for n in range(200)]
    assert one != two


# --- update --------------------------------------------------------------------------------------


def test_update_keeps_the_type_of_a_single_expression_and_renders_text(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: traits
        trigger: {event: Order Completed}
        steps:
          - id: remember
            update:
              orders: "{{ event.properties.n }}"
              vip: true
              label: "order-{{ event.properties.n }}-{{ event.properties.missing }}!"
              gone: "{{ event.properties.missing }}"
              plain: hello
        """,
    )
    run = new_run(journey, trigger=event("Order Completed", n=3))

    command = run.start()

    assert isinstance(command, WriteTraits)
    assert command.step_id == "remember"
    assert command.traits == {"orders": 3, "vip": True, "label": "order-3-!", "gone": None, "plain": "hello"}
    assert type(command.traits["orders"]) is int
    assert run.resume(None, T0) == Ended("completed")


def test_update_reading_user_reads_the_profile_first(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: bump
        trigger: {event: Order Completed}
        steps:
          - update: {orders: "{{ user.orders | default(0) + 1 }}"}
        """,
    )
    run = new_run(journey)

    assert run.start() == ReadProfile()
    assert run.resume({"orders": 4}, T0) == WriteTraits("s1", {"orders": 5})


def test_an_update_value_that_clashes_with_the_data_is_stored_empty_and_the_run_goes_on(
    templates: TemplateStore,
) -> None:
    journey = compile_journey(
        templates,
        """
        journey: clash
        trigger: {event: Order Completed}
        steps:
          - update:
              next: "{{ user.name + 1 }}"
              label: "n-{{ event.properties.n / 0 }}"
              kept: "{{ event.properties.n }}"
          - wait: 1h
        """,
    )
    run = new_run(journey, trigger=event("Order Completed", n=3))

    assert run.start() == ReadProfile()
    assert run.resume({"name": "Li"}, T0) == WriteTraits("s1", {"next": None, "label": None, "kept": 3})
    assert isinstance(run.resume(None, T0), Sleep)


# --- ends ----------------------------------------------------------------------------------------


def test_an_exit_step_ends_with_its_reason(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: early
        trigger: {event: Go}
        steps:
          - wait: 1h
          - exit: not_interested
        """,
    )
    run = new_run(journey)
    sleep = run.start()
    assert isinstance(sleep, Sleep)

    assert run.resume(None, sleep.until) == Ended("not_interested")
    assert run.ended == "not_interested"
    assert run.pending is None


def test_running_out_of_steps_completes(templates: TemplateStore) -> None:
    journey = compile_journey(templates, SENDS)
    log = drive_to_end(new_run(journey))
    assert log[-1] == Ended("completed")
    assert [type(c) for c in log] == [Deliver, Deliver, Ended]


def test_ending_from_outside_stops_the_run(templates: TemplateStore) -> None:
    journey = compile_journey(templates, GOAL)
    run = new_run(journey)
    assert isinstance(run.start(), Sleep)

    later = T0 + timedelta(hours=3)
    assert run.end("restarted", later) == Ended("restarted")
    assert run.ended == "restarted"
    assert run.now == later


# --- routing helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("re_entry", "active", "ran_before", "decision"),
    [
        ("after_exit", False, False, "start"),
        ("after_exit", False, True, "start"),
        ("after_exit", True, True, "ignore"),
        ("restart", False, False, "start"),
        ("restart", False, True, "start"),
        ("restart", True, True, "restart"),
        ("once", False, False, "start"),
        ("once", False, True, "ignore"),
        ("once", True, True, "ignore"),
    ],
)
def test_entry_decision(
    templates: TemplateStore, re_entry: str, active: bool, ran_before: bool, decision: str
) -> None:
    journey = compile_journey(
        templates,
        f"""
        journey: entry
        trigger: {{event: Go}}
        re_entry: {re_entry}
        steps: [{{wait: 1h}}]
        """,
    )
    assert entry_decision(journey, active=active, ran_before=ran_before) == decision


TRIGGERED = """
journey: carts
trigger:
  event: Cart Updated
  if: "event.properties.item_count > 0 and not user.blocked"
key: "event.properties.cart_id"
steps: [{wait: 1h}]
"""


def test_trigger_matches_on_name_and_condition(templates: TemplateStore) -> None:
    journey = compile_journey(templates, TRIGGERED)

    assert trigger_matches(journey, event("Cart Updated", item_count=2), {}, "u1")
    assert not trigger_matches(journey, event("Cart Updated", item_count=0), {}, "u1")
    assert not trigger_matches(journey, event("Cart Updated"), {}, "u1")
    assert not trigger_matches(journey, event("Cart Updated", item_count=2), {"blocked": True}, "u1")
    assert not trigger_matches(journey, event("Cart Viewed", item_count=2), {}, "u1")


def test_run_key_is_the_key_value_or_empty(templates: TemplateStore) -> None:
    keyed = compile_journey(templates, TRIGGERED)
    unkeyed = compile_journey(templates, EXIT_ON.replace('key: "event.properties.cart_id"\n', ""))

    assert run_key(keyed, event("Cart Updated", cart_id="c9"), {}, "u1") == "c9"
    assert run_key(keyed, event("Cart Updated", cart_id=42), {}, "u1") == "42"
    assert run_key(keyed, event("Cart Updated"), {}, "u1") == ""
    assert run_key(unkeyed, event("Cart Updated", cart_id="c9"), {}, "u1") == ""


# --- the intermediate form -----------------------------------------------------------------------

EVERYTHING = """
journey: everything
trigger: {event: Signed Up}
key: "event.properties.plan"
timezone: Europe/Berlin
quiet_hours: {start: "22:00", end: "07:00"}
goal: {event: Order Completed, within: 10d, if: "event.properties.total > 0"}
exit_on: [{event: Unsubscribed}]
steps:
  - id: welcome
    send: email
    template: note
    fallback: [sms]
  - wait: 1d
  - wait_until: "09:30"
    days: [tue, thu]
  - wait_for: Profile Completed
    timeout: 2d
    if: "event.properties.percent >= 80"
    then: [{send: sms, template: note}]
    else: [{update: {nudged: true, plan: "{{ event.properties.plan }}"}}]
  - branch:
      - if: "user.vip"
        then: [{send: wechat, template: note, category: transactional}]
      - else: [{wait: 3h}]
  - split: subject_test
    variants:
      a: {weight: 1, steps: [{send: email, template: offer_a}]}
      b: {weight: 1, steps: [{send: email, template: offer_b}]}
  - update: {stage: "done-{{ journey.key }}"}
"""


@pytest.mark.parametrize("traits", [{"vip": True, "timezone": "Asia/Tokyo"}, {}])
def test_a_journey_through_json_drives_the_same_commands(
    templates: TemplateStore, traits: dict[str, Any]
) -> None:
    journey = compile_journey(templates, EVERYTHING)
    back = ir.journey_from_dict(json.loads(json.dumps(ir.journey_to_dict(journey))))
    trigger = event("Signed Up", plan="pro")

    for user_id in ("u1", "u2", "u3", "u4"):
        original = drive_to_end(new_run(journey, user_id=user_id, key="pro", trigger=trigger), traits=traits)
        replayed = drive_to_end(new_run(back, user_id=user_id, key="pro", trigger=trigger), traits=traits)
        assert replayed == original
        assert original[-1] == Ended("completed")
        assert sum(isinstance(c, Deliver) for c in original) >= 2


# --- goal windows, values and step reach ---------------------------------------------------------

VALUED = """
journey: valued
trigger: {event: Chat Ended}
goal: {event: Order Completed, within: 2d, from: last_message, value: "event.properties.total", exit: false}
steps:
  - id: first_wait
    wait: 1d
  - id: nudge
    send: email
    template: note
"""


def test_a_goal_measured_from_the_last_message_converts_nothing_before_a_message(templates: TemplateStore) -> None:
    run = new_run(compile_journey(templates, VALUED))
    assert isinstance(run.start(), Sleep)

    early = T0 + timedelta(hours=3)
    assert run.on_event(event("Order Completed", early, total=50), early) == EventEffect()
    assert run.goal_window_end is None


def test_a_goal_measured_from_the_last_message_counts_its_window_from_that_message(templates: TemplateStore) -> None:
    run = new_run(compile_journey(templates, VALUED))
    run.start()
    sent_at = T0 + timedelta(days=1)
    assert answer(run, run.resume(None, sent_at), now=sent_at) == Ended("completed")
    assert run.last_message_at == sent_at
    assert run.goal_window_end == sent_at + timedelta(days=2)


def test_a_conversion_carries_the_goals_value(templates: TemplateStore) -> None:
    journey = compile_journey(templates, VALUED.replace("from: last_message, ", ""))
    run = new_run(journey)
    run.start()
    at = T0 + timedelta(hours=1)

    assert run.on_event(event("Order Completed", at, total="19.5"), at) == EventEffect(converted=True, value=19.5)
    # converted once: a second order is worth nothing more to this run
    assert run.on_event(event("Order Completed", at, total=7), at) == EventEffect()


@pytest.mark.parametrize("total", [None, "n/a", True, [1], "inf", 10**400])
def test_a_value_that_is_not_a_number_is_no_value(templates: TemplateStore, total: Any) -> None:
    run = new_run(compile_journey(templates, VALUED.replace("from: last_message, ", "")))
    run.start()
    assert run.on_event(event("Order Completed", T0, total=total), T0) == EventEffect(converted=True)


def test_an_ended_run_converts_until_its_window_ends(templates: TemplateStore) -> None:
    journey = compile_journey(templates, VALUED)
    sent_at = T0 + timedelta(days=1)
    ended = EndedRun("run-1", "valued", "u1", "", T0, last_message_at=sent_at)
    silent = EndedRun("run-2", "valued", "u1", "", T0)

    inside = event("Order Completed", sent_at + timedelta(days=2), total=30)
    outside = event("Order Completed", sent_at + timedelta(days=2, seconds=1), total=30)
    other = event("Cart Updated", sent_at + timedelta(hours=1))

    assert late_conversion(journey, ended, inside, {}) == EventEffect(converted=True, value=30)
    assert late_conversion(journey, ended, outside, {}) is None
    assert late_conversion(journey, ended, other, {}) is None
    assert late_conversion(journey, silent, inside, {}) is None


def test_a_goal_without_a_window_lasts_only_the_runs_life(templates: TemplateStore) -> None:
    journey = compile_journey(templates, VALUED.replace("within: 2d, from: last_message, ", ""))
    after = event("Order Completed", T0 + timedelta(days=1), total=5)
    assert late_conversion(journey, EndedRun("run-1", "valued", "u1", "", T0, T0), after, {}) is None


def test_every_step_reached_is_handed_to_the_driver_once_in_order(templates: TemplateStore) -> None:
    journey = compile_journey(
        templates,
        """
        journey: reach
        trigger: {event: Signed Up}
        steps:
          - id: pick
            split: copy_test
            variants:
              a: {weight: 1, steps: [{id: hello, send: email, template: note}]}
          - id: pause
            wait: 1h
          - id: check
            branch:
              - if: "user.vip"
                then: [{id: vip_note, send: email, template: note}]
        """,
    )
    run = new_run(journey)

    assert isinstance(answer(run, run.start()), Sleep)
    assert run.take_reached() == [Reach("pick", T0, "a"), Reach("hello", T0), Reach("pause", T0)]
    assert run.take_reached() == []

    later = T0 + timedelta(hours=1)
    assert answer(run, run.resume(None, later), traits={"vip": True}, now=later) == Ended("completed")
    assert run.take_reached() == [Reach("check", later), Reach("vip_note", later)]
    assert Reach.from_dict(Reach("pick", T0, "a").to_dict()) == Reach("pick", T0, "a")


def test_a_held_out_send_opens_a_window_measured_from_the_last_message(templates: TemplateStore) -> None:
    run = new_run(compile_journey(templates, VALUED))
    run.start()
    sent_at = T0 + timedelta(days=1)
    held = SendResult(
        outcome=SendOutcome(
            step_id="nudge", channel="email", template="note", status="skipped", at=sent_at, reason="holdout"
        )
    )
    assert isinstance(run.resume(None, sent_at), Deliver)
    assert run.resume(held, sent_at) == Ended("completed")
    assert run.goal_window_end == sent_at + timedelta(days=2)


# --- records that ride on a send (records_ride) ---------------------------------------------------

RIDERS = """
journey: riders
trigger: {event: Go}
goal: {event: Order Completed, within: 3d, from: last_message}
steps:
  - {id: first, send: email, template: note}
  - {id: pause, wait: 1h}
  - id: pick
    split: copy
    variants:
      a: {weight: 1, steps: [{id: in_a, send: email, template: offer_a}]}
      b: {weight: 1, steps: [{id: in_b, send: email, template: offer_b}, {id: b_pause, wait: 2h}]}
  - id: clicked
    wait_for: Link Clicked
    timeout: 1d
    then: [{id: thanks, send: email, template: note}]
    else:
      - id: by_plan
        branch:
          - if: "user.vip"
            then: [{id: vip_note, send: email, template: note}]
          - else: [{id: plain_note, send: email, template: note}, {id: bye, exit: done}]
  - {id: last, send: email, template: note}
"""


@pytest.mark.parametrize("vip", [True, False])
@pytest.mark.parametrize("user_id", ["u1", "u2", "u3", "u4"])
def test_a_record_riding_on_a_send_is_the_record_the_run_writes_after_it(
    templates: TemplateStore, user_id: str, vip: bool
) -> None:
    """Two runs driven alike: one gives each send its rider (:meth:`Run.send_rider`), the other
    records as a driver does after the send. Every rider equals that record, and ``rode`` takes
    its steps; a send with no rider is followed by neither a wait nor the run's end."""
    journey = compile_journey(templates, RIDERS)
    riding, plain = new_run(journey, user_id=user_id), new_run(journey, user_id=user_id)
    traits = {"vip": vip}
    commands = (riding.start(), plain.start())
    kinds: list[str | None] = []
    while not isinstance(commands[0], Ended):
        ours, theirs = commands
        assert ours == theirs
        at = riding.now
        if isinstance(ours, Deliver):
            rider = riding.send_rider("wf-1", steps=True)
            kinds.append(None if rider is None else rider["kind"])
            result = sent(ours.request.step_id, at)
            ours, theirs = riding.resume(result, at), plain.resume(result, at)
            if rider is None:
                assert not isinstance(theirs, (Sleep, AwaitEvent)) and theirs != Ended("completed")
            elif rider["kind"] == "steps":
                assert isinstance(theirs, (Sleep, AwaitEvent))
                assert rider["record"] == plain.steps_record(theirs)
                assert riding.rode(rider, ours) and riding.reached == []
            else:
                assert theirs == Ended("completed")
                assert rider["record"] == plain.end_record("wf-1", "completed", at, continued=False)
                assert riding.rode(rider, ours) and riding.reached == []
            commands = (ours, theirs)
            continue
        if isinstance(ours, ReadProfile):
            commands = (riding.resume(traits, at), plain.resume(traits, at))
            continue
        assert isinstance(ours, (Sleep, AwaitEvent)) and isinstance(theirs, (Sleep, AwaitEvent))
        assert riding.steps_record(ours) == plain.steps_record(theirs)
        commands = (riding.resume(None, ours.until), plain.resume(None, theirs.until))
    assert commands[1] == commands[0]
    # first: the pause; in_a or in_b: the wait_for or b_pause; then the wait_for times out:
    # vip_note is followed by `last` (a send), which ends the run; plain_note by an exit.
    assert kinds == (["steps", "steps", None, "end"] if vip else ["steps", "steps", None])


def test_a_rider_is_not_taken_when_the_run_went_elsewhere(templates: TemplateStore) -> None:
    """A send the provider deferred leaves the run sleeping at the send, not at the wait the rider
    named: nothing is taken, and the driver records as usual. Without ``steps`` a run gets no
    steps rider at all."""
    journey = compile_journey(templates, RIDERS)
    run = new_run(journey)
    command = run.start()
    assert isinstance(command, Deliver)
    assert run.send_rider("wf-1", steps=False) is None
    rider = run.send_rider("wf-1", steps=True)
    assert rider is not None and rider["record"]["waiting"] == "pause"
    held = run.resume(SendResult(defer_until=T0 + timedelta(hours=8), defer_reason="quiet_hours"), T0)
    assert isinstance(held, Sleep) and held.step_id == "first"
    assert not run.rode(rider, held)
    assert [r.step_id for r in run.reached] == ["first"]


OPENINGS = {
    "wait": "steps:\n  - {id: first, wait: 1h}\n  - {id: hi, send: email, template: note}\n",
    "branch": (
        "steps:\n  - id: check\n    branch:\n      - if: \"user.vip == true\"\n"
        "        then: [{id: vip_wait, wait: 2h}]\n"
        "  - {id: soon, wait_for: Clicked, timeout: 1d}\n  - {id: hi, send: email, template: note}\n"
    ),
    "until": "steps:\n  - {id: due, wait_until: {date: event.properties.due_at}}\n  - {id: hi, send: email, template: note}\n",
    "send": "steps:\n  - {id: hi, send: email, template: note}\n  - {id: later, wait: 1h}\n",
    "quiet": (
        "quiet_hours: {start: '00:00', end: '23:59'}\n"
        "steps:\n  - {id: hi, send: email, template: note, category: marketing}\n"
    ),
}


@pytest.mark.parametrize(
    ("case", "traits", "waits", "reads"),
    [
        ("wait", None, "first", False),
        ("until", {"timezone": "Asia/Tokyo"}, "due", True),
        ("branch", {"vip": True}, "vip_wait", True),
        ("branch", {"vip": False}, "soon", True),
        ("branch", None, None, True),  # no traits to answer the read: the run reads them itself
        ("send", None, None, False),
        ("quiet", None, None, False),  # a send held by quiet hours is no wait a router writes
    ],
)
def test_an_opening_is_the_start_and_first_steps_the_run_records_itself(
    templates: TemplateStore, case: str, traits: dict[str, Any] | None, waits: str | None, reads: bool
) -> None:
    """A router works out how a run it starts begins (:func:`opening`): the traits it read answer a
    first profile read, and when the run then comes to a wait its start record and the record of
    the steps up to that wait equal what the run writes itself before that wait."""
    journey = compile_journey(templates, f"journey: opens\ntrigger: {{event: Joined}}\n{OPENINGS[case]}")
    trigger = event("Joined", T0, due_at="2030-01-02")

    opened = opening(journey, user_id="u1", key="", event=trigger, now=T0, traits=traits)

    assert opened.reads_profile is reads
    assert (None if opened.waits is None else opened.waits.step_id) == waits, opened.first
    if opened.waits is None:
        return
    run = new_run(journey, trigger=trigger, run_id="run-7")
    first = run.start()
    if isinstance(first, ReadProfile):
        first = run.resume(dict(traits or {}), T0)
    assert first == opened.waits
    start, steps = opened.records("run-7", "wf-7")
    assert start == run.start_record("wf-7")
    assert steps == run.steps_record(first)
    assert steps["reached"] and steps["waiting"] == waits
