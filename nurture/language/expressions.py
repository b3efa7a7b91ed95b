"""Conditions and computed values: Jinja2 syntax, compiled to a small pure tree.

Marketers write conditions in Jinja2 expression syntax. The compiler parses them with Jinja2's
own parser, checks names and constructs, and lowers them to nested JSON lists that
:func:`evaluate` interprets without Jinja. That keeps workflow code free of template engines
(deterministic, sandbox-friendly) while the language stays Jinja2 for the marketer.

Sandbox by construction: only the four documented names exist, attribute access reads mapping
keys and list items of plain data, and nothing can be called except a fixed set of filters.

Evaluation lives in :mod:`nurture.language.evaluation`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateSyntaxError
from jinja2.parser import Parser
from jinja2.sandbox import SandboxedEnvironment

from .diagnostics import did_you_mean
from .evaluation import FILTERS, NAMES, TESTS, Expr

_ENV = SandboxedEnvironment()


class ExpressionError(ValueError):
    """An expression that cannot be compiled; ``column`` is 1-based within the expression, 0
    when the problem is the expression as a whole."""

    def __init__(self, message: str, column: int = 0, *, at: re.Pattern[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column
        self.at = at
        """Where the mistake is, when the caller knows the source and ``column`` does not say:
        its first match outside string literals (group 1 when there is one)."""


_STRING = re.compile(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"")
_VALUE_CODE = re.compile(r"\{\{.*?\}\}", re.S)
# What people bring from JavaScript, Python or SQL, and what expressions spell instead. Jinja
# itself accepts True/False/None as well as true/false/none, so those need no advice.
_FOREIGN = re.compile(r"===|!==|&&|\|\||&|!(?!=)|\?|(?<![\w.])(null|NULL|nil|undefined)\b")
_FOREIGN_FIX = {
    "===": "'==' (there is no '===')",
    "!==": "'!=' (there is no '!==')",
    "&&": "'and'",
    "&": "'and'",
    "||": "'or'",
    "!": "'not' ('!=' is fine)",
    "?": "'x if condition else y'",
}


def _outside_strings(source: str, pattern: re.Pattern[str], start: int, end: int) -> Iterator[re.Match[str]]:
    """The matches of ``pattern`` in ``source[start:end]`` that are not inside a string literal."""
    strings = [m.span() for m in _STRING.finditer(source, start, end)]
    for match in pattern.finditer(source, start, end):
        if not any(a <= match.start() < b for a, b in strings):
            yield match


_IS = re.compile(r"\bis\s+(?:not\s+)?$")


def _foreign(source: str, regions: list[tuple[int, int]]) -> ExpressionError | None:
    """Advice for the first operator or value of another language in ``regions`` of ``source``."""
    for start, end in regions:
        for match in _outside_strings(source, _FOREIGN, start, end):
            if match.group(1) and _IS.search(source, start, match.start()):
                continue  # `x is undefined` is the test of that name
            return _advice(match)
    return None


def _advice(match: re.Match[str]) -> ExpressionError:
    token = match.group()
    if match.group(1):
        fix = "'x is undefined' or 'x is defined'" if token == "undefined" else "'none'"
        message = f"'{token}' is not a value in expressions: use {fix}"
    else:
        message = f"'{token}' is not an operator in expressions: use {_FOREIGN_FIX[token]}"
    return ExpressionError(message, match.start() + 1)


def _located(exc: ExpressionError, source: str, regions: list[tuple[int, int]]) -> ExpressionError:
    """``exc`` with its column set from its ``at`` pattern, when that is found in ``regions``."""
    if exc.at is None:
        return exc
    for start, end in regions:
        for match in _outside_strings(source, exc.at, start, end):
            return ExpressionError(exc.message, match.start(match.lastindex or 0) + 1)
    return exc


# --- compilation -------------------------------------------------------------------------------

_BINOPS: dict[type[nodes.Node], str] = {
    nodes.Add: "+",
    nodes.Sub: "-",
    nodes.Mul: "*",
    nodes.Div: "/",
    nodes.FloorDiv: "//",
    nodes.Mod: "%",
    nodes.Pow: "**",
}
_COMPARE = {"eq": "==", "ne": "!=", "gt": ">", "gteq": ">=", "lt": "<", "lteq": "<=", "in": "in", "notin": "not in"}


def compile_expression(source: str) -> Expr:
    """Parse a condition such as ``event.properties.total > 0``."""
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("an expression is required here, e.g. \"event.properties.total > 0\"")
    if "{{" in source or "{%" in source:
        raise ExpressionError("write the condition without {{ }}: conditions are bare expressions")
    advice = _foreign(source, [(0, len(source))])
    if advice is not None:
        raise advice
    try:
        parser = Parser(_ENV, source, state="variable")
        node = parser.parse_expression()
        if parser.stream.current.type != "eof":
            token = parser.stream.current
            raise ExpressionError(f"unexpected '{token.value}' after the expression")
    except TemplateSyntaxError as exc:
        message = _syntax_message(exc)
        column = len(source.rstrip()) + 1 if "ends too early" in message else _syntax_column(exc)
        raise ExpressionError(message, column) from None
    except RecursionError:
        raise ExpressionError("the expression is nested too deeply: simplify it") from None
    names: list[str] = []
    try:
        tree = _lower(node, names)
    except RecursionError:
        raise ExpressionError("the expression is nested too deeply: simplify it") from None
    except ExpressionError as exc:
        raise _located(exc, source, [(0, len(source))]) from None
    return Expr(source=source, tree=tree, names=tuple(dict.fromkeys(names)))


def compile_value(source: Any) -> Expr:
    """A value for ``update``: ``"{{ expr }}"`` keeps the expression's type, other text renders."""
    if not isinstance(source, str):
        return Expr(source=repr(source), tree=["const", source], names=())
    if "{{" not in source and "{%" not in source:
        return Expr(source=source, tree=["const", source], names=())
    code = [m.span() for m in _VALUE_CODE.finditer(source)]
    advice = _foreign(source, code)
    if advice is not None:
        raise advice
    try:
        template = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise ExpressionError(_syntax_message(exc), _syntax_column(exc)) from None
    parts: list[Any] = []
    names: list[str] = []
    expressions = 0
    for statement in template.body:
        if not isinstance(statement, nodes.Output):
            raise ExpressionError("values may use {{ expression }} but not {% %} blocks")
        for child in statement.nodes:
            if isinstance(child, nodes.TemplateData):
                parts.append(["const", child.data])
            else:
                expressions += 1
                try:
                    parts.append(_lower(child, names))
                except ExpressionError as exc:
                    raise _located(exc, source, code) from None
    unique = tuple(dict.fromkeys(names))
    if len(parts) == 1 and expressions == 1:  # exactly one {{ expr }}: keep its type
        return Expr(source=source, tree=parts[0], names=unique)
    return Expr(source=source, tree=["concat", parts], names=unique)


def _syntax_message(exc: TemplateSyntaxError) -> str:
    # The position Jinja's lexer names (" at 14") becomes the diagnostic's column instead.
    message = re.sub(r" at \d+$", "", exc.message or "invalid expression")
    if "end of template" in message or "end of print statement" in message:
        return "expression syntax error: the expression ends too early (an operand or a closing bracket is missing)"
    return f"expression syntax error: {message}"


def _syntax_column(exc: TemplateSyntaxError) -> int:
    """Where Jinja's lexer stopped (``unexpected char '$' at 7``); 0 when it does not say."""
    found = re.search(r" at (\d+)$", exc.message or "")
    return int(found.group(1)) + 1 if found else 0


def _lower(node: nodes.Node, names: list[str]) -> Any:
    if isinstance(node, nodes.Const):
        return ["const", node.value]
    if isinstance(node, nodes.Name):
        if node.name not in NAMES:
            raise ExpressionError(
                f"unknown name '{node.name}'{did_you_mean(node.name, NAMES)}; "
                f"expressions can use {', '.join(NAMES)}",
                at=re.compile(rf"(?<![\w.]){re.escape(node.name)}\b"),
            )
        names.append(node.name)
        return ["name", node.name]
    if isinstance(node, nodes.Getattr):
        _check_attr(node.attr)
        return ["get", _lower(node.node, names), ["const", node.attr]]
    if isinstance(node, nodes.Getitem):
        if isinstance(node.arg, nodes.Slice):
            raise ExpressionError("slices are not supported in expressions")
        if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            _check_attr(node.arg.value)
        return ["get", _lower(node.node, names), _lower(node.arg, names)]
    if isinstance(node, nodes.And):
        return ["and", _lower(node.left, names), _lower(node.right, names)]
    if isinstance(node, nodes.Or):
        return ["or", _lower(node.left, names), _lower(node.right, names)]
    if isinstance(node, nodes.Not):
        return ["not", _lower(node.node, names)]
    if isinstance(node, nodes.Neg):
        return ["neg", _lower(node.node, names)]
    if isinstance(node, nodes.Pos):
        return _lower(node.node, names)
    if type(node) in _BINOPS:
        binary = node
        assert isinstance(binary, nodes.BinExpr)
        return ["bin", _BINOPS[type(node)], _lower(binary.left, names), _lower(binary.right, names)]
    if isinstance(node, nodes.Concat):
        return ["concat", [_lower(n, names) for n in node.nodes]]
    if isinstance(node, nodes.Compare):
        ops = [[_COMPARE[op.op], _lower(op.expr, names)] for op in node.ops]
        return ["cmp", _lower(node.expr, names), ops]
    if isinstance(node, nodes.CondExpr):
        otherwise = _lower(node.expr2, names) if node.expr2 is not None else ["const", None]
        return ["if", _lower(node.test, names), _lower(node.expr1, names), otherwise]
    if isinstance(node, (nodes.List, nodes.Tuple)):
        return ["list", [_lower(n, names) for n in node.items]]
    if isinstance(node, nodes.Dict):
        return ["dict", [[_lower(p.key, names), _lower(p.value, names)] for p in node.items]]
    if isinstance(node, nodes.Filter):
        return _lower_call(node, "filter", FILTERS, names)
    if isinstance(node, nodes.Test):
        return _lower_call(node, "test", TESTS, names)
    if isinstance(node, nodes.Call):
        raise ExpressionError("function calls are not allowed in expressions; use filters like | length")
    raise ExpressionError(f"'{type(node).__name__}' is not supported in expressions")


def _check_attr(attr: str) -> None:
    if attr.startswith("_"):
        raise ExpressionError(
            f"'{attr}' cannot be read: names starting with '_' are private",
            at=re.compile(rf"\.\s*({re.escape(attr)})\b|\[\s*(['\"]{re.escape(attr)})"),
        )


def _lower_call(
    node: nodes.Filter | nodes.Test,
    kind: str,
    table: Mapping[str, Callable[..., Any]],
    names: list[str],
) -> Any:
    if node.name not in table:
        lead = r"\|\s*" if kind == "filter" else r"\bis\s+(?:not\s+)?"
        raise ExpressionError(
            f"unknown {kind} '{node.name}'{did_you_mean(node.name, table)}; "
            f"available: {', '.join(sorted(table))}",
            at=re.compile(rf"{lead}({re.escape(node.name)})\b"),
        )
    if node.kwargs or node.dyn_args or node.dyn_kwargs:
        raise ExpressionError(f"{kind} '{node.name}' takes positional arguments only")
    assert node.node is not None
    args = [_lower(a, names) for a in node.args]
    return [kind, node.name, _lower(node.node, names), args]
