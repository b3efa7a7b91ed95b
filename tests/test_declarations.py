"""Declared traits and events: reads of undeclared names are compile errors at their place, with
"did you mean"; an undeclared project compiles as before and `nurture validate` lists what it
reads; with `enforce_declarations`, the event API refuses calls that contradict the declarations.
Scenario files are held to the same declarations: what they give people and send.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support import new_user, rows
from temporalio.client import Client
from test_api import Api, serving

from nurture.cli.main import main
from nurture.language.compiler import CompileResult, Project, compile_project, load_project
from nurture.language.diagnostics import CompileError, Diagnostic
from nurture.language.schema import Declarations, Declared, value_problem
from nurture.simulation.scenarios import Scenario, load_scenario, scenario_files
from nurture.storage.db import Database
from nurture.storage.models import EventRecord, ProfileRecord

ROOT = Path(__file__).resolve().parent.parent

DECLARATIONS = """\
traits:
  first_name: {type: string, example: Mei}
  vip: boolean
  age: {type: integer, description: "Whole years."}
  plan: string
  birthday: {type: date, example: 1990-05-01}
events:
  Cart Updated:
    properties:
      cart_id: {type: string, required: true}
      item_count: integer
  Order Completed:
    properties:
      order_id: {type: string, required: true}
      total: number
  Signed Up:
"""

JOURNEY = """\
journey: welcome
trigger:
  event: Cart Updated
  if: "event.properties.item_count > 0"
key: "event.properties.cart_id"
goal:
  event: Order Completed
  if: "event.properties.total > 0"
exit_on:
  - event: Signed Up
steps:
  - wait_for: Order Completed
    if: "event.properties.order_id != ''"
    timeout: 1h
    then:
      - update: {plan: pro, vip: true, age: "{{ user.age + 1 }}"}
  - branch:
      - if: "user.vip and last_event.properties.total > 10 and user.group.id and user.id"
        then:
          - send: sms
            template: hello
  - send: email
    template: welcome
"""

HELLO_SMS = "Hi {{ user.first_name }}, cart {{ event.properties.cart_id }}\n"

WELCOME_MJML = """\
---
subject: "Welcome, {{ user.first_name | default('friend') }}"
---
<mjml>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-text>{% if user.vip %}Thanks for being a member.{% endif %} {{ user['plan'] }}</mj-text>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
"""


def make_project(
    root: Path,
    *,
    journey: str = JOURNEY,
    config: str | None = DECLARATIONS,
    sms: str = HELLO_SMS,
    email: str = WELCOME_MJML,
) -> Path:
    (root / "journeys").mkdir(exist_ok=True)
    (root / "journeys" / "welcome.yaml").write_text(journey, encoding="utf-8")
    for channel in ("email", "sms"):
        (root / "templates" / channel).mkdir(parents=True, exist_ok=True)
    (root / "templates" / "sms" / "hello.txt").write_text(sms, encoding="utf-8")
    (root / "templates" / "email" / "welcome.mjml").write_text(email, encoding="utf-8")
    if config is not None:
        (root / "nurture.yaml").write_text(config, encoding="utf-8")
    return root


def compiled(root: Path, *, report_undeclared: bool = False) -> CompileResult:
    return compile_project(root / "journeys", root / "templates", report_undeclared=report_undeclared)


def test_the_base_project_compiles_with_its_declarations(tmp_path: Path) -> None:
    result = compiled(make_project(tmp_path), report_undeclared=True)

    assert result.diagnostics == []
    assert result.project is not None
    declared = result.project.settings.declarations
    assert declared.traits is not None and declared.traits["birthday"] == Declared("date", example="1990-05-01")
    assert declared.events is not None and declared.events["Order Completed"]["order_id"].required
    assert "email" in declared.traits and "Page Viewed" in declared.events  # built in


@dataclass(frozen=True)
class Case:
    id: str
    old: str
    """Text of the base journey to replace (the first occurrence)."""
    new: str
    line: int
    column: int
    message: str
    key: str = ""


CASES = [
    Case("trait-in-branch", "user.vip and", "user.vipp and", 18, 19, "unknown trait 'vipp' (did you mean 'vip'?)"),
    Case(
        "trait-by-subscript",
        "and user.id",
        "and user['frist_name']",
        18,
        88,
        "unknown trait 'frist_name' (did you mean 'first_name'?)",
    ),
    Case(
        "property-in-trigger-if",
        "item_count > 0",
        "item_cont > 0",
        4,
        25,
        "event 'Cart Updated' has no property 'item_cont' (did you mean 'item_count'?)",
        key="trigger.if",
    ),
    Case("property-in-key", '"event.properties.cart_id"', '"event.properties.cart_idd"', 5, 24, "'cart_idd'", "key"),
    Case(
        "goal-if-reads-the-goal-event",
        "total > 0",
        "totl > 0",
        8,
        25,
        "event 'Order Completed' has no property 'totl' (did you mean 'total'?)",
        key="goal.if",
    ),
    Case(
        "goal-value-reads-the-goal-event",
        '  if: "event.properties.total > 0"\n',
        '  if: "event.properties.total > 0"\n  value: "event.properties.amount"\n',
        9,
        28,
        "event 'Order Completed' has no property 'amount'; it declares order_id, total",
        key="goal.value",
    ),
    Case(
        "wait-for-if-reads-the-awaited-event",
        "order_id != ''",
        "cart_id != ''",
        13,
        27,
        "event 'Order Completed' has no property 'cart_id'; it declares order_id, total",
        key="steps[0].if",
    ),
    Case(
        "last-event-reads-the-awaited-events",
        "last_event.properties.total",
        "last_event.properties.totals",
        18,
        49,
        "event 'Order Completed' has no property 'totals' (did you mean 'total'?)",
    ),
    Case(
        "event-field",
        "event.properties.item_count > 0",
        "event.propertes.item_count > 0",
        4,
        14,
        "'propertes' is not part of an event (did you mean 'properties'?)",
    ),
    Case(
        "unknown-trigger-event",
        "event: Cart Updated",
        "event: Cart Updatd",
        3,
        10,
        "unknown event 'Cart Updatd' (did you mean 'Cart Updated'?): declare it under events:",
        key="trigger.event",
    ),
    Case(
        "unknown-wait-for-event",
        "wait_for: Order Completed",
        "wait_for: Order Complete",
        12,
        15,
        "unknown event 'Order Complete' (did you mean 'Order Completed'?)",
    ),
    Case(
        "unknown-exit-on-event",
        "event: Signed Up",
        "event: Signed Upp",
        10,
        12,
        "unknown event 'Signed Upp' (did you mean 'Signed Up'?)",
        key="exit_on[0].event",
    ),
    Case(
        "exit-on-if-reads-its-own-event",
        "  - event: Signed Up\n",
        "  - event: Signed Up\n    if: \"event.properties.source == 'web'\"\n",
        11,
        27,
        "event 'Signed Up' has no property 'source': declare it under events: 'Signed Up': properties:",
        key="exit_on[0].if",
    ),
    Case(
        "update-of-an-undeclared-trait",
        "update: {plan: pro",
        "update: {plna: pro",
        16,
        18,
        "unknown trait 'plna' (did you mean 'plan'?)",
        key="steps[0].then[0].update.plna",
    ),
    Case(
        "update-value-of-the-wrong-type",
        "vip: true",
        'vip: "yes"',
        16,
        34,
        "trait 'vip' is declared with type boolean: expected true or false, got 'yes' (text)",
    ),
    Case(
        "read-in-an-update-value",
        "user.age + 1",
        "user.ag + 1",
        16,
        54,
        "unknown trait 'ag' (did you mean 'age'?)",
    ),
    Case(
        "number-compared-with-text",
        "item_count > 0",
        "item_count > '0'",
        4,
        8,
        "event.properties.item_count is declared with type integer but is compared with '0' (text): "
        "compare it with a whole number",
    ),
    Case(
        "boolean-compared-with-text",
        "user.vip and",
        "user.vip == 'yes' and",
        18,
        14,
        "user.vip is declared with type boolean but is compared with 'yes' (text)",
    ),
    Case(
        "text-in-a-list-of-numbers",
        "user.vip and",
        "user.plan in ['free', 2] and",
        18,
        14,
        "user.plan is declared with type string but is compared with 2 (a number)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_an_undeclared_name_is_reported_at_its_place(case: Case, tmp_path: Path) -> None:
    assert case.old in JOURNEY
    result = compiled(make_project(tmp_path, journey=JOURNEY.replace(case.old, case.new, 1)))

    assert result.project is None
    [error] = result.errors
    assert (Path(error.path).name, error.line, error.column) == ("welcome.yaml", case.line, case.column), error
    assert case.message in error.message, error.message
    if case.key:
        assert error.key == case.key


TEMPLATE_CASES = [
    ("sms", "Hi {{ user.frist_name }}\n", 1, 12, "unknown trait 'frist_name' (did you mean 'first_name'?)"),
    (
        "sms",
        "Hi {{ user.first_name }},\n{{ event.properties.cart_idd }}\n",
        2,
        21,
        "event 'Cart Updated' (the trigger of journey welcome) has no property 'cart_idd' (did you mean 'cart_id'?)",
    ),
    ("sms", "{{ event.nme }}\n", 1, 10, "'nme' is not part of an event (did you mean 'name'?)"),
    ("email", WELCOME_MJML.replace("{% if user.vip %}", "{% if user.vipp %}"), 8, 29, "unknown trait 'vipp'"),
    ("email", WELCOME_MJML.replace("user['plan']", "user['plna']"), 8, 82, "unknown trait 'plna' (did you mean 'plan'?)"),
    ("email", WELCOME_MJML.replace("user.first_name |", "user.firstname |"), 2, 28, "unknown trait 'firstname'"),
]


@pytest.mark.parametrize(("channel", "text", "line", "column", "message"), TEMPLATE_CASES)
def test_an_undeclared_name_in_a_template_is_reported_in_the_template(
    tmp_path: Path, channel: str, text: str, line: int, column: int, message: str
) -> None:
    files = {"sms": text} if channel == "sms" else {"email": text}
    result = compiled(make_project(tmp_path, **files))

    assert result.project is None
    [error] = result.errors
    expected = tmp_path / "templates" / channel / ("hello.txt" if channel == "sms" else "welcome.mjml")
    assert (error.path, error.line, error.column) == (str(expected), line, column), error
    assert message in error.message


def test_a_template_read_through_another_name_is_not_followed(tmp_path: Path) -> None:
    sms = "{% set person = user %}{{ person.anything }} {% for tag in user.tags %}{{ tag }}{% endfor %}\n"
    result = compiled(make_project(tmp_path, sms=sms))

    [error] = result.errors
    assert "unknown trait 'tags'" in error.message and error.column == sms.index("tags") + 1


NURTURE_YAML_CASES = [
    ("bad-type", "  vip: boolean\n", "  vip: bool\n", 3, "'bool' (text) is not allowed (did you mean 'boolean'?)"),
    (
        "example-of-another-type",
        "  first_name: {type: string, example: Mei}\n",
        "  first_name: {type: string, example: 3}\n",
        2,
        "the example does not fit type string: expected text, got 3 (a number)",
    ),
    (
        "bad-date-example",
        "{type: date, example: 1990-05-01}",
        "{type: date, example: 1990-13-01}",
        6,
        "expected a date written YYYY-MM-DD",
    ),
    ("unknown-key", "{type: integer, description:", "{type: integer, descripton:", 4, "(did you mean 'description'?)"),
    ("builtin-id", "  plan: string\n", "  id: string\n", 5, "'id' is built in (user.id) and cannot be declared"),
    ("builtin-type", "  plan: string\n", "  plan: string\n  email: number\n", 2, "'email' is built in as string"),
    ("missing-type", "  plan: string\n", "  plan: {example: pro}\n", 5, "'type' is required (one of string, number"),
    (
        "property-unknown-key",
        "{type: string, required: true}\n      item_count",
        "{type: string, requird: true}\n      item_count",
        10,
        "unknown key 'requird' (did you mean 'required'?)",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "line", "message"), [c[1:] for c in NURTURE_YAML_CASES], ids=[c[0] for c in NURTURE_YAML_CASES]
)
def test_a_bad_declaration_is_reported_in_nurture_yaml(
    tmp_path: Path, old: str, new: str, line: int, message: str
) -> None:
    assert old in DECLARATIONS
    result = compiled(make_project(tmp_path, config=DECLARATIONS.replace(old, new, 1)))

    matching = [d for d in result.errors if message in d.message]
    assert matching, [d.headline() for d in result.diagnostics]
    assert Path(matching[0].path).name == "nurture.yaml" and matching[0].line == line


def test_enforcing_needs_something_declared(tmp_path: Path) -> None:
    result = compiled(make_project(tmp_path, config="timezone: UTC\nenforce_declarations: true\n"))

    [error] = result.errors
    assert Path(error.path).name == "nurture.yaml" and error.line == 1
    assert error.message == "enforce_declarations needs traits: or events: to enforce: declare them"


def test_an_undeclared_project_compiles_and_validate_lists_what_it_reads(tmp_path: Path) -> None:
    make_project(tmp_path, config=None, journey=JOURNEY.replace("user.vip and", "user.vipp and"))

    assert compiled(tmp_path).diagnostics == []  # nothing declared: nothing checked, nothing said
    result = compiled(tmp_path, report_undeclared=True)

    assert result.project is not None and result.errors == []
    traits, events = result.diagnostics
    assert traits.severity == events.severity == "warning"
    assert traits.message == (
        "no traits are declared, so these reads are not checked: user.age, user.first_name, user.plan, "
        "user.vip, user.vipp (declare them under traits: in nurture.yaml)"
    )
    assert events.message.startswith("no events are declared, so these names and properties are not checked: ")
    assert "Cart Updated (cart_id, item_count); Order Completed (order_id, total); Signed Up" in events.message

    answer = CliRunner().invoke(
        main, ["validate", "--journeys", str(tmp_path / "journeys"), "--templates", str(tmp_path / "templates")]
    )
    assert answer.exit_code == 0, answer.output
    assert "warning: no traits are declared" in answer.output and "1 journeys valid." in answer.output


def test_declared_traits_leave_undeclared_events_listed(tmp_path: Path) -> None:
    config = DECLARATIONS[: DECLARATIONS.index("events:")]
    result = compiled(make_project(tmp_path, config=config), report_undeclared=True)

    assert result.project is not None
    [warning] = result.diagnostics
    assert warning.message.startswith("no events are declared") and warning.path.endswith("nurture.yaml")


def test_the_example_project_is_declared_in_full() -> None:
    """Every journey and template of the repository compiles against its nurture.yaml's
    declarations, which leave nothing read undeclared."""
    result = compile_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml", report_undeclared=True)

    assert result.diagnostics == []
    assert result.project is not None and len(result.project.journeys) >= 5
    assert result.project.settings.declarations.traits is not None


@pytest.mark.parametrize(
    ("kind", "good", "bad", "message"),
    [
        ("string", "Mei", 3, "expected text, got 3 (a number)"),
        ("number", 2.5, "2.5", "expected a number, got '2.5' (text)"),
        ("number", 3, True, "expected a number, got true (a boolean)"),
        ("integer", 4.0, 4.5, "expected a whole number, got 4.5 (a number)"),
        ("boolean", False, 0, "expected true or false, got 0 (a number)"),
        ("date", "2026-02-28", "2026-02-30", "expected a date written YYYY-MM-DD"),
        ("date", "2024-02-29", "2026-03-02T10:00:00Z", "expected a date written YYYY-MM-DD"),
        ("datetime", "2026-03-02T10:00:00Z", "2026-03-02", "expected a date and time in ISO 8601"),
        ("datetime", "2026-03-02T10:00:00+08:00", "yesterday", "expected a date and time in ISO 8601"),
        ("list", ["a"], "a", "expected a list"),
        ("object", {"a": 1}, ["a"], "expected an object, got a list"),
    ],
)
def test_value_types(kind: str, good: Any, bad: Any, message: str) -> None:
    assert value_problem(kind, good) is None
    assert value_problem(kind, None) is None  # null is no value, of any type
    problem = value_problem(kind, bad)
    assert problem is not None and problem.startswith(message)


# --- the event API with enforce_declarations ---------------------------------------------------


@pytest.fixture(scope="module")
def enforced(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The example project with its declarations enforced."""
    config = tmp_path_factory.mktemp("enforced") / "nurture.yaml"
    text = (ROOT / "nurture.yaml").read_text(encoding="utf-8")
    assert "# enforce_declarations: true" in text
    config.write_text(text.replace("# enforce_declarations: true", "enforce_declarations: true"), encoding="utf-8")
    project = load_project(ROOT / "journeys", ROOT / "templates", config)
    assert project.settings.declarations == Declarations.build(
        project.settings.declarations.traits, project.settings.declarations.events, enforce=True
    )
    return project


@pytest.fixture(scope="session")
async def temporal_client(dev_server: str) -> Client:
    return await Client.connect(dev_server)


@pytest.fixture
async def api(project: Project, database: Database, temporal_client: Client) -> AsyncIterator[Api]:
    async with serving(project, database, temporal_client) as api:
        yield api


@pytest.fixture
async def enforcing(enforced: Project, database: Database, temporal_client: Client) -> AsyncIterator[Api]:
    async with serving(enforced, database, temporal_client) as api:
        yield api


REFUSED = [
    (
        "wrong-type",
        "/v1/track",
        {"event": "Order Completed", "properties": {"order_id": "o1", "total": "12"}},
        {"properties.total": "expected a number, got '12' (text)"},
    ),
    (
        "missing-required",
        "/v1/track",
        {"event": "Order Completed", "properties": {"total": 12}},
        {"properties.order_id": "'Order Completed' requires order_id (string)"},
    ),
    (
        "null-required",
        "/v1/track",
        {"event": "Cart Updated", "properties": {"cart_id": None, "item_count": 1.5}},
        {
            "properties.cart_id": "'Cart Updated' requires cart_id (string)",
            "properties.item_count": "expected a whole number, got 1.5 (a number)",
        },
    ),
    ("page", "/v1/page", {"name": "Pricing", "properties": {"url": 7}}, {"properties.url": "expected text, got 7"}),
    (
        "identify",
        "/v1/identify",
        {"traits": {"vip": "yes", "first_name": "Mei", "phone": 8613800138000}},
        {"traits.vip": "expected true or false, got 'yes' (text)", "traits.phone": "expected text"},
    ),
]


@pytest.mark.parametrize(("path", "body", "detail"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
async def test_a_call_contradicting_the_declarations_is_refused(
    enforcing: Api, path: str, body: dict[str, Any], detail: dict[str, str]
) -> None:
    user = new_user()

    answer = await enforcing.post(path, {"userId": user, **body})

    assert answer.status_code == 400, answer.text
    fields = {d["field"]: d["message"] for d in answer.json()["detail"]}
    assert set(fields) == set(detail)
    for field, words in detail.items():
        assert words in fields[field], fields
    assert rows(enforcing.db, EventRecord, user_id=user) == []
    assert rows(enforcing.db, ProfileRecord, user_id=user) == []


async def test_in_a_batch_only_the_contradicting_item_is_refused(enforcing: Api) -> None:
    user = new_user()
    batch = [
        {"type": "identify", "userId": user, "traits": {"vip": True, "favourite_colour": 3}},
        {"type": "track", "userId": user, "event": "Cart Emptied", "properties": {}},
        {"type": "track", "userId": user, "event": "Something Undeclared", "properties": {"x": 1}},
        {"type": "track", "userId": user, "event": "Cart Emptied", "properties": {"cart_id": "c1", "extra": [1]}},
    ]

    answer = await enforcing.post("/v1/batch", {"batch": batch})

    assert answer.status_code == 200, answer.text
    [refused] = answer.json()["refused"]
    assert refused["index"] == 1
    assert refused["detail"] == [
        {"field": "batch[1].properties.cart_id", "message": "'Cart Emptied' requires cart_id (string)"}
    ]
    tracked = sorted(e.name for e in rows(enforcing.db, EventRecord, user_id=user, kind="track"))
    assert tracked == ["Cart Emptied", "Something Undeclared"]
    [profile] = rows(enforcing.db, ProfileRecord, user_id=user)
    assert profile.traits == {"vip": True, "favourite_colour": 3}  # an undeclared trait is taken as is


async def test_without_enforcement_the_same_call_is_accepted(api: Api) -> None:
    user = new_user()

    answer = await api.post(
        "/v1/track", {"userId": user, "event": "Cart Updated", "properties": {"item_count": "2"}}
    )

    assert answer.status_code == 200, answer.text
    assert [e.name for e in rows(api.db, EventRecord, user_id=user, kind="track")] == ["Cart Updated"]


def test_enforcement_is_off_unless_nurture_yaml_asks(project: Project) -> None:
    assert project.settings.declarations.enforce is False
    assert project.settings.declarations.events is not None




# --- scenario files ----------------------------------------------------------------------------

SCENARIO = """\
scenario: what a scenario gives people and sends is declared
start: 2026-03-02T10:00:00Z
journeys: [welcome]
users:
  u1: {email: u1@example.com, first_name: Mei, vip: false, opted_out: [sms]}
events:
  - {at: 0s, user: u1, identify: {plan: pro, age: 30, birthday: "1990-05-01", opted_out: []}}
  - {at: 1h, user: u1, event: Cart Updated, properties: {cart_id: c1, item_count: 2}}
  - {at: 2h, user: u1, event: Order Completed, properties: {order_id: o1, total: 12.5}}
  - {at: 3h, user: u1, event: Page Viewed, properties: {path: /pricing}}
  - {at: 4h, user: u1, group: g1, traits: {seats: 12}}
"""

POPULATION = """\
scenario: generated people and events are declared too
start: 2026-03-02T10:00:00Z
journeys: [welcome]
population:
  count: 3
  traits: {first_name: "Mei {n}", age: 20..60, vip: [true, false]}
  events:
    - {event: Cart Updated, at: 0s..1h, properties: {cart_id: "c{n}", item_count: [1, 2]}}
"""


@dataclass(frozen=True)
class ScenarioCase:
    id: str
    old: str
    new: str
    point: str
    """Where in the changed line the error points: its first occurrence there."""
    key: str
    message: str
    text: str = SCENARIO


SCENARIO_CASES = [
    ScenarioCase(
        "user-trait",
        "first_name: Mei",
        "frist_name: Mei",
        "frist_name",
        "users.u1.frist_name",
        "unknown trait 'frist_name' (did you mean 'first_name'?): declare it under traits: in nurture.yaml",
    ),
    ScenarioCase(
        "user-trait-type",
        "vip: false",
        'vip: "no"',
        '"no"',
        "users.u1.vip",
        "trait 'vip' is declared with type boolean: expected true or false, got 'no' (text)",
    ),
    ScenarioCase(
        "identify-trait", "age: 30", "ag: 30", "ag:", "events[0].identify.ag", "unknown trait 'ag' (did you mean 'age'?)"
    ),
    ScenarioCase(
        "identify-trait-type",
        "age: 30",
        "age: thirty",
        "thirty",
        "events[0].identify.age",
        "trait 'age' is declared with type integer: expected a whole number, got 'thirty' (text)",
    ),
    ScenarioCase(
        "identify-bad-date",
        '"1990-05-01"',
        '"1990-02-30"',
        '"1990-02-30"',
        "events[0].identify.birthday",
        "trait 'birthday' is declared with type date: expected a date written YYYY-MM-DD, got '1990-02-30' (text)",
    ),
    ScenarioCase(
        "identify-unquoted-date",
        '"1990-05-01"',
        "1990-05-01",
        "1990-05-01",
        "events[0].identify.birthday",
        "got 1990-05-01 unquoted (YAML reads it as a date, not as text: write it in quotes)",
    ),
    ScenarioCase(
        "event-name",
        "event: Order Completed",
        "event: Order Complete",
        "Order Complete",
        "events[2].event",
        "unknown event 'Order Complete' (did you mean 'Order Completed'?): declare it under events: in nurture.yaml",
    ),
    ScenarioCase(
        "property",
        "cart_id: c1",
        "cart_idd: c1, cart_id: c1",
        "cart_idd",
        "events[1].properties.cart_idd",
        "event 'Cart Updated' has no property 'cart_idd' (did you mean 'cart_id'?): "
        "declare it under events: 'Cart Updated': properties: in nurture.yaml",
    ),
    ScenarioCase(
        "property-type",
        "item_count: 2",
        'item_count: "2"',
        '"2"',
        "events[1].properties.item_count",
        "property 'item_count' is declared with type integer: expected a whole number, got '2' (text)",
    ),
    ScenarioCase(
        "builtin-event-property",
        "path: /pricing",
        "pth: /pricing",
        "pth",
        "events[3].properties.pth",
        "event 'Page Viewed' has no property 'pth' (did you mean 'path'?)",
    ),
    ScenarioCase(
        "population-trait",
        "age: 20..60",
        "agee: 20..60",
        "agee",
        "population.traits.agee",
        "unknown trait 'agee' (did you mean 'age'?)",
        POPULATION,
    ),
    ScenarioCase(
        "population-trait-range",
        "age: 20..60",
        "age: 20.5..60",
        "20.5..60",
        "population.traits.age",
        "trait 'age' is declared with type integer: expected a whole number, got ",
        POPULATION,
    ),
    ScenarioCase(
        "population-event",
        "event: Cart Updated",
        "event: Cart Update",
        "Cart Update",
        "population.events[0].event",
        "unknown event 'Cart Update' (did you mean 'Cart Updated'?)",
        POPULATION,
    ),
    ScenarioCase(
        "population-property-choice",
        "item_count: [1, 2]",
        "item_count: [1, two]",
        "[1, two]",
        "population.events[0].properties.item_count",
        "property 'item_count' is declared with type integer: expected a whole number, got 'two' (text)",
        POPULATION,
    ),
]


def write_scenario(root: Path, text: str) -> Path:
    (root / "journeys" / "tests").mkdir(parents=True, exist_ok=True)
    path = root / "journeys" / "tests" / "declared.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def loaded(root: Path, text: str) -> Scenario:
    project = load_project(root / "journeys", root / "templates", root / "nurture.yaml")
    return load_scenario(write_scenario(root, text), project)


def scenario_errors(root: Path, text: str) -> list[Diagnostic]:
    with pytest.raises(CompileError) as caught:
        loaded(root, text)
    return caught.value.diagnostics


@pytest.mark.parametrize("text", [SCENARIO, POPULATION], ids=["written", "population"])
def test_a_declared_scenario_loads(tmp_path: Path, text: str) -> None:
    scenario = loaded(make_project(tmp_path), text)

    assert scenario.journeys == ["welcome"]


@pytest.mark.parametrize("case", SCENARIO_CASES, ids=[case.id for case in SCENARIO_CASES])
def test_an_undeclared_name_or_a_wrong_value_in_a_scenario_is_reported_at_its_place(
    case: ScenarioCase, tmp_path: Path
) -> None:
    assert case.text.count(case.old) == 1
    text = case.text.replace(case.old, case.new)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if case.new in row)
    column = text.splitlines()[line - 1].index(case.point) + 1

    [error] = scenario_errors(make_project(tmp_path), text)

    assert (Path(error.path).name, error.line, error.column) == ("declared.yaml", line, column), error
    assert error.key == case.key
    assert case.message in error.message, error.message


def test_every_fault_of_a_scenario_is_reported_in_one_go(tmp_path: Path) -> None:
    text = SCENARIO.replace("first_name: Mei", "frist_name: Mei").replace("item_count: 2", "item_count: two")

    errors = scenario_errors(make_project(tmp_path), text)

    assert [e.key for e in errors] == ["users.u1.frist_name", "events[1].properties.item_count"]


def test_a_required_property_may_be_left_out_unless_declarations_are_enforced(tmp_path: Path) -> None:
    text = SCENARIO.replace("order_id: o1, ", "")
    loaded(make_project(tmp_path), text)  # the event API takes such an event

    make_project(tmp_path, config=DECLARATIONS + "enforce_declarations: true\n")
    [error] = scenario_errors(tmp_path, text)
    assert (error.key, error.line) == ("events[2].event", 9)
    assert error.message == "'Order Completed' requires order_id (string)"

    [error] = scenario_errors(tmp_path, POPULATION.replace('cart_id: "c{n}", ', ""))
    assert (error.key, error.message) == ("population.events[0].event", "'Cart Updated' requires cart_id (string)")


@pytest.mark.parametrize("declared", ["events", "traits"])
def test_what_is_not_declared_is_not_checked(tmp_path: Path, declared: str) -> None:
    """Traits alone leave events as they were, and events alone leave traits."""
    text = SCENARIO.replace("first_name: Mei", "frist_name: Mei").replace("cart_id: c1", "cart_idd: c1")
    kept = DECLARATIONS[DECLARATIONS.index("events:") :] if declared == "events" else DECLARATIONS[: DECLARATIONS.index("events:")]

    [error] = scenario_errors(make_project(tmp_path, config=kept), text)

    assert error.key == ("events[1].properties.cart_idd" if declared == "events" else "users.u1.frist_name")


def test_an_undeclared_project_loads_any_scenario_as_before(tmp_path: Path) -> None:
    text = SCENARIO.replace("first_name: Mei", "frist_name: Mei").replace("item_count: 2", 'item_count: "2"')
    make_project(tmp_path, config="timezone: UTC\n")

    scenario = loaded(tmp_path, text.replace("event: Order Completed", "event: Order Complete"))

    assert scenario.users["u1"]["frist_name"] == "Mei"
    assert scenario.events[1].event is not None and scenario.events[1].event.properties["item_count"] == "2"


@pytest.mark.parametrize(
    "project_dir", [ROOT, ROOT / "tests" / "projects" / "dates"], ids=["example", "dates"]
)
def test_every_scenario_of_the_repository_loads_against_its_project(project_dir: Path) -> None:
    config = project_dir / "nurture.yaml"
    project = load_project(project_dir / "journeys", project_dir / "templates", config)
    folders = [project_dir / "journeys" / "tests", project_dir / "journeys" / "forecasts", project_dir / "tests" / "scenarios"]
    files = scenario_files([folder for folder in folders if folder.exists()])

    assert len(files) >= 15
    for path in files:
        load_scenario(path, project)  # raises CompileError naming the file, line and column
