"""Declared traits and events: what ``traits:`` and ``events:`` in ``nurture.yaml`` allow to check.

    traits:
      first_name: {type: string, example: Mei}
      vip: boolean
    events:
      Order Completed:
        properties:
          order_id: {type: string, required: true}
          total: number

With declarations, the compiler checks every read of ``user.<trait>`` and
``event.properties.<name>`` in journeys and templates against them (:func:`read_problem`,
:func:`comparison_problems`), the event API may refuse calls whose values contradict them
(:func:`trait_faults`, :func:`property_faults`), and scenario files are held to them, undeclared
names included. Without them nothing is checked, as before. Pure: no I/O, no Jinja.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal, get_args

from .audiences import ENTERED, EXITED, PROPERTY
from .diagnostics import describe_value, did_you_mean

TypeName = Literal["string", "number", "integer", "boolean", "date", "datetime", "list", "object"]
TYPES: tuple[str, ...] = get_args(TypeName)
"""The types a trait or an event property may be declared with."""

_EXPECTED = {
    "string": "text",
    "number": "a number",
    "integer": "a whole number",
    "boolean": "true or false",
    "date": "a date written YYYY-MM-DD",
    "datetime": "a date and time in ISO 8601, e.g. 2026-03-02T10:00:00Z",
    "list": "a list",
    "object": "an object",
}


@dataclass(frozen=True, slots=True)
class Declared:
    """One declared trait or event property."""

    type: str
    """One of :data:`TYPES`."""
    required: bool = False
    """Properties only: a track call of the event must carry it (not null)."""
    description: str = ""
    example: Any = None


_TEXT = Declared("string")
BUILTIN_TRAITS: Mapping[str, Declared] = {
    "id": Declared("string", description="The user id."),
    "group": Declared("object", description="The user's account: group.id and the group's traits."),
    "email": Declared("string", description="The email channel's address."),
    "phone": Declared("string", description="The SMS channel's address, E.164 (+8613800138000)."),
    "wechat_openid": Declared("string", description="The WeChat channel's address."),
    "timezone": Declared("string", description="IANA zone, e.g. Asia/Shanghai."),
    "locale": Declared("string", description="Picks template translations, e.g. zh-CN."),
    "preferred_channel": Declared("string", description="The first channel send: auto tries."),
}
"""Traits Nurture itself reads or sets: known without being declared."""
_PAGE = ("name", "category", "url", "path", "title", "referrer", "search", "keywords")
WECHAT_FOLLOWED = "WeChat Followed"
"""The track event of a WeChat follow (the follower is the person)."""

BUILTIN_EVENTS: Mapping[str, Mapping[str, Declared]] = {
    "Page Viewed": {name: _TEXT for name in _PAGE},
    "Screen Viewed": {name: _TEXT for name in ("name", "category")},
    WECHAT_FOLLOWED: {},
    ENTERED: {PROPERTY: Declared("string", required=True, description="The audience id.")},
    EXITED: {PROPERTY: Declared("string", required=True, description="The audience id.")},
}
"""Events the API makes of ``page`` and ``screen`` calls, with Segment's properties for them,
of a WeChat follow (no properties: the follower is the person), and of a person entering or
leaving an audience (its id in ``audience``)."""
EVENT_FIELDS = ("name", "properties", "timestamp")
"""What an event has (``event.name``, ``event.properties.<name>``, ``event.timestamp``)."""
READ_ROOTS = ("user", "event", "last_event")
"""The names whose reads declarations check."""


@dataclass(frozen=True)
class Declarations:
    """The project's declarations, built-ins included; ``None`` where nothing is declared."""

    traits: Mapping[str, Declared] | None = None
    events: Mapping[str, Mapping[str, Declared]] | None = None
    enforce: bool = False
    """Whether the event API refuses calls that contradict the declarations."""

    @classmethod
    def build(
        cls,
        traits: Mapping[str, Declared] | None,
        events: Mapping[str, Mapping[str, Declared]] | None,
        *,
        enforce: bool = False,
    ) -> Declarations:
        """Declarations with the built-in traits and events added (a project's own win)."""
        all_events = None
        if events is not None:
            all_events = {name: dict(props) for name, props in BUILTIN_EVENTS.items()}
            for name, props in events.items():
                all_events[name] = {**all_events.get(name, {}), **props}
        return cls(
            traits=None if traits is None else {**BUILTIN_TRAITS, **traits},
            events=all_events,
            enforce=enforce,
        )

    def trait(self, name: str) -> Declared | None:
        return None if self.traits is None else self.traits.get(name)


# --- values ------------------------------------------------------------------------------------


def value_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` is not of the declared ``kind``, or ``None`` when it is; null fits any kind
    (it means no value)."""
    if value is None or _fits(kind, value):
        return None
    return f"expected {_EXPECTED[kind]}, got {describe_value(value)}"


def _fits(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "number":
        return isinstance(value, (int, float))
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "list":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, Mapping)
    if not isinstance(value, str):
        return False
    try:
        if kind == "date":
            return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", value)) and bool(date.fromisoformat(value))
        return len(value) > 10 and bool(datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00")))
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Fault:
    """One trait or property of a call that the declarations contradict."""

    name: str
    message: str
    type: str | None = None
    """The declared type, when the value is of another; ``None`` for an undeclared or a missing name."""

    def describe(self, kind: str) -> str:
        """The fault as a compile error tells it; ``kind`` is ``trait`` or ``property``."""
        if self.type is None:
            return self.message
        return f"{kind} '{self.name}' is declared with type {self.type}: {self.message}"


def unknown_trait(name: str, declarations: Declarations) -> str:
    """What is said of a trait the declarations do not name, with the closest one that they do."""
    traits = [n for n in declarations.traits or () if n != "group"]
    return f"unknown trait '{name}'{did_you_mean(name, traits)}: declare it under traits: in nurture.yaml"


def unknown_event(name: str, declarations: Declarations) -> str:
    """What is said of an event the declarations do not name, with the closest one that they do."""
    hint = did_you_mean(name, declarations.events or ())
    return f"unknown event '{name}'{hint}: declare it under events: in nurture.yaml"


def _no_property(event: str, prop: str, known: Sequence[str], context: str = "") -> str:
    hint = did_you_mean(prop, known)
    listed = f"; it declares {', '.join(known)}" if known and not hint else ""
    return (
        f"event '{event}'{context} has no property '{prop}'{hint}{listed}: "
        f"declare it under events: '{event}': properties: in nurture.yaml"
    )


def trait_faults(
    declarations: Declarations, traits: Mapping[str, Any], *, undeclared: bool = False
) -> Iterator[Fault]:
    """Traits whose values contradict their declared types; with ``undeclared``, also the traits
    the declarations do not name (when traits are declared at all)."""
    for name, value in traits.items():
        spec = declarations.trait(name)
        if spec is None:
            if undeclared and declarations.traits is not None:
                yield Fault(name, unknown_trait(name, declarations))
            continue
        problem = value_problem(spec.type, value)
        if problem is not None:
            yield Fault(name, problem, spec.type)


def property_faults(
    declarations: Declarations, event: str, properties: Mapping[str, Any] | None, *, undeclared: bool = False
) -> Iterator[Fault]:
    """A track call's properties against its event's declaration: declared ones of the wrong type,
    required ones missing or null; with ``undeclared``, also properties the declaration does not
    name. An undeclared event has no faults here (see :func:`unknown_event`)."""
    declared = None if declarations.events is None else declarations.events.get(event)
    if declared is None:
        return
    given = properties or {}
    for name, spec in declared.items():
        value = given.get(name)
        if value is None:
            if spec.required:
                yield Fault(name, f"'{event}' requires {name} ({spec.type})")
            continue
        problem = value_problem(spec.type, value)
        if problem is not None:
            yield Fault(name, problem, spec.type)
    if undeclared:
        yield from (Fault(name, _no_property(event, name, list(declared))) for name in given if name not in declared)


def properties_problems(
    declarations: Declarations, event: str, properties: Mapping[str, Any] | None, where: str
) -> list[dict[str, str]]:
    """A track call's faults against its event's declaration, as API ``detail`` entries: declared
    properties of the wrong type, required ones missing or null. An undeclared event, and
    properties the declaration does not name, are accepted."""
    return [
        {"field": f"{where}.{fault.name}", "message": fault.message}
        for fault in property_faults(declarations, event, properties)
    ]


def traits_problems(declarations: Declarations, traits: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """Identify traits whose values contradict their declared types, as API ``detail`` entries;
    undeclared traits are accepted."""
    return [{"field": f"{where}.{fault.name}", "message": fault.message} for fault in trait_faults(declarations, traits)]


# --- reads in expressions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """A read of ``user``, ``event`` or ``last_event``: ``user.first_name`` is
    ``Read("user", ("first_name",))``; a key computed at run time is ``None``."""

    root: str
    keys: tuple[str | int | None, ...] = ()

    def text(self, upto: int | None = None) -> str:
        out = self.root
        for key in self.keys[: None if upto is None else upto + 1]:
            out += f"[{key}]" if isinstance(key, int) else f".{key}" if key is not None else "[…]"
        return out

    def pattern(self, upto: int) -> re.Pattern[str]:
        """Where the read is written, up to key ``upto`` (group 1: that key)."""
        parts = [rf"(?<![\w.]){self.root}"]
        for index, key in enumerate(self.keys[: upto + 1]):
            text = re.escape(str(key)) if key is not None else r"[^\]]*"
            name = f"({text})" if index == upto else text
            parts.append(rf"\s*(?:\.\s*|\[\s*['\"]?){name}(?!\w)(?:['\"]?\s*\])?")
        return re.compile("".join(parts))


_NODES = frozenset(
    {"const", "name", "get", "and", "or", "not", "neg", "bin", "concat", "cmp", "if", "list", "dict", "filter", "test"}
)


def _chain(tree: list[Any]) -> Read | None:
    keys: list[str | int | None] = []
    node = tree
    while node[0] == "get":
        key = node[2]
        plain = key[0] == "const" and isinstance(key[1], (str, int)) and not isinstance(key[1], bool)
        keys.append(key[1] if plain else None)
        node = node[1]
    if node[0] == "name" and node[1] in READ_ROOTS:
        return Read(node[1], tuple(reversed(keys)))
    return None


def reads(tree: Any) -> Iterator[Read]:
    """Every read of ``user``, ``event`` and ``last_event`` in a compiled expression tree, each
    as long as written (``user.group.id`` once, not also ``user.group``)."""
    if not isinstance(tree, list) or not tree:
        return
    kind = tree[0]
    if not (isinstance(kind, str) and kind in _NODES):
        for item in tree:
            yield from reads(item)
        return
    if kind == "const":
        return
    if kind == "name":
        if tree[1] in READ_ROOTS:
            yield Read(tree[1])
        return
    if kind == "get":
        chain = _chain(tree)
        if chain is not None:
            yield chain
        node = tree
        while node[0] == "get":
            yield from reads(node[2])
            node = node[1]
        if chain is None:
            yield from reads(node)
        return
    for item in tree[1:]:
        yield from reads(item)


@dataclass(frozen=True)
class EventScope:
    """Which events ``event`` and ``last_event`` may be at one place of a journey."""

    event: tuple[str, ...] = ()
    """The triggering event; in the ``if:`` of a goal, ``exit_on`` or ``wait_for``, that event."""
    last_event: tuple[str, ...] = ()
    """Every event a ``wait_for`` of the journey waits for."""
    context: str = ""
    """How ``event`` is named in messages, e.g. "the trigger of journey welcome"."""


def read_problem(read: Read, declarations: Declarations, scope: EventScope) -> tuple[int, str] | None:
    """The first key of ``read`` the declarations do not know, with what is wrong; ``None`` when
    the read is declared, or when nothing is declared to check it against."""
    if not read.keys or not isinstance(read.keys[0], str):
        return None
    first = read.keys[0]
    if read.root == "user":
        if declarations.traits is None or first in declarations.traits:
            return None
        return 0, unknown_trait(first, declarations)
    if declarations.events is None:
        return None
    if first not in EVENT_FIELDS:
        hint = did_you_mean(first, EVENT_FIELDS)
        return 0, f"'{first}' is not part of an event{hint}: an event has {', '.join(EVENT_FIELDS)}"
    names = scope.event if read.root == "event" else scope.last_event
    if first != "properties" or len(read.keys) < 2 or not isinstance(read.keys[1], str) or not names:
        return None
    if any(name not in declarations.events for name in names):
        return None  # an undeclared event is reported where it is named
    prop = read.keys[1]
    known: dict[str, None] = {}
    for name in names:
        if prop in declarations.events[name]:
            return None
        known.update(dict.fromkeys(declarations.events[name]))
    if len(names) == 1:
        where = f" ({scope.context})" if scope.context and read.root == "event" else ""
        return 1, _no_property(names[0], prop, list(known), where)
    return 1, f"none of the events {', '.join(names)} has a property '{prop}'{did_you_mean(prop, known)}"


def declared_type(read: Read, declarations: Declarations, scope: EventScope) -> str | None:
    """The declared type of what ``read`` reads, when the declarations say it."""
    if read.root == "user" and len(read.keys) == 1 and isinstance(read.keys[0], str):
        spec = declarations.trait(read.keys[0])
        return None if spec is None else spec.type
    if read.root == "user" or declarations.events is None:
        return None
    if read.keys == ("name",) or read.keys == ("timestamp",):
        return "string"
    names = scope.event if read.root == "event" else scope.last_event
    if len(read.keys) != 2 or read.keys[0] != "properties" or not isinstance(read.keys[1], str) or not names:
        return None
    kinds = {
        spec.type
        for name in names
        if (spec := declarations.events.get(name, {}).get(str(read.keys[1]))) is not None
    }
    return kinds.pop() if len(kinds) == 1 else None


_ORDERING = frozenset({"==", "!=", ">", ">=", "<", "<="})


def comparison_problems(tree: Any, declarations: Declarations, scope: EventScope) -> Iterator[tuple[Read, str]]:
    """Comparisons of a declared value with a literal of another type (``user.vip == 'yes'``
    for a boolean ``vip``): never true, or always true for ``!=``."""
    if not isinstance(tree, list) or not tree:
        return
    if tree[0] == "const":
        return
    if tree[0] == "cmp" and len(tree) == 3:
        operands = [tree[1], *(right for _, right in tree[2])]
        for (op, _), left, right in zip(tree[2], operands, operands[1:], strict=False):
            for ref, lit, reversed_ in ((left, right, False), (right, left, True)):
                found = _compared(ref, lit, op, reversed_, declarations, scope)
                if found is not None:
                    yield found
    for item in tree[1:] if isinstance(tree[0], str) else tree:
        yield from comparison_problems(item, declarations, scope)


def _compared(
    ref: Any, lit: Any, op: str, reversed_: bool, declarations: Declarations, scope: EventScope
) -> tuple[Read, str] | None:
    if not (isinstance(ref, list) and ref and ref[0] == "get" and isinstance(lit, list) and lit):
        return None
    read = _chain(ref)
    if read is None:
        return None
    kind = declared_type(read, declarations, scope)
    if kind is None:
        return None
    values: Sequence[Any]
    if op in _ORDERING and lit[0] == "const":
        values = [lit[1]]
    elif op in ("in", "not in") and not reversed_ and lit[0] == "list":
        values = [item[1] for item in lit[1] if isinstance(item, list) and item and item[0] == "const"]
    else:
        return None
    for value in values:
        if _clashes(kind, value):
            return read, (
                f"{read.text()} is declared with type {kind} but is compared with {describe_value(value)}: "
                f"compare it with {_EXPECTED[kind]}"
            )
    return None


def _clashes(kind: str, value: Any) -> bool:
    """Whether a literal can never equal or order with a value of ``kind``."""
    if value is None or isinstance(value, (list, dict, tuple)):
        return False
    if isinstance(value, bool):
        return kind != "boolean"
    if isinstance(value, (int, float)):
        return kind not in ("number", "integer")
    if isinstance(value, str):
        return kind not in ("string", "date", "datetime")
    return False


@dataclass
class Usage:
    """What journeys and templates read, for the warning of a project that declares nothing."""

    traits: dict[str, None] = field(default_factory=dict)
    events: dict[str, dict[str, None]] = field(default_factory=dict)

    def add_read(self, read: Read, scope: EventScope) -> None:
        first = read.keys[0] if read.keys else None
        if read.root == "user" and isinstance(first, str) and first not in BUILTIN_TRAITS:
            self.traits[first] = None
        names = scope.event if read.root == "event" else scope.last_event if read.root == "last_event" else ()
        if first == "properties" and len(read.keys) > 1 and isinstance(read.keys[1], str) and len(names) == 1:
            self.events.setdefault(names[0], {})[read.keys[1]] = None

    def add_event(self, name: str) -> None:
        self.events.setdefault(name, {})

    def warnings(self, declarations: Declarations) -> list[str]:
        """What is read but not declared: one message for traits, one for events."""
        out = []
        if declarations.traits is None and self.traits:
            out.append(
                "no traits are declared, so these reads are not checked: "
                + ", ".join(f"user.{name}" for name in sorted(self.traits))
                + " (declare them under traits: in nurture.yaml)"
            )
        events = {name: props for name, props in self.events.items() if name not in BUILTIN_EVENTS}
        if declarations.events is None and events:
            listed = [
                f"{name} ({', '.join(sorted(props))})" if props else name for name, props in sorted(events.items())
            ]
            out.append(
                "no events are declared, so these names and properties are not checked: "
                + "; ".join(listed)
                + " (declare them under events: in nurture.yaml)"
            )
        return out
