"""Date, pacing and eligibility keys: how they compile, how mistakes are reported, and what the
pure engine does with them (random waits, date waits, re-entry gaps, send rates)."""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nurture.engine.clock import date_instant, read_date, zone
from nurture.engine.interpreter import (
    DATE_REACHED,
    DatePlan,
    Deliver,
    Ended,
    ReadProfile,
    Run,
    Sleep,
    date_event,
    date_plan,
    entry_decision,
    next_date_moment,
    random_wait,
    trigger_matches,
)
from nurture.engine.model import Event
from nurture.language import ir
from nurture.language.compiler import Settings, compile_text
from nurture.language.diagnostics import Diagnostic, DiagnosticSink
from nurture.language.expressions import compile_expression
from nurture.language.templates import TemplateStore

T0 = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # Monday 10:00 in Shanghai
PATH = "journeys/notice.yaml"


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> TemplateStore:
    root = tmp_path_factory.mktemp("templates")
    (root / "email").mkdir()
    (root / "email" / "note.mjml").write_text(
        '---\nsubject: "Hello"\n---\n<mjml><mj-body><mj-section><mj-column><mj-text>Hi</mj-text>'
        "</mj-column></mj-section></mj-body></mjml>\n",
        encoding="utf-8",
    )
    return TemplateStore(root)


def compile_journey(text: str, templates: TemplateStore) -> tuple[ir.Journey | None, list[Diagnostic]]:
    sink = DiagnosticSink()
    journey = compile_text(textwrap.dedent(text), PATH, templates, Settings(timezone="Asia/Shanghai"), sink)
    return journey, sink.items


def journey_with(steps: str, templates: TemplateStore, head: str = "") -> ir.Journey:
    text = "journey: notice\ntrigger: {event: Renewal Scheduled}\n" + head + "steps:\n" + textwrap.indent(
        textwrap.dedent(steps), "  "
    )
    journey, diagnostics = compile_journey(text, templates)
    assert journey is not None, "\n".join(d.headline() for d in diagnostics)
    return journey


def run_of(journey: ir.Journey, *, run_id: str = "r1", properties: dict[str, Any] | None = None) -> Run:
    event = Event("Renewal Scheduled", T0, properties or {}, "m1")
    return Run(journey, run_id=run_id, user_id="u1", key="", event=event, entered_at=T0)


@dataclass(frozen=True)
class Case:
    id: str
    steps: str
    line: int
    column: int
    message: str
    head: str = ""


def _source(case: Case) -> str:
    return "journey: notice\ntrigger: {event: Renewal Scheduled}\n" + case.head + "steps:\n" + textwrap.indent(
        textwrap.dedent(case.steps), "  "
    )


CASES = [
    Case("random-wait-key-typo", "- wait: {randon: 0..2h}\n", 4, 12, "unknown key 'randon' (did you mean 'random'?)"),
    Case("random-wait-not-a-range", "- wait: {random: 2h}\n", 4, 20, "'2h' is not a range"),
    Case("random-wait-backwards", "- wait: {random: 2h..1h}\n", 4, 20, "is an empty range"),
    Case("random-wait-bad-duration", "- wait: {random: 0..2 hours}\n", 4, 20, "is not a duration"),
    Case("random-wait-extra-key", "- wait: {random: 0..2h, seed: 3}\n", 4, 27, "unknown key 'seed'; allowed keys: random"),
    Case(
        "date-wait-key-typo",
        '- wait_until: {date: "user.birthday", ofset: -3d}\n',
        4,
        41,
        "unknown key 'ofset' (did you mean 'offset'?)",
    ),
    Case("date-wait-no-date", '- wait_until: {at: "10:00"}\n', 4, 17, "'date' is required"),
    Case("date-wait-bad-offset", '- wait_until: {date: "user.birthday", offset: -3 days}\n', 4, 49, "'-3 days' is not an offset"),
    Case("date-wait-bad-at", '- wait_until: {date: "user.birthday", at: "25:00"}\n', 4, 45, "'25:00' is not a time of day"),
    Case("date-wait-bad-expression", '- wait_until: {date: "user.birthday ==", at: "09:00"}\n', 4, 41, "the expression ends too early"),
    Case("date-wait-unknown-name", '- wait_until: {date: "usr.birthday"}\n', 4, 25, "did you mean 'user'"),
    Case("re-entry-key-typo", "- wait: 1h\n", 3, 12, "unknown key 'afer' (did you mean 'after'?)", "re_entry: {afer: 7d}\n"),
    Case("re-entry-bad-duration", "- wait: 1h\n", 3, 19, "'7 days' is not a duration", "re_entry: {after: 7 days}\n"),
    Case("re-entry-unknown-word", "- wait: 1h\n", 3, 11, "'weekly' (text) is not allowed", "re_entry: weekly\n"),
    Case(
        "date-wait-with-days",
        '- wait_until: {date: "user.birthday"}\n  days: [mon]\n',
        5,
        5,
        "days go with a time of day",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_mistake_is_reported_at_its_place(case: Case, templates: TemplateStore) -> None:
    journey, diagnostics = compile_journey(_source(case), templates)
    headlines = "\n".join(d.headline() for d in diagnostics)
    assert journey is None
    matching = [d for d in diagnostics if case.message in d.message]
    assert matching, f"no diagnostic mentions {case.message!r}; got:\n{headlines}"
    assert (matching[0].path, matching[0].line, matching[0].column) == (PATH, case.line, case.column), headlines


# --- wait: {random: ..} ------------------------------------------------------------------------


def test_random_wait_compiles_to_its_shortest_length_and_spread(templates: TemplateStore) -> None:
    journey = journey_with("- wait: {random: 0..2h}\n- wait: {random: 30m..1h}\n- wait: 1h\n", templates)
    first, second, plain = journey.steps
    assert (first, second, plain) == (
        ir.Wait("s1", 0, spread=7200),
        ir.Wait("s2", 1800, spread=1800),
        ir.Wait("s3", 3600),
    )
    assert first.written == "0..2h"
    # A wait without a range keeps the form (and version) it had before ranges existed.
    assert "spread" not in ir._encode(plain, as_written=False)


def test_random_wait_is_sha256_of_run_and_step_modulo_the_spread() -> None:
    digest = hashlib.sha256(b"announcement:ann::1:spread").digest()
    assert random_wait("announcement:ann::1", "spread", 7200) == int.from_bytes(digest[:8], "big") % 7201
    assert random_wait("announcement:ann::1", "spread", 0) == 0


def test_random_waits_differ_across_runs_and_stay_within_the_range() -> None:
    draws = [random_wait(f"announcement:user{n}::1", "spread", 7200) for n in range(500)]
    assert all(0 <= d <= 7200 for d in draws)
    assert len(set(draws)) > 450  # spread out, not one length for everyone
    assert min(draws) < 720 and max(draws) > 6480  # reaches both ends of the range


def test_a_run_sleeps_its_own_draw_and_a_replayed_run_the_same(templates: TemplateStore) -> None:
    journey = journey_with("- id: spread\n  wait: {random: 30m..1h}\n", templates)
    sleeps = []
    for run_id in ("r1", "r1", "r2"):
        command = run_of(journey, run_id=run_id).start()
        assert isinstance(command, Sleep) and command.reason == "wait"
        sleeps.append(command.until)
    assert sleeps[0] == sleeps[1] == T0 + timedelta(seconds=1800 + random_wait("r1", "spread", 1800))
    assert sleeps[2] == T0 + timedelta(seconds=1800 + random_wait("r2", "spread", 1800))
    assert sleeps[0] != sleeps[2]


# --- wait_until: {date, offset, at} -------------------------------------------------------------


def test_date_wait_compiles_with_its_expression_offset_and_time(templates: TemplateStore) -> None:
    journey = journey_with(
        '- wait_until: {date: "event.properties.renews_at", offset: -3d, at: "10:00"}\n'
        '- wait_until: {date: "user.birthday"}\n'
        '- wait_until: "10:00"\n',
        templates,
    )
    moved, plain_date, clock = journey.steps
    assert isinstance(moved, ir.WaitUntil) and isinstance(plain_date, ir.WaitUntil) and isinstance(clock, ir.WaitUntil)
    assert moved.date is not None and moved.date.source == "event.properties.renews_at"
    assert (moved.offset, moved.minute) == (-3 * 86400, 600)
    assert (plain_date.offset, plain_date.minute) == (0, None)
    assert moved.when == "event.properties.renews_at -3d at 10:00"
    assert plain_date.when == "user.birthday"
    assert clock.when == "10:00"
    encoded = ir._encode(clock, as_written=False)
    assert "date" not in encoded and "offset" not in encoded  # the time-of-day form keeps its version


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-03-15", date(2026, 3, 15)),
        ("2028-02-29", date(2028, 2, 29)),
        ("2027-02-29", date(2027, 2, 28)),  # no 29 February in 2027: the last day of February
        ("2027-02-29T10:00:00Z", datetime(2027, 2, 28, 10, 0, tzinfo=UTC)),
        ("2026-03-15T02:00:00Z", datetime(2026, 3, 15, 2, 0, tzinfo=UTC)),
        (" 2026-03-15T10:00:00 ", datetime(2026, 3, 15, 10, 0)),  # no offset: the person's local time
        ("2026-03-15T10:00:00+08:00", datetime(2026, 3, 15, 2, 0, tzinfo=UTC)),
        ("2026-02-30", None),
        ("2026-13-01", None),
        ("15/03/2026", None),
        ("March 15", None),
        ("", None),
        (None, None),
        (1773540000, None),  # numbers are not read as dates
        (["2026-03-15"], None),
    ],
)
def test_read_date(value: Any, expected: date | datetime | None) -> None:
    assert read_date(value) == expected


SHANGHAI, NEW_YORK = zone("Asia/Shanghai"), zone("America/New_York")


@pytest.mark.parametrize(
    ("value", "offset", "minute", "tz", "expected"),
    [
        # A calendar day starts at local midnight; the offset and the time apply on the wall clock.
        (date(2026, 3, 15), 0, None, SHANGHAI, datetime(2026, 3, 14, 16, 0, tzinfo=UTC)),
        (date(2026, 3, 15), -3 * 86400, 600, SHANGHAI, datetime(2026, 3, 12, 2, 0, tzinfo=UTC)),
        (date(2026, 3, 15), -12 * 3600, None, SHANGHAI, datetime(2026, 3, 14, 4, 0, tzinfo=UTC)),
        # An instant: its own local day, then the offset and the time of day.
        (datetime(2026, 3, 20, 8, 0, tzinfo=UTC), -3 * 86400, 600, SHANGHAI, datetime(2026, 3, 17, 2, 0, tzinfo=UTC)),
        (datetime(2026, 3, 20, 8, 0, tzinfo=UTC), 0, None, NEW_YORK, datetime(2026, 3, 20, 8, 0, tzinfo=UTC)),
        # Across the night New York's clocks go forward (8 March 2026), -3d keeps 10:00 local.
        (date(2026, 3, 11), -3 * 86400, 600, NEW_YORK, datetime(2026, 3, 8, 14, 0, tzinfo=UTC)),
        (datetime(2026, 3, 10, 10, 0), -3 * 86400, None, NEW_YORK, datetime(2026, 3, 7, 15, 0, tzinfo=UTC)),
        # A wall time in the skipped hour moves forward by the gap, as for wait_until "02:30".
        (date(2026, 3, 8), 0, 150, NEW_YORK, datetime(2026, 3, 8, 7, 30, tzinfo=UTC)),
        # Past the end of the calendar: no instant.
        (datetime(9999, 12, 31, 23, 0, tzinfo=UTC), 86400, None, SHANGHAI, None),
    ],
)
def test_date_instant(
    value: date | datetime, offset: int, minute: int | None, tz: ZoneInfo, expected: datetime | None
) -> None:
    assert date_instant(value, offset=offset, minute=minute, tz=tz) == expected


DATE_WAIT = '- id: before\n  wait_until: {date: "event.properties.renews_at", offset: -3d, at: "10:00"}\n'


def _first_wait(run: Run, traits: dict[str, Any]) -> Sleep | Ended | Any:
    command = run.start()
    assert isinstance(command, ReadProfile)
    return run.resume(traits, T0)


def test_a_date_wait_sleeps_until_the_moment_in_the_users_zone(templates: TemplateStore) -> None:
    journey = journey_with(DATE_WAIT + "- send: email\n  template: note\n", templates)
    run = run_of(journey, properties={"renews_at": "2026-03-20"})
    command = _first_wait(run, {"timezone": "Europe/Paris"})
    assert command == Sleep(datetime(2026, 3, 17, 9, 0, tzinfo=UTC), "before", "wait_until")
    run = run_of(journey, properties={"renews_at": "2026-03-20"})
    command = _first_wait(run, {"timezone": "Mars/Olympus"})  # not a zone: the journey's (Shanghai)
    assert command == Sleep(datetime(2026, 3, 17, 2, 0, tzinfo=UTC), "before", "wait_until")


def test_a_date_wait_reads_the_users_traits(templates: TemplateStore) -> None:
    journey = journey_with('- id: party\n  wait_until: {date: "user.birthday", at: "09:00"}\n', templates)
    command = _first_wait(run_of(journey), {"birthday": "2026-05-04"})
    assert command == Sleep(datetime(2026, 5, 4, 1, 0, tzinfo=UTC), "party", "wait_until")


def test_a_moment_already_past_goes_on_at_once(templates: TemplateStore) -> None:
    journey = journey_with(DATE_WAIT + "- send: email\n  template: note\n", templates)
    for renews_at in ("2026-03-03", "2026-03-05T02:00:00Z", "2020-01-01"):  # T0 itself counts as past
        run = run_of(journey, properties={"renews_at": renews_at})
        command = _first_wait(run, {})
        assert isinstance(command, Deliver), renews_at
        assert command.request.step_id == "s2"


@pytest.mark.parametrize("properties", [{}, {"renews_at": None}, {"renews_at": "next week"}, {"renews_at": 20260320}])
def test_a_missing_or_unreadable_date_ends_the_run_with_no_date(
    templates: TemplateStore, properties: dict[str, Any]
) -> None:
    journey = journey_with(DATE_WAIT + "- send: email\n  template: note\n", templates)
    run = run_of(journey, properties=properties)
    assert _first_wait(run, {}) == Ended("no_date")
    assert run.ended == "no_date"


# --- re_entry: {after} ---------------------------------------------------------------------------


def test_re_entry_after_compiles_to_after_exit_with_a_gap(templates: TemplateStore) -> None:
    journey = journey_with("- wait: 1h\n", templates, head="re_entry: {after: 7d}\n")
    assert (journey.re_entry, journey.re_entry_after) == ("after_exit", 7 * 86400)
    plain = journey_with("- wait: 1h\n", templates, head="re_entry: after_exit\n")
    assert (plain.re_entry, plain.re_entry_after) == ("after_exit", 0)
    assert "re_entry_after" not in ir._encode(plain, as_written=False)  # older journeys keep their version
    assert plain.version != journey.version


def test_re_entry_after_counts_from_the_last_entry(templates: TemplateStore) -> None:
    journey = journey_with("- wait: 1h\n", templates, head="re_entry: {after: 7d}\n")
    week = timedelta(days=7)

    def decide(*, active: bool = False, last: datetime | None = T0, now: datetime) -> str:
        return entry_decision(journey, active=active, ran_before=last is not None, last_entered_at=last, now=now)

    assert decide(last=None, now=T0) == "start"  # never entered
    assert decide(active=True, now=T0 + 2 * week) == "ignore"  # a run is active, however old
    assert decide(now=T0 + week - timedelta(seconds=1)) == "ignore"
    assert decide(now=T0 + week) == "start"  # exactly a week after entry
    plain = journey_with("- wait: 1h\n", templates)
    assert entry_decision(plain, active=False, ran_before=True, last_entered_at=T0, now=T0) == "start"


# --- trigger: {date, ...} ------------------------------------------------------------------------


def dated(trigger: str, templates: TemplateStore, key: str = "") -> ir.Journey:
    text = f"journey: notice\ntrigger: {trigger}\n{key}steps:\n  - send: email\n    template: note\n"
    journey, diagnostics = compile_journey(text, templates)
    assert journey is not None, "\n".join(d.headline() for d in diagnostics)
    return journey


TRIGGER_CASES = [
    ('{date: "event.properties.renews_at", at: "10:00"}', 2, 17, "this reads the event, but no event is named"),
    ('{date: "user.birthday", if: "event.properties.plan"}', 2, 38, "this reads the event, but no event is named"),
    ('{date: "user.birthday", every: month}', 2, 41, "is not allowed"),
    ('{date: "user.birthday", evry: year}', 2, 34, "unknown key 'evry' (did you mean 'every'?)"),
    ('{date: "user.birthday", offset: 3 days}', 2, 42, "'3 days' is not an offset"),
    ('{date: "user.birthday", at: "9am"}', 2, 38, "'9am' is not a time of day"),
    ('{date: "user.birthday", event: ""}', 2, 41, "must not be empty"),
]


@pytest.mark.parametrize(("trigger", "line", "column", "message"), TRIGGER_CASES, ids=[c[3][:30] + str(c[2]) for c in TRIGGER_CASES])
def test_date_trigger_mistakes_are_reported_at_their_place(
    templates: TemplateStore, trigger: str, line: int, column: int, message: str
) -> None:
    text = f"journey: notice\ntrigger: {trigger}\nsteps:\n  - send: email\n    template: note\n"
    journey, diagnostics = compile_journey(text, templates)
    headlines = "\n".join(d.headline() for d in diagnostics)
    assert journey is None
    found = [d for d in diagnostics if message in d.message]
    assert found, headlines
    assert (found[0].line, found[0].column) == (line, column), headlines


def test_date_triggers_compile(templates: TemplateStore) -> None:
    birthday = dated('{date: "user.birthday", at: "09:00", every: year}', templates)
    assert birthday.trigger == ir.EventRule(event="")
    assert birthday.date_trigger is not None
    assert (birthday.date_trigger.minute, birthday.date_trigger.offset, birthday.date_trigger.yearly) == (540, 0, True)
    renewal = dated(
        '{date: "event.properties.renews_at", offset: -3d, at: "10:00", event: Renewal Scheduled, if: "event.properties.plan"}',
        templates,
    )
    assert renewal.trigger.event == "Renewal Scheduled" and renewal.trigger.cond is not None
    assert renewal.date_trigger is not None and renewal.date_trigger.offset == -3 * 86400
    plain = dated("{event: Renewal Scheduled}", templates)
    assert plain.date_trigger is None and "date_trigger" not in ir._encode(plain, as_written=False)


def test_a_carrying_event_plans_a_date_and_starts_no_run_itself(templates: TemplateStore) -> None:
    journey = dated(
        '{date: "event.properties.renews_at", offset: -3d, at: "10:00", event: Renewal Scheduled, if: "event.properties.plan != \'free\'"}',
        templates,
        key='key: "event.properties.subscription_id"\n',
    )
    event = Event("Renewal Scheduled", T0, {"renews_at": "2026-03-20", "subscription_id": "s1", "plan": "pro"}, "m1")
    assert not trigger_matches(journey, event, {}, "u1")
    plan = date_plan(journey, event, {"timezone": "Europe/Paris"}, "u1")
    assert plan == DatePlan("s1", "2026-03-20", "Europe/Paris", event)
    assert DatePlan.from_dict(plan.to_dict()) == plan
    assert date_plan(journey, Event("Other", T0, {}), {}, "u1") is None  # not the carrying event
    assert date_plan(journey, Event("Renewal Scheduled", T0, {"plan": "free"}), {}, "u1") is None  # if false
    # A carrying event without a readable date gives up what was waited for.
    unreadable = date_plan(journey, Event("Renewal Scheduled", T0, {"renews_at": "soon", "subscription_id": "s1"}), {}, "u1")
    assert unreadable is not None and (unreadable.key, unreadable.date, unreadable.timezone) == ("s1", None, "Asia/Shanghai")


def test_a_trait_date_is_planned_from_every_change_and_its_if_can_withdraw_it(templates: TemplateStore) -> None:
    journey = dated('{date: "user.trial_ends_at", offset: -1d, if: "not user.subscribed"}', templates)
    assert date_plan(journey, Event("Signed Up", T0), {}, "u1") is None  # events do not concern it
    assert date_plan(journey, None, {"trial_ends_at": "2026-03-09"}, "u1") == DatePlan("", "2026-03-09", "Asia/Shanghai")
    withdrawn = date_plan(journey, None, {"trial_ends_at": "2026-03-09", "subscribed": True}, "u1")
    assert withdrawn == DatePlan("", None, "Asia/Shanghai")


YEARLY = ir.DateTrigger(date=compile_expression("user.birthday"), minute=540, yearly=True)
ONCE = ir.DateTrigger(date=compile_expression("user.birthday"), minute=540)


@pytest.mark.parametrize(
    ("trigger", "value", "since", "after", "expected"),
    [
        # A birthday: this year's moment is still ahead, so it comes first.
        (YEARLY, "1990-05-04", T0, False, datetime(2026, 5, 4, 1, 0, tzinfo=UTC)),
        (ONCE, "2026-05-04", T0, False, datetime(2026, 5, 4, 1, 0, tzinfo=UTC)),
        # A one-off date in the past has no moment (old data starts nothing).
        (ONCE, "1990-05-04", T0, False, None),
        # Once it has come, the next is a year later; a one-off date has none.
        (YEARLY, "1990-05-04", datetime(2026, 5, 4, 1, 0, tzinfo=UTC), True, datetime(2027, 5, 4, 1, 0, tzinfo=UTC)),
        (ONCE, "2026-05-04", datetime(2026, 5, 4, 1, 0, tzinfo=UTC), True, None),
        # At the moment itself, a new plan still takes it.
        (ONCE, "2026-05-04", datetime(2026, 5, 4, 1, 0, tzinfo=UTC), False, datetime(2026, 5, 4, 1, 0, tzinfo=UTC)),
        (YEARLY, "1990-05-04", datetime(2026, 12, 31, tzinfo=UTC), False, datetime(2027, 5, 4, 1, 0, tzinfo=UTC)),
        (YEARLY, "not a date", T0, False, None),
    ],
)
def test_next_date_moment(
    trigger: ir.DateTrigger, value: str, since: datetime, after: bool, expected: datetime | None
) -> None:
    assert next_date_moment(trigger, value, "Asia/Shanghai", since=since, after=after) == expected


def test_a_yearly_leap_day_is_the_28th_in_common_years_and_the_29th_in_leap_years() -> None:
    moments, since = [], T0
    for _ in range(3):
        moment = next_date_moment(YEARLY, "2000-02-29", "Asia/Shanghai", since=since, after=True)
        assert moment is not None
        moments.append(moment.astimezone(zone("Asia/Shanghai")).date())
        since = moment
    assert moments == [date(2027, 2, 28), date(2028, 2, 29), date(2029, 2, 28)]


def test_a_yearly_offset_reaching_into_the_year_before() -> None:
    trigger = ir.DateTrigger(date=compile_expression("user.renews"), offset=-30 * 86400, minute=600, yearly=True)
    moment = next_date_moment(trigger, "2020-01-10", "UTC", since=T0, after=False)
    assert moment == datetime(2026, 12, 11, 10, 0, tzinfo=UTC)  # 30 days before 10 January 2027


def test_the_run_event_of_a_date_is_new_for_each_moment(templates: TemplateStore) -> None:
    moment = datetime(2026, 5, 4, 1, 0, tzinfo=UTC)
    plan = DatePlan("", "1990-05-04", "Asia/Shanghai")
    event = date_event("birthday", "u1", plan, moment)
    assert (event.name, event.timestamp, event.properties) == (DATE_REACHED, moment, {"date": "1990-05-04"})
    assert event.message_id is not None and len(event.message_id) <= 64
    assert date_event("birthday", "u1", plan, moment) == event  # a retried activity: the same event
    assert date_event("birthday", "u1", plan, moment + timedelta(days=365)).message_id != event.message_id
    carrying = Event("Renewal Scheduled", T0, {"renews_at": "2026-03-20"}, "m1")
    from_event = date_event("renewal", "u1", DatePlan("s1", "2026-03-20", "UTC", carrying), moment)
    assert (from_event.name, from_event.properties, from_event.timestamp) == ("Renewal Scheduled", carrying.properties, T0)
    assert from_event.message_id != "m1"


# --- declared traits --------------------------------------------------------------------------------


DECLARED_DATES = """\
journey: welcome
trigger: {date: "user.birthdy", at: "09:00", every: year}
steps:
  - wait_until: {date: "user.birthday_party", offset: -1d}
  - send: email
    template: welcome
"""


def test_dates_read_declared_traits_with_did_you_mean(tmp_path: Path) -> None:
    from test_declarations import compiled, make_project

    result = compiled(make_project(tmp_path, journey=DECLARED_DATES))
    found = {(d.line, d.key): d.message for d in result.errors}
    assert "did you mean 'birthday'" in found[(2, "trigger.date")], found
    assert "birthday_party" in found[(4, "steps[0].wait_until.date")], found
