"""Plans for the runs of an older journey version: end them, or move them to a newer version.

A run sleeps at one of a few kinds of step: a ``wait``, a ``wait_until``, a ``wait_for``, or a
``send`` held by quiet hours or a frequency cap. Moving it to a new version means continuing at a
step of that version, matched by step id unless the plan maps it elsewhere, and that step must be
one the run can be waiting at in the same way: a sleep (``wait`` or ``wait_until``) for a sleep, a
``wait_for`` for a ``wait_for``, a ``send`` for a held send. :func:`plan_move` checks this for
every waiting step of the old version before any run is touched, and names each step at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import ir
from .diagnostics import did_you_mean

FAMILIES: dict[str, str] = {"wait": "sleep", "wait_until": "sleep", "wait_for": "wait_for", "send": "held send"}
"""The kinds of step a run can wait at, and which of them can take each other's runs."""


class MigrationError(ValueError):
    """A plan that cannot be carried out; ``problems`` names every step at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Migration:
    """What happens to the runs in flight of ``journey`` at ``from_version``.

    With ``to_version``, each moves to that version at its next wait, continuing at
    ``steps[step it waits at]``; without, each ends with ``end_reason``.
    """

    journey: str
    from_version: str
    to_version: str | None = None
    steps: Mapping[str, str] = field(default_factory=dict)
    """Every waiting step of the old version, by id, to the step of the new version it continues at."""
    end_reason: str | None = None

    def signal(self, target: ir.Journey | None = None) -> dict[str, Any]:
        """The ``migrate`` signal's payload: the new version's intermediate form and the map, or
        the end reason. A run applies it only while it is at ``from_version``."""
        if self.end_reason is not None:
            return {"from_version": self.from_version, "end": self.end_reason}
        assert target is not None and target.version == self.to_version
        return {
            "from_version": self.from_version,
            "journey": ir.journey_payload(target),
            "steps": dict(self.steps),
        }


def waiting_steps(journey: ir.Journey) -> list[ir.Step]:
    """The steps of ``journey`` a run can be waiting at, in document order."""
    return [step for step in ir.walk(journey.steps) if step.kind in FAMILIES]


def plan_end(journey: ir.Journey, reason: str) -> Migration:
    """End every run of ``journey`` (its version) with ``reason``."""
    if not reason.strip() or len(reason) > 64:
        raise MigrationError(["--reason: give 1 to 64 characters"])
    return Migration(journey.id, journey.version, end_reason=reason)


def plan_move(old: ir.Journey, new: ir.Journey, mapping: Mapping[str, str] | None = None) -> Migration:
    """Move the runs of ``old`` to ``new``; ``mapping`` sends old step ids to new ones where the
    ids differ. Raises :class:`MigrationError` naming every waiting step without a place."""
    mapping = dict(mapping or {})
    problems = []
    if old.id != new.id:
        problems.append(f"version {new.version} is a version of {new.id}, not of {old.id}")
    if old.version == new.version:
        problems.append(f"--from and --to are the same version {old.version}")
    waiting = {step.id: step for step in waiting_steps(old)}
    targets = {step.id: step for step in ir.walk(new.steps)}
    for source in mapping:
        if source not in waiting:
            where = "a step of" if source in {s.id for s in ir.walk(old.steps)} else "no step of"
            hint = "" if where == "a step of" else did_you_mean(source, waiting)
            problems.append(
                f"--map {source}=...: {source} is {where} version {old.version} where runs wait{hint}"
                if where == "no step of"
                else f"--map {source}=...: runs never wait at {source} ({old.step(source).kind}), so it needs no place"
            )
    steps: dict[str, str] = {}
    for step_id, step in waiting.items():
        target_id = mapping.get(step_id, step_id)
        target = targets.get(target_id)
        mapped = step_id in mapping
        if target is None:
            if mapped:
                problems.append(
                    f"step {step_id} ({step.kind}) maps to {target_id}, which is no step of version "
                    f"{new.version}{did_you_mean(target_id, targets)}"
                )
            else:
                problems.append(
                    f"step {step_id} ({step.kind}) of version {old.version} is not in version {new.version}: "
                    f"name where its runs go with --map {step_id}=STEP"
                )
            continue
        if FAMILIES.get(target.kind) != FAMILIES[step.kind]:
            problems.append(
                f"step {step_id} ({step.kind}) {'maps to' if mapped else 'is'} {target_id} in version "
                f"{new.version}, a {target.kind}: a run waiting at a {FAMILIES[step.kind]} can only "
                f"continue at a {_accepting(step.kind)}"
            )
            continue
        steps[step_id] = target_id
    if problems:
        raise MigrationError(problems)
    return Migration(old.id, old.version, to_version=new.version, steps=steps)


def _accepting(kind: str) -> str:
    kinds = [k for k, family in FAMILIES.items() if family == FAMILIES[kind]]
    return " or ".join(kinds)


def parse_map(pairs: list[str]) -> dict[str, str]:
    """``old=new`` pairs (``--map``) as a mapping; ``ValueError`` naming a malformed one."""
    mapping = {}
    for pair in pairs:
        source, sep, target = pair.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"{pair!r} is not OLD_STEP=NEW_STEP")
        if source.strip() in mapping:
            raise ValueError(f"{source.strip()} is mapped twice")
        mapping[source.strip()] = target.strip()
    return mapping
