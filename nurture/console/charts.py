"""The journey map and the funnel, drawn as SVG on the server.

The map walks the compiled journey the way ``nurture graph`` does (:func:`nurture.language.graph.paths`:
branches, splits, a ``wait_for``'s timeout, an implicit ``otherwise``) and puts each step's
numbers from the report on its box. Every box links to the step's detail. Only presentation
attributes and classes are used (no ``style``), so the console's CSP needs no inline styles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from markupsafe import Markup, escape

from nurture.language import ir
from nurture.language.graph import paths
from nurture.reports.report import FunnelStage, StepCounts, step_label

NODE_W = 232
GAP_X = 28
ROW = 112
"""Vertical room per step: its box and the line to the next one."""
PAD = 16


def _height(step: ir.Step) -> int:
    return 82 if isinstance(step, ir.Send) else 56


@dataclass
class _Canvas:
    counts: Mapping[str, StepCounts]
    selected: str | None
    link: str
    parts: list[str] = field(default_factory=list)
    bottom: int = 0

    def width(self, steps: tuple[ir.Step, ...]) -> int:
        widest = NODE_W
        for step in steps:
            forks = paths(step)
            if forks:
                total = sum(self.width(nested) for _, nested in forks) + GAP_X * (len(forks) - 1)
                widest = max(widest, total)
        return widest

    def line(self, x1: float, y1: float, x2: float, y2: float, label: str = "") -> None:
        # A fork's edges turn just below the fork; edges that join a later step turn just above
        # it, so they never cross the boxes of another branch.
        mid = y1 + 14 if label or y2 - y1 <= ROW else y2 - 14
        self.parts.append(
            f'<path class="edge" d="M{x1:.0f},{y1:.0f} V{mid:.0f} H{x2:.0f} V{y2:.0f}" '
            'fill="none" stroke="#94a3b8" stroke-width="1.5" marker-end="url(#arrow)"/>'
        )
        if label:
            text = label if len(label) <= 28 else label[:27] + "…"
            self.parts.append(
                f'<text class="edge-label" x="{x2 + 6:.0f}" y="{mid + 16:.0f}" font-size="11" '
                f'fill="#475569">{escape(text)}</text>'
            )

    def node(self, step: ir.Step, cx: float, top: float) -> None:
        counts = self.counts.get(step.id)
        h = _height(step)
        x = cx - NODE_W / 2
        chosen = step.id == self.selected
        classes = "node" + (" node-selected" if chosen else "") + f" node-{step.kind}"
        label = f"{step.kind} {step_label(step)}"
        if len(label) > 34:
            label = label[:33] + "…"
        lines = [f"reached {counts.reached:,}" if counts else "reached 0"]
        if counts and counts.waiting:
            lines[0] += f" · waiting {counts.waiting:,}"
        if counts and counts.send is not None:
            outcomes = counts.send.outcomes
            sent = outcomes.get("sent", 0)
            skipped = sum(v for k, v in outcomes.items() if k.startswith("skipped"))
            failed = sum(v for k, v in outcomes.items() if k.startswith("failed"))
            lines.append(f"sent {sent:,} · skipped {skipped:,} · failed {failed:,}")
            fb = counts.send.feedback
            lines.append(
                f"delivered {fb.get('delivered', 0):,} · opened {fb.get('opened', 0):,} · clicked {fb.get('clicked', 0):,}"
            )
        title = f"{step.id}: {step.kind} {step_label(step)}. " + ". ".join(lines)
        stroke = "#1d4ed8" if chosen else ("#2563eb" if isinstance(step, ir.Send) else "#cbd5e1")
        fill = "#eff6ff" if chosen else "#ffffff"
        self.parts.append(f'<a href="{escape(self.link)}{escape(step.id)}#step" class="{classes}" '
                          f'aria-label="{escape(title)}">')
        self.parts.append(f"<title>{escape(title)}</title>")
        self.parts.append(
            f'<rect x="{x:.0f}" y="{top:.0f}" width="{NODE_W}" height="{h}" rx="8" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{2 if chosen else 1.5}"/>'
        )
        self.parts.append(
            f'<text x="{x + 12:.0f}" y="{top + 20:.0f}" font-size="13" font-weight="600" fill="#0f172a">'
            f"{escape(label)}</text>"
        )
        for index, text in enumerate(lines):
            self.parts.append(
                f'<text x="{x + 12:.0f}" y="{top + 40 + index * 18:.0f}" font-size="12" fill="#334155">'
                f"{escape(text)}</text>"
            )
        self.parts.append("</a>")
        self.bottom = max(self.bottom, int(top + h))

    def chain(
        self, steps: tuple[ir.Step, ...], left: float, top: float, ends: list[tuple[float, float, str]]
    ) -> tuple[float, list[tuple[float, float, str]]]:
        """Draw ``steps`` in a column ``width(steps)`` wide from ``left``, joined to the open
        ``ends`` above; the y below them and their own open ends."""
        width = self.width(steps)
        cx = left + width / 2
        y = top
        for step in steps:
            for x1, y1, label in ends:
                self.line(x1, y1, cx, y, label)
            self.node(step, cx, y)
            bottom = y + _height(step)
            if isinstance(step, ir.Exit):
                return bottom + ROW - _height(step), []
            forks = paths(step)
            if not forks:
                ends = [(cx, bottom, "")]
                y += ROW
                continue
            total = sum(self.width(nested) for _, nested in forks) + GAP_X * (len(forks) - 1)
            x = left + (width - total) / 2
            ends = []
            lowest = y + ROW
            for label, nested in forks:
                branch_width = self.width(nested)
                if nested:
                    after, open_ends = self.chain(nested, x, y + ROW, [(cx, bottom, label)])
                    ends.extend(open_ends)
                    lowest = max(lowest, after)
                else:
                    ends.append((cx, bottom, label))
                x += branch_width + GAP_X
            y = lowest
        return y, ends


def journey_map(
    journey: ir.Journey, steps: Mapping[str, StepCounts], *, selected: str | None, link: str, entered: int
) -> Markup:
    """The journey as an SVG map; each step links to ``link`` + its id."""
    canvas = _Canvas(steps, selected, link)
    width = canvas.width(journey.steps) + 2 * PAD
    cx = width / 2
    trigger = f"trigger {journey.trigger.describe}"
    canvas.parts.append(
        f'<rect x="{cx - NODE_W / 2:.0f}" y="{PAD}" width="{NODE_W}" height="44" rx="22" fill="#f1f5f9" '
        'stroke="#64748b" stroke-width="1.5"/>'
    )
    canvas.parts.append(
        f'<text x="{cx:.0f}" y="{PAD + 19}" font-size="13" font-weight="600" fill="#0f172a" '
        f'text-anchor="middle">{escape(trigger[:34])}</text>'
    )
    canvas.parts.append(
        f'<text x="{cx:.0f}" y="{PAD + 35}" font-size="12" fill="#334155" text-anchor="middle">'
        f"entered {entered:,}</text>"
    )
    after, ends = canvas.chain(journey.steps, PAD, PAD + 44 + 56, [(cx, PAD + 44, "")])
    for x1, y1, label in ends:
        canvas.line(x1, y1, cx, after, label)
    canvas.parts.append(
        f'<rect x="{cx - 60:.0f}" y="{after:.0f}" width="120" height="32" rx="16" fill="#f1f5f9" '
        'stroke="#64748b" stroke-width="1.5"/>'
    )
    canvas.parts.append(
        f'<text x="{cx:.0f}" y="{after + 21:.0f}" font-size="12" fill="#334155" text-anchor="middle">completed</text>'
    )
    height = after + 32 + PAD
    return Markup(
        f'<svg class="journey-map" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" role="group" aria-label="Map of the journey\'s steps">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#94a3b8"/></marker></defs>'
        + "".join(canvas.parts)
        + "</svg>"
    )


def funnel_chart(stages: list[FunnelStage]) -> Markup:
    """Horizontal bars, one per funnel stage, as a share of the runs that entered."""
    if not stages:
        return Markup("")
    top = max(stages[0].runs, 1)
    label_w, bar_w, row = 150, 300, 34
    parts = []
    for index, stage in enumerate(stages):
        y = index * row + 6
        share = stage.runs / top
        rate = "" if stage.rate is None else f" ({stage.rate:.1%})"
        name = stage.stage if len(stage.stage) <= 26 else stage.stage[:25] + "…"
        parts.append(
            f'<text x="{label_w - 10}" y="{y + 17}" font-size="13" fill="#0f172a" text-anchor="end">'
            f"{escape(name)}</text>"
        )
        parts.append(f'<rect x="{label_w}" y="{y}" width="{bar_w}" height="24" rx="4" fill="#f1f5f9"/>')
        parts.append(
            f'<rect x="{label_w}" y="{y}" width="{max(bar_w * share, 2 if stage.runs else 0):.1f}" height="24" '
            f'rx="4" fill="#3b82f6"/>'
        )
        parts.append(
            f'<text x="{label_w + bar_w + 10}" y="{y + 17}" font-size="13" fill="#334155">'
            f"{stage.runs:,}{escape(rate)}</text>"
        )
    height = len(stages) * row + 8
    width = label_w + bar_w + 140
    return Markup(
        f'<svg class="funnel" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="Funnel">' + "".join(parts) + "</svg>"
    )
