"""Audience membership, as pure rules: the one implementation the event API, the simulator and
the scenario runtime share.

A person's standing in an audience depends on their traits, their opt-outs and, per ``did`` or
``not_did`` clause, a *tally*: the times of their most recent matching events, newest last, at
most ``at_least`` of them. That is enough, because "at least N matching events in the last W" holds
exactly when the N-th most recent one is inside the window. So an arriving event changes one small
tally, and the moment a windowed clause flips with no new event is known in advance
(:attr:`Standing.changes_at`): the person who ordered 30 days ago leaves "ordered in the last 30
days" at that instant, and enters "has not ordered in the last 30 days" at the same one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nurture.language.audiences import Activity, Audience
from nurture.language.evaluation import is_true

Tally = tuple[datetime, ...]
"""The times of a person's most recent matching events for one clause, oldest first."""


@dataclass(frozen=True, slots=True)
class Standing:
    """Whether a person is a member now, and the next moment that can change with no new input
    (``None``: only an event, an identify or an opt-out can change it)."""

    member: bool
    changes_at: datetime | None = None


def event_matches(clause: Activity, name: str, scope: Mapping[str, Any]) -> bool:
    """Whether an event counts for ``clause``; ``scope`` holds ``user`` and ``event`` as conditions
    see them (:meth:`nurture.engine.model.Event.scope`)."""
    return name == clause.event and is_true(clause.cond, scope)


def note(clause: Activity, tally: Tally, at: datetime) -> Tally:
    """``tally`` with one more matching event at ``at`` (events may arrive out of order). Callers
    pass the event's time or the time it arrived, whichever is earlier: a tally holds no future
    time, so keeping only the newest ``at_least`` loses nothing."""
    times = sorted((*tally, at))
    return tuple(times[-clause.at_least :])


def _holds(clause: Activity, tally: Tally, now: datetime) -> tuple[bool, datetime | None]:
    """Whether ``clause`` has at least ``at_least`` events in its window at ``now``, and when that
    stops being true with no new event."""
    if len(tally) < clause.at_least:
        return False, None
    oldest = tally[-clause.at_least]
    if oldest > now:
        # Events stamped in the future count from their own time.
        return False, oldest
    if clause.within is None:
        return True, None
    leaves = oldest + timedelta(seconds=clause.within)
    return (now < leaves), (leaves if now < leaves else None)


def evaluate(
    audience: Audience,
    traits: Mapping[str, Any],
    opted_out: frozenset[str] | set[str],
    tallies: Sequence[Tally],
    now: datetime,
) -> Standing:
    """The person's standing in ``audience`` at ``now``; ``tallies`` follow :attr:`Audience.clauses`."""
    if len(tallies) != len(audience.clauses):
        raise ValueError(f"audience {audience.id!r} has {len(audience.clauses)} clauses, got {len(tallies)} tallies")
    changes: list[datetime] = []
    member = not any(topic in opted_out for topic in audience.subscribed)
    if member and audience.where is not None:
        member = is_true(audience.where, {"user": dict(traits)})
    for index, clause in enumerate(audience.clauses):
        holds, flips = _holds(clause, tallies[index], now)
        if flips is not None:
            changes.append(flips)
        wanted = index < len(audience.did)
        if holds != wanted:
            member = False
    # A time-based change matters only while the rest could let it through; reporting the earliest
    # flip is always safe (re-evaluating then finds the truth), so keep it simple.
    return Standing(member, min(changes) if changes else None)


def empty_tallies(audience: Audience) -> tuple[Tally, ...]:
    """Tallies for a person with no matching events."""
    return tuple(() for _ in audience.clauses)
