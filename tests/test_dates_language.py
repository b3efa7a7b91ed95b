"""Date, pacing and eligibility keys: how they compile, how mistakes are reported, and what the
pure engine does with them (random waits, date waits, re-entry gaps, send rates)."""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nurture.engine.interpreter import Run, Sleep, random_wait
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
