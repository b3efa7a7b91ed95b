"""The in-memory audience upkeep the simulator and the scenario runtime share: kept current one
call at a time and one moment at a time, it agrees with counting every event from scratch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nurture.engine.model import Event, Profile
from nurture.language.audiences import ENTERED, EXITED, Activity, Audience
from nurture.language.expressions import compile_expression
from nurture.simulation.audiences import Change, Upkeep

T0 = datetime(2026, 3, 2, 10, tzinfo=UTC)
DAY = 86400
ORDER = "Order Completed"
VIEW = "Product Viewed"

CUSTOMERS = Audience("customers", did=(Activity(ORDER),))
LAPSED = Audience("lapsed", did=(Activity(ORDER),), not_did=(Activity(ORDER, within=30 * DAY),))
PYTHON = Audience("python", where=compile_expression('user.interest == "python"'), subscribed=("promotions",))
KEEN = Audience(
    "keen",
    did=(Activity(VIEW, cond=compile_expression("event.properties.price > 10"), at_least=3, within=7 * DAY),),
)


def _event(name: str, at: datetime, **properties: Any) -> Event:
    return Event(name, at, properties)


def _days(n: float) -> datetime:
    return T0 + timedelta(days=n)


def test_a_lapsed_customer_enters_on_day_30_with_no_event() -> None:
    upkeep = Upkeep({"customers": CUSTOMERS, "lapsed": LAPSED})
    ann = Profile("ann")
    assert upkeep.touch(ann, T0, _event(ORDER, T0)) == [Change("ann", "customers", True, T0)]
    assert upkeep.next_due() == _days(30)
    assert upkeep.advance(_days(29), lambda person: Profile(person)) == []
    changes = upkeep.advance(_days(45), lambda person: Profile(person))
    assert changes == [Change("ann", "lapsed", True, _days(30))]
    assert changes[0].event() == Event(ENTERED, _days(30), {"audience": "lapsed"})
    assert upkeep.next_due() is None
    [left] = upkeep.touch(ann, _days(50), _event(ORDER, _days(50)))
    assert left.event() == Event(EXITED, _days(50), {"audience": "lapsed"})
    assert upkeep.members("lapsed") == set() and upkeep.members("customers") == {"ann"}


def test_an_order_on_day_20_moves_the_lapse_to_day_50() -> None:
    upkeep = Upkeep({"lapsed": LAPSED})
    bob = Profile("bob")
    upkeep.touch(bob, T0, _event(ORDER, T0))
    assert upkeep.touch(bob, _days(20), _event(ORDER, _days(20))) == []
    assert upkeep.next_due() == _days(50)
    assert upkeep.advance(_days(60), Profile) == [Change("bob", "lapsed", True, _days(50))]


def test_an_event_counts_at_its_timestamp_or_now_whichever_is_earlier() -> None:
    upkeep = Upkeep({"customers": CUSTOMERS, "lapsed": LAPSED})
    # An order stamped 40 days ago, arriving now: a lapsed customer at once.
    old = upkeep.touch(Profile("cy"), _days(40), _event(ORDER, T0))
    assert {(c.audience, c.entered, c.at) for c in old} == {("customers", True, _days(40)), ("lapsed", True, _days(40))}
    # An order stamped in the future counts from now: lapsed 30 days from now, not from its stamp.
    upkeep.touch(Profile("di"), T0, _event(ORDER, _days(5)))
    assert upkeep.advance(_days(31), Profile) == [Change("di", "lapsed", True, _days(30))]


def test_three_paid_views_in_a_week_enter_and_leave_by_themselves() -> None:
    upkeep = Upkeep({"keen": KEEN})
    fay = Profile("fay")
    assert upkeep.touch(fay, T0, _event(VIEW, T0, price=49)) == []
    assert upkeep.touch(fay, _days(1), _event(VIEW, _days(1), price=49)) == []
    assert upkeep.touch(fay, _days(2), _event(VIEW, _days(2), price=5)) == []  # not a paid course
    assert upkeep.touch(fay, _days(3), _event(VIEW, _days(3), price=29)) == [Change("fay", "keen", True, _days(3))]
    assert upkeep.advance(_days(10), Profile) == [Change("fay", "keen", False, _days(7))]


def test_traits_and_opt_outs_are_read_on_each_touch() -> None:
    upkeep = Upkeep({"python": PYTHON})
    assert upkeep.touch(Profile("eve", {"interest": "ruby"}), T0) == []
    assert upkeep.touch(Profile("eve", {"interest": "python"}), _days(1)) == [Change("eve", "python", True, _days(1))]
    opted = Profile("eve", {"interest": "python"}, frozenset({"promotions"}))
    assert upkeep.touch(opted, _days(2)) == [Change("eve", "python", False, _days(2))]
    assert upkeep.touch(Profile("eve", {"interest": "python"}, frozenset({"sms"})), _days(3))[0].entered


def test_a_merged_persons_events_count_for_the_survivor() -> None:
    upkeep = Upkeep({"keen": KEEN})
    upkeep.touch(Profile("anon"), T0, _event(VIEW, T0, price=49))
    upkeep.touch(Profile("anon"), _days(1), _event(VIEW, _days(1), price=49))
    upkeep.touch(Profile("gus"), _days(1), _event(VIEW, _days(1), price=49))
    upkeep.merge("gus", "anon")
    assert upkeep.touch(Profile("gus"), _days(2)) == [Change("gus", "keen", True, _days(2))]
    assert upkeep.advance(_days(30), Profile) == [Change("gus", "keen", False, _days(7))]


def test_moments_of_several_people_come_in_time_order() -> None:
    upkeep = Upkeep({"lapsed": LAPSED})
    for name, day in (("late", 3), ("early", 1), ("middle", 2)):
        upkeep.touch(Profile(name), _days(day), _event(ORDER, _days(day)))
    changes = upkeep.advance(_days(40), Profile)
    assert [(c.person, c.at) for c in changes] == [("early", _days(31)), ("middle", _days(32)), ("late", _days(33))]


def test_no_audiences_no_upkeep() -> None:
    upkeep = Upkeep({})
    assert not upkeep
    assert upkeep.touch(Profile("ann"), T0, _event(ORDER, T0)) == [] and upkeep.next_due() is None


# --- incremental upkeep against counting from scratch ------------------------------------------

MINUTE = 60
AUDIENCES = {
    "recent": Audience("recent", did=(Activity(ORDER, within=30 * MINUTE),)),
    "lapsed": Audience("lapsed", did=(Activity(ORDER),), not_did=(Activity(ORDER, within=45 * MINUTE),)),
    "keen": Audience("keen", did=(Activity(VIEW, at_least=3, within=20 * MINUTE),)),
    "python": Audience(
        "python",
        where=compile_expression('user.interest == "python"'),
        did=(Activity(VIEW, cond=compile_expression("event.properties.price > 10"), at_least=2),),
    ),
}

inputs = st.lists(
    st.tuples(
        st.integers(0, 10),  # minutes since the previous input
        st.sampled_from(["ann", "bob"]),
        st.sampled_from([ORDER, VIEW, "identify"]),
        st.integers(-10, 40),  # how many minutes earlier than its arrival the event is stamped
        st.sampled_from([5, 20]),  # a price
        st.sampled_from(["python", "ruby"]),
    ),
    max_size=25,
)


def _member(
    audience: Audience, events: list[tuple[str, datetime, int, datetime]], interest: str | None, now: datetime
) -> bool:
    """Membership counted from every event the person had by ``now`` (name, counted-at time,
    price, arrival)."""
    if audience.where is not None and interest != "python":
        return False

    def holds(clause: Activity) -> bool:
        start = None if clause.within is None else now - timedelta(seconds=clause.within)
        count = sum(
            1
            for name, at, price, _ in events
            if name == clause.event
            and (clause.cond is None or price > 10)
            and at <= now
            and (start is None or at > start)
        )
        return count >= clause.at_least

    return all(holds(c) for c in audience.did) and not any(holds(c) for c in audience.not_did)


@settings(max_examples=150, deadline=None)
@given(inputs, st.lists(st.integers(0, 400), max_size=8))
def test_incremental_upkeep_equals_counting_from_scratch(steps: list[Any], checks: list[int]) -> None:
    upkeep = Upkeep(AUDIENCES)
    history: dict[str, list[tuple[str, datetime, int, datetime]]] = {"ann": [], "bob": []}
    interest: dict[str, str] = {}
    by_time: list[Change] = []
    """The changes no input caused: a window passing."""
    now = T0
    moments = sorted(T0 + timedelta(minutes=m) for m in checks)

    def profile(person: str) -> Profile:
        return Profile(person, {"interest": interest[person]} if person in interest else {})

    def check(at: datetime) -> None:
        by_time.extend(upkeep.advance(at, profile))
        for key, audience in AUDIENCES.items():
            expected = {p for p in history if _member(audience, history[p], interest.get(p), at)}
            assert upkeep.members(key) == expected, (key, at)

    for gap, person, kind, early, price, likes in steps:
        now += timedelta(minutes=gap)
        while moments and moments[0] < now:
            check(moments.pop(0))
        by_time.extend(upkeep.advance(now, profile))
        if kind == "identify":
            interest[person] = likes
            upkeep.touch(profile(person), now)
        else:
            stamp = now - timedelta(minutes=early)
            history[person].append((kind, min(stamp, now), price, now))  # a future stamp counts from now
            upkeep.touch(profile(person), now, Event(kind, stamp, {"price": price}))
        check(now)
    for moment in moments:
        check(max(moment, now))
    check(now + timedelta(days=1))
    # Each change with no input came at its exact moment: a second earlier, the events the person
    # had by then said the opposite (windows are whole minutes here).
    for change in by_time:
        audience = AUDIENCES[change.audience]
        assert audience.where is None  # traits change only with an input
        known = [e for e in history[change.person] if e[3] < change.at]
        assert _member(audience, known, None, change.at) == change.entered, change
        assert _member(audience, known, None, change.at - timedelta(seconds=1)) != change.entered, change
