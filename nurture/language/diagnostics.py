"""Compile diagnostics: a location, a key path, a message and an optional hint.

Every compile problem becomes one :class:`Diagnostic`. They are collected, never raised one at a
time, so a marketer sees every mistake in one run, each rendered as::

    journeys/x.yaml:12:5: steps[2].wait_for: timeout is required
       11 |   - wait_for: Order Completed
       12 |     then:
          |     ^
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found while compiling a journey, template or scenario."""

    path: str
    """File the problem is in, as given to the compiler (relative paths stay relative)."""
    line: int
    """1-based line; 0 when the problem concerns the whole file."""
    column: int
    """1-based column; 0 when unknown."""
    message: str
    """What is wrong and, where possible, how to fix it."""
    key: str = ""
    """Dotted key path inside the document, e.g. ``steps[2].wait_for``."""
    severity: str = "error"
    """``error`` stops compilation; ``warning`` is reported and compilation goes on."""

    def headline(self) -> str:
        where = self.path
        if self.line:
            where += f":{self.line}:{self.column or 1}"
        prefix = f"{self.key}: " if self.key else ""
        label = "" if self.severity == "error" else f"{self.severity}: "
        return f"{where}: {label}{prefix}{self.message}"

    def render(self, source: str | None = None) -> str:
        """The headline plus a numbered snippet with a caret, when the source is at hand."""
        text = self.headline()
        if source is None or not self.line:
            return text
        return text + "\n" + snippet(source, self.line, self.column)


@dataclass
class DiagnosticSink:
    """Collects diagnostics for one compilation."""

    items: list[Diagnostic] = field(default_factory=list)

    def add(self, diagnostic: Diagnostic) -> None:
        self.items.append(diagnostic)

    def extend(self, diagnostics: Iterable[Diagnostic]) -> None:
        self.items.extend(diagnostics)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity != "error"]


class CompileError(Exception):
    """Raised by entry points that need a compiled project when any error was found."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = list(diagnostics)
        super().__init__(f"{len(self.diagnostics)} error(s)\n" + format_all(self.diagnostics))


def snippet(source: str, line: int, column: int, context: int = 1) -> str:
    """Numbered lines around ``line`` with a caret under ``column``."""
    lines = source.splitlines()
    if not 1 <= line <= len(lines):
        return ""
    first = max(1, line - context)
    width = len(str(line))
    out = []
    for number in range(first, line + 1):
        out.append(f"  {number:>{width}} | {lines[number - 1]}")
    out.append(f"  {'':>{width}} | {' ' * max(column - 1, 0)}^")
    return "\n".join(out)


def did_you_mean(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


def describe_value(value: object) -> str:
    """A value as a message shows it: ``'abc' (text)``, ``3 (a number)``, ``a list``."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value} (a number)"
    if isinstance(value, str):
        return f"'{value}' (text)"
    if isinstance(value, date):  # a datetime too
        return f"{value.isoformat()} unquoted (YAML reads it as a date, not as text: write it in quotes)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def format_all(diagnostics: Sequence[Diagnostic]) -> str:
    """Render diagnostics with snippets, reading each file once."""
    cache: dict[str, str | None] = {}
    rendered = []
    for d in diagnostics:
        if d.path not in cache:
            try:
                cache[d.path] = Path(d.path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                cache[d.path] = None
        rendered.append(d.render(cache[d.path]))
    return "\n".join(rendered)
