"""The report of one journey: entries, where runs are, step reach, messages, conversions,
experiments and the project's holdout, counted by the database.

Every number is an aggregate query over ``runs``, ``step_reaches``, ``messages`` and
``message_events`` (SQLite and PostgreSQL alike); Python only walks the compiled journey to put
the counts in order and does the statistics on the counts (:mod:`nurture.reports.stats`).

The time range selects runs by entry: a run counts when it entered in ``[since, until)``, and
then everything it did counts, whenever it happened (a run that entered on the last day and
converted a week later is a conversion of that range). Every field is described in
``docs/results.md``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Date, case, cast, extract, func, literal, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from nurture.engine.clock import parse_instant
from nurture.language import ir
from nurture.storage.db import Database
from nurture.storage.models import FEEDBACK, MessageRecord, RunRecord, StepReach

from . import stats

SCHEMA = "nurture.report/v1"
MIN_PER_ARM = 100
"""Runs each arm needs before the report shows p-values: below that the normal approximations the
tests rest on are poor, and early swings mislead more than they inform."""
ALPHA = 0.05
"""A winner is named when the always-valid p-value falls below this (95% confidence)."""



class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Totals(_Model):
    entered: int = Field(
        description="Runs that entered in the range (a restarted run and its successor are two runs)."
    )
    active: int = Field(description="Of those, runs still active now.")
    ended: dict[str, int] = Field(
        description="Ended runs by reason: `completed`, `goal`, `exit_on`, `restarted`, `forgotten`, or an `exit:` step's reason."
    )


class VersionCounts(_Model):
    version: str
    entered: int
    active: int
    converted: int


class SendCounts(_Model):
    outcomes: dict[str, int] = Field(
        description="Messages by outcome: `sent`, `skipped:<reason>`, `failed:<reason>` (`sending` while unknown)."
    )
    channels: dict[str, int] = Field(
        description="Sent messages by the channel that carried them (fallbacks show here)."
    )
    deferrals: dict[str, int] = Field(
        description="Holds before the send went out, by the latest reason (`quiet_hours`, `frequency_cap`)."
    )
    feedback: dict[str, int] = Field(
        description="Messages with provider feedback of each kind: delivered, bounced, opened, clicked, unsubscribed, spam."
    )


class StepCounts(_Model):
    id: str
    kind: str
    label: str = Field(description="What the step does: channel and template, duration, event, experiment...")
    reached: int = Field(description="Runs that reached the step (once per run).")
    waiting: int = Field(
        description="Active runs waiting at the step now (a wait, a wait_for, a deferred send)."
    )
    send: SendCounts | None = None
    branches: list[StepBranch] = Field(default_factory=list, description="Nested steps, by branch.")


class StepBranch(_Model):
    label: str = Field(description="`then`, `else`, `if <condition>`, `variant <name>`.")
    steps: list[StepCounts]


StepCounts.model_rebuild()


class Conversions(_Model):
    converted: int = Field(description="Runs that reached the goal within its window.")
    rate: float | None = Field(description="converted / entered.")
    median_seconds: float | None = Field(description="Median time from entry to conversion, in seconds.")
    value: float | None = Field(
        description="Sum of the goal's `value` over conversions (when it declares one)."
    )
    value_per_run: float | None = Field(description="value / entered.")


class FunnelStage(_Model):
    stage: str = Field(description="`entered`, a top-level send step id, or `converted`.")
    runs: int
    drop_off: int = Field(description="Runs of the previous stage that did not reach this one.")
    rate: float | None = Field(description="runs / entered.")


class Arm(_Model):
    name: str
    runs: int
    converted: int
    rate: float | None
    value_per_run: float | None


class Comparison(_Model):
    arm: str
    against: str
    lift: float | None = Field(description="Absolute lift: rate(arm) - rate(against).")
    lift_interval: stats.Interval | None = Field(description="95% Wald interval of the absolute lift.")
    relative_lift: float | None = Field(description="rate(arm) / rate(against) - 1.")
    relative_interval: stats.Interval | None = Field(description="95% Katz interval of the relative lift.")
    p_value: float | None = Field(
        description="Two-sided pooled two-proportion z-test (None while too early)."
    )
    always_valid_p: float | None = Field(
        description="mSPRT always-valid p-value over daily looks (None while too early)."
    )
    verdict: Literal["too early", "winner", "no clear winner yet"]
    winner: str | None = Field(description="The better arm, when the always-valid p-value is below 0.05.")
    summary: str = Field(description="The verdict in plain words.")


class Experiment(_Model):
    step: str
    experiment: str
    control: str = Field(description="The variant named `control`, else the first declared.")
    arms: list[Arm]
    comparisons: list[Comparison]


class Holdout(_Model):
    arms: list[Arm] = Field(description="`holdout` (no marketing message) and `messaged` (everyone else).")
    comparison: Comparison


class JourneyReport(_Model):
    schema_: str = Field(SCHEMA, alias="schema")
    journey: str
    name: str
    description: str
    version: str | None = Field(description="The version reported on; None: every version.")
    current_version: str
    since: datetime | None = Field(description="Runs that entered at or after this instant.")
    until: datetime | None = Field(description="Runs that entered before this instant.")
    generated_at: datetime
    totals: Totals
    versions: list[VersionCounts]
    steps: list[StepCounts]
    conversions: Conversions
    funnel: list[FunnelStage]
    experiments: list[Experiment]
    holdout: Holdout | None = Field(description="Present when any run of the range was held out.")


def report_to_dict(report: JourneyReport) -> dict[str, Any]:
    """The report as the ``nurture.report/v1`` JSON document."""
    return report.model_dump(mode="json", by_alias=True)


class JourneyCounts(_Model):
    active: int = Field(description="Runs active now.")
    entered_today: int = Field(description="Runs that entered since midnight UTC.")
    entered_7d: int = Field(description="Runs that entered in the last seven days (7 x 24 hours).")
    converted: int = Field(description="Runs that converted, ever.")


def journey_counts(
    db: Database, journeys: Sequence[str], *, now: datetime | None = None
) -> dict[str, JourneyCounts]:
    """Status counts of each of ``journeys`` (zeros for a journey without runs), in one query."""
    now = _utc(now) or datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = now - timedelta(days=7)
    rows = {}
    if journeys:
        with db.session() as session:
            rows = {
                row[0]: row[1:]
                for row in session.execute(
                    select(
                        col(RunRecord.journey),
                        func.count(case((col(RunRecord.status) == "active", 1))),
                        func.count(case((col(RunRecord.entered_at) >= today, 1))),
                        func.count(case((col(RunRecord.entered_at) >= week, 1))),
                        func.count(col(RunRecord.converted_at)),
                    )
                    .where(col(RunRecord.journey).in_(journeys))
                    .group_by(col(RunRecord.journey))
                )
            }
    return {
        journey: JourneyCounts(
            active=found[0], entered_today=found[1], entered_7d=found[2], converted=found[3]
        )
        for journey in journeys
        for found in [rows.get(journey, (0, 0, 0, 0))]
    }


# --- the queries -------------------------------------------------------------------------------


class _Scope:
    """Which rows belong to the report: the journey's runs that entered in the range."""

    def __init__(
        self, journey: str, since: datetime | None, until: datetime | None, version: str | None
    ) -> None:
        self.journey, self.since, self.until, self.version = journey, since, until, version

    def runs(self) -> list[ColumnElement[bool]]:
        where = [col(RunRecord.journey) == self.journey]
        if self.version is not None:
            where.append(col(RunRecord.version) == self.version)
        if self.since is not None:
            where.append(col(RunRecord.entered_at) >= self.since)
        if self.until is not None:
            where.append(col(RunRecord.entered_at) < self.until)
        return where

    def _run_ids(self) -> Any:
        return select(col(RunRecord.run_id)).where(*self.runs())

    def reaches(self) -> list[ColumnElement[bool]]:
        # Step reaches carry the journey and version: only a time range needs the runs table.
        where = [col(StepReach.journey) == self.journey]
        if self.version is not None:
            where.append(col(StepReach.version) == self.version)
        if self.since is not None or self.until is not None:
            where.append(col(StepReach.run_id).in_(self._run_ids()))
        return where

    def messages(self) -> list[ColumnElement[bool]]:
        where = [col(MessageRecord.journey) == self.journey]
        if self.version is not None or self.since is not None or self.until is not None:
            where.append(col(MessageRecord.run_id).in_(self._run_ids()))
        return where


def _day(db: Database, column: Any) -> Any:
    """The UTC calendar day of a timestamp column, in SQL."""
    if db.engine.dialect.name == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)


def _as_day(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def parse_bound(text: str, *, end: bool = False) -> datetime:
    """A range bound: an ISO date-time (naive means UTC) or a date, which is its midnight UTC, or
    for the ``end`` of a range the next midnight, so ``--until 2026-03-31`` includes that day.
    Raises ``ValueError`` naming the accepted forms."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC) + (
                timedelta(days=1) if end else timedelta(0)
            )
        return parse_instant(value.replace("z", "Z"))
    except (ValueError, OverflowError):
        raise ValueError(
            f"{text!r} is not a date (2026-03-31) or a date-time (2026-03-31T12:00:00Z)"
        ) from None


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def journey_report(
    db: Database,
    journey: ir.Journey,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    version: str | None = None,
    now: datetime | None = None,
) -> JourneyReport:
    """The report of ``journey`` over the runs that entered in ``[since, until)`` (of ``version``)."""
    since, until = _utc(since), _utc(until)
    scope = _Scope(journey.id, since, until, version)
    # Built once: PostgreSQL matches a GROUP BY expression to the selected one by its parameters too.
    waiting_at = case((col(RunRecord.status) == "active", col(RunRecord.step)), else_=None)
    with db.session() as session:
        run_rows = session.execute(
            select(
                col(RunRecord.version),
                col(RunRecord.status),
                col(RunRecord.end_reason),
                col(RunRecord.holdout),
                waiting_at,
                func.count(),
                func.count(col(RunRecord.converted_at)),
                func.sum(col(RunRecord.conversion_value)),
            )
            .where(*scope.runs())
            .group_by(
                col(RunRecord.version),
                col(RunRecord.status),
                col(RunRecord.end_reason),
                col(RunRecord.holdout),
                waiting_at,
            )
        ).all()
        reach_rows = session.execute(
            select(col(StepReach.step_id), func.count())
            .where(*scope.reaches())
            .group_by(col(StepReach.step_id))
        ).all()
        deferral_rows = session.execute(
            select(col(StepReach.step_id), col(StepReach.deferral_reason), func.sum(col(StepReach.deferrals)))
            .where(*scope.reaches(), col(StepReach.deferrals) > 0)
            .group_by(col(StepReach.step_id), col(StepReach.deferral_reason))
        ).all()
        message_rows = session.execute(
            select(
                col(MessageRecord.step_id),
                col(MessageRecord.status),
                col(MessageRecord.reason),
                col(MessageRecord.channel),
                func.count(),
            )
            .where(*scope.messages())
            .group_by(
                col(MessageRecord.step_id),
                col(MessageRecord.status),
                col(MessageRecord.reason),
                col(MessageRecord.channel),
            )
        ).all()
        # One bit per kind on the message row (set as the webhooks record feedback): no join.
        has = [func.sum(case((col(MessageRecord.feedback).op("&")(1 << bit) != 0, 1), else_=0)) for bit in range(len(FEEDBACK))]
        feedback_rows = [
            (step_id, name, count)
            for step_id, *counts in session.execute(
                select(col(MessageRecord.step_id), *has)
                .where(*scope.messages(), col(MessageRecord.feedback) != 0)
                .group_by(col(MessageRecord.step_id))
            ).all()
            for name, count in zip(FEEDBACK, counts, strict=True)
            if count
        ]
        median = _median_seconds(db, session, scope)
        splits = [step for step in ir.walk(journey.steps) if isinstance(step, ir.Split)]
        experiments = [_experiment(db, session, scope, split) for split in splits]
        held = any(row[3] for row in run_rows)
        holdout = _holdout(db, session, scope) if held else None

    entered = sum(row[5] for row in run_rows)
    active = sum(row[5] for row in run_rows if row[1] == "active")
    ended: dict[str, int] = defaultdict(int)
    waiting: dict[str, int] = defaultdict(int)
    by_version: dict[str, list[int]] = {}
    converted, value = 0, None
    for run_version, status, reason, _held, step, count, conversions, worth in run_rows:
        counts = by_version.setdefault(run_version, [0, 0, 0])
        counts[0] += count
        counts[2] += conversions
        converted += conversions
        if worth is not None:
            value = (value or 0.0) + float(worth)
        if status == "active":
            counts[1] += count
            if step is not None:
                waiting[step] += count
        else:
            ended[reason or "unknown"] += count

    reached: dict[str, int] = {step_id: count for step_id, count in reach_rows}
    deferrals: dict[str, dict[str, int]] = defaultdict(dict)
    for step_id, reason, held_times in deferral_rows:
        deferrals[step_id][reason or "unknown"] = int(held_times)
    outcomes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    channels: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for step_id, status, reason, channel, count in message_rows:
        outcomes[step_id][
            status if status in ("sent", "sending") or not reason else f"{status}:{reason}"
        ] += count
        if status == "sent":
            channels[step_id][channel] += count
    feedback: dict[str, dict[str, int]] = defaultdict(dict)
    for step_id, name, count in feedback_rows:
        feedback[step_id][name] = count

    def step_counts(step: ir.Step) -> StepCounts:
        send = None
        if isinstance(step, ir.Send):
            send = SendCounts(
                outcomes=_sorted(outcomes.get(step.id, {})),
                channels=_sorted(channels.get(step.id, {})),
                deferrals=_sorted(deferrals.get(step.id, {})),
                feedback={name: feedback[step.id].get(name, 0) for name in FEEDBACK},
            )
        return StepCounts(
            id=step.id,
            kind=step.kind,
            label=step_label(step),
            reached=reached.get(step.id, 0),
            waiting=waiting.get(step.id, 0),
            send=send,
            branches=[
                StepBranch(label=label, steps=[step_counts(s) for s in nested])
                for label, nested in ir.children(step)
                if nested
            ],
        )

    funnel = [("entered", entered)]
    funnel += [(step.id, reached.get(step.id, 0)) for step in journey.steps if isinstance(step, ir.Send)]
    funnel.append(("converted", converted))
    return JourneyReport(
        schema=SCHEMA,
        journey=journey.id,
        name=journey.name or journey.id,
        description=journey.description,
        version=version,
        current_version=journey.version,
        since=since,
        until=until,
        generated_at=_utc(now) or datetime.now(UTC),
        totals=Totals(entered=entered, active=active, ended=_sorted(ended)),
        versions=[
            VersionCounts(version=name, entered=counts[0], active=counts[1], converted=counts[2])
            for name, counts in sorted(by_version.items(), key=lambda item: -item[1][0])
        ],
        steps=[step_counts(step) for step in journey.steps],
        conversions=Conversions(
            converted=converted,
            rate=_ratio(converted, entered),
            median_seconds=median,
            value=value,
            value_per_run=None if value is None else _ratio(value, entered),
        ),
        funnel=[
            FunnelStage(
                stage=stage,
                runs=runs,
                drop_off=0 if index == 0 else max(funnel[index - 1][1] - runs, 0),
                rate=_ratio(runs, entered),
            )
            for index, (stage, runs) in enumerate(funnel)
        ],
        experiments=experiments,
        holdout=holdout,
    )


def _sorted(counts: Mapping[str, int]) -> dict[str, int]:
    """Largest first, then by name: the order a reader scans."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _ratio(part: float, whole: int) -> float | None:
    return part / whole if whole else None


def _median_seconds(db: Database, session: Any, scope: _Scope) -> float | None:
    converted = [*scope.runs(), col(RunRecord.converted_at).is_not(None)]
    if db.engine.dialect.name == "postgresql":
        epoch = extract("epoch", col(RunRecord.converted_at) - col(RunRecord.entered_at))
        found = session.execute(
            select(func.percentile_cont(0.5).within_group(epoch)).where(*converted)
        ).scalar()
        return None if found is None else float(found)
    seconds = (
        func.julianday(col(RunRecord.converted_at)) - func.julianday(col(RunRecord.entered_at))
    ) * 86400.0
    return stats.median([float(value) for (value,) in session.execute(select(seconds).where(*converted))])


# --- experiments ---------------------------------------------------------------------------------

Looks = dict[str, dict[date, list[float]]]
"""Per arm, per UTC day: [runs that entered the arm, conversions, value]."""


def _experiment(db: Database, session: Any, scope: _Scope, split: ir.Split) -> Experiment:
    """Per variant: runs assigned (by the split's step reaches) and their conversions at or after
    the assignment, per day, so the always-valid test can look once a day."""
    where = [*scope.reaches(), col(StepReach.step_id) == split.id]
    looks: Looks = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0]))
    reached_on, converted_on = _day(db, col(StepReach.reached_at)), _day(db, col(RunRecord.converted_at))
    assigned = session.execute(
        select(col(StepReach.variant), reached_on, func.count())
        .where(*where)
        .group_by(col(StepReach.variant), reached_on)
    )
    for variant, day, count in assigned:
        looks[variant or ""][_as_day(day)][0] += count
    converted = session.execute(
        select(
            col(StepReach.variant),
            converted_on,
            func.count(),
            func.sum(col(RunRecord.conversion_value)),
        )
        .join(RunRecord, col(RunRecord.run_id) == col(StepReach.run_id))
        # The range applies to the joined runs directly; "not null" lets the planner drop the
        # runs that never converted before the join rather than after it.
        .where(
            col(StepReach.journey) == scope.journey,
            col(StepReach.step_id) == split.id,
            *scope.runs(),
            col(RunRecord.converted_at).is_not(None),
            col(RunRecord.converted_at) >= col(StepReach.reached_at),
        )
        .group_by(col(StepReach.variant), converted_on)
    )
    for variant, day, count, worth in converted:
        look = looks[variant or ""][_as_day(day)]
        look[1] += count
        look[2] += float(worth or 0.0)
    names = [variant.name for variant in split.variants]
    names += sorted(name for name in looks if name not in names)  # a variant since removed
    control = "control" if "control" in names else names[0]
    arms = [_arm(name, looks.get(name, {})) for name in names]
    comparisons = [_compare(control, name, looks) for name in names if name != control]
    return Experiment(
        step=split.id, experiment=split.experiment, control=control, arms=arms, comparisons=comparisons
    )


def _holdout(db: Database, session: Any, scope: _Scope) -> Holdout:
    """Held-out runs (no marketing message) against everyone else, entries and conversions per day."""
    looks: Looks = defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0]))
    arm = case((col(RunRecord.holdout), literal("holdout")), else_=literal("messaged"))
    entered_on, converted_on = _day(db, col(RunRecord.entered_at)), _day(db, col(RunRecord.converted_at))
    for name, day, count in session.execute(
        select(arm, entered_on, func.count()).where(*scope.runs()).group_by(arm, entered_on)
    ):
        looks[name][_as_day(day)][0] += count
    for name, day, count, worth in session.execute(
        select(arm, converted_on, func.count(), func.sum(col(RunRecord.conversion_value)))
        .where(*scope.runs(), col(RunRecord.converted_at).is_not(None))
        .group_by(arm, converted_on)
    ):
        looks[name][_as_day(day)][1] += count
        looks[name][_as_day(day)][2] += float(worth or 0.0)
    return Holdout(
        arms=[_arm(name, looks.get(name, {})) for name in ("holdout", "messaged")],
        comparison=_compare("holdout", "messaged", looks),
    )


def _arm(name: str, days: Mapping[date, list[float]]) -> Arm:
    runs = int(sum(look[0] for look in days.values()))
    converted = int(sum(look[1] for look in days.values()))
    value = sum(look[2] for look in days.values())
    return Arm(
        name=name,
        runs=runs,
        converted=converted,
        rate=_ratio(converted, runs),
        value_per_run=_ratio(value, runs) if value else None,
    )


def daily_looks(
    control: Mapping[date, Sequence[float]], arm: Mapping[date, Sequence[float]]
) -> list[tuple[int, int, int, int]]:
    """Cumulative (x control, n control, x arm, n arm) at the end of each day either side saw data."""
    looks, totals = [], [0, 0, 0, 0]
    for day in sorted({*control, *arm}):
        for index, side in ((0, control), (2, arm)):
            counts = side.get(day)
            if counts is not None:
                totals[index] += int(counts[1])
                totals[index + 1] += int(counts[0])
        looks.append((totals[0], totals[1], totals[2], totals[3]))
    return looks


def _compare(control: str, name: str, looks: Looks) -> Comparison:
    base, other = _arm(control, looks.get(control, {})), _arm(name, looks.get(name, {}))
    x1, n1, x2, n2 = base.converted, base.runs, other.converted, other.runs
    lift = None if base.rate is None or other.rate is None else other.rate - base.rate
    relative = None
    if base.rate and other.rate is not None:
        relative = other.rate / base.rate - 1.0
    shared: dict[str, Any] = {
        "arm": name,
        "against": control,
        "lift": lift,
        "lift_interval": stats.difference_interval(x1, n1, x2, n2),
        "relative_lift": relative,
        "relative_interval": stats.ratio_interval(x1, n1, x2, n2),
    }
    if min(n1, n2) < MIN_PER_ARM:
        return Comparison(
            **shared,
            p_value=None,
            always_valid_p=None,
            verdict="too early",
            winner=None,
            summary=f"too early: {n1} and {n2} runs so far, need about {MIN_PER_ARM} per variant",
        )
    tested = stats.two_proportion_z_test(x1, n1, x2, n2)
    # Looks start once both arms have enough runs for the normal approximation (fewer looks only
    # make the p-value larger, so it stays valid).
    looked = daily_looks(looks.get(control, {}), looks.get(name, {}))
    always = stats.always_valid_p_value(look for look in looked if min(look[1], look[3]) >= MIN_PER_ARM)
    if always < ALPHA and lift is not None and lift != 0:
        better, worse = (name, control) if lift > 0 else (control, name)
        summary = f"{better} converts better than {worse}: {_points(abs(lift))}"
        interval = shared["lift_interval"]
        if interval is not None:
            low, high = (interval.low, interval.high) if lift > 0 else (-interval.high, -interval.low)
            summary += f" (95% CI {low * 100:+.1f} to {high * 100:+.1f})"
        return Comparison(
            **shared,
            p_value=None if tested is None else tested[1],
            always_valid_p=always,
            verdict="winner",
            winner=better,
            summary=f"{summary}, always-valid p {_p(always)}",
        )
    return Comparison(
        **shared,
        p_value=None if tested is None else tested[1],
        always_valid_p=always,
        verdict="no clear winner yet",
        winner=None,
        summary=f"no clear winner yet: {name} {_signed_points(lift)} against {control}, always-valid p {_p(always)}",
    )


def _points(difference: float) -> str:
    return f"{difference * 100:+.1f} points"


def _signed_points(difference: float | None) -> str:
    return "n/a" if difference is None else _points(difference)


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"= {value:.3f}"


# --- labels --------------------------------------------------------------------------------------


def step_label(step: ir.Step) -> str:
    """What a step does, in the words of the journey file."""
    if isinstance(step, ir.Send):
        channels = " > ".join(step.channels) or "auto"
        return f"{channels} {step.template}"
    if isinstance(step, ir.Wait):
        length = step.written or f"{step.seconds}s"
        return f"{length} at random" if step.spread else length
    if isinstance(step, ir.WaitUntil):
        return f"until {step.when}"
    if isinstance(step, ir.WaitFor):
        return f"{step.describe} (timeout {step.timeout_written or f'{step.timeout}s'})"
    if isinstance(step, ir.Split):
        return step.experiment
    if isinstance(step, ir.Branch):
        return f"{len(step.arms)} condition{'s' if len(step.arms) != 1 else ''}"
    if isinstance(step, ir.Update):
        return ", ".join(trait.name for trait in step.traits)
    return step.reason


def walk_counts(steps: Iterable[StepCounts]) -> Iterable[StepCounts]:
    """Every step of a report, nested ones included, in journey order."""
    for step in steps:
        yield step
        for branch in step.branches:
            yield from walk_counts(branch.steps)


# --- text ----------------------------------------------------------------------------------------


def render_text(report: JourneyReport) -> str:
    """The report as a readable table: steps indented as the journey is, then the experiments."""
    entered = report.totals.entered
    lines = [f"{report.name} ({report.journey})"]
    versions = "every version" if report.version is None else f"version {report.version}"
    span = (
        "all time"
        if report.since is None and report.until is None
        else f"entered {_when(report.since) or 'the start'} to {_when(report.until) or 'now'}"
    )
    lines.append(f"{versions}, {span}; current version {report.current_version}")
    lines.append("")
    ended = ", ".join(f"{reason} {count}" for reason, count in report.totals.ended.items()) or "none"
    lines.append(f"entered    {entered}")
    lines.append(f"active     {report.totals.active}")
    lines.append(f"ended      {sum(report.totals.ended.values())}  ({ended})")
    conv = report.conversions
    converted = f"converted  {conv.converted}  {_pct(conv.rate)}"
    if conv.median_seconds is not None:
        converted += f", median {_duration(conv.median_seconds)} after entry"
    if conv.value is not None:
        converted += f", value {conv.value:,.2f} ({_money(conv.value_per_run)} per run)"
    lines.append(converted)
    if len(report.versions) > 1:
        lines.append("")
        lines.append("versions")
        for row in report.versions:
            lines.append(
                f"  {row.version:<14} entered {row.entered:>7}  active {row.active:>7}  "
                f"converted {row.converted:>7} {_pct(_ratio(row.converted, row.entered))}"
            )
    lines.append("")
    lines.append(f"{'step':<{_NAME}} {'reached':>8} {'waiting':>8}  of entered")
    lines.extend(_step_lines(report.steps, 0, entered))
    lines.append("")
    lines.append("funnel")
    for stage in report.funnel:
        drop = f"  (-{stage.drop_off})" if stage.drop_off else ""
        lines.append(f"  {stage.stage:<30} {stage.runs:>8} {_pct(stage.rate)}{drop}")
    for experiment in report.experiments:
        lines.append("")
        lines.append(
            f"experiment {experiment.experiment} (step {experiment.step}, control {experiment.control})"
        )
        lines.extend(_arm_lines(experiment.arms))
        lines.extend(f"  {comparison.summary}" for comparison in experiment.comparisons)
    if report.holdout is not None:
        lines.append("")
        lines.append("holdout (no marketing message) against everyone else")
        lines.extend(_arm_lines(report.holdout.arms))
        lines.append(f"  {report.holdout.comparison.summary}")
    return "\n".join(lines) + "\n"


_NAME = 60
"""Characters of the step column."""


def _step_lines(steps: Sequence[StepCounts], depth: int, entered: int) -> list[str]:
    lines = []
    indent = "  " * depth
    for step in steps:
        name = f"{indent}{step.id}  {step.kind} {step.label}"
        if len(name) > _NAME:
            name = name[: _NAME - 1] + "…"
        waiting = str(step.waiting) if step.waiting else ""
        lines.append(f"{name:<{_NAME}} {step.reached:>8} {waiting:>8}  {_pct(_ratio(step.reached, entered))}")
        if step.send is not None:
            detail = ", ".join(f"{name} {count}" for name, count in step.send.outcomes.items())
            if step.send.channels:
                detail += "; via " + ", ".join(f"{c} {n}" for c, n in step.send.channels.items())
            if step.send.deferrals:
                detail += "; deferred: " + ", ".join(f"{r} {n}" for r, n in step.send.deferrals.items())
            feedback = ", ".join(f"{name} {count}" for name, count in step.send.feedback.items() if count)
            if feedback:
                detail += f"; {feedback}"
            if detail:
                lines.append(f"{indent}    {detail}")
        for branch in step.branches:
            lines.append(f"{indent}  {branch.label}:")
            lines.extend(_step_lines(branch.steps, depth + 2, entered))
    return lines


def _arm_lines(arms: Sequence[Arm]) -> list[str]:
    lines = []
    for arm in arms:
        line = f"  {arm.name:<12} {arm.runs:>8} runs  {arm.converted:>7} converted  {_pct(arm.rate)}"
        if arm.value_per_run is not None:
            line += f"  {_money(arm.value_per_run)} per run"
        lines.append(line)
    return lines


def _pct(rate: float | None) -> str:
    return "" if rate is None else f"{rate * 100:5.1f}%"


def _money(value: float | None) -> str:
    return "" if value is None else f"{value:,.2f}"


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"
