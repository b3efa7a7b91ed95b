"""The identity rules (nurture.engine.identity): resolution, merges and their order-independence."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nurture.engine.identity import (
    Identifier,
    Identities,
    RunSlot,
    alias_identifiers,
    call_identifiers,
    merge_traits,
    merged_away,
    normalise_phone,
)

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("+86 138 0013 8000", "+8613800138000"),
        ("0086-138-0013-8000", "+8613800138000"),
        ("+1 (415) 555-0100", "+14155550100"),
        ("415 555 0100", None),  # no country code: not an identifier
        ("+0123456789", None),
        ("+1234", None),
    ],
)
def test_phones_are_e164(raw: str, e164: str | None) -> None:
    assert normalise_phone(raw) == e164


def test_call_identifiers_normalise_and_order() -> None:
    found = call_identifiers(
        "u1", "a1", {"email": " Li@Example.COM ", "phone": "+86 138 0013 8000", "name": "Li"}
    )
    assert found == [
        Identifier("user_id", "u1"),
        Identifier("anonymous_id", "a1"),
        Identifier("email", "li@example.com"),
        Identifier("phone", "+8613800138000"),
    ]
    assert call_identifiers(None, "a1", {"email": "not an email", "phone": True}) == [
        Identifier("anonymous_id", "a1")
    ]


def test_an_anonymous_visitor_becomes_known_without_a_new_person() -> None:
    ids = Identities()
    visitor = ids.apply(call_identifiers(None, "a1"), at(0)).person
    assert visitor == "anonymous_id:a1"
    plan = ids.apply(call_identifiers("u1", "a1", {"email": "li@example.com"}), at(5))
    assert plan.person == visitor and not plan.merges
    assert ids.lookup("user_id", "u1") == ids.lookup("email", "LI@example.com") == visitor
    assert ids.lookup("person", visitor) == visitor


def test_the_older_person_survives_a_merge_whatever_the_order() -> None:
    for first, second in (("u1", "a1"), ("a1", "u1")):
        ids = Identities()
        ids.apply(call_identifiers("u1", None), at(0))
        ids.apply(call_identifiers(None, "a1"), at(1))
        calls = {"u1": call_identifiers("u1", "a1"), "a1": call_identifiers(None, "a1", {"email": "x@y.io"})}
        ids.apply(calls[first], at(2))
        ids.apply(calls[second], at(3))
        assert ids.lookup("anonymous_id", "a1") == "u1"
        assert ids.canonical("anonymous_id:a1") == "u1"


def test_two_known_users_sharing_an_address_stay_two_people() -> None:
    ids = Identities()
    ids.apply(call_identifiers("mum", None, {"email": "family@example.com"}), at(0))
    plan = ids.apply(call_identifiers("son", None, {"email": "family@example.com"}), at(1))
    assert plan.person == "son" and not plan.merges
    assert plan.conflicts == (Identifier("email", "family@example.com"),)
    assert ids.lookup("email", "family@example.com") == "mum"


def test_an_alias_joins_two_known_users() -> None:
    ids = Identities()
    ids.apply(call_identifiers("old-id", None), at(0))
    ids.apply(call_identifiers("new-id", None), at(1))
    plan = ids.apply([Identifier("user_id", "new-id"), Identifier("user_id", "old-id")], at(2), explicit=True)
    assert plan.merges == (("old-id", "new-id"),)
    assert ids.lookup("user_id", "new-id") == "old-id"


def test_an_alias_previous_id_is_a_user_id_when_someone_has_it_else_an_anonymous_id() -> None:
    ids = Identities()
    ids.apply(call_identifiers("old-id", None), at(0))
    known = ids.resolve
    assert alias_identifiers("new-id", "old-id", lambda i: known(i) is not None) == [
        Identifier("user_id", "new-id"),
        Identifier("user_id", "old-id"),
    ]
    assert alias_identifiers("new-id", "a-77", lambda i: known(i) is not None) == [
        Identifier("user_id", "new-id"),
        Identifier("anonymous_id", "a-77"),
    ]
    assert alias_identifiers("new-id", "new-id", lambda i: True) == [Identifier("user_id", "new-id")]


def test_a_shared_device_does_not_merge_two_users() -> None:
    ids = Identities()
    ids.apply(call_identifiers("alice", "device-1"), at(0))
    plan = ids.apply(call_identifiers("bob", "device-1"), at(1))
    assert plan.person == "bob" and plan.conflicts == (Identifier("anonymous_id", "device-1"),)
    assert ids.lookup("anonymous_id", "device-1") == "alice"


def test_taken_person_ids_get_a_suffix() -> None:
    ids = Identities()
    ids.apply(call_identifiers(None, "x"), at(0))
    assert ids.apply(call_identifiers("anonymous_id:x", None), at(1)).person == "anonymous_id:x~2"


def test_newer_traits_win_and_untimed_ones_lose() -> None:
    traits, times = merge_traits(
        {"name": "Li", "plan": "free", "city": "Shanghai"},
        {"name": "2026-03-02T10:00:00+00:00", "plan": "2026-03-05T10:00:00+00:00"},
        {"name": "Li Wei", "plan": "pro", "city": "Beijing", "vip": True},
        {"name": "2026-03-03T10:00:00+00:00", "plan": "2026-03-04T10:00:00+00:00"},
    )
    assert traits == {"name": "Li Wei", "plan": "free", "city": "Shanghai", "vip": True}
    assert times["name"] == "2026-03-03T10:00:00+00:00"


def test_duplicate_runs_keep_the_one_that_entered_first() -> None:
    runs = [
        RunSlot("cart", "c1", "cart:b", at(5)),
        RunSlot("cart", "c1", "cart:a", at(1)),
        RunSlot("cart", "c2", "cart:c", at(9)),
        RunSlot("welcome", "", "welcome:z", at(3)),
        RunSlot("welcome", "", "welcome:y", at(3)),
    ]
    assert {r.run_id for r in merged_away(runs)} == {"cart:b", "welcome:z"}


CALLS = st.lists(
    st.tuples(
        st.sampled_from([None, "u1", "u2", "u3"]),
        st.sampled_from([None, "a1", "a2", "a3"]),
        st.sampled_from([None, "e1@x.io", "e2@x.io"]),
        st.booleans(),
    ).filter(lambda c: c[0] is not None or c[1] is not None),
    min_size=1,
    max_size=6,
)


def _play(calls: list[tuple[str | None, str | None, str | None, bool]]) -> Identities:
    ids = Identities()
    for n, (user, anonymous, email, explicit) in enumerate(calls):
        idents = call_identifiers(user, anonymous, {"email": email})
        ids.apply(idents, at(n), explicit=explicit)
    return ids


def _partition(ids: Identities) -> set[frozenset[Identifier]]:
    groups: dict[str, set[Identifier]] = {}
    for ident in ids.owner:
        groups.setdefault(ids.resolve(ident) or "", set()).add(ident)
    return {frozenset(g) for g in groups.values()}


@settings(max_examples=300, deadline=None)
@given(CALLS)
def test_every_identifier_resolves_to_one_surviving_person_with_at_most_one_user_id_unless_aliased(
    calls: list[tuple[str | None, str | None, str | None, bool]],
) -> None:
    ids = _play(calls)
    for ident in ids.owner:
        person = ids.resolve(ident)
        assert person is not None and person not in ids.merged_into
    if not any(explicit for *_, explicit in calls):
        for group in _partition(ids):
            assert len({i for i in group if i.kind == "user_id"}) <= 1


@settings(max_examples=200, deadline=None)
@given(st.permutations(["u1", "a1", "e1"]))
def test_merging_is_commutative_in_effect(order: list[str]) -> None:
    """Three persons made in a fixed order, then joined by calls in any order: the same one survives."""
    ids = Identities()
    ids.apply(call_identifiers("u1", None), at(0))
    ids.apply(call_identifiers(None, "a1"), at(1))
    ids.apply(call_identifiers(None, "a9", {"email": "e1@x.io"}), at(2))
    joins = {
        "u1": call_identifiers("u1", "a1"),
        "a1": call_identifiers(None, "a1", {"email": "e1@x.io"}),
        "e1": call_identifiers("u1", None, {"email": "e1@x.io"}),
    }
    for n, name in enumerate(order):
        ids.apply(joins[name], at(10 + n))
    assert {ids.resolve(i) for i in ids.owner} == {"u1"}
    again = Identities(dict(ids.persons), dict(ids.owner), dict(ids.merged_into))
    for name in itertools.chain(order):
        again.apply(joins[name], at(20))  # idempotent: nothing changes
    assert again.merged_into == ids.merged_into and again.owner == ids.owner


def test_ids_are_kept_exactly_as_sent() -> None:
    assert call_identifiers(" u-1\n", "a 1 ") == [Identifier("user_id", " u-1\n"), Identifier("anonymous_id", "a 1 ")]
    assert call_identifiers(" ", "\t") == []
