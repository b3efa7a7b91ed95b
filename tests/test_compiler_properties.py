"""Whatever a marketer types, the compiler answers with diagnostics, never with an exception."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nurture.language import ir
from nurture.language.compiler import Settings, compile_text, load_settings
from nurture.language.diagnostics import DiagnosticSink
from nurture.language.templates import TemplateStore

ROOT = Path(__file__).parents[1]
# The samples name the project's topics, which nurture.yaml declares.
PROJECT_SETTINGS = load_settings(ROOT / "nurture.yaml", DiagnosticSink())
SAMPLES = {path.stem: path.read_text(encoding="utf-8") for path in sorted((ROOT / "journeys").glob("*.yaml"))}
STORE = TemplateStore(ROOT / "templates")

FAST = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

KEYS = [
    "journey", "name", "description", "trigger", "event", "if", "key", "re_entry", "goal", "within",
    "exit", "exit_on", "timezone", "quiet_hours", "start", "end", "steps", "id", "wait", "wait_until",
    "days", "send", "template", "fallback", "category", "wait_for", "timeout", "then", "else",
    "branch", "split", "variants", "weight", "update", "a", "b", "<<",
]  # fmt: skip
WORDS = [
    "welcome", "welcome_coupon", "cart_reminder", "Signed Up", "Order Completed", "email", "sms",
    "wechat", "emial", "fax", "marketing", "transactional", "restart", "once", "after_exit", "1h",
    "1d12h", "0s", "1x", "30m", "2w", "10:00", "25:00", "21:00", "mon", "mnday", "Asia/Shanghai",
    "Mars/Base", "{{", "}}", "{{ user.vip }}", "{% if %}", "if", "user.vip", "usr.vip",
    "event.properties.total > 0", "event.properties.total >", "user.__class__", "range(3)",
    "user.name | shout", "x | length", "../etc", ".hidden", "a/b", "", " ", "id", "s1", "done",
]  # fmt: skip
TOKENS = (
    KEYS + WORDS + [":", "- ", "-", "[", "]", "{", "}", ",", "'", '"', "#", "&a", "*a", "!!str", "|", ">"]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(WORDS),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)
durations = st.one_of(
    st.sampled_from(["1s", "30m", "1h", "1d12h", "2w"]),
    st.builds("{}{}".format, st.integers(min_value=1, max_value=999), st.sampled_from("smhdw")),
)
conditions = st.sampled_from(
    [
        "user.vip",
        "event.properties.total > 0",
        "not user.unsubscribed and event.properties.plan in ['pro', 'team']",
        "user.tags | length >= 2",
        "user.email is defined",
    ]
)
good_step: st.SearchStrategy[dict[str, Any]] = st.deferred(
    lambda: st.one_of(
        st.fixed_dictionaries({"wait": durations}),
        st.fixed_dictionaries(
            {"wait_until": st.sampled_from(["00:00", "9:30", "23:59"])},
            optional={"days": st.lists(st.sampled_from(ir.WEEKDAYS), min_size=1, max_size=3)},
        ),
        st.fixed_dictionaries(
            {"send": st.just("email"), "template": st.sampled_from(["welcome", "cart_reminder"])},
            optional={"category": st.sampled_from(["marketing", "transactional"])},
        ),
        st.fixed_dictionaries(
            {"send": st.just("sms"), "template": st.just("welcome_coupon")},
            optional={"fallback": st.just(["wechat"])},
        ),
        st.fixed_dictionaries(
            {"wait_for": st.just("Order Completed"), "timeout": durations},
            optional={
                "if": conditions,
                "then": st.lists(good_step, max_size=2),
                "else": st.lists(good_step, max_size=2),
            },
        ),
        st.fixed_dictionaries(
            {
                "branch": st.lists(
                    st.fixed_dictionaries({"if": conditions, "then": st.lists(good_step, max_size=2)}),
                    min_size=1,
                    max_size=2,
                )
            }
        ),
        st.fixed_dictionaries(
            {
                "split": st.just("subject_test"),
                "variants": st.fixed_dictionaries(
                    {
                        "a": st.fixed_dictionaries(
                            {"weight": st.integers(min_value=1, max_value=100)},
                            optional={"steps": st.lists(good_step, max_size=2)},
                        ),
                        "b": st.fixed_dictionaries({"weight": st.integers(min_value=0, max_value=100)}),
                    }
                ),
            }
        ),
        st.fixed_dictionaries(
            {
                "update": st.dictionaries(
                    st.sampled_from(["vip", "last_cart", "score"]),
                    st.one_of(
                        st.integers(),
                        st.booleans(),
                        st.sampled_from(["{{ event.properties.cart_id }}", "Hi {{ user.first_name }}"]),
                    ),
                    min_size=1,
                )
            }
        ),
    )
)
well_formed = st.fixed_dictionaries(
    {
        "journey": st.just("welcome"),
        "trigger": st.fixed_dictionaries({"event": st.just("Signed Up")}, optional={"if": conditions}),
        "steps": st.lists(good_step, min_size=1, max_size=4),
    },
    optional={
        "re_entry": st.sampled_from(["after_exit", "restart", "once"]),
        "goal": st.fixed_dictionaries({"event": st.just("Order Completed")}, optional={"within": durations}),
        "exit_on": st.lists(st.fixed_dictionaries({"event": st.just("Unsubscribed")}), max_size=2),
        "timezone": st.sampled_from(["UTC", "Asia/Shanghai", "America/New_York"]),
        "quiet_hours": st.just({"start": "21:00", "end": "08:00"}),
        "key": st.just("event.properties.cart_id"),
    },
)
steps = st.one_of(good_step, st.dictionaries(st.sampled_from(KEYS), documents, min_size=1, max_size=4))
journey_like = st.fixed_dictionaries(
    {
        "journey": st.sampled_from(["welcome", "Welcome", "other", 3]),
        "trigger": st.one_of(st.fixed_dictionaries({"event": st.sampled_from(WORDS)}), documents),
        "steps": st.lists(st.one_of(steps, documents), max_size=5),
    },
    optional={key: documents for key in ("goal", "exit_on", "timezone", "quiet_hours", "key", "re_entry")},
)


def compile_checked(text: str, name: str = "welcome") -> None:
    """Compile ``text``; whatever the outcome, the diagnostics must be well formed."""
    path = f"journeys/{name}.yaml"
    sink = DiagnosticSink()
    journey = compile_text(text, path, STORE, Settings(), sink)
    if journey is None:
        assert sink.errors, "compile failed without saying why"
    else:
        assert sink.errors == []
        assert isinstance(journey, ir.Journey)
        ids = [step.id for step in ir.walk(journey.steps)]
        assert ids and all(isinstance(i, str) and i for i in ids)
    lines = len(text.splitlines())
    for diagnostic in sink.items:
        assert isinstance(diagnostic.message, str) and diagnostic.message.strip()
        assert diagnostic.line >= 0 and diagnostic.column >= 0
        if diagnostic.path == path:
            assert diagnostic.line <= lines + 1, diagnostic.headline()
        assert diagnostic.headline().startswith(diagnostic.path)


def dump(document: Any) -> str:
    return yaml.safe_dump(document, allow_unicode=True, sort_keys=False)


@FAST
@given(documents)
def test_any_yaml_document_gives_diagnostics_not_exceptions(document: Any) -> None:
    compile_checked(dump(document))


@FAST
@given(well_formed)
def test_well_formed_journeys_compile_and_round_trip_through_json(document: dict[str, Any]) -> None:
    text = dump(document)
    sink = DiagnosticSink()
    journey = compile_text(text, "journeys/welcome.yaml", STORE, Settings(), sink)
    assert sink.items == [], [d.headline() for d in sink.items]
    assert journey is not None

    back = ir.journey_from_dict(json.loads(json.dumps(ir.journey_to_dict(journey))))
    assert back == journey
    again = compile_text(text, "elsewhere/welcome.yaml", STORE, Settings(), DiagnosticSink())
    assert again is not None and again.version == journey.version
    ids = [step.id for step in ir.walk(journey.steps)]
    assert len(ids) == len(set(ids))


@FAST
@given(journey_like)
def test_any_journey_shaped_document_gives_diagnostics_not_exceptions(document: dict[str, Any]) -> None:
    compile_checked(dump(document))


@FAST
@given(st.text(max_size=300))
def test_any_text_gives_diagnostics_not_exceptions(text: str) -> None:
    compile_checked(text)


lines_of_tokens = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=6), st.lists(st.sampled_from(TOKENS), min_size=1, max_size=4)
    ),
    max_size=12,
)


@FAST
@given(lines_of_tokens)
def test_any_lines_of_journey_words_give_diagnostics_not_exceptions(
    lines: list[tuple[int, list[str]]],
) -> None:
    compile_checked("\n".join(" " * indent + " ".join(words) for indent, words in lines))


# --- mutations of the sample journeys --------------------------------------------------------------

_TOKEN = re.compile(r"[\w./:{}|<>-]+")


def _delete(lines: list[str], data: st.DataObject) -> list[str]:
    index = data.draw(st.integers(0, len(lines) - 1))
    return lines[:index] + lines[index + 1 :]


def _duplicate(lines: list[str], data: st.DataObject) -> list[str]:
    index = data.draw(st.integers(0, len(lines) - 1))
    return lines[: index + 1] + lines[index:]


def _swap(lines: list[str], data: st.DataObject) -> list[str]:
    first = data.draw(st.integers(0, len(lines) - 1))
    second = data.draw(st.integers(0, len(lines) - 1))
    out = list(lines)
    out[first], out[second] = out[second], out[first]
    return out


def _indent(lines: list[str], data: st.DataObject) -> list[str]:
    index = data.draw(st.integers(0, len(lines) - 1))
    prefix = data.draw(st.sampled_from(["", " ", "  ", "    ", "\t", "  \t"]))
    out = list(lines)
    stripped = out[index].lstrip()
    if data.draw(st.booleans()):
        out[index] = prefix + out[index]
    else:
        out[index] = prefix + stripped
    return out


def _replace_token(lines: list[str], data: st.DataObject) -> list[str]:
    index = data.draw(st.integers(0, len(lines) - 1))
    line = lines[index]
    spans = [m.span() for m in _TOKEN.finditer(line)]
    if not spans:
        return lines
    start, end = data.draw(st.sampled_from(spans))
    new = data.draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=6)))
    out = list(lines)
    out[index] = line[:start] + new + line[end:]
    return out


def _truncate(lines: list[str], data: st.DataObject) -> list[str]:
    text = "\n".join(lines)
    cut = data.draw(st.integers(0, len(text)))
    return text[:cut].split("\n")


MUTATIONS = {
    "delete": _delete,
    "duplicate": _duplicate,
    "swap": _swap,
    "indent": _indent,
    "replace_token": _replace_token,
    "truncate": _truncate,
}


@settings(FAST, max_examples=300)
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_mutated_sample_journeys_give_diagnostics_not_exceptions(name: str, data: st.DataObject) -> None:
    lines = SAMPLES[name].split("\n")
    for kind in data.draw(
        st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3), label="mutations"
    ):
        if not lines:
            break
        lines = MUTATIONS[kind](lines, data)
    compile_checked("\n".join(lines), name)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_unmutated_samples_compile(name: str) -> None:
    """The mutation test starts from valid journeys, so any error it sees comes from a mutation."""
    sink = DiagnosticSink()
    journey = compile_text(SAMPLES[name], f"journeys/{name}.yaml", STORE, PROJECT_SETTINGS, sink)
    assert sink.errors == []
    assert journey is not None and journey.id == name


def test_samples_are_the_project_journeys() -> None:
    assert sorted(SAMPLES) == ["cart_abandonment", "chat_recovery", "course_launch", "post_purchase", "welcome_series"]


# --- inputs found to crash the compiler; kept as regressions ---------------------------------------

HEADER = "journey: welcome\ntrigger:\n  event: Signed Up\n"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(HEADER + "steps:\n  - wait: 2020-13-45\n", id="impossible-date-scalar"),
        pytest.param(HEADER + "steps:\n  - wait: 1d\n    at: 2026-02-30 10:00:00\n", id="impossible-timestamp-scalar"),
        pytest.param("journey: welcome\ntrigger: &t\n  event: Signed Up\n  again: *t\nsteps:\n  - wait: 1d\n", id="recursive-alias-mapping"),
        pytest.param(HEADER + "steps: &s\n  - wait: 1d\n  - *s\n", id="recursive-alias-list"),
        pytest.param(HEADER + "steps:\n  - wait: 1d\x0b\n", id="control-character"),
        pytest.param(HEADER + "steps:\n  - wait: 1d\n'[key]': 1\n", id="key-spelled-like-a-pydantic-marker"),
        pytest.param(HEADER + "steps:\n  - send: email\n    template: ../welcome\n", id="template-name-with-a-slash"),
        pytest.param(HEADER + "steps:\n  - send: sms\n    template: .hidden\n", id="template-name-with-a-leading-dot"),
    ],
)  # fmt: skip
def test_hostile_input_gives_diagnostics_not_exceptions(text: str) -> None:
    sink = DiagnosticSink()
    journey = compile_text(text, "journeys/welcome.yaml", STORE, Settings(), sink)
    assert journey is None
    assert sink.errors
    assert all(d.line >= 1 for d in sink.errors), [d.headline() for d in sink.errors]


def test_a_deeply_nested_expression_compiles_or_is_reported() -> None:
    """Either outcome is fine; an exception (today a RecursionError from 100 parentheses) is not."""
    text = HEADER + '  if: "' + "(" * 100 + "user.vip" + ")" * 100 + '"\nsteps:\n  - wait: 1d\n'
    sink = DiagnosticSink()
    journey = compile_text(text, "journeys/welcome.yaml", STORE, Settings(), sink)
    if journey is None:
        assert [d.line for d in sink.errors] == [4]
    else:
        assert sink.errors == []
