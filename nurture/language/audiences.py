"""The compiled form of an audience (``audiences/<id>.yaml``): who is in it, as data.

An audience is a condition over one person: their traits (``where``), their event history
(``did`` and ``not_did``, each an event counted in an optional trailing window) and their topic
subscriptions (``subscribed``). All parts must hold. The pure rules that decide membership and
when it next changes with no new input are in :mod:`nurture.engine.audience`; this module only
says what an audience is, and round-trips it through JSON like a journey.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .evaluation import Expr

ENTERED = "Audience Entered"
"""The event a person gets when they enter an audience (``properties.audience`` names it)."""
EXITED = "Audience Exited"
"""The event a person gets when they leave one."""
PROPERTY = "audience"
"""The property of :data:`ENTERED` and :data:`EXITED` naming the audience."""




def condition_source(audience_id: str, written: str | None) -> str:
    """The condition a journey's audience trigger, goal or ``wait_for`` compiles to: the audience
    event names ``audience_id``, and the marketer's ``if`` (``written``) holds."""
    own = f'event.properties.{PROPERTY} == "{audience_id}"'
    return own if written is None else f"{own} and ({written})"


def written_condition(cond: Expr | None, audience_id: str | None) -> str | None:
    """The marketer's ``if`` inside a condition made by :func:`condition_source` (``None``: none),
    for display; any other condition as it is."""
    if cond is None or audience_id is None:
        return None if cond is None else cond.source
    own = condition_source(audience_id, None)
    if cond.source == own:
        return None
    return cond.source.removeprefix(f"{own} and (").removesuffix(")")


@dataclass(frozen=True, slots=True)
class Activity:
    """One ``did`` or ``not_did`` clause: events named ``event`` (that meet ``cond``), at least
    ``at_least`` of them, within the last ``within`` seconds (``None``: ever)."""

    event: str
    cond: Expr | None = None
    at_least: int = 1
    within: int | None = None
    within_written: str | None = field(default=None, compare=False)
    """``within`` as the marketer wrote it (``30d``), for display."""

    @property
    def describe(self) -> str:
        times = "" if self.at_least == 1 else f" at least {self.at_least} times"
        window = "" if self.within is None else f" in the last {self.within_written or f'{self.within}s'}"
        cond = "" if self.cond is None else f" where {self.cond.source}"
        return f"{self.event}{cond}{times}{window}"


@dataclass(frozen=True, slots=True)
class Audience:
    """One compiled audience. Membership needs ``where`` true, every ``did`` clause met, no
    ``not_did`` clause met, and no topic in ``subscribed`` opted out of."""

    id: str
    name: str = ""
    description: str = ""
    where: Expr | None = None
    did: tuple[Activity, ...] = ()
    not_did: tuple[Activity, ...] = ()
    subscribed: tuple[str, ...] = ()
    source: str = field(default="", compare=False)
    """The file it was compiled from."""

    @property
    def clauses(self) -> tuple[Activity, ...]:
        """``did`` then ``not_did``: the order of the tallies :mod:`nurture.engine.audience` keeps."""
        return self.did + self.not_did

    @property
    def events(self) -> frozenset[str]:
        """Event names whose arrival can change membership."""
        return frozenset(clause.event for clause in self.clauses)

    @property
    def timed(self) -> bool:
        """Whether membership can change with time alone (a clause with a window)."""
        return any(clause.within is not None for clause in self.clauses)

    @property
    def reads_traits(self) -> bool:
        """Whether an identify can change membership."""
        return self.where is not None or any(
            clause.cond is not None and clause.cond.reads_user for clause in self.clauses
        )

    @property
    def version(self) -> str:
        """A content hash: a changed definition is a new version (members are evaluated again)."""
        body = json.dumps(audience_to_dict(self), sort_keys=True, default=str, ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


def _activity_to_dict(clause: Activity) -> dict[str, Any]:
    return {
        "event": clause.event,
        "cond": None if clause.cond is None else clause.cond.to_dict(),
        "at_least": clause.at_least,
        "within": clause.within,
        "within_written": clause.within_written,
    }


def _activity_from_dict(data: Mapping[str, Any]) -> Activity:
    cond = data.get("cond")
    return Activity(
        event=data["event"],
        cond=None if cond is None else Expr.from_dict(cond),
        at_least=int(data.get("at_least", 1)),
        within=data.get("within"),
        within_written=data.get("within_written"),
    )


def audience_to_dict(audience: Audience) -> dict[str, Any]:
    """JSON-serialisable form (without ``source``)."""
    return {
        "id": audience.id,
        "name": audience.name,
        "description": audience.description,
        "where": None if audience.where is None else audience.where.to_dict(),
        "did": [_activity_to_dict(clause) for clause in audience.did],
        "not_did": [_activity_to_dict(clause) for clause in audience.not_did],
        "subscribed": list(audience.subscribed),
    }


def audience_from_dict(data: Mapping[str, Any]) -> Audience:
    """The audience back from :func:`audience_to_dict`."""
    where = data.get("where")
    return Audience(
        id=data["id"],
        name=data.get("name", ""),
        description=data.get("description", ""),
        where=None if where is None else Expr.from_dict(where),
        did=tuple(_activity_from_dict(item) for item in data.get("did", ())),
        not_did=tuple(_activity_from_dict(item) for item in data.get("not_did", ())),
        subscribed=tuple(data.get("subscribed", ())),
    )
