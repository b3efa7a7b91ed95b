"""Who each call is about, for the in-memory runtimes: the simulator and the scenario runtime.

Both keep an :class:`~nurture.engine.identity.Identities` and apply the calls of a timeline to it
by the identity rules (docs/identity.md): a track resolves its person (creating one for a new
visitor), an identify or alias may merge two people. :class:`People` carries out what a merge
does to the in-memory profiles and send history; :func:`join_slots` and :func:`join_counts` move
the merged person's runs and re-entry history to the survivor, whatever a runtime keeps in its
slots (the simulator its live runs, the scenario runtime its workflow run ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from nurture.delivery.deliverer import MemoryHistory, MemoryProfiles
from nurture.engine.identity import (
    Identifier,
    Identities,
    Plan,
    RunSlot,
    alias_identifiers,
    call_identifiers,
    identifier,
    merged_away,
)
from nurture.engine.interpreter import OpenGoals

CallKind = Literal["track", "identify", "alias", "group"]


@dataclass(frozen=True, slots=True)
class Call:
    """The identity side of one input: who a track, identify, alias or group call names."""

    kind: CallKind
    user: str | None = None
    """The call's ``userId``."""
    anonymous: str | None = None
    """The call's ``anonymousId``."""
    traits: Mapping[str, Any] = field(default_factory=dict)
    """An identify's traits (its addresses are identifiers), or a group's traits."""
    opted_out: frozenset[str] | None = None
    """With identify: the person's opt-outs from now on (``None``: unchanged)."""
    previous: str | None = None
    """With alias: the ``previousId``."""
    group: str | None = None
    """With group: the ``groupId``."""

    def names(self) -> str:
        """The ids the call gives, for timelines: ``u1``, ``anonymous a1``, ``u1 + anonymous a1``."""
        parts = [] if self.user is None else [self.user]
        if self.anonymous is not None:
            parts.append(f"anonymous {self.anonymous}")
        return " + ".join(parts)


SlotKey = tuple[str, str, str]
"""``(journey, person, key)``: where a runtime keeps a person's run of a journey and key."""

V = TypeVar("V")


@dataclass
class People:
    """The identity graph of one in-memory run of a timeline, and the stores a merge joins."""

    profiles: MemoryProfiles
    history: MemoryHistory | None = None
    identities: Identities = field(default_factory=Identities)
    merged: dict[str, list[str]] = field(default_factory=dict)
    """Per surviving person, every person id merged into it."""

    def __post_init__(self) -> None:
        self.profiles.identities = self.identities
        if self.history is not None:
            self.history.identities = self.identities

    def add_user(self, user_id: str, traits: Mapping[str, Any], opted_out: Iterable[str], at: datetime) -> str:
        """A person known from the start (a scenario's ``users:``), as an identify at ``at``."""
        return self.apply(Call("identify", user_id, traits=traits, opted_out=frozenset(opted_out)), at).person

    def identifiers(self, call: Call) -> list[Identifier]:
        if call.kind == "alias":
            assert call.user is not None and call.previous is not None
            known = self.identities.resolve
            return alias_identifiers(call.user, call.previous, lambda i: known(i) is not None)
        return call_identifiers(call.user, call.anonymous, call.traits if call.kind == "identify" else None)

    def apply(self, call: Call, at: datetime) -> Plan:
        """Resolve the call's person, carry out its merges on the profiles and the send history,
        and apply an identify's traits or a group's membership; the plan says what happened."""
        if call.kind == "track" and call.anonymous is None:
            known = identifier("user_id", call.user)
            person = None if known is None else self.identities.resolve(known)
            if person is not None:  # the common case: a known user's event
                return Plan(person)
        plan = self.identities.apply(self.identifiers(call), at, explicit=call.kind == "alias")
        for kept, merged in plan.merges:
            self.profiles.merge(kept, merged)
            if self.history is not None:
                self.history.merge(kept, merged)
            self.merged.setdefault(kept, []).extend([merged, *self.merged.pop(merged, [])])
        if call.kind == "identify":
            self.profiles.update_now(plan.person, call.traits, call.opted_out, at=at)
        elif call.kind == "group":
            assert call.group is not None
            self.profiles.join_group(plan.person, call.group, call.traits, at)
        return plan

    def open_goals(self, goals: OpenGoals, person: str) -> None:
        """Put the ended runs of people merged into ``person`` (ended before or after the merge)
        under ``person``, so a goal event of the merged person converts them late."""
        for old in self.merged.get(person, ()):
            moved = goals.by_user.pop(old, None)
            if moved:
                goals.by_user.setdefault(person, []).extend(moved)


def join_slots(
    slots: dict[SlotKey, V], kept: str, merged: str, active: Callable[[SlotKey, V], RunSlot | None]
) -> list[V]:
    """Move ``merged``'s slots to ``kept``. Where both people have an active run of one journey
    and key (``active`` describes a slot's run, ``None`` once it ended), the one that entered
    first keeps the slot (:func:`~nurture.engine.identity.merged_away`); the others are returned,
    for the runtime to end with reason ``merged``."""
    losers: list[V] = []
    for slot in [s for s in slots if s[1] == merged]:
        theirs = slots.pop(slot)
        target = (slot[0], kept, slot[2])
        ours = slots.get(target)
        their_run = active(slot, theirs)
        our_run = None if ours is None else active(target, ours)
        if ours is None or our_run is None:
            slots[target] = theirs
            continue
        if their_run is None:
            continue
        (ended,) = merged_away([our_run, their_run])
        if ended is their_run:
            losers.append(theirs)
        else:
            slots[target] = theirs
            losers.append(ours)
    return losers


def join_counts(counts: dict[SlotKey, int], kept: str, merged: str) -> None:
    """Add ``merged``'s runs per journey and key to ``kept``'s, so re-entry rules (``once``)
    treat the merged person as one and new run numbers stay unique."""
    for slot in [s for s in counts if s[1] == merged]:
        target = (slot[0], kept, slot[2])
        counts[target] = counts.get(target, 0) + counts.pop(slot)
