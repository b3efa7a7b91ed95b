"""Evaluating compiled expressions: pure Python over plain data, no template engine.

A missing trait or property is :data:`MISSING`: falsy, renders as an empty string, and any
comparison with it is false (``!=`` excepted), so ``event.properties.total > 0`` is simply false
when ``total`` is absent. Nothing can be called but the fixed filters and tests below, and only
mapping keys and list items can be read: the sandbox holds by construction. This module is safe
to import from workflow code.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NAMES = ("user", "event", "last_event", "journey")
"""The top-level names every condition and template sees."""


class _Missing:
    """A value that is not there: falsy, empty, unequal to everything."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "MISSING"

    def __str__(self) -> str:
        return ""


MISSING: Any = _Missing()


@dataclass(frozen=True, slots=True)
class Expr:
    """A compiled expression: the marketer's source and its evaluation tree."""

    source: str
    tree: Any
    names: tuple[str, ...]

    @property
    def reads_user(self) -> bool:
        return "user" in self.names

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "tree": self.tree, "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Expr:
        return cls(source=data["source"], tree=data["tree"], names=tuple(data["names"]))


# --- evaluation --------------------------------------------------------------------------------


def evaluate(expr: Expr | Any, scope: Mapping[str, Any]) -> Any:
    """The value of a compiled expression in ``scope`` (plain JSON-like data)."""
    tree = expr.tree if isinstance(expr, Expr) else expr
    return _eval(tree, scope)


# What data of the wrong type raises at run time (text plus a number, a division by zero): the
# journey compiled, so the data is at fault, and a run must not stop over it.
_CLASHES = (TypeError, ValueError, ZeroDivisionError, OverflowError)


def is_true(expr: Expr | None, scope: Mapping[str, Any]) -> bool:
    """A condition's truth; a missing condition is true; a runtime type clash is false."""
    if expr is None:
        return True
    try:
        return bool(evaluate(expr, scope))
    except _CLASHES:
        return False


def value_of(expr: Expr, scope: Mapping[str, Any]) -> Any:
    """A value's expression (``update``, ``key``); a runtime type clash is :data:`MISSING`."""
    try:
        return evaluate(expr, scope)
    except _CLASHES:
        return MISSING


def _get(container: Any, key: Any) -> Any:
    if isinstance(container, Mapping):
        return container.get(key, MISSING) if isinstance(key, (str, int)) else MISSING
    if isinstance(container, (list, tuple)) and isinstance(key, int) and not isinstance(key, bool):
        return container[key] if -len(container) <= key < len(container) else MISSING
    return MISSING


_ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": operator.pow,
}


def _compare(op: str, left: Any, right: Any) -> bool:
    if op == "!=":
        return left is MISSING or right is MISSING or bool(left != right)
    if left is MISSING or right is MISSING:
        return False
    try:
        if op == "==":
            return bool(left == right)
        if op == ">":
            return bool(left > right)
        if op == ">=":
            return bool(left >= right)
        if op == "<":
            return bool(left < right)
        if op == "<=":
            return bool(left <= right)
        if op == "in":
            return bool(left in right)
        return bool(left not in right)
    except TypeError:
        return False


def _eval(tree: Sequence[Any], scope: Mapping[str, Any]) -> Any:
    kind = tree[0]
    if kind == "const":
        return tree[1]
    if kind == "name":
        return scope.get(tree[1], MISSING)
    if kind == "get":
        return _get(_eval(tree[1], scope), _eval(tree[2], scope))
    if kind == "and":
        left = _eval(tree[1], scope)
        return _eval(tree[2], scope) if left else left
    if kind == "or":
        left = _eval(tree[1], scope)
        return left if left else _eval(tree[2], scope)
    if kind == "not":
        return not _eval(tree[1], scope)
    if kind == "neg":
        value = _eval(tree[1], scope)
        return MISSING if value is MISSING else -value
    if kind == "bin":
        left, right = _eval(tree[2], scope), _eval(tree[3], scope)
        if left is MISSING or right is MISSING:
            return MISSING
        return _ARITH[tree[1]](left, right)
    if kind == "concat":
        return "".join(_text(_eval(part, scope)) for part in tree[1])
    if kind == "cmp":
        left = _eval(tree[1], scope)
        for op, right_tree in tree[2]:
            right = _eval(right_tree, scope)
            if not _compare(op, left, right):
                return False
            left = right
        return True
    if kind == "if":
        return _eval(tree[2], scope) if _eval(tree[1], scope) else _eval(tree[3], scope)
    if kind == "list":
        return [_eval(item, scope) for item in tree[1]]
    if kind == "dict":
        return {_eval(k, scope): _eval(v, scope) for k, v in tree[1]}
    if kind == "filter":
        args = [_eval(a, scope) for a in tree[3]]
        return FILTERS[tree[1]](_eval(tree[2], scope), *args)
    if kind == "test":
        args = [_eval(a, scope) for a in tree[3]]
        return bool(TESTS[tree[1]](_eval(tree[2], scope), *args))
    raise ValueError(f"unknown expression node {kind!r}")


def _text(value: Any) -> str:
    if value is MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    return str(value)


def _default(value: Any, fallback: Any = "", boolean: bool = False) -> Any:
    # A trait set to null reads like a missing one, as it does in templates.
    if value is MISSING or value is None or (boolean and not value):
        return fallback
    return value


def _number(convert: Callable[[Any], Any], fallback: Any) -> Callable[..., Any]:
    def apply(value: Any, default: Any = fallback) -> Any:
        try:
            return convert(value)
        except (TypeError, ValueError, OverflowError):
            return default

    return apply


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _round(value: Any, precision: int = 0, method: str = "common") -> Any:
    if value is MISSING:
        return MISSING
    if method == "ceil":
        return math.ceil(value * 10**precision) / 10**precision
    if method == "floor":
        return math.floor(value * 10**precision) / 10**precision
    return round(value, precision)


def _seq(fn: Callable[[list[Any]], Any]) -> Callable[[Any], Any]:
    def apply(value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or not value:
            return MISSING
        return fn(list(value))

    return apply


def _strfn(fn: Callable[[str], Any]) -> Callable[[Any], Any]:
    return lambda value: MISSING if value is MISSING else fn(_text(value))


FILTERS: dict[str, Callable[..., Any]] = {
    "default": _default,
    "d": _default,
    "length": _length,
    "count": _length,
    "lower": _strfn(str.lower),
    "upper": _strfn(str.upper),
    "title": _strfn(str.title),
    "capitalize": _strfn(str.capitalize),
    "trim": _strfn(str.strip),
    "string": _text,
    "int": _number(lambda v: int(float(v)) if isinstance(v, str) else int(v), 0),
    "float": _number(float, 0.0),
    "abs": lambda v: MISSING if v is MISSING else abs(v),
    "round": _round,
    "first": _seq(lambda v: v[0]),
    "last": _seq(lambda v: v[-1]),
    "min": _seq(min),
    "max": _seq(max),
    "sum": lambda v: sum(v) if isinstance(v, (list, tuple)) else MISSING,
    "join": lambda v, sep="": sep.join(_text(x) for x in v) if isinstance(v, (list, tuple)) else "",
    "list": lambda v: list(v) if isinstance(v, (list, tuple, str)) else [],
}

TESTS: dict[str, Callable[..., Any]] = {
    "defined": lambda v: v is not MISSING,
    "undefined": lambda v: v is MISSING,
    "none": lambda v: v is None,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "mapping": lambda v: isinstance(v, Mapping),
    "sequence": lambda v: isinstance(v, (list, tuple, str)),
    "true": lambda v: v is True,
    "false": lambda v: v is False,
    "even": lambda v: isinstance(v, int) and v % 2 == 0,
    "odd": lambda v: isinstance(v, int) and v % 2 == 1,
    "divisibleby": lambda v, n: isinstance(v, int) and bool(n) and v % n == 0,
    "eq": lambda v, o: _compare("==", v, o),
    "ne": lambda v, o: _compare("!=", v, o),
    "gt": lambda v, o: _compare(">", v, o),
    "ge": lambda v, o: _compare(">=", v, o),
    "lt": lambda v, o: _compare("<", v, o),
    "le": lambda v, o: _compare("<=", v, o),
    "in": lambda v, o: _compare("in", v, o),
}
