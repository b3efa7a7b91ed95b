"""Conditions and update values: compiled from Jinja2 syntax, evaluated without Jinja."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nurture.language.evaluation import MISSING, evaluate, is_true
from nurture.language.expressions import ExpressionError, compile_expression, compile_value

SCOPE: dict[str, Any] = {
    "user": {
        "id": "u1",
        "first_name": "Li",
        "vip": True,
        "tier": "Gold",
        "tags": ["course", "kit"],
        "age": "42",
        "score": "4.7",
        "nickname": None,
    },
    "event": {
        "name": "Order Completed",
        "properties": {"n": 3, "total": 99.5, "items": [10, 20, 30], "plan": "pro", "cart": {"id": "c1"}},
    },
    "journey": {"id": "welcome", "key": "c1"},
}


def value_of(source: str, scope: dict[str, Any] = SCOPE) -> Any:
    return evaluate(compile_expression(source), scope)


def holds(source: str, scope: dict[str, Any] = SCOPE) -> bool:
    return is_true(compile_expression(source), scope)


# --- conditions ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("event.properties.n > 2", True),
        ("event.properties.n > 3", False),
        ("event.properties.n >= 3", True),
        ("event.properties.total < 100", True),
        ("event.properties.total <= 99", False),
        ("event.properties.plan == 'pro'", True),
        ("event.properties.plan != 'pro'", False),
        ("1 < event.properties.n < 5", True),
        ("1 < event.properties.n < 2", False),
        ("user.vip and event.properties.n > 2", True),
        ("user.vip and event.properties.n > 5", False),
        ("event.properties.n > 5 or user.tier == 'Gold'", True),
        ("not user.vip", False),
        ("not (event.properties.n > 5)", True),
        ("journey.key == event.properties.cart.id", True),
    ],
)
def test_comparisons_and_logic(source: str, expected: bool) -> None:
    assert holds(source) is expected
    assert bool(value_of(source)) is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("user.unknown", False),
        ("event.properties.unknown", False),
        ("last_event.name", False),
        ("user.unknown.deeper.still", False),
        ("event.properties.items[7]", False),
        ("user.unknown > 0", False),
        ("user.unknown < 0", False),
        ("user.unknown == 0", False),
        ("user.unknown == user.also_unknown", False),
        ("user.unknown != 0", True),
        ("not user.unknown", True),
        ("user.unknown + 1 > 0", False),
    ],
)
def test_missing_values_are_falsy_and_compare_false(source: str, expected: bool) -> None:
    assert holds(source) is expected


def test_missing_value_is_the_missing_marker_and_renders_empty() -> None:
    assert value_of("user.unknown") is MISSING
    assert value_of("user.unknown + 1") is MISSING
    assert str(MISSING) == ""
    assert value_of("user.nickname") is None


def test_a_missing_condition_is_true() -> None:
    assert is_true(None, SCOPE) is True


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("user.unknown | default('friend')", "friend"),
        ("user.first_name | default('friend')", "Li"),
        ("user.unknown | d('friend')", "friend"),
        ("'' | default('friend', true)", "friend"),
        ("user.tags | length", 2),
        ("user.unknown | length", 0),
        ("'Pro Plan' | length", 8),
        ("user.tier | lower", "gold"),
        ("user.tier | upper", "GOLD"),
        ("user.age | int", 42),
        ("user.score | int", 4),
        ("'abc' | int", 0),
        ("user.unknown | int", 0),
        ("user.age | int + 1", 43),
        ("event.properties.items | first", 10),
        ("event.properties.items | sum", 60),
        ("user.tags | join(', ')", "course, kit"),
    ],
)
def test_filters(source: str, expected: Any) -> None:
    result = value_of(source)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("user.first_name is defined", True),
        ("user.email is defined", False),
        ("user.email is undefined", True),
        ("user.email is not defined", True),
        ("user.nickname is defined", True),
        ("user.nickname is none", True),
        ("event.properties.n is number", True),
        ("user.age is number", False),
        ("event.properties.n is odd", True),
        ("event.properties.n is divisibleby 3", True),
    ],
)
def test_tests(source: str, expected: bool) -> None:
    assert holds(source) is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("'kit' in user.tags", True),
        ("'book' in user.tags", False),
        ("'book' not in user.tags", True),
        ("user.tier in ['Gold', 'Platinum']", True),
        ("'ol' in user.tier", True),
        ("'plan' in event.properties", True),
        ("20 in event.properties.items", True),
        ("user.unknown in user.tags", False),
        ("'kit' in user.unknown", False),
    ],
)
def test_membership(source: str, expected: bool) -> None:
    assert holds(source) is expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("event.properties.n * 2 + 1", 7),
        ("event.properties.n - 5", -2),
        ("event.properties.total / 2", 49.75),
        ("event.properties.n // 2", 1),
        ("event.properties.n % 2", 1),
        ("2 ** event.properties.n", 8),
        ("-event.properties.n", -3),
        ("(event.properties.n + 1) * 2", 8),
        ("'Hi ' ~ user.first_name", "Hi Li"),
        ("'a' ~ 1", "a1"),
        ("'yes' if user.vip else 'no'", "yes"),
        ("'yes' if user.unknown else 'no'", "no"),
    ],
)
def test_arithmetic_and_concatenation(source: str, expected: Any) -> None:
    assert value_of(source) == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("[1, 2, 3]", [1, 2, 3]),
        ("[1, 2, 3] | length", 3),
        ("[user.first_name, event.properties.n]", ["Li", 3]),
        ("{'a': 1, 'b': event.properties.n}", {"a": 1, "b": 3}),
        ("{'a': 1}.a", 1),
        ("{'a': 1}['a']", 1),
        ("(1, 2)", [1, 2]),
    ],
)
def test_list_and_dict_literals(source: str, expected: Any) -> None:
    assert value_of(source) == expected


@pytest.mark.parametrize(
    "source",
    ["'a' > 1", "user.tags > 3", "user.first_name < event.properties.n", "1 / 0 > 1", "-user.tier"],
)
def test_a_type_clash_is_false_not_an_exception(source: str) -> None:
    assert holds(source) is False


def test_a_type_clash_in_a_comparison_evaluates_to_false() -> None:
    assert value_of("'a' > 1") is False
    assert value_of("'a' == 1") is False


def test_conditions_read_the_scope_at_evaluation_time() -> None:
    expr = compile_expression("user.vip")
    assert is_true(expr, SCOPE) is True
    assert is_true(expr, {**SCOPE, "user": {"id": "u1", "vip": False}}) is False
    assert is_true(expr, {}) is False


def test_compiled_expression_records_its_source_and_names() -> None:
    expr = compile_expression("user.vip and event.properties.n > journey.key | length")
    assert expr.source == "user.vip and event.properties.n > journey.key | length"
    assert sorted(expr.names) == ["event", "journey", "user"]
    assert expr.reads_user
    assert not compile_expression("event.properties.n > 1").reads_user


def test_compiled_expression_round_trips_through_json() -> None:
    expr = compile_expression("user.tier | lower in ['gold', 'vip'] and event.properties.n > 1")
    back = type(expr).from_dict(json.loads(json.dumps(expr.to_dict())))
    assert back == expr
    assert is_true(back, SCOPE) is True


# --- rejected expressions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "an expression is required"),
        ("   ", "an expression is required"),
        ("event.properties.total >", "expression syntax error"),
        ("user.vip user.tier", "unexpected 'user' after the expression"),
        ("usr.vip", "unknown name 'usr' (did you mean 'user'?)"),
        ("range(10)", "function calls are not allowed"),
        ("user.tier.upper()", "function calls are not allowed"),
        ("user.__class__", "'__class__' cannot be read"),
        ("user['_secret']", "'_secret' cannot be read"),
        ("user.tier | shout", "unknown filter 'shout'"),
        ("user.tier is shouting", "unknown test 'shouting'"),
        ("user.tags[0:1]", "slices are not supported"),
        ("user.tier | default(fallback='x')", "positional arguments only"),
        ("{{ user.vip }}", "without {{ }}"),
    ],
)
def test_rejected_expressions(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("source", "column", "message"),
    [
        ("user.age >= 18 && user.vip", 16, "'&&' is not an operator in expressions: use 'and'"),
        ("user.a & user.b", 8, "'&' is not an operator in expressions: use 'and'"),
        ("user.a || user.b", 8, "'||' is not an operator in expressions: use 'or'"),
        ("not user.a and !user.b", 16, "'!' is not an operator in expressions: use 'not'"),
        ("user.a === 1", 8, "'===' is not an operator in expressions: use '=='"),
        ("user.a !== 1", 8, "'!==' is not an operator in expressions: use '!='"),
        ("user.a == null", 11, "'null' is not a value in expressions: use 'none'"),
        ("user.a == undefined", 11, "'undefined' is not a value in expressions: use 'x is undefined'"),
        ("user.vip ? 1 : 2", 10, "'?' is not an operator in expressions: use 'x if condition else y'"),
        ("user.plan == $pro", 14, "expression syntax error: unexpected char '$'"),
        ("user.vip and usr.age", 14, "unknown name 'usr'"),
        ("user.tier | shout", 13, "unknown filter 'shout'"),
        ("user['_secret']", 6, "'_secret' cannot be read"),
    ],
)
def test_mistakes_from_other_languages_point_at_the_character_and_say_what_to_write(
    source: str, column: int, message: str
) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert caught.value.message.startswith(message)
    assert caught.value.column == column


@pytest.mark.parametrize(
    "source",
    [
        "user.a != 1",
        "user.note == 'a && b || !c === null'",
        "user.a is undefined or user.b is not undefined",
        "user.a == None or user.b == True or user.c == false",
        "user.null == 1",
    ],
)
def test_what_looks_foreign_but_is_jinja_still_compiles(source: str) -> None:
    compile_expression(source)


# --- update values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ event.properties.n }}", 3),
        ("{{ event.properties.total }}", 99.5),
        ("{{ user.vip }}", True),
        ("{{ user.tags }}", ["course", "kit"]),
        ("{{ event.properties.cart }}", {"id": "c1"}),
        ("{{ event.properties.n * 2 }}", 6),
        ("{{ 5 }}", 5),
        ("{{ true }}", True),
    ],
)
def test_a_single_expression_value_keeps_its_type(source: str, expected: Any) -> None:
    result = evaluate(compile_value(source), SCOPE)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("Hi {{ user.first_name }}!", "Hi Li!"),
        ("{{ user.first_name }} ({{ user.tier | lower }})", "Li (gold)"),
        ("order {{ event.properties.n }}", "order 3"),
        (" {{ event.properties.n }}", " 3"),
        ("Hi {{ user.unknown }}!", "Hi !"),
        ("{{ user.unknown }}{{ user.nickname }}x", "x"),
    ],
)
def test_mixed_text_renders_to_text(source: str, expected: str) -> None:
    assert evaluate(compile_value(source), SCOPE) == expected


@pytest.mark.parametrize("source", [True, 3, 2.5, None, "plain text", ["a", "b"], {"k": 1}])
def test_a_value_without_braces_is_a_constant(source: Any) -> None:
    expr = compile_value(source)
    assert evaluate(expr, SCOPE) == source
    assert expr.names == ()


def test_a_missing_single_expression_value_is_missing() -> None:
    assert evaluate(compile_value("{{ user.unknown }}"), SCOPE) is MISSING


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{% if user.vip %}yes{% endif %}", "not {% %} blocks"),
        ("{{ user.vip", "expression syntax error"),
        ("{{ nope }}", "unknown name 'nope'"),
        ("{{ range(3) }}", "function calls are not allowed"),
    ],
)
def test_rejected_values(source: str, message: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_value(source)
    assert message in caught.value.message
