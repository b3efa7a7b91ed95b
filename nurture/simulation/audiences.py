"""Audience membership kept current in memory: the upkeep the simulator and the scenario runtime
share, so both produce the same audience events at the same instants.

Per person and audience, :class:`Upkeep` keeps the clause tallies, whether the person is a member
and the next moment that can change with no new input (:mod:`nurture.engine.audience` decides
all three). A runtime *touches* a person after each of their calls (a track adds its event to the
tallies first) and *advances* to every moment :meth:`Upkeep.next_due` names; both return the
changes, which the runtime then processes as the track events ``Audience Entered`` and
``Audience Exited`` of that person, at that instant.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from nurture.engine.audience import Tally, empty_tallies, evaluate, event_matches, note
from nurture.engine.interpreter import user_scope
from nurture.engine.model import Event, Profile
from nurture.language.audiences import ENTERED, EXITED, PROPERTY, Audience


@dataclass(frozen=True, slots=True)
class Change:
    """A person entered (``entered``) or left an audience at ``at``."""

    person: str
    audience: str
    entered: bool
    at: datetime

    def event(self) -> Event:
        """The audience event the person gets."""
        return Event(ENTERED if self.entered else EXITED, self.at, {PROPERTY: self.audience})


@dataclass
class _Standing:
    """One person's place in one audience."""

    tallies: tuple[Tally, ...]
    member: bool = False
    changes_at: datetime | None = None


@dataclass
class Upkeep:
    """Every person's standing in every audience of a project, kept current as calls arrive and
    time passes."""

    audiences: Mapping[str, Audience]
    _people: dict[str, dict[str, _Standing]] = field(default_factory=dict, init=False)
    _due: list[tuple[datetime, str]] = field(default_factory=list, init=False)
    """A heap of (moment, person); an entry is stale once the person's next moment differs."""
    _next: dict[str, datetime] = field(default_factory=dict, init=False)
    """Each person's next moment a standing can change with no new input."""

    def __bool__(self) -> bool:
        """Whether there is any audience to keep (without one, runtimes skip the upkeep)."""
        return bool(self.audiences)

    def members(self, audience: str) -> set[str]:
        """Who is in ``audience`` now (as last evaluated)."""
        return {person for person, standings in self._people.items() if audience in standings and standings[audience].member}

    def touch(self, profile: Profile, now: datetime, event: Event | None = None) -> list[Change]:
        """The person's standings after a call at ``now`` (``event``: a track's event, counted at
        its timestamp or ``now``, whichever is earlier); the memberships that changed."""
        standings = self._standings(profile.user_id)
        if event is not None:
            scope = {"user": user_scope(profile.user_id, profile.traits), "event": event.scope()}
            at = min(event.timestamp, now)
            for audience_id, audience in self.audiences.items():
                standing = standings[audience_id]
                for index, clause in enumerate(audience.clauses):
                    if event_matches(clause, event.name, scope):
                        tallies = list(standing.tallies)
                        tallies[index] = note(clause, tallies[index], at)
                        standing.tallies = tuple(tallies)
        return self._evaluate(profile, now)

    def next_due(self) -> datetime | None:
        """The earliest moment a standing changes with no new input (``None``: none will)."""
        while self._due and self._next.get(self._due[0][1]) != self._due[0][0]:
            heapq.heappop(self._due)
        return self._due[0][0] if self._due else None

    def advance(self, until: datetime, profile: Callable[[str], Profile]) -> list[Change]:
        """Every change with no new input up to ``until``, each at its own moment, in time order;
        ``profile`` gives a person's traits and opt-outs as they are now."""
        changes: list[Change] = []
        while (due := self.next_due()) is not None and due <= until:
            _, person = heapq.heappop(self._due)
            del self._next[person]
            changes += self._evaluate(profile(person), due)
        return changes

    def merge(self, kept: str, merged: str) -> None:
        """``merged`` joined ``kept``: their events count together (``kept``'s standings are
        evaluated again on the call that merged them); ``merged`` has no standings of its own."""
        theirs = self._people.pop(merged, None)
        self._next.pop(merged, None)
        if theirs is None:
            return
        ours = self._standings(kept)
        for audience_id, audience in self.audiences.items():
            standing = ours[audience_id]
            tallies = list(standing.tallies)
            for index, clause in enumerate(audience.clauses):
                for at in theirs[audience_id].tallies[index]:
                    tallies[index] = note(clause, tallies[index], at)
            standing.tallies = tuple(tallies)

    def _standings(self, person: str) -> dict[str, _Standing]:
        standings = self._people.get(person)
        if standings is None:
            standings = {key: _Standing(empty_tallies(audience)) for key, audience in self.audiences.items()}
            self._people[person] = standings
        return standings

    def _evaluate(self, profile: Profile, now: datetime) -> list[Change]:
        """Evaluate every standing of the person at ``now``; schedule their next moment."""
        person = profile.user_id
        standings = self._standings(person)
        traits = user_scope(person, profile.traits)
        changes: list[Change] = []
        upcoming: list[datetime] = []
        for audience_id, audience in self.audiences.items():
            standing = standings[audience_id]
            result = evaluate(audience, traits, profile.opted_out, standing.tallies, now)
            if result.member != standing.member:
                changes.append(Change(person, audience_id, result.member, now))
            standing.member, standing.changes_at = result.member, result.changes_at
            if result.changes_at is not None:
                upcoming.append(result.changes_at)
        moment = min(upcoming, default=None)
        if moment is None:
            self._next.pop(person, None)
        elif self._next.get(person) != moment:
            self._next[person] = moment
            heapq.heappush(self._due, (moment, person))
        return changes
