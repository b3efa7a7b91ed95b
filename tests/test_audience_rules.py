"""The pure membership rules of nurture.engine.audience, checked against a brute-force count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from nurture.engine.audience import Tally, evaluate, note
from nurture.language.audiences import Activity, Audience, audience_from_dict, audience_to_dict
from nurture.language.expressions import compile_expression

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 86400


def _brute(times: list[datetime], clause: Activity, now: datetime) -> bool:
    """Counting every matching event (not a tally) in the window."""
    start = None if clause.within is None else now - timedelta(seconds=clause.within)
    return sum(1 for t in times if t <= now and (start is None or t > start)) >= clause.at_least


def _at(when: datetime, audience: Audience, tally: Tally) -> bool:
    return evaluate(audience, {}, frozenset(), (tally,), when).member


def test_lapsed_customer_leaves_and_enters_on_day_31_with_no_event() -> None:
    ordered = Activity("Order Completed", within=30 * DAY)
    recent = Audience("recent", did=(ordered,))
    lapsed = Audience("lapsed", did=(Activity("Order Completed"),), not_did=(ordered,))
    tally_any = note(lapsed.did[0], (), T0)
    tally_30 = note(ordered, (), T0)
    day29 = T0 + timedelta(days=29)
    standing = evaluate(recent, {}, frozenset(), (tally_30,), day29)
    assert standing.member and standing.changes_at == T0 + timedelta(days=30)
    assert not evaluate(lapsed, {}, frozenset(), (tally_any, tally_30), day29).member
    day30 = T0 + timedelta(days=30)
    assert not evaluate(recent, {}, frozenset(), (tally_30,), day30).member
    assert evaluate(lapsed, {}, frozenset(), (tally_any, tally_30), day30).member


def test_where_and_subscribed() -> None:
    audience = Audience("py", where=compile_expression('user.interest == "python"'), subscribed=("courses",))
    assert evaluate(audience, {"interest": "python"}, frozenset(), (), T0).member
    assert not evaluate(audience, {"interest": "go"}, frozenset(), (), T0).member
    assert not evaluate(audience, {"interest": "python"}, frozenset({"courses"}), (), T0).member


def test_round_trip_keeps_behaviour_and_version() -> None:
    audience = Audience(
        "a",
        where=compile_expression("user.vip"),
        did=(Activity("Product Viewed", compile_expression("event.properties.price > 10"), 3, 7 * DAY, "7d"),),
    )
    back = audience_from_dict(audience_to_dict(audience))
    assert back == audience and back.version == audience.version
    assert Audience("a").version != audience.version


@settings(max_examples=300, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 20 * DAY), max_size=12),
    at_least=st.integers(1, 4),
    within=st.one_of(st.none(), st.integers(1, 10 * DAY)),
    probe=st.integers(0, 30 * DAY),
)
def test_tally_agrees_with_counting_every_event(
    offsets: list[int], at_least: int, within: int | None, probe: int
) -> None:
    clause = Activity("E", at_least=at_least, within=within)
    audience = Audience("x", did=(clause,))
    times = [T0 + timedelta(seconds=s) for s in offsets]
    tally: Tally = ()
    for when in times:  # in arrival order, which need not be time order
        tally = note(clause, tally, when)
    # Callers note an event at its time or the time it arrived, whichever is earlier, and evaluate
    # at the present: no tally holds a future time.
    now = T0 + timedelta(seconds=max(offsets, default=0) + probe)
    standing = evaluate(audience, {}, frozenset(), (tally,), now)
    assert standing.member == _brute(times, clause, now)
    if standing.changes_at is not None:
        # Nothing changes before the announced moment, and something does at it.
        assert standing.changes_at > now
        before = standing.changes_at - timedelta(microseconds=1)
        assert _at(before, audience, tally) == standing.member
        assert _at(standing.changes_at, audience, tally) != standing.member
