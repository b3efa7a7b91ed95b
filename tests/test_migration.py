"""Moving sleeping runs to a new journey version: the plan's checks, the interpreter continuing at
the mapped step, and a run carried whole into a fresh history (continue-as-new)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from support import rows
from test_interpreter import T0, answer, compile_journey, event, new_run, sent, templates

from nurture.engine.interpreter import AwaitEvent, Deliver, Ended, Run, Sleep, WriteTraits
from nurture.engine.model import SendResult
from nurture.language import ir
from nurture.language.migration import MigrationError, parse_map, plan_end, plan_move, waiting_steps
from nurture.language.templates import TemplateStore
from nurture.simulation.simulator import Simulator
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord, RunRecord, StepReach
from nurture.storage.stores import DbRecorder

__all__ = ["templates"]  # the module's fixture, shared

V1 = """
journey: onboarding
trigger: {event: Signed Up}
goal: {event: Upgraded, within: 30d}
steps:
  - id: hello
    send: email
    template: note
  - id: first_wait
    wait: 2d
  - id: split_copy
    split: copy
    variants:
      a:
        weight: 1
        steps:
            - id: await_click
              wait_for: Clicked
              timeout: 3d
              then: [{id: thanks, send: email, template: offer_a}]
              else: [{id: nudge, send: email, template: offer_b}]
      b:
        weight: 1
        steps:
            - id: await_click_b
              wait_for: Clicked
              timeout: 3d
  - id: last_note
    send: email
    template: note
"""

V2 = """
journey: onboarding
trigger: {event: Signed Up}
goal: {event: Upgraded, within: 30d}
steps:
  - id: hello
    send: email
    template: note
  - id: first_pause
    wait: 1d
  - id: split_copy
    split: copy
    variants:
      a:
        weight: 1
        steps:
            - id: await_click
              wait_for: Clicked
              timeout: 5d
              then: [{id: thanks_v2, send: sms, template: note}]
              else: []
      b:
        weight: 1
        steps:
            - id: await_click_b
              wait_for: Clicked
              timeout: 3d
  - id: tag
    update: {onboarded: "yes"}
  - id: last_note
    send: email
    template: note
"""


@pytest.fixture(scope="module")
def versions(templates: TemplateStore) -> tuple[ir.Journey, ir.Journey]:
    return compile_journey(templates, V1), compile_journey(templates, V2)


def user_in(journey: ir.Journey, variant: str, nth: int = 0) -> str:
    """A user id the copy split assigns to ``variant`` (the ``nth`` one)."""
    from nurture.engine.interpreter import choose_variant

    split = journey.step("split_copy")
    assert isinstance(split, ir.Split)
    return [
        user for user in (f"u{n}" for n in range(100)) if choose_variant("copy", user, split.variants).name == variant
    ][nth]


# --- the plan ------------------------------------------------------------------------------------


def test_the_plan_names_every_waiting_step_without_a_place(versions: tuple[ir.Journey, ir.Journey]) -> None:
    old, new = versions
    assert [s.id for s in waiting_steps(old)] == [
        "hello",
        "first_wait",
        "await_click",
        "thanks",
        "nudge",
        "await_click_b",
        "last_note",
    ]
    with pytest.raises(MigrationError) as failed:
        plan_move(old, new)
    assert failed.value.problems == [
        f"step first_wait (wait) of version {old.version} is not in version {new.version}: "
        "name where its runs go with --map first_wait=STEP",
        f"step thanks (send) of version {old.version} is not in version {new.version}: "
        "name where its runs go with --map thanks=STEP",
        f"step nudge (send) of version {old.version} is not in version {new.version}: "
        "name where its runs go with --map nudge=STEP",
    ]

    with pytest.raises(MigrationError) as wrong:
        plan_move(old, new, {"first_wait": "await_click", "thanks": "thanks_v3", "nudge": "last_note", "tag": "x"})
    assert wrong.value.problems == [
        f"--map tag=...: tag is no step of version {old.version} where runs wait",
        f"step first_wait (wait) maps to await_click in version {new.version}, a wait_for: a run waiting "
        "at a sleep can only continue at a wait or wait_until",
        f"step thanks (send) maps to thanks_v3, which is no step of version {new.version} (did you mean 'thanks_v2'?)",
    ]

    plan = plan_move(old, new, {"first_wait": "first_pause", "thanks": "thanks_v2", "nudge": "last_note"})
    assert plan.to_version == new.version and plan.from_version == old.version
    assert plan.steps["first_wait"] == "first_pause" and plan.steps["await_click"] == "await_click"
    assert plan.signal(new)["journey"]["version"] == new.version
    with pytest.raises(MigrationError, match="same version"):
        plan_move(old, old)
    assert plan_end(old, "retired").end_reason == "retired"
    assert parse_map(["a=b", " c = d "]) == {"a": "b", "c": "d"}
    with pytest.raises(ValueError, match="not OLD_STEP=NEW_STEP"):
        parse_map(["a"])


# --- moving a run --------------------------------------------------------------------------------


def test_a_sleeping_run_keeps_its_wake_up_and_continues_with_the_new_version(
    versions: tuple[ir.Journey, ir.Journey],
) -> None:
    old, new = versions
    run = new_run(old, user_id=user_in(old, "b"))
    waiting = answer(run, run.start())
    assert waiting == Sleep(T0 + timedelta(days=2), "first_wait", "wait")
    run.take_reached()

    moved = run.move_to(new, "first_pause")

    assert moved == Sleep(T0 + timedelta(days=2), "first_pause", "wait")  # the wake-up it had
    assert run.journey is new and run.take_reached() == []
    assert run.steps_record(moved)["version"] == new.version
    nxt = run.resume(None, T0 + timedelta(days=2))
    assert nxt == AwaitEvent("await_click_b", "Clicked", T0 + timedelta(days=5))
    assert run.variants == {"copy": "b"}
    after = run.resume(None, T0 + timedelta(days=5))
    assert after == WriteTraits("tag", {"onboarded": "yes"})  # a step only the new version has
    last = run.resume(None, T0 + timedelta(days=5))
    assert isinstance(last, Deliver) and last.request.version == new.version
    assert run.resume(sent("last_note"), T0 + timedelta(days=5)) == Ended("completed")


def test_a_run_mid_wait_for_moves_and_its_event_takes_the_new_branch(
    versions: tuple[ir.Journey, ir.Journey],
) -> None:
    old, new = versions
    run = new_run(old, user_id=user_in(old, "a"))
    command = answer(run, run.start())
    command = answer(run, run.resume(None, T0 + timedelta(days=2)))
    assert command == AwaitEvent("await_click", "Clicked", T0 + timedelta(days=5))
    at = T0 + timedelta(days=3)

    moved = run.move_to(new, "await_click")

    # The timeout it had (not the new 5d from now); the goal window still counts from entry.
    assert moved == AwaitEvent("await_click", "Clicked", T0 + timedelta(days=5))
    clicked = event("Clicked", at)
    assert run.on_event(clicked, at).resume
    then = run.resume(clicked, at)
    assert isinstance(then, Deliver) and then.request.step_id == "thanks_v2" and then.request.channels == ("sms",)
    assert then.request.variant == "a"
    assert run.on_event(event("Upgraded", at + timedelta(days=20)), at + timedelta(days=20)).converted


def test_a_held_send_moves_and_is_delivered_when_its_hold_ends(versions: tuple[ir.Journey, ir.Journey]) -> None:
    old, new = versions
    run = new_run(old)
    first = run.start()
    assert isinstance(first, Deliver)
    later = T0 + timedelta(hours=9)
    held = run.resume(SendResult(defer_until=later, defer_reason="frequency_cap"), T0)
    assert held == Sleep(later, "hello", "frequency_cap")

    moved = run.move_to(new, "hello")

    assert moved == held and [reach.step_id for reach in run.take_reached()] == ["hello"]
    again = run.resume(None, later)
    assert isinstance(again, Deliver) and again.request.version == new.version and again.request.step_id == "hello"
    assert run.resume(sent("hello"), later) == Sleep(later + timedelta(days=1), "first_pause", "wait")


def test_only_a_waiting_run_moves(versions: tuple[ir.Journey, ir.Journey]) -> None:
    old, new = versions
    run = new_run(old)
    assert isinstance(run.start(), Deliver)
    with pytest.raises(RuntimeError, match="only a waiting run"):
        run.move_to(new, "hello")


def test_a_step_that_cannot_take_the_wait_leaves_the_run_as_it_was(versions: tuple[ir.Journey, ir.Journey]) -> None:
    old, new = versions
    run = new_run(old, user_id=user_in(old, "b"))
    waiting = answer(run, run.start())
    assert waiting == Sleep(T0 + timedelta(days=2), "first_wait", "wait")

    with pytest.raises(ValueError, match="no step nowhere"):
        run.move_to(new, "nowhere")
    with pytest.raises(ValueError, match=r"step await_click \(wait_for\) cannot take a run waiting at first_wait"):
        run.move_to(new, "await_click")
    with pytest.raises(ValueError, match=r"step tag \(update\)"):
        run.move_to(new, "tag")

    assert run.journey is old
    assert run.resume(None, waiting.until) == AwaitEvent("await_click_b", "Clicked", T0 + timedelta(days=5))


# --- carried whole to a fresh history ------------------------------------------------------------


def drive(run: Run, command: object, log: list[object]) -> None:
    """To the end: sleeps resumed at their instant, each wait_for answered by a click a day in."""
    while not isinstance(command, Ended):
        command = answer(run, command, log=log)  # type: ignore[arg-type]
        if isinstance(command, Sleep):
            command = run.resume(None, command.until)
        elif isinstance(command, AwaitEvent):
            at = command.until - timedelta(days=2)
            clicked = event("Clicked", at)
            assert run.on_event(clicked, at).resume
            command = run.resume(clicked, at)
    log.append(command)


@pytest.mark.parametrize("stop_at", ["first_wait", "await_click"])
def test_a_restored_snapshot_runs_exactly_as_the_run_would_have(
    versions: tuple[ir.Journey, ir.Journey], stop_at: str
) -> None:
    old, _ = versions
    user = user_in(old, "a")
    whole = new_run(old, user_id=user)
    expected: list[object] = []
    drive(whole, whole.start(), expected)

    run = new_run(old, user_id=user)
    log: list[object] = []
    command = answer(run, run.start(), log=log)
    while command.step_id != stop_at:  # type: ignore[union-attr]
        assert isinstance(command, Sleep)
        command = answer(run, run.resume(None, command.until), log=log)
    snapshot = run.snapshot()

    restored, waiting = Run.restore(old, snapshot)

    assert waiting == command and restored.variants == run.variants and restored.now == run.now
    assert restored.last_message_at == run.last_message_at and restored.snapshot() == snapshot
    assert log.pop() == waiting  # drive logs it again
    drive(restored, waiting, log)
    assert log == expected


# --- the simulator -------------------------------------------------------------------------------


def simulate(
    templates: TemplateStore, old: ir.Journey, db: Database | None = None
) -> tuple[Simulator, dict[str, str]]:
    """Four people: a and b enter at T0 (by the upgrade at 2d1h they wait for a click, one per
    variant), d enters at 1d (asleep at first_wait until 3d), e enters after the upgrade."""
    from channels.outbox import Outbox
    from nurture.delivery.deliverer import Deliverer
    from nurture.simulation.simulator import Simulator

    outbox = Outbox()
    deliverer = Deliverer(templates, {"email": outbox, "sms": outbox, "wechat": outbox})
    sim = Simulator([old], deliverer, T0, recorder=None if db is None else DbRecorder(db))
    people = {"a": user_in(old, "a"), "b": user_in(old, "b"), "d": user_in(old, "b", 1), "e": user_in(old, "a", 1)}
    for name, user in people.items():
        sim.add_user(user, {"email": f"{name}@example.com", "phone": "+8613800138000"})
    for name, offset in [("a", 0), ("b", 0), ("d", 1), ("e", 4)]:
        at = T0 + timedelta(days=offset)
        sim.track(at, people[name], event("Signed Up", at))
    return sim, people


def by_person(sim: Simulator, people: dict[str, str]) -> dict[str, list[tuple[timedelta, str]]]:
    names = {user: name for name, user in people.items()}
    seen: dict[str, list[tuple[timedelta, str]]] = {}
    for o in sim.outcomes:
        what = f"{o.send.step_id} {o.send.channel}" if o.send is not None else f"ended {o.exit}"
        seen.setdefault(names[o.user], []).append((o.at - T0, what))
    return seen


async def test_the_simulator_moves_sleeping_runs_at_an_upgrade(
    versions: tuple[ir.Journey, ir.Journey], templates: TemplateStore, database: Database
) -> None:
    old, new = versions
    sim, people = simulate(templates, old, database)
    at_upgrade = T0 + timedelta(days=2, hours=1)
    plan = plan_move(old, new, {"first_wait": "first_pause", "thanks": "thanks_v2", "nudge": "last_note"})
    sim.upgrade(at_upgrade, new, plan)
    click = T0 + timedelta(days=3)
    sim.track(click, people["a"], event("Clicked", click))

    await sim.run()

    day = timedelta(days=1)
    assert by_person(sim, people) == {
        # mid-wait_for when moved: the click takes the new version's branch (an SMS)
        "a": [(0 * day, "hello email"), (3 * day, "thanks_v2 sms"), (3 * day, "last_note email"), (3 * day, "ended completed")],
        # its wait_for times out when it would have (5d, not 2d1h + 3d), then the new steps
        "b": [(0 * day, "hello email"), (5 * day, "last_note email"), (5 * day, "ended completed")],
        # asleep at first_wait: wakes at 3d as planned, at first_pause, then follows the new version
        "d": [(1 * day, "hello email"), (6 * day, "last_note email"), (6 * day, "ended completed")],
        # entered after the upgrade: the new version from the start (1d pause, then a 5d wait_for)
        "e": [(4 * day, "hello email"), (10 * day, "last_note email"), (10 * day, "ended completed")],
    }
    runs = {row.user_id: row for row in rows(database, RunRecord)}
    assert {runs[people[name]].version for name in "abde"} == {new.version}
    messages = {(m.run_id, m.step_id): m for m in rows(database, MessageRecord)}
    assert len(messages) == len(sends_of(sim))
    reach = {(r.run_id, r.step_id): r.version for r in rows(database, StepReach)}
    assert reach[(runs[people["a"]].run_id, "hello")] == old.version
    assert reach[(runs[people["a"]].run_id, "thanks_v2")] == new.version


def sends_of(sim: Simulator) -> list[object]:
    return [o for o in sim.outcomes if o.send is not None]


async def test_the_simulator_ends_runs_of_a_retired_version(
    versions: tuple[ir.Journey, ir.Journey], templates: TemplateStore
) -> None:
    old, new = versions
    sim, people = simulate(templates, old)
    sim.upgrade(T0 + timedelta(days=2, hours=1), new, plan_end(old, "retired"))

    await sim.run()

    seen = by_person(sim, people)
    for name in "abd":
        assert seen[name][-1] == (timedelta(days=2, hours=1), "ended retired")
    assert seen["e"] == [
        (timedelta(days=4), "hello email"),
        (timedelta(days=10), "last_note email"),
        (timedelta(days=10), "ended completed"),
    ]
    assert any(entry.what == "deployed" and entry.detail == f"version {new.version}" for entry in sim.entries)


async def test_without_a_plan_runs_in_flight_finish_on_their_version(
    versions: tuple[ir.Journey, ir.Journey], templates: TemplateStore
) -> None:
    old, new = versions
    sim, people = simulate(templates, old)
    sim.upgrade(T0 + timedelta(days=2, hours=1), new)

    await sim.run()

    seen = by_person(sim, people)
    # b waits for a click in the old version, times out at 5d and gets the old last_note at once
    assert seen["b"] == [(timedelta(0), "hello email"), (timedelta(days=5), "last_note email"), (timedelta(days=5), "ended completed")]
    # a's old branch: no click, so the old `nudge` email goes out at 5d
    assert (timedelta(days=5), "nudge email") in seen["a"]
    with pytest.raises(ValueError, match="moves runs to version"):
        sim.upgrade(T0, old, plan_move(old, new, {"first_wait": "first_pause", "thanks": "thanks_v2", "nudge": "last_note"}))
