"""Generated users for forecasts: a scenario's ``population`` block, drawn from a seeded RNG.

Each user gets numbered traits and a sequence of events, each event happening with a
probability that may depend on the user's segment or on the variant the engine will assign
them (:func:`~nurture.engine.interpreter.choose_variant` is a pure function of the user id, so
it is known before the run starts). Users are drawn one at a time, in order, from a single
``random.Random(seed)``: the same file and seed give the same users and events.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from nurture.engine.interpreter import choose_variant, user_scope
from nurture.engine.model import Event
from nurture.language import ir
from nurture.language.evaluation import Expr, is_true


@dataclass(frozen=True, slots=True)
class Numbered:
    """Text with ``{n}`` replaced by the user's number."""

    text: str


@dataclass(frozen=True, slots=True)
class Uniform:
    """A number drawn uniformly from ``low..high`` (whole when both ends are)."""

    low: float
    high: float
    whole: bool


@dataclass(frozen=True, slots=True)
class OneOf:
    """One of the choices, uniformly."""

    choices: tuple[Any, ...]


_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*\.\.\s*(-?\d+(?:\.\d+)?)\s*$")


def value_spec(raw: Any) -> Any:
    """What a written trait or property draws: ``"40..120"`` a number in that range, a list one of
    its items, text with ``{n}`` the user's number in it, a mapping each of its values; anything
    else is itself."""
    if isinstance(raw, str):
        match = _RANGE.match(raw)
        if match:
            low, high = match.groups()
            if float(high) < float(low):
                raise ValueError(f"'{raw}' runs backwards: write the lower number first")
            return Uniform(float(low), float(high), "." not in low + high)
        return Numbered(raw) if "{n}" in raw else raw
    if isinstance(raw, list):
        if not raw:
            raise ValueError("a list picks one of its items: give at least one")
        return OneOf(tuple(value_spec(item) for item in raw))
    if isinstance(raw, dict):
        return {key: value_spec(value) for key, value in raw.items()}
    return raw


def draw(spec: Any, rng: random.Random, n: int) -> Any:
    """A value of a trait or property spec (see :func:`value_spec`) for user number ``n``."""
    if isinstance(spec, Numbered):
        return spec.text.replace("{n}", str(n))
    if isinstance(spec, Uniform):
        if spec.whole:
            return rng.randint(int(spec.low), int(spec.high))
        return round(rng.uniform(spec.low, spec.high), 2)
    if isinstance(spec, OneOf):
        return draw(rng.choice(spec.choices), rng, n)
    if isinstance(spec, dict):
        return {key: draw(value, rng, n) for key, value in spec.items()}
    return spec


def examples(spec: Any) -> Iterator[Any]:
    """A value of each choice ``spec`` may draw (see :func:`value_spec`): what declared types are
    checked against."""
    if isinstance(spec, OneOf):
        for choice in spec.choices:
            yield from examples(choice)
    else:
        yield draw(spec, random.Random(0), 1)


@dataclass(frozen=True, slots=True)
class VariantRates:
    """Probabilities by the variant a split of ``experiment`` assigns the user."""

    experiment: str
    variants: tuple[ir.Variant, ...]
    probability: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class SegmentRate:
    cond: Expr
    probability: float


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One generated event: when, what, and how likely for a given user."""

    name: str
    at: tuple[int, int]
    """Offset range in seconds: from the scenario start, or (``after_entry``) from the user's first event."""
    after_entry: bool
    properties: Mapping[str, Any]
    probability: float = 1.0
    by_variant: tuple[VariantRates, ...] = ()
    by_segment: tuple[SegmentRate, ...] = ()

    def chance(self, user_id: str, scope: Mapping[str, Any]) -> float:
        """The first matching segment's probability, else the user's variant's, else the default."""
        for segment in self.by_segment:
            if is_true(segment.cond, scope):
                return segment.probability
        for rates in self.by_variant:
            variant = choose_variant(rates.experiment, user_id, rates.variants).name
            if variant in rates.probability:
                return rates.probability[variant]
        return self.probability


@dataclass(frozen=True, slots=True)
class Person:
    user_id: str
    traits: dict[str, Any]
    events: list[Event]


@dataclass(frozen=True)
class Population:
    count: int
    seed: int
    user: str
    """The user id, with ``{n}`` for the user's number (1 to ``count``)."""
    traits: Mapping[str, Any]
    events: tuple[EventSpec, ...]

    def user_id(self, n: int) -> str:
        return self.user.replace("{n}", str(n))

    def generate(self, start: datetime) -> Iterator[Person]:
        """The users in order, each with the events that happen to them, drawn lazily."""
        rng = random.Random(self.seed)
        for n in range(1, self.count + 1):
            user_id = self.user_id(n)
            traits = {key: draw(value, rng, n) for key, value in self.traits.items()}
            scope: dict[str, Any] = {"user": user_scope(user_id, traits)}
            events: list[Event] = []
            entry = start
            for index, spec in enumerate(self.events):
                # Every draw is made whether or not the event happens, so changing one
                # probability does not reshuffle the rest of the population.
                offset = timedelta(seconds=rng.randint(*spec.at))
                properties = {key: draw(value, rng, n) for key, value in spec.properties.items()}
                coin = rng.random()
                if index == 0:
                    entry = start + offset
                    scope["event"] = Event(spec.name, entry, properties).scope()
                if coin >= spec.chance(user_id, scope):
                    continue
                at = entry + offset if spec.after_entry else start + offset
                events.append(Event(spec.name, at, properties, f"{user_id}-{index}"))
            yield Person(user_id, traits, events)
