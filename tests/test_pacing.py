"""Send rates (``rate: 1000/h``): how they compile, how the deliverer spreads sends over their
slots, how a run keeps or gives up its slot, and the shared slots in the database (SQLite and
PostgreSQL), taken by concurrent workers without two sends ever sharing one."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import send_request

from channels.outbox import Outbox
from nurture.delivery.deliverer import Deliverer, MemoryRates, for_every_channel
from nurture.engine.interpreter import Deliver, Run, Sleep
from nurture.engine.model import Event, Profile, SendOutcome, SendRequest, SendResult
from nurture.language import ir
from nurture.language.compiler import Settings, compile_text
from nurture.language.diagnostics import Diagnostic, DiagnosticSink
from nurture.language.durations import DurationError, parse_rate
from nurture.language.templates import TemplateStore
from nurture.storage.db import Database
from nurture.storage.models import SendRate
from nurture.storage.rates import DbRates

NOW = datetime(2026, 3, 2, 4, 0, tzinfo=UTC)
USER = Profile("u1", {"email": "li@example.com"})
PATH = "journeys/launch.yaml"


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> TemplateStore:
    root = tmp_path_factory.mktemp("templates")
    (root / "email").mkdir()
    (root / "email" / "hello.mjml").write_text(
        '---\nsubject: "Hi"\n---\n<mjml><mj-body><mj-section><mj-column><mj-text>Hello</mj-text>'
        "</mj-column></mj-section></mj-body></mjml>\n",
        encoding="utf-8",
    )
    return TemplateStore(root)


def compile_journey(text: str, templates: TemplateStore) -> tuple[ir.Journey | None, list[Diagnostic]]:
    sink = DiagnosticSink()
    journey = compile_text(textwrap.dedent(text), PATH, templates, Settings(), sink)
    return journey, sink.items


LAUNCH = """\
journey: launch
trigger: {event: Course Launched}
rate: 1000/h
steps:
  - id: announce
    send: email
    template: hello
  - id: nudge
    send: email
    template: hello
    rate: 50/30m
"""


# --- the language --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1000/h", (1000, 3600)), ("50/m", (50, 60)), (" 500 / 30m ", (500, 1800)), ("2/1d12h", (2, 129600))],
)
def test_parse_rate(text: str, expected: tuple[int, int]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["1000", "1000 per hour", "h/1000", "-5/h", "1.5/h", "10/x"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(DurationError, match="is not a rate"):
        parse_rate(text)


def test_journey_and_step_rates_compile(templates: TemplateStore) -> None:
    journey, diagnostics = compile_journey(LAUNCH, templates)
    assert diagnostics == [] and journey is not None
    assert journey.rate == ir.Rate(1000, 3600)
    announce, nudge = journey.steps
    assert isinstance(announce, ir.Send) and isinstance(nudge, ir.Send)
    assert (announce.rate, nudge.rate) == (None, ir.Rate(50, 1800))
    assert nudge.rate is not None and nudge.rate.spacing == 36.0
    # Journeys and sends without a rate keep the form (and version) they had before rates existed.
    assert "rate" not in ir._encode(announce, as_written=False)
    plain, _ = compile_journey(LAUNCH.replace("rate: 1000/h\n", ""), templates)
    assert plain is not None and "rate" not in ir._encode(plain, as_written=False)
    assert ir.content_version(journey) != ir.content_version(plain)


@pytest.mark.parametrize(
    ("change", "line", "column", "message"),
    [
        (("rate: 1000/h", "rate: 1000 per hour"), 3, 7, "'1000 per hour' is not a rate"),
        (("rate: 1000/h", "rate: 0/h"), 3, 7, "allows no sends at all"),
        (("rate: 1000/h", "rat: 1000/h"), 3, 1, "unknown key 'rat' (did you mean 'rate'?)"),
        (("    rate: 50/30m", "    rate: 50/30 minutes"), 11, 11, "is not a rate"),
        (
            ("    rate: 50/30m", "    rate: 50/30m\n    category: transactional"),
            11,
            5,
            "a transactional send is never held back, so it has no rate",
        ),
    ],
)
def test_rate_mistakes_are_reported_at_their_place(
    templates: TemplateStore, change: tuple[str, str], line: int, column: int, message: str
) -> None:
    journey, diagnostics = compile_journey(LAUNCH.replace(*change), templates)
    headlines = "\n".join(d.headline() for d in diagnostics)
    assert journey is None
    found = [d for d in diagnostics if message in d.message]
    assert found, headlines
    assert (found[0].path, found[0].line, found[0].column) == (PATH, line, column), headlines


# --- the run -------------------------------------------------------------------------------------


def test_a_send_carries_its_rate_and_keeps_its_slot_only_while_held_for_it(templates: TemplateStore) -> None:
    journey, _ = compile_journey(LAUNCH, templates)
    assert journey is not None
    run = Run(journey, run_id="r1", user_id="u1", key="", event=Event("Course Launched", NOW), entered_at=NOW)
    command = run.start()
    assert isinstance(command, Deliver)
    request = command.request
    assert (request.rate, request.rate_key, request.rate_slot) == (ir.Rate(1000, 3600), "launch", None)
    slot = NOW + timedelta(seconds=7.2)
    assert run.resume(SendResult(defer_until=slot, defer_reason="rate_limit"), NOW) == Sleep(
        slot, "announce", "rate_limit"
    )
    again = run.resume(None, slot)
    assert isinstance(again, Deliver) and again.request.rate_slot == slot
    # Held again by quiet hours, the send gives its slot up: it takes a new one when it goes.
    morning = NOW + timedelta(hours=10)
    assert run.resume(SendResult(defer_until=morning), slot) == Sleep(morning, "announce", "quiet_hours")
    after = run.resume(None, morning)
    assert isinstance(after, Deliver) and after.request.rate_slot is None
    outcome = SendOutcome("announce", "email", "hello", "sent", morning)
    nudge = run.resume(SendResult(outcome), morning)
    assert isinstance(nudge, Deliver)
    assert (nudge.request.rate, nudge.request.rate_key) == (ir.Rate(50, 1800), "launch/nudge")
    assert run.steps_record(Sleep(slot, "announce", "rate_limit"))["deferred"] == "rate_limit"


def test_a_request_round_trips_with_its_rate_and_without_one() -> None:
    paced = send_request(rate=ir.Rate(2, 3600, "2/h"), rate_key="launch", rate_slot=NOW)
    assert SendRequest.from_dict(paced.to_dict()) == paced
    plain = send_request()
    assert not {"rate", "rate_key", "rate_slot"} & set(plain.to_dict())  # as before rates existed
    assert SendRequest.from_dict(plain.to_dict()) == plain


# --- the deliverer -------------------------------------------------------------------------------


def deliverer(templates: TemplateStore, rates: MemoryRates | DbRates) -> Deliverer:
    return Deliverer(templates, for_every_channel(Outbox()), rates=rates)


def paced(step: str, **changes: object) -> SendRequest:
    fields = {"rate": ir.Rate(2, 3600), "rate_key": "launch", **changes}
    return send_request(step_id=step, channels=("email",), template="hello", **fields)  # type: ignore[no-any-return]


async def test_sends_over_the_rate_are_held_for_their_slots(templates: TemplateStore) -> None:
    send = deliverer(templates, MemoryRates())
    first = await send.send(paced("a"), USER, NOW)
    assert first.outcome is not None and first.outcome.status == "sent"
    second = await send.send(paced("b"), USER, NOW + timedelta(minutes=1))
    third = await send.send(paced("c"), USER, NOW + timedelta(minutes=2))
    assert (second.defer_until, second.defer_reason) == (NOW + timedelta(minutes=30), "rate_limit")
    assert (third.defer_until, third.defer_reason) == (NOW + timedelta(minutes=60), "rate_limit")
    # At its slot, a held send goes without taking another.
    back = await send.send(paced("b", rate_slot=second.defer_until), USER, NOW + timedelta(minutes=30))
    assert back.outcome is not None and back.outcome.status == "sent"
    # An idle rate saves up nothing: after a quiet spell, sends are spaced again from then.
    later = NOW + timedelta(hours=5)
    assert (await send.send(paced("d"), USER, later)).outcome is not None
    assert (await send.send(paced("e"), USER, later)).defer_until == later + timedelta(minutes=30)


async def test_skipped_and_transactional_sends_take_no_slot(templates: TemplateStore) -> None:
    rates = MemoryRates()
    send = deliverer(templates, rates)
    skipped = await send.send(paced("a"), Profile("u2", {}), NOW)
    assert skipped.outcome is not None and skipped.outcome.reason == "no_address"
    receipt = await send.send(paced("b", category="transactional"), USER, NOW)
    assert receipt.outcome is not None and receipt.outcome.status == "sent"
    assert rates.next_free == {}
    assert (await send.send(paced("c"), USER, NOW)).outcome is not None


async def test_rates_are_counted_apart_by_key(templates: TemplateStore) -> None:
    send = deliverer(templates, MemoryRates())
    assert (await send.send(paced("a"), USER, NOW)).outcome is not None
    own = paced("b", rate=ir.Rate(1, 60), rate_key="launch/b")
    assert (await send.send(own, USER, NOW)).outcome is not None
    assert (await send.send(paced("c"), USER, NOW)).defer_reason == "rate_limit"


# --- the database --------------------------------------------------------------------------------


async def test_db_rates_hand_out_spaced_slots_and_keep_them_across_restarts(database: Database) -> None:
    rates = DbRates(database)
    spacing = timedelta(seconds=3.6)
    slots = [await rates.reserve("launch", NOW, spacing) for _ in range(3)]
    assert slots == [NOW, NOW + spacing, NOW + 2 * spacing]
    assert await DbRates(database).reserve("launch", NOW, spacing) == NOW + 3 * spacing  # a second worker
    assert await rates.reserve("other", NOW, spacing) == NOW
    later = NOW + timedelta(hours=1)
    assert await rates.reserve("launch", later, spacing) == later
    with database.session() as session:
        row = session.get(SendRate, "launch")
        assert row is not None and row.next_free == later + spacing


async def test_concurrent_workers_never_share_a_slot(database: Database) -> None:
    spacing = timedelta(seconds=1)
    workers = [DbRates(database) for _ in range(4)]
    taken = await asyncio.gather(*(workers[n % 4].reserve("launch", NOW, spacing) for n in range(40)))
    assert sorted(taken) == [NOW + n * spacing for n in range(40)]


async def test_the_deliverer_paces_through_the_database(templates: TemplateStore, database: Database) -> None:
    send = deliverer(templates, DbRates(database))
    assert (await send.send(paced("a"), USER, NOW)).outcome is not None
    held = await send.send(paced("b"), USER, NOW)
    assert (held.defer_until, held.defer_reason) == (NOW + timedelta(minutes=30), "rate_limit")


def test_the_migration_and_the_model_agree(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.migrate()
    with db.engine.connect() as connection:
        columns = {row[1]: row for row in connection.exec_driver_sql("PRAGMA table_info(send_rates)")}
    db.dispose()
    assert set(columns) == set(SendRate.model_fields)
    assert columns["key"][5] == 1  # the primary key
