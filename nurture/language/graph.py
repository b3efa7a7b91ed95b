"""Mermaid flowcharts of journeys: step ids, branches, waits, ends."""

from __future__ import annotations

import re

from . import ir
from .durations import format_duration


def _label(step: ir.Step) -> str:
    if isinstance(step, ir.Wait):
        length = step.written or format_duration(step.seconds)
        return f"wait {length} at random" if step.spread else f"wait {length}"
    if isinstance(step, ir.WaitUntil):
        return f"wait until {step.when}"
    if isinstance(step, ir.Send):
        via = f" → {' → '.join(step.fallback)}" if step.fallback else ""
        kind = " (transactional)" if step.category == "transactional" else ""
        return f"send {step.channel}{via}: {step.template}{kind}"
    if isinstance(step, ir.WaitFor):
        return f"wait for {step.describe}<br/>up to {step.timeout_written or format_duration(step.timeout)}"
    if isinstance(step, ir.Branch):
        return "branch"
    if isinstance(step, ir.Split):
        return f"split {step.experiment}"
    if isinstance(step, ir.Update):
        return "update " + ", ".join(t.name for t in step.traits)
    return f"exit: {step.reason}"


def paths(step: ir.Step) -> list[tuple[str, tuple[ir.Step, ...]]]:
    """The ways out of a step that forks, as a map draws them: a ``wait_for``'s ``then`` and
    ``timeout``, a branch's conditions and ``otherwise`` (empty when it declares no ``else``),
    a split's variants. Empty for any other step."""
    found = [
        ("timeout" if isinstance(step, ir.WaitFor) and label == "else" else label, nested)
        for label, nested in ir.children(step)
    ]
    if isinstance(step, ir.Branch) and not step.otherwise:
        found.append(("otherwise", ()))
    return found


def _quote(text: str) -> str:
    return '"' + text.replace('"', "#quot;") + '"'


class _Builder:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def node(self, step: ir.Step) -> str:
        name = "n_" + re.sub(r"[^A-Za-z0-9_]", "_", step.id)
        shape = ("{{", "}}") if isinstance(step, (ir.Branch, ir.Split, ir.WaitFor)) else ("[", "]")
        if isinstance(step, ir.Exit):
            shape = ("([", "])")
        self.lines.append(f"    {name}{shape[0]}{_quote(f'{step.id}: {_label(step)}')}{shape[1]}")
        return name

    def chain(self, steps: tuple[ir.Step, ...], entry: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Link ``steps`` after the open ends in ``entry``; return the new open ends."""
        ends = entry
        for step in steps:
            name = self.node(step)
            for source, label in ends:
                arrow = f" -->|{_quote(label)}| " if label else " --> "
                self.lines.append(f"    {source}{arrow}{name}")
            if isinstance(step, ir.Exit):
                return []
            if not isinstance(step, (ir.WaitFor, ir.Branch, ir.Split)):
                ends = [(name, "")]
                continue
            ends = []
            for label, nested in paths(step):
                ends.extend(self.chain(nested, [(name, label)]) if nested else [(name, label)])
        return ends


def mermaid(journey: ir.Journey) -> str:
    """A ``flowchart TD`` of the journey, ready for any Mermaid renderer."""
    b = _Builder()
    trigger = f"trigger: {journey.starts_on}"
    if (written := journey.trigger.written_if) is not None:
        trigger += f" if {written}"
    b.lines.append("flowchart TD")
    b.lines.append(f"    start(({_quote(trigger)}))")
    ends = b.chain(journey.steps, [("start", "")])
    b.lines.append('    done(["completed"])')
    for source, label in ends:
        arrow = f" -->|{_quote(label)}| " if label else " --> "
        b.lines.append(f"    {source}{arrow}done")
    if journey.goal is not None:
        goal = journey.goal
        window = f" within {goal.within_written or format_duration(goal.within)}" if goal.within else ""
        ends_run = ", ends the run" if journey.goal.exit else ""
        b.lines.append(f"    goal[/{_quote(f'goal: {journey.goal.describe}{window}{ends_run}')}/]")
    for index, rule in enumerate(journey.exit_on, 1):
        b.lines.append(f"    exit_on_{index}[/{_quote(f'exit on: {rule.event}')}/]")
    return "\n".join(b.lines) + "\n"
