"""A reproducible week of learners and their events, as a scenario document for the simulator.

``generate_week`` draws users (time zones, addresses, consents, preferences) and seven days of
events from one seeded RNG, so the same seed always gives the same scenario. ``Week.document``
turns the whole week, or the slice of it that concerns some users, into the dict a scenario YAML
file holds (with ``expect: []``: the policy test checks invariants, not a script).

Events land on whole minutes and identify calls on the 30th second of a minute: every timer the
journeys set (waits, quiet-hour ends, local midnights) is a whole minute, so an opt-out change
never ties with a send and "opted out at that moment" is never ambiguous.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DAY = 86_400
HOUR = 3_600
MINUTE = 60

START = datetime(2026, 3, 4, tzinfo=UTC)
"""A Wednesday: the week spans New York's switch to daylight time (Sunday 8 March)."""

CHANNELS = ("email", "sms", "wechat")
TOPICS = ("courses", "promotions", "surveys")

# (zone or None for "no timezone trait", weight). Kolkata's half-hour offset puts local midnight
# and quiet hours off the UTC hour; the bogus zone must fall back like a missing one.
ZONES: tuple[tuple[str | None, int], ...] = (
    ("Asia/Shanghai", 28),
    ("America/New_York", 15),
    ("Europe/Berlin", 14),
    ("Australia/Sydney", 10),
    ("UTC", 10),
    ("Asia/Kolkata", 4),
    (None, 16),
    ("Mars/Olympus_Mons", 3),
)

FIRST_NAMES = ("Ada", "Mei", "Tom", "Lena", "Raj", "Sara", "Wei", "Olga", "Kenji", "Ana", "Jun", "Priya")
COURSES = (
    ("Python Basics", 199),
    ("SQL Basics", 99),
    ("UX Design Bootcamp", 1299),
    ("Guitar for Beginners", 199),
    ("Japanese N5 Prep", 597),
    ("零基础学 Python", 698),
)
AGENTS = (
    ("Wang Fang", "+8610 5730 2211"),
    ("Grace Liu", "+86 400 820 0000"),
    ("Tom Reid", "+61 2 8000 1234"),
)

# Course launches are broadcasts: one instant for everyone in the audience, whatever their zone,
# so some audiences are asleep (13:00 UTC is 21:00 in Shanghai, 20:00 UTC is 07:00 in Sydney).
LAUNCHES = (
    ("k1", "Rust for Pythonistas", 149, 1 * DAY + 13 * HOUR),
    ("k2", "Data Viz", 99, 3 * DAY + 2 * HOUR),
    ("k3", "Algorithms", 129, 5 * DAY + 20 * HOUR),
)


@dataclass
class Week:
    start: datetime
    users: dict[str, dict[str, Any]]
    """Traits per user, including the initial ``opted_out`` list (channels and topics)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Scenario event entries, ``at`` in seconds from ``start``, in time order."""

    def document(self, only: set[str] | None = None) -> dict[str, Any]:
        """The scenario file's content for every user, or for ``only`` these users."""
        users = {u: t for u, t in self.users.items() if only is None or u in only}
        return {
            "scenario": f"a simulated week of {len(users)} learners",
            "start": self.start.isoformat(),
            "users": users,
            "events": [e for e in self.events if e["user"] in users],
            "expect": [],
        }


def generate_week(n_users: int = 1000, seed: int = 20260304) -> Week:
    rng = random.Random(seed)
    users: dict[str, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    for number in range(1, n_users + 1):
        user = f"u{number:04d}"
        traits, opted = _profile(rng, user)
        users[user] = traits
        events.extend(_events(rng, user, traits, opted))
    events.sort(key=lambda e: (e["at"], e["user"]))
    return Week(START, users, events)


def _profile(rng: random.Random, user: str) -> tuple[dict[str, Any], set[str]]:
    traits: dict[str, Any] = {"first_name": rng.choice(FIRST_NAMES)}
    zone = rng.choices([z for z, _ in ZONES], [w for _, w in ZONES])[0]
    if zone is not None:
        traits["timezone"] = zone
    # Addresses are often missing: a learner who signed up with WeChat has no email, and so on.
    if rng.random() < 0.88:
        traits["email"] = f"{user}@example.com"
    if rng.random() < 0.6:
        traits["phone"] = f"+86138{rng.randrange(10**8):08d}"
    if rng.random() < 0.4:
        traits["wechat_openid"] = f"oUpF8u{user}{rng.randrange(10**12):012d}"
    preferred = rng.choice(("email", "sms", "wechat", None, None))
    if preferred is not None:
        traits["preferred_channel"] = preferred
    if rng.random() < 0.1:
        traits["vip"] = True
    if rng.random() < 0.15:
        traits["locale"] = "zh-CN"
    opted = {c for c in CHANNELS if rng.random() < 0.12}
    opted |= {t for t, p in zip(TOPICS, (0.12, 0.15, 0.05), strict=True) if rng.random() < p}
    traits["opted_out"] = sorted(opted)
    return traits, opted


def _minute(rng: random.Random, low: int, high: int) -> int:
    """A whole-minute offset in [low, high)."""
    return low + rng.randrange((high - low) // MINUTE) * MINUTE


def _events(rng: random.Random, user: str, traits: dict[str, Any], opted: set[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def track(at: int, name: str, **properties: Any) -> None:
        out.append({"at": at, "user": user, "event": name, "properties": properties})

    if rng.random() < 0.55:
        track(_minute(rng, 0, 3 * DAY), "Signed Up", interest=rng.choice(("Python", "Design", "Music")))

    carts = [f"c{n}" for n in range(rng.choice((0, 0, 1, 1, 2, 3)))]
    for cart in carts:
        at = _minute(rng, 0, 6 * DAY)
        for _ in range(rng.choice((1, 1, 2, 3))):
            course, price = rng.choice(COURSES)
            items = 0 if rng.random() < 0.1 else rng.randint(1, 3)
            track(
                at,
                "Cart Updated",
                cart_id=cart,
                item_count=items,
                top_item=course,
                cart_total=price * items,
                currency="CNY",
            )
            at += _minute(rng, 10 * MINUTE, 30 * HOUR)
            if at >= 7 * DAY:  # the week's input ends after seven days; runs may go on
                break
        if at < 7 * DAY and rng.random() < 0.15:
            track(at, "Cart Emptied", cart_id=cart)

    for order in range(rng.choice((0, 0, 0, 1, 1, 2))):
        course, price = rng.choice(COURSES)
        properties: dict[str, Any] = {
            "order_id": f"o{user}-{order}",
            "total": 0 if rng.random() < 0.2 else price,
            "currency": "CNY",
            "course_name": course,
        }
        if rng.random() < 0.5:
            properties["tracking_number"] = f"SF{rng.randrange(10**9):09d}"
        if carts and rng.random() < 0.5:
            properties["cart_id"] = rng.choice(carts)
        if rng.random() < 0.3:
            properties["course_id"] = rng.choice(LAUNCHES)[0]
        track(_minute(rng, 0, 7 * DAY), "Order Completed", **properties)

    if rng.random() < 0.25:
        chat = f"chat_{user}"
        agent, phone = rng.choice(AGENTS)
        at = _minute(rng, 0, 6 * DAY)
        track(at, "Chat Interrupted", chat_id=chat, agent_name=agent, agent_phone=phone, topic="invoice")
        if rng.random() < 0.4:
            track(at + _minute(rng, 5 * MINUTE, 55 * MINUTE), "Chat Resumed", chat_id=chat)
        if rng.random() < 0.5:
            track(at + _minute(rng, 2 * HOUR, 22 * HOUR), "Ticket Resolved", chat_id=chat)

    for course_id, name, price, at in LAUNCHES:
        if rng.random() < 0.5:
            track(at, "Course Launched", course_id=course_id, course_name=name, early_bird_price=price)

    # Mid-week consent changes: identify replaces the whole opt-out list, so each call carries the
    # full new list; now and then a learner also gives us a phone number.
    if rng.random() < 0.3:
        current = set(opted)
        for at in sorted(_minute(rng, 0, 7 * DAY) + 30 for _ in range(rng.choice((1, 1, 2)))):
            change = rng.choice(CHANNELS + TOPICS)
            current = current - {change} if change in current else current | {change}
            if rng.random() < 0.1:
                current = set()
            identify: dict[str, Any] = {"opted_out": sorted(current)}
            if "phone" not in traits and rng.random() < 0.3:
                identify["phone"] = f"+86139{rng.randrange(10**8):08d}"
            out.append({"at": at, "user": user, "identify": identify})
    return out
