"""Date, pacing and eligibility keys: how they compile, how mistakes are reported, and what the
pure engine does with them (random waits, date waits, re-entry gaps, send rates)."""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nurture.engine.clock import date_instant, read_date, zone
from nurture.engine.interpreter import Deliver, Ended, ReadProfile, Run, Sleep, entry_decision, random_wait
from nurture.engine.model import Event
from nurture.language import ir
from nurture.language.compiler import Settings, compile_text
from nurture.language.diagnostics import Diagnostic, DiagnosticSink
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
