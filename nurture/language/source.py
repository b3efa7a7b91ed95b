"""YAML with source positions.

PyYAML composes a node tree that knows where every scalar, sequence and mapping starts. We turn
it into plain Python data plus a :class:`SourceMap` from key paths to positions, so validation
errors anywhere later can point at ``file:line:column``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from .diagnostics import Diagnostic

Path = tuple[str | int, ...]

# YAML 1.1 reads an unquoted 10:00 as the base-60 integer 600; a marketer means a clock time.
_CLOCK = re.compile(r"^\d{1,2}:\d{2}(:\d{2})?$")


@dataclass(frozen=True, slots=True)
class Mark:
    """A 1-based position in a file."""

    line: int
    column: int


@dataclass
class SourceMap:
    """Where each value (and each mapping key) of a document starts."""

    path: str
    text: str
    values: dict[Path, Mark] = field(default_factory=dict)
    keys: dict[Path, Mark] = field(default_factory=dict)

    def value(self, path: Path) -> Mark:
        """The position of the value at ``path``, or of its nearest ancestor."""
        return self._nearest(self.values, path)

    def key(self, path: Path) -> Mark:
        """The position of the key that holds ``path``, falling back to its value."""
        if path in self.keys:
            return self.keys[path]
        return self.value(path)

    def _nearest(self, table: dict[Path, Mark], path: Path) -> Mark:
        for end in range(len(path), -1, -1):
            mark = table.get(path[:end])
            if mark is not None:
                return mark
        return Mark(1, 1)

    def diagnostic(
        self, path: Path, message: str, *, at_key: bool = False, severity: str = "error"
    ) -> Diagnostic:
        mark = self.key(path) if at_key else self.value(path)
        return Diagnostic(
            self.path, mark.line, mark.column, message, key=format_path(path), severity=severity
        )


class SourceError(Exception):
    """The text is not a YAML document we can read; carries the diagnostics."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("; ".join(d.headline() for d in diagnostics))


def format_path(path: Path) -> str:
    """``('steps', 2, 'wait_for')`` -> ``steps[2].wait_for``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


MAX_NODES = 50_000
"""More values than any journey has: past it, aliases are expanding into a bomb."""


def load_yaml(text: str, path: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document and record where everything in it is."""
    smap = SourceMap(path=path, text=text)
    problems: list[Diagnostic] = []
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None, smap
        data = _convert(loader, node, (), smap, problems, _Walk())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or "invalid YAML"
        hint = _syntax_hint(problem)
        raise SourceError(
            [Diagnostic(path, line, column, f"YAML syntax error: {problem}{hint}")]
        ) from None
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        raise SourceError(
            [
                Diagnostic(
                    path,
                    line,
                    column,
                    f"character {exc.character!r} is not allowed in YAML: delete it "
                    "(control characters often come from pasting text from a word processor)",
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise SourceError([Diagnostic(path, 1, 1, f"YAML error: {exc}")]) from None
    except _TooLarge as exc:
        raise SourceError([Diagnostic(path, 1, 1, str(exc))]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if problems:
        raise SourceError(problems)
    return data, smap


class _TooLarge(Exception):
    """An alias that refers to itself, or aliases that expand past :data:`MAX_NODES`."""


@dataclass
class _Walk:
    nodes: int = 0
    open: set[int] = field(default_factory=set)


def _syntax_hint(problem: str) -> str:
    if "mapping values are not allowed" in problem:
        return " (quote values that contain ': ', or check the indentation of this line)"
    if "found character '\\t'" in problem:
        return " (indent with spaces, not tabs)"
    if "could not find expected ':'" in problem:
        return " (a key needs ': ' after it; check the line above too)"
    if "expected <block end>" in problem:
        return " (this line's indentation does not match the block it belongs to)"
    if "found undefined alias" in problem:
        return " (define the anchor with &name before using *name)"
    return ""


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)


def _convert(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: Path,
    smap: SourceMap,
    problems: list[Diagnostic],
    walk: _Walk,
) -> Any:
    walk.nodes += 1
    if walk.nodes > MAX_NODES:
        raise _TooLarge(f"the document expands to more than {MAX_NODES} values: check its aliases (*name)")
    if id(node) in walk.open:
        mark = _mark(node)
        raise _TooLarge(f"an alias on line {mark.line} refers to the value that contains it: remove the loop")
    smap.values.setdefault(path, _mark(node))
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        walk.open.add(id(node))
        try:
            return _convert_collection(loader, node, path, smap, problems, walk)
        finally:
            walk.open.discard(id(node))
    assert isinstance(node, yaml.ScalarNode)
    if node.style is None and _CLOCK.match(node.value):
        return node.value
    try:
        return loader.construct_object(node, deep=True)
    except ValueError:  # an impossible date such as 2026-02-30: keep it as text
        return node.value


def _convert_collection(
    loader: yaml.SafeLoader,
    node: yaml.MappingNode | yaml.SequenceNode,
    path: Path,
    smap: SourceMap,
    problems: list[Diagnostic],
    walk: _Walk,
) -> Any:
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _convert(loader, key_node, path + ("<key>",), smap, problems, walk)
            if not isinstance(key, str):
                # A key is a name: `on:` is the word on, not YAML 1.1's true.
                key = str(key_node.value).lower() if isinstance(key, bool) else str(key)
            child = path + (key,)
            if key in out:
                mark = _mark(key_node)
                problems.append(
                    Diagnostic(
                        smap.path,
                        mark.line,
                        mark.column,
                        f"duplicate key '{key}': each key may appear once in a mapping",
                        key=format_path(child),
                    )
                )
                continue
            smap.keys[child] = _mark(key_node)
            out[key] = _convert(loader, value_node, child, smap, problems, walk)
        smap.values.pop(path + ("<key>",), None)
        return out
    return [
        _convert(loader, item, path + (index,), smap, problems, walk)
        for index, item in enumerate(node.value)
    ]


def iter_paths(data: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every (path, value) in a loaded document, depth first."""
    yield path, data
    if isinstance(data, dict):
        for key, value in data.items():
            yield from iter_paths(value, path + (key,))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from iter_paths(value, path + (index,))
