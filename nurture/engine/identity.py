"""One person across every identifier: the rules, shared by every runtime.

A **person** has a stable internal id and any number of **identifiers**: ``user_id`` (the
client's ``userId``), ``anonymous_id`` (a visitor's ``anonymousId``), and the addresses ``email``,
``phone`` (E.164) and ``wechat_openid``. Each identifier belongs to one person at a time. A call
names some identifiers (its ``userId`` and ``anonymousId``, the addresses among its traits);
:func:`plan_call` decides, from the persons they already resolve to, which person the call is
about, which persons merge into it, which identifiers are new, and which are left where they are.

The rules (docs/identity.md explains them for users):

- **Person ids.** A new person's id is its first identifier, in the order ``user_id``,
  ``anonymous_id``, ``email``, ``phone``, ``wechat_openid``: the ``userId`` itself, or
  ``<kind>:<value>`` for the others (``anonymous_id:a-91``). Where that id is taken, ``~2``, ``~3``
  ... is added. An id never changes; a merged person's id keeps resolving to the survivor.
- **Merges.** A call joins every person its identifiers resolve to, except that an implicit merge
  (an ``identify``, or a ``track`` with both ids) never joins two persons who each have a
  ``userId`` of their own: such an identifier stays with the person it belongs to (a
  *conflict*, audited), as a shared family address or a shared device would. An ``alias`` is
  explicit and joins them anyway.
- **Survivor.** Of two merging persons the older survives (created first; equal times: the
  smaller id), so the outcome does not depend on the order calls arrive in.
- **Traits.** Per trait, the value set by the later call wins (ties: the survivor's).
  **Opt-outs** are the union: an opt-out is never lost in a merge.
- **Runs.** Runs of both persons carry on as the survivor's, except that of two active runs of
  the same journey and key the older (entered first; equal times: smaller run id) survives and
  the other ends with reason ``merged``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

KINDS = ("user_id", "anonymous_id", "email", "phone", "wechat_openid")
"""Identifier kinds, in the order that names a new person."""

ADDRESS_KINDS = ("email", "phone", "wechat_openid")
"""Identifiers that are also traits (and where messages go)."""

MERGED = "merged"
"""The end reason of a run that lost to an older run of the same journey and key in a merge."""

EPOCH = datetime.min.replace(tzinfo=UTC)
"""The time of a trait set before times were kept: older than any call."""

_PHONE_PUNCTUATION = re.compile(r"[\s().\-/]")
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


class Identifier(NamedTuple):
    kind: str
    value: str

    def label(self) -> str:
        """How a person id or a log line names it: the userId itself, else ``kind:value``."""
        return self.value if self.kind == "user_id" else f"{self.kind}:{self.value}"


def normalise_phone(raw: str) -> str | None:
    """``raw`` as E.164 (``+8613800138000``): punctuation and spaces dropped, a leading ``00``
    read as ``+``; ``None`` when that is not a plausible E.164 number (no country code)."""
    number = _PHONE_PUNCTUATION.sub("", raw)
    if number.startswith("00"):
        number = "+" + number[2:]
    return number if _E164.fullmatch(number) else None


def normalise(kind: str, raw: Any) -> str | None:
    """The identifier's canonical value, or ``None`` when ``raw`` cannot identify anyone: emails
    are trimmed and lower-cased, phones made E.164, ids kept exactly as sent (but never blank:
    ``"u-1 "`` is not ``"u-1"``, as the user ids runs and messages were kept under before)."""
    if raw is None or isinstance(raw, bool) or not isinstance(raw, str | int):
        return None
    value = str(raw)
    if not value.strip():
        return None
    if kind in ("user_id", "anonymous_id"):
        return value
    value = value.strip()
    if kind == "email":
        value = value.lower()
        return value if _EMAIL.fullmatch(value) else None
    if kind == "phone":
        return normalise_phone(value)
    return value


def identifier(kind: str, raw: Any) -> Identifier | None:
    value = normalise(kind, raw)
    return None if value is None else Identifier(kind, value)


def call_identifiers(
    user_id: str | None, anonymous_id: str | None, traits: Mapping[str, Any] | None = None
) -> list[Identifier]:
    """The identifiers a call names, in :data:`KINDS` order, without repeats."""
    found = [identifier("user_id", user_id), identifier("anonymous_id", anonymous_id)]
    found += [identifier(kind, (traits or {}).get(kind)) for kind in ADDRESS_KINDS]
    return list(dict.fromkeys(i for i in found if i is not None))


def alias_identifiers(
    user_id: str, previous_id: str, has_user_id: Callable[[Identifier], bool]
) -> list[Identifier]:
    """The identifiers an ``alias`` names: its ``userId``, then its ``previousId``, which
    Segment's clients fill with either an old ``userId`` or the visitor's ``anonymousId``: read as
    a ``userId`` when someone has that ``userId`` (``has_user_id``), else as an ``anonymousId``."""
    previous = identifier("user_id", previous_id)
    if previous is not None and not has_user_id(previous):
        previous = identifier("anonymous_id", previous_id)
    found = [identifier("user_id", user_id), previous]
    return list(dict.fromkeys(i for i in found if i is not None))


@dataclass(frozen=True)
class Person:
    """What the merge rules need to know of a person."""

    id: str
    created_at: datetime
    user_ids: frozenset[str] = frozenset()
    """The ``userId`` identifiers the person has."""


def survivor(a: Person, b: Person) -> tuple[Person, Person]:
    """``(survivor, merged)``: the older person survives, the smaller id on equal times."""
    return (a, b) if (a.created_at, a.id) <= (b.created_at, b.id) else (b, a)


def new_person_id(first: Identifier, taken: Callable[[str], bool]) -> str:
    """A new person's id from its first identifier, made unique with ``~2``, ``~3`` ..."""
    base = first.label()
    candidate, n = base, 1
    while taken(candidate):
        n += 1
        candidate = f"{base}~{n}"
    return candidate


@dataclass(frozen=True)
class Plan:
    """What one call does to identities."""

    person: str
    """The person the call is about, once the merges are done."""
    created: Person | None = None
    """A person to create first (no identifier of the call belonged to anyone who could take it)."""
    merges: tuple[tuple[str, str], ...] = ()
    """``(survivor, merged)`` pairs, in order: each merged person joins the survivor."""
    attach: tuple[Identifier, ...] = ()
    """Identifiers that belonged to no one and now belong to :attr:`person`."""
    conflicts: tuple[Identifier, ...] = ()
    """Identifiers of the call that belong to another person who keeps them."""


def plan_call(
    identifiers: Sequence[Identifier],
    found: Mapping[Identifier, Person],
    *,
    now: datetime,
    taken: Callable[[str], bool],
    explicit: bool = False,
) -> Plan:
    """Decide what a call naming ``identifiers`` does, given the persons some of them belong to
    (``found``, already resolved to surviving persons). ``explicit`` for an ``alias``, which may
    join persons that each have a ``userId``."""
    if not identifiers:
        raise ValueError("a call names at least one identifier")
    target: Person | None = None
    user_ids = {i.value for i in identifiers if i.kind == "user_id" and i not in found}
    merges: list[tuple[str, str]] = []
    attach: list[Identifier] = []
    conflicts: list[Identifier] = []
    for ident in identifiers:
        other = found.get(ident)
        if other is None:
            attach.append(ident)
            continue
        if target is not None and other.id == target.id:
            continue
        if not explicit and user_ids and other.user_ids and not other.user_ids <= user_ids:
            conflicts.append(ident)
            continue
        user_ids |= other.user_ids
        if target is None:
            target = other
            continue
        kept, merged = survivor(target, other)
        merges.append((kept.id, merged.id))
        target = Person(kept.id, kept.created_at, frozenset(user_ids))
    if target is None:
        first = attach[0] if attach else identifiers[0]
        created = Person(new_person_id(first, taken), now, frozenset(user_ids))
        return Plan(created.id, created, (), tuple(attach), tuple(conflicts))
    return Plan(target.id, None, tuple(merges), tuple(attach), tuple(conflicts))


def merge_traits(
    kept: Mapping[str, Any],
    kept_times: Mapping[str, str],
    merged: Mapping[str, Any],
    merged_times: Mapping[str, str],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Per trait, the value set later wins (ties: ``kept``'s). Times are ISO-8601 instants in
    UTC, so they compare as strings; a trait without a time is older than any with one."""
    traits = dict(kept)
    times = dict(kept_times)
    for name, value in merged.items():
        theirs = merged_times.get(name, "")
        if name not in traits or theirs > times.get(name, ""):
            traits[name] = value
            if theirs:
                times[name] = theirs
    return traits, times


def stamp(traits: Iterable[str], at: datetime, times: Mapping[str, str]) -> dict[str, str]:
    """``times`` with each of ``traits`` set at ``at`` (an aware datetime)."""
    when = at.astimezone(UTC).isoformat()
    return {**times, **dict.fromkeys(traits, when)}


class RunSlot(NamedTuple):
    """An active run, as a merge sees it."""

    journey: str
    key: str
    run_id: str
    entered_at: datetime


def merged_away(runs: Iterable[RunSlot]) -> list[RunSlot]:
    """The active runs a merge ends: of several active runs of one journey and key, all but the
    one that entered first (equal times: the smaller run id)."""
    kept: dict[tuple[str, str], RunSlot] = {}
    ended: list[RunSlot] = []
    for run in sorted(runs, key=lambda r: (r.entered_at, r.run_id)):
        slot = (run.journey, run.key)
        if slot in kept:
            ended.append(run)
        else:
            kept[slot] = run
    return ended


@dataclass
class Identities:
    """Persons and identifiers held in memory: the simulator's and the scenario runtime's
    identity store, and the reference the database store is tested against."""

    persons: dict[str, Person] = field(default_factory=dict)
    owner: dict[Identifier, str] = field(default_factory=dict)
    """Which person each identifier belongs to (possibly merged since: see :meth:`canonical`)."""
    merged_into: dict[str, str] = field(default_factory=dict)

    def canonical(self, person_id: str) -> str:
        """The surviving person of ``person_id`` (itself unless merged)."""
        while person_id in self.merged_into:
            person_id = self.merged_into[person_id]
        return person_id

    def resolve(self, ident: Identifier) -> str | None:
        owner = self.owner.get(ident)
        return None if owner is None else self.canonical(owner)

    def lookup(self, kind: str, raw: Any) -> str | None:
        """The person an identifier (as written) belongs to; a person id for kind ``person``."""
        if kind == "person":
            return self.canonical(str(raw)) if str(raw) in self.persons else None
        ident = identifier(kind, raw)
        return None if ident is None else self.resolve(ident)

    def identifiers_of(self, person_id: str) -> list[Identifier]:
        person_id = self.canonical(person_id)
        return sorted(i for i, owner in self.owner.items() if self.canonical(owner) == person_id)

    def apply(self, identifiers: Sequence[Identifier], now: datetime, *, explicit: bool = False) -> Plan:
        """Plan the call and carry it out."""
        found = {}
        for ident in identifiers:
            owner = self.resolve(ident)
            if owner is not None:
                found[ident] = self.persons[owner]
        plan = plan_call(identifiers, found, now=now, taken=self.persons.__contains__, explicit=explicit)
        if plan.created is not None:
            self.persons[plan.created.id] = plan.created
        for kept, merged in plan.merges:
            self.merged_into[merged] = kept
            joined = self.persons[kept].user_ids | self.persons[merged].user_ids
            self.persons[kept] = Person(kept, self.persons[kept].created_at, joined)
        person = self.persons[plan.person]
        new_ids = {i.value for i in plan.attach if i.kind == "user_id"}
        if new_ids:
            self.persons[plan.person] = Person(person.id, person.created_at, person.user_ids | new_ids)
        for ident in plan.attach:
            self.owner[ident] = plan.person
        return plan
