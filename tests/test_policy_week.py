"""A simulated week of the mission journeys for 1,000 learners, checked against the delivery policy.

The users and events come from :mod:`week_of_users` (seeded, so every run is the same week). The
checks below recompute the policy from what the project's YAML files say (``nurture.yaml`` and
``journeys/*.yaml``, read with plain PyYAML), the users' traits and identify calls replayed over
time, and the simulator's outcomes and timeline. They never ask ``nurture.delivery.policy``, the clock
helpers or the Deliverer what is allowed: a rule the engine gets wrong must not be "confirmed" by
the same code that got it wrong.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pytest
import yaml
from click.testing import CliRunner
from week_of_users import CHANNELS, Week, generate_week

from channels.outbox import Outbox
from nurture.cli.main import main
from nurture.delivery.deliverer import Deliverer, for_every_channel
from nurture.engine.model import Event
from nurture.language.compiler import Project
from nurture.simulation.scenarios import Scenario, Step, build_simulator
from nurture.simulation.simulator import Entry, Outcome, Simulator

ROOT = Path(__file__).resolve().parents[1]
ADDRESS = {"email": "email", "sms": "phone", "wechat": "wechat_openid"}
SKIP_REASONS = {"no_address", "opted_out", "topic_opted_out", "frequency_cap", "template_error"}
SKIP_DETAIL = re.compile(r"^\S+ \S+ \((?P<reason>[a-z_]+)\)")
"""A held send's timeline detail: ``channel template (reason)``, then maybe a variant."""
DEFER_REASONS = {"(quiet hours)": "quiet_hours", "(frequency cap)": "frequency_cap"}


# --- the policy as the project's YAML files state it -------------------------------------------


def _minutes(text: str) -> int:
    hours, minutes = str(text).split(":")
    return int(hours) * 60 + int(minutes)


@dataclass(frozen=True)
class SendStep:
    journey: str
    step: str
    channels: tuple[str, ...]
    """Every channel the step may use, in order (the project's channel order for ``send: auto``)."""
    auto: bool
    marketing: bool
    topic: str | None
    quiet: dict[str, tuple[int, int] | None]
    """Quiet window per channel in local minutes, ``None`` when the channel has none."""
    zone: str
    on_cap: str


@dataclass(frozen=True)
class Rules:
    steps: dict[tuple[str, str], SendStep]
    per_day: int
    per_week: int


def _send_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every ``send:`` step anywhere in a journey (branches, waits' then/else, split variants)."""
    if isinstance(node, dict):
        if "send" in node:
            yield node
        for value in node.values():
            yield from _send_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _send_nodes(value)


def read_rules() -> Rules:
    project = yaml.safe_load((ROOT / "nurture.yaml").read_text(encoding="utf-8"))
    caps = project["frequency_caps"]["all"]
    steps: dict[tuple[str, str], SendStep] = {}
    for path in sorted((ROOT / "journeys").glob("*.yaml")):
        journey = yaml.safe_load(path.read_text(encoding="utf-8"))
        window = journey.get("quiet_hours") or project["quiet_hours"]
        base = (_minutes(window["start"]), _minutes(window["end"]))
        quiet: dict[str, tuple[int, int] | None] = {}
        for channel in CHANNELS:
            # A channel key overrides the journey's window for that channel; null turns it off.
            if channel not in window:
                quiet[channel] = base
            elif window[channel] is None:
                quiet[channel] = None
            else:
                quiet[channel] = (_minutes(window[channel]["start"]), _minutes(window[channel]["end"]))
        for node in _send_nodes(journey["steps"]):
            send = node["send"]
            channels = (
                tuple(project["channel_order"]) if send == "auto" else (send, *node.get("fallback", ()))
            )
            steps[journey["journey"], node["id"]] = SendStep(
                journey["journey"],
                node["id"],
                channels,
                send == "auto",
                node.get("category", "marketing") == "marketing",
                node.get("topic"),
                quiet,
                journey.get("timezone") or project["timezone"],
                journey.get("on_cap", project["on_cap"]),
            )
    return Rules(steps, caps["per_day"], caps["per_week"])


def inside(local: datetime, window: tuple[int, int] | None) -> bool:
    """Whether a local wall time falls in a daily window that may wrap midnight."""
    if window is None:
        return False
    minute = local.hour * 60 + local.minute
    start, end = window
    return start <= minute < end if start < end else minute >= start or minute < end


def reachable(step: SendStep, traits: dict[str, Any], opted: set[str]) -> list[str]:
    """The channels a send may use for this user now, best first: ``auto`` puts the user's
    preferred channel first; a channel needs an address and, for marketing, no opt-out."""
    order = list(step.channels)
    preferred = traits.get("preferred_channel")
    if step.auto and preferred in order:
        order.remove(preferred)
        order.insert(0, preferred)
    return [c for c in order if traits.get(ADDRESS[c]) and not (step.marketing and c in opted)]


# --- the users over time --------------------------------------------------------------------------


@dataclass
class Users:
    """Traits and opt-outs of every user at any instant, replayed from the week's identify calls."""

    week: Week
    changes: dict[str, list[tuple[datetime, dict[str, Any]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for item in self.week.events:
            if "identify" in item:
                at = self.week.start + timedelta(seconds=item["at"])
                self.changes.setdefault(item["user"], []).append((at, item["identify"]))

    def at(self, user: str, when: datetime) -> tuple[dict[str, Any], set[str]]:
        traits = dict(self.week.users[user])
        opted = set(traits.pop("opted_out"))
        for at, change in self.changes.get(user, ()):
            if at > when:
                break
            change = dict(change)
            opted = set(change.pop("opted_out"))  # identify replaces the whole list
            traits.update(change)
        return traits, opted

    def zone(self, user: str, default: str) -> ZoneInfo:
        # No identify changes a zone, so the initial trait holds all week.
        name = self.week.users[user].get("timezone")
        try:
            return ZoneInfo(name) if name else ZoneInfo(default)
        except (ZoneInfoNotFoundError, ValueError):
            return ZoneInfo(default)


@dataclass
class Calendar:
    """One user's marketing sends per local calendar day, as they happen."""

    zone: ZoneInfo
    days: Counter[date] = field(default_factory=Counter)

    def add(self, at: datetime) -> None:
        self.days[at.astimezone(self.zone).date()] += 1

    def full(self, at: datetime, per_day: int, per_week: int) -> bool:
        """Whether another send at ``at`` would break a cap."""
        today = at.astimezone(self.zone).date()
        week = sum(self.days[today - timedelta(days=back)] for back in range(7))
        return self.days[today] >= per_day or week >= per_week


# --- running the week -----------------------------------------------------------------------------


def scenario_of(week: Week, journeys: list[str]) -> Scenario:
    """The week as a Scenario built in code: 1,000 users is more than a scenario file may expand to."""
    users = {u: {k: v for k, v in t.items() if k != "opted_out"} for u, t in week.users.items()}
    opted = {u: list(t["opted_out"]) for u, t in week.users.items()}
    steps = []
    for index, item in enumerate(week.events):
        if "event" in item:
            when = week.start + timedelta(seconds=item["at"])
            event = Event(item["event"], when, item["properties"], f"week-{index}")
            steps.append(Step(item["at"], item["user"], event=event))
        else:
            traits = dict(item["identify"])
            out = frozenset(traits.pop("opted_out"))
            steps.append(Step(item["at"], item["user"], traits=traits, opted_out=out))
    return Scenario("a simulated week", "<generated>", week.start, journeys, users, opted, steps)


@dataclass
class Played:
    week: Week
    sim: Simulator
    outbox: Outbox
    users: Users
    rules: Rules


@pytest.fixture(scope="module")
async def played(project: Project) -> Played:
    week = generate_week(1000, seed=20260304)
    journeys = ["welcome_series", "cart_abandonment", "post_purchase", "chat_recovery", "course_launch"]
    assert set(journeys) <= set(project.journeys)
    sim: Simulator | None = None
    # The outbox stamps messages with the simulator's virtual clock: what "reached" each user when.
    outbox = Outbox(now=lambda: sim.now if sim is not None else week.start)
    sim = build_simulator(
        scenario_of(week, journeys), project, Deliverer(project.templates, for_every_channel(outbox))
    )
    await sim.run()
    return Played(week, sim, outbox, Users(week), read_rules())


def sends(played: Played) -> list[tuple[Outcome, SendStep]]:
    assert played.sim.outcomes
    return [
        (o, played.rules.steps[o.journey, o.send.step_id]) for o in played.sim.outcomes if o.send is not None
    ]


def where(o: Outcome | Entry, zone: ZoneInfo) -> str:
    """Where a send happened, for failure messages: user, journey/step, UTC and local time."""
    step = o.step if isinstance(o, Entry) else o.send.step_id if o.send else ""
    return f"{o.user} {o.journey}/{step} at {o.at.isoformat()} ({o.at.astimezone(zone):%a %Y-%m-%d %H:%M} {zone.key})"


# --- the week is the mix the policy issue asks for -----------------------------------------------


def test_the_week_is_reproducible_and_mixed() -> None:
    week = generate_week(1000, seed=20260304)
    assert week == generate_week(1000, seed=20260304)
    assert week != generate_week(1000, seed=1)
    zones = Counter(t.get("timezone") for t in week.users.values())
    for name in ("Asia/Shanghai", "America/New_York", "Europe/Berlin", "Australia/Sydney", "UTC", None):
        assert zones[name] >= 30, (name, zones)
    assert Counter(t.get("preferred_channel") for t in week.users.values()).keys() == {
        "email",
        "sms",
        "wechat",
        None,
    }
    opted = Counter(x for t in week.users.values() for x in t["opted_out"])
    assert all(opted[x] >= 10 for x in ("email", "sms", "wechat", "courses", "promotions")), opted
    for trait in ADDRESS.values():
        assert sum(trait not in t for t in week.users.values()) >= 50, trait
    names = Counter(e.get("event", "identify") for e in week.events)
    for name in (
        "Signed Up",
        "Cart Updated",
        "Cart Emptied",
        "Order Completed",
        "Chat Interrupted",
        "Chat Resumed",
        "Ticket Resolved",
        "Course Launched",
        "identify",
    ):
        assert names[name] >= 20, (name, names)
    orders = [e["properties"] for e in week.events if e.get("event") == "Order Completed"]
    assert any("tracking_number" in p for p in orders) and any("tracking_number" not in p for p in orders)
    assert max(e["at"] for e in week.events) < 7 * 86_400


# --- the invariants ------------------------------------------------------------------------------


def test_the_outbox_holds_exactly_the_sent_outcomes(played: Played) -> None:
    """What reached users is what the outcomes say was sent: the invariants below read outcomes."""
    sent = Counter(
        (o.run_id, o.send.step_id, o.send.channel, o.at) for o, _ in sends(played) if o.send.status == "sent"
    )
    delivered = Counter((m.run_id, m.step_id, m.message.channel, m.sent_at) for m in played.outbox.messages())
    assert delivered == sent
    assert not [o for o, _ in sends(played) if o.send.status == "failed"]


def test_no_marketing_message_inside_its_channels_quiet_hours(played: Played) -> None:
    violations = []
    for o, step in sends(played):
        if o.send.status != "sent" or not step.marketing:
            continue
        zone = played.users.zone(o.user, step.zone)
        window = step.quiet[o.send.channel]
        if inside(o.at.astimezone(zone), window):
            violations.append(f"{where(o, zone)}: {o.send.channel} inside quiet window {window}")
    assert not violations, "\n".join(violations[:20])


def test_no_marketing_message_to_an_opted_out_channel_or_topic_or_without_address(played: Played) -> None:
    identifies = {c[0] for changes in played.users.changes.values() for c in changes}
    violations = []
    for o, step in sends(played):
        # The replay is exact only if no send shares an instant with an opt-out change.
        assert o.at not in identifies, where(o, played.users.zone(o.user, step.zone))
        if o.send.status != "sent":
            continue
        traits, opted = played.users.at(o.user, o.at)
        zone = played.users.zone(o.user, step.zone)
        if not traits.get(ADDRESS[o.send.channel]):
            violations.append(f"{where(o, zone)}: sent on {o.send.channel} without an address")
        # Every template exists on every channel here, so nothing should fall past the first.
        best = reachable(step, traits, opted)
        if best and o.send.channel != best[0]:
            violations.append(f"{where(o, zone)}: sent on {o.send.channel}, not on {best[0]} (of {best})")
        if not step.marketing:
            continue
        if o.send.channel in opted:
            violations.append(f"{where(o, zone)}: {o.send.channel} while opted out of it ({sorted(opted)})")
        if step.topic in opted:
            violations.append(f"{where(o, zone)}: topic {step.topic} while opted out of it ({sorted(opted)})")
    assert not violations, "\n".join(violations[:20])


def test_no_user_gets_more_marketing_than_the_caps_in_their_own_calendar(played: Played) -> None:
    rules = played.rules
    per_user: dict[str, list[datetime]] = defaultdict(list)
    zones: dict[str, ZoneInfo] = {}
    for o, step in sends(played):
        if o.send.status == "sent" and step.marketing:
            per_user[o.user].append(o.at)
            zones[o.user] = played.users.zone(o.user, step.zone)
    violations = []
    busiest_day = busiest_week = 0
    for user, instants in per_user.items():
        days = Counter(at.astimezone(zones[user]).date() for at in instants)
        for day, count in days.items():
            busiest_day = max(busiest_day, count)
            if count > rules.per_day:
                violations.append(f"{user}: {count} marketing messages on local {day} ({zones[user].key})")
            # Every 7-day window that contains this day ends on one of the 7 days from it.
            for end in (day + timedelta(days=k) for k in range(7)):
                week = sum(days[end - timedelta(days=back)] for back in range(7))
                busiest_week = max(busiest_week, week)
                if week > rules.per_week:
                    violations.append(f"{user}: {week} marketing messages in the 7 local days to {end}")
    assert not violations, "\n".join(sorted(set(violations))[:20])
    # The caps were reached, so "never more than" is not true merely for lack of traffic.
    assert (busiest_day, busiest_week) == (rules.per_day, rules.per_week)


def test_every_held_send_has_the_right_reason_and_every_rule_was_exercised(played: Played) -> None:
    rules, users = played.rules, played.users
    counts: Counter[str] = Counter()
    violations = []
    # One walk over the timeline in processing order: what counts against a cap is exactly the
    # marketing sent before this line.
    calendars: dict[str, Calendar] = {}
    for entry in played.sim.entries:
        if entry.what not in ("sent", "skipped", "deferred", "failed"):
            continue
        step = rules.steps[entry.journey, entry.step]
        zone = users.zone(entry.user, step.zone)
        calendar = calendars.setdefault(entry.user, Calendar(zone))
        traits, opted = users.at(entry.user, entry.at)
        full = calendar.full(entry.at, rules.per_day, rules.per_week)
        here = where(entry, zone)
        if entry.what == "sent":
            counts["sent"] += 1
            if step.marketing:
                calendar.add(entry.at)
            continue
        if entry.what == "failed":
            violations.append(f"{here}: failed {entry.detail}")
            continue
        if entry.what == "deferred":
            reason = next((r for tag, r in DEFER_REASONS.items() if entry.detail.endswith(tag)), None)
            counts[f"deferred:{reason}"] += 1
            if reason is None:
                violations.append(f"{here}: deferred without a reason: {entry.detail!r}")
            elif not step.marketing:
                violations.append(f"{here}: transactional send deferred ({reason})")
            elif reason == "quiet_hours" and not (
                (best := reachable(step, traits, opted))
                and inside(entry.at.astimezone(zone), step.quiet[best[0]])
            ):
                violations.append(
                    f"{here}: deferred for quiet hours, but {best[:1]} is not in its quiet window"
                )
            elif reason == "frequency_cap" and (step.on_cap != "defer" or not full):
                violations.append(f"{here}: deferred for the cap (on_cap {step.on_cap}) with room left")
            continue
        found = SKIP_DETAIL.match(entry.detail)
        reason = found["reason"] if found else None
        counts[f"skipped:{reason}"] += 1
        addressed = [c for c in step.channels if traits.get(ADDRESS[c])]
        if reason not in SKIP_REASONS:
            violations.append(f"{here}: skipped without a known reason: {entry.detail!r}")
        elif reason == "no_address" and addressed:
            violations.append(f"{here}: no_address though {addressed} have addresses")
        elif reason == "opted_out" and (
            not step.marketing or not addressed or any(c not in opted for c in addressed)
        ):
            violations.append(f"{here}: opted_out with {addressed} addressed and {sorted(opted)} opted out")
        elif reason == "topic_opted_out" and (not step.marketing or step.topic not in opted):
            violations.append(f"{here}: topic_opted_out but {step.topic} not in {sorted(opted)}")
        elif reason == "frequency_cap" and (not step.marketing or step.on_cap != "skip" or not full):
            violations.append(f"{here}: skipped for the cap (on_cap {step.on_cap}) with room left")
    print("\nweek of 1,000 users:", dict(sorted(counts.items())))
    assert not violations, "\n".join(violations[:20])
    outcomes = Counter(
        "sent" if o.send.status == "sent" else f"skipped:{o.send.reason}" for o, _ in sends(played)
    )
    assert outcomes == Counter({k: v for k, v in counts.items() if not k.startswith("deferred")})
    for exercised in (
        "skipped:frequency_cap",
        "skipped:opted_out",
        "skipped:topic_opted_out",
        "skipped:no_address",
        "deferred:quiet_hours",
        "deferred:frequency_cap",
    ):
        assert counts[exercised] >= 10, (exercised, counts)


def test_transactional_messages_ignore_caps_quiet_hours_and_opt_outs(played: Played) -> None:
    rules, users = played.rules, played.users
    calendars: dict[str, Calendar] = {}
    cases: Counter[str] = Counter()
    for o, step in sends(played):
        zone = users.zone(o.user, step.zone)
        calendar = calendars.setdefault(o.user, Calendar(zone))
        if o.send.status == "sent" and step.marketing:
            calendar.add(o.at)
        if step.marketing:
            continue
        _, opted = users.at(o.user, o.at)
        assert o.send.status == "sent" or o.send.reason == "no_address", where(o, zone)
        if o.send.status != "sent":
            continue
        cases["sent"] += 1
        cases["in quiet hours"] += inside(o.at.astimezone(zone), step.quiet[o.send.channel])
        cases["caps full"] += calendar.full(o.at, rules.per_day, rules.per_week)
        cases["channel opted out"] += o.send.channel in opted
    print("\ntransactional:", dict(cases))
    assert cases["in quiet hours"] >= 1 and cases["caps full"] >= 1 and cases["channel opted out"] >= 1, cases

    # Every order's notice goes out the instant the order arrives, whatever the hour or the caps.
    notices = {
        (o.user, o.at): o.send
        for o, _ in sends(played)
        if o.send.step_id in ("shipping_sms", "course_access_sms")
    }
    for item in played.week.events:
        if item.get("event") != "Order Completed":
            continue
        at = played.week.start + timedelta(seconds=item["at"])
        traits, _ = users.at(item["user"], at)
        notice = notices.get((item["user"], at))
        assert notice is not None, (item["user"], at)
        expected = "shipping_notice" if "tracking_number" in item["properties"] else "course_access"
        assert notice.template == expected
        assert notice.status == ("sent" if traits.get("phone") else "skipped"), (item["user"], at, notice)


# --- what a marketer sees ------------------------------------------------------------------------


# A timeline line of a send: stamp, offset, user, journey/step, what, detail.
LINE = re.compile(
    r"^\w{3} \d\d-\d\d \d\d:\d\d  \+\s*(?P<hours>\d+)h(?P<minutes>\d\d)  (?P<user>\S+)\s+(?P<where>\S+/\S+)\s+"
    r"(?P<what>sent|skipped|deferred)\s+(?P<detail>.*)$"
)
MARKERS = ("(frequency cap)", "(quiet hours)", "(frequency_cap)", "(opted_out)")


def test_nurture_simulate_shows_why_each_held_message_was_held(played: Played, tmp_path: Path) -> None:
    """``nurture simulate`` on a 20-user slice of the week (1,000 users is pages of timeline).

    Users never affect one another (caps, opt-outs and runs are per user), so the slice replays
    exactly its users' part of the big week; it is picked to contain every kind of hold.
    """
    by_user: dict[str, list[Entry]] = defaultdict(list)
    for entry in played.sim.entries:
        by_user[entry.user].append(entry)
    chosen: list[str] = []
    for marker in MARKERS:
        chosen.append(next(u for u in sorted(by_user) if any(marker in e.detail for e in by_user[u])))
    for user in sorted(played.week.users):
        if len(set(chosen)) >= 20:
            break
        chosen.append(user)
    slice_users = set(chosen)
    assert len(slice_users) == 20
    path = tmp_path / "week_slice.yaml"
    path.write_text(yaml.safe_dump(played.week.document(slice_users), allow_unicode=True, sort_keys=False))

    result = CliRunner().invoke(
        main,
        [
            "simulate",
            str(path),
            "--journeys",
            str(ROOT / "journeys"),
            "--templates",
            str(ROOT / "templates"),
            "--config",
            str(ROOT / "nurture.yaml"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for marker in MARKERS:
        assert any(marker in line for line in lines), marker
    rows = [m for m in map(LINE.match, lines) if m]
    held = [m for m in rows if m["what"] != "sent"]
    assert held
    reasons = (*MARKERS, "(topic_opted_out)", "(no_address)", "(template_error)")
    assert all(any(r in m["detail"] for r in reasons) for m in held), [m[0] for m in held]
    # The slice's timeline is its users' share of the big week, line for line.
    printed = Counter(
        (int(m["hours"]) * 60 + int(m["minutes"]), m["user"], m["where"], m["what"], m["detail"])
        for m in rows
    )
    expected = Counter(
        (
            int((e.at - played.week.start).total_seconds()) // 60,
            e.user,
            f"{e.journey}/{e.step}",
            e.what,
            e.detail,
        )
        for e in played.sim.entries
        if e.user in slice_users and e.what in ("sent", "skipped", "deferred")
    )
    assert printed == expected
