"""A journey's report over many runs, against the aggregate SQL an analyst would write (the floor).

    python benchmarks/report.py [--runs 1000000] [--db sqlite|postgresql|both] [--repeat 5]
                                [--postgres postgresql://postgres@127.0.0.1:5432/postgres]
                                [--explain] [--seed 7]

Seeds ``--runs`` runs of a synthetic 20-step journey (``benchmarks/report_journeys/``: sends
with a fallback, waits, a ``wait_for``, a ``branch`` and a three-variant ``split``) straight into
the real tables made by ``Database.migrate()``: runs, step_reaches, messages and message_events,
written in bulk (PostgreSQL ``COPY``, SQLite ``executemany`` in large transactions; secondary
indexes are dropped during the load and created again from their own definitions, then the
tables are analysed). Then, side by side, ``--repeat`` times each in alternation after one
untimed pass: the report (``nurture.reports.report.journey_report``, all versions, all time)
and the floor, the plain ``GROUP BY`` queries that give the same numbers (runs by version,
status and end reason; reach, deferrals and variants per step; messages by step, status, reason
and channel; feedback per step; conversions and value per variant; median time to convert).
Prints medians, the ratio report/floor and the goals (report within 2x of the floor; under 1 s
on PostgreSQL at 1M runs).
``--explain`` prints PostgreSQL's ``EXPLAIN ANALYZE`` of every floor query.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sqlite3
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from _stack import ROOT, machine

from nurture.language.compiler import load_project
from nurture.language.ir import Journey
from nurture.reports.report import journey_report
from nurture.storage.db import Database, database_url
from nurture.storage.models import feedback_bit

JOURNEY = "bench_report"
SPLIT = "offer_test"
RATIO_GOAL = 2.0
POSTGRES_GOAL = 1.0  # seconds, at 1M runs
NOW = datetime(2026, 12, 1, tzinfo=UTC)
TABLES = ("runs", "step_reaches", "messages", "message_events")

# (step id, kind, channel, template): the journey's 20 steps in order; see report_journey.yaml.
SENDS = {
    "welcome_sms": ("sms", "welcome_coupon"),
    "welcome_email": ("email", "welcome"),
    "thank_you_sms": ("sms", "vip_thank_you"),
    "nudge_email": ("email", "popular_courses"),
    "vip_sms": ("sms", "vip_thank_you"),
    "standard_email": ("email", "usage_guide"),
    "offer_email_a": ("email", "course_launch"),
    "offer_sms_b": ("sms", "course_last_chance"),
    "reminder_email": ("email", "cart_reminder"),
    "last_call_sms": ("sms", "cart_last_call"),
    "survey_email": ("email", "live_session_preview"),
}
END_REASONS = (
    ("exit_on", 0.45),
    ("goal", 0.25),
    ("restarted", 0.15),
    ("forgotten", 0.05),
    ("exit:unsubscribed", 0.10),
)
SKIPS = (("frequency_cap", 0.4), ("opted_out", 0.25), ("topic_opted_out", 0.15), ("no_address", 0.2))
FEEDBACK = {
    "email": (
        ("delivered", 0.9),
        ("open", 0.35),
        ("click", 0.08),
        ("bounce", 0.02),
        ("unsubscribe", 0.005),
        ("spamreport", 0.001),
    ),
    "sms": (("delivered", 0.95),),
    "wechat": (("delivered", 0.9),),
}


def pick(rng: random.Random, choices: Sequence[tuple[str, float]]) -> str:
    roll, total = rng.random(), 0.0
    for name, weight in choices:
        total += weight
        if roll < total:
            return name
    return choices[-1][0]


@dataclass
class Rows:
    """One batch of rows per table, as tuples in the column order of :data:`COLUMNS`."""

    runs: list[tuple[Any, ...]]
    step_reaches: list[tuple[Any, ...]]
    messages: list[tuple[Any, ...]]
    message_events: list[tuple[Any, ...]]


COLUMNS = {
    "runs": (
        "run_id",
        "workflow_id",
        "journey",
        "version",
        "user_id",
        "key",
        "status",
        "entered_at",
        "ended_at",
        "end_reason",
        "variants",
        "converted_at",
        "conversion_value",
        "step",
        "last_message_at",
        "goal_until",
        "holdout",
    ),
    "step_reaches": (
        "run_id",
        "step_id",
        "journey",
        "version",
        "variant",
        "reached_at",
        "deferrals",
        "deferral_reason",
    ),
    "messages": (
        "idempotency_key",
        "run_id",
        "user_id",
        "journey",
        "step_id",
        "channel",
        "template",
        "provider",
        "provider_id",
        "status",
        "reason",
        "variant",
        "attempts",
        "revision",
        "sent_at",
        "created_at",
        "feedback",
    ),
    "message_events": (
        "provider",
        "event",
        "idempotency_key",
        "provider_id",
        "user_id",
        "at",
        "data",
        "received_at",
    ),
}


class Seeder:
    """Synthetic runs of the benchmark journey: most reach the first steps, fewer the later ones.

    A run enters some time in the 60 days before :data:`NOW`; before each wait it may stop there
    (12%): a run that entered in the last week is then still active, waiting at that step, and an
    older one ended for a reason of :data:`END_REASONS`. A run that passes every wait completes.
    """

    def __init__(self, versions: Sequence[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.versions = versions

    def batch(self, start: int, count: int) -> Rows:
        rows = Rows([], [], [], [])
        for index in range(start, start + count):
            self.run(index, rows)
        return rows

    def run(self, index: int, rows: Rows) -> None:
        rng = self.rng
        run_id = f"run-{index:08d}"
        user = f"user-{index:08d}"
        version = self.versions[0] if rng.random() < 0.7 else self.versions[1]
        entered = NOW - timedelta(seconds=rng.randrange(60 * 86400))
        clock = entered
        variant: str | None = None
        last_message: datetime | None = None

        def reach(step: str, hours: float = 0.0, *, var: str | None = None) -> datetime:
            nonlocal clock
            clock += timedelta(hours=hours)
            deferrals, why = (1, "quiet_hours") if step in SENDS and rng.random() < 0.05 else (0, None)
            rows.step_reaches.append((run_id, step, JOURNEY, version, var, clock, deferrals, why))
            return clock

        def send(step: str, var: str | None = None) -> None:
            nonlocal last_message
            at = reach(step, var=var)
            channel, template = SENDS[step]
            key = f"{run_id}:{step}"
            roll = rng.random()
            status, reason, provider, provider_id, sent_at = "sent", None, "outbox", f"p-{key}", at
            if channel == "sms" and roll < 0.08:  # no usable phone: the WeChat fallback
                channel = "wechat"
            elif roll < 0.16:
                status, reason, provider, provider_id, sent_at = "skipped", pick(rng, SKIPS), None, None, None
            elif roll < 0.19:
                status, reason, provider_id, sent_at = "failed", "provider_error", None, None
            rows.messages.append(
                (
                    key,
                    run_id,
                    user,
                    JOURNEY,
                    step,
                    channel,
                    template,
                    provider,
                    provider_id,
                    status,
                    reason,
                    var,
                    "[]",
                    0,
                    sent_at,
                    at,
                    0,
                )
            )
            if status != "sent":
                return
            last_message = at
            bits = 0
            for event, chance in FEEDBACK[channel]:
                if rng.random() < chance:
                    when = at + timedelta(minutes=rng.randrange(1, 600))
                    rows.message_events.append(("outbox", event, key, provider_id, user, when, "{}", when))
                    bits |= feedback_bit(event)  # what the webhooks set as they record the event
            rows.messages[-1] = (*rows.messages[-1][:-1], bits)

        def wait(step: str, hours: float) -> bool:
            """Reach the wait ``step``; whether the run stops there (its row is then written): it
            is still waiting when the wait ends after :data:`NOW`, else it may end meanwhile."""
            nonlocal clock
            reach(step)
            if clock + timedelta(hours=hours) > NOW:
                self.finish(rows, run_id, user, version, entered, clock, variant, last_message, waiting=step)
                return True
            if rng.random() < 0.12:
                clock += timedelta(hours=rng.uniform(0, hours))
                self.finish(rows, run_id, user, version, entered, clock, variant, last_message, ended_at=step)
                return True
            clock += timedelta(hours=hours)
            return False

        send("welcome_sms")
        if wait("wait_1", 24):
            return
        send("welcome_email")
        ordered = rng.random() < 0.25
        if wait("wait_for_order", rng.randrange(1, 48) if ordered else 48):
            return
        send("thank_you_sms" if ordered else "nudge_email")
        if wait("wait_2", 24):
            return
        reach("segment_branch")
        send("vip_sms" if rng.random() < 0.2 else "standard_email")
        variant = ("a", "b", "control")[rng.randrange(3)]
        reach(SPLIT, var=variant)
        if variant == "a":
            send("offer_email_a", variant)
        elif variant == "b":
            send("offer_sms_b", variant)
        for step, hours, nxt in (
            ("wait_3", 48, "reminder_email"),
            ("wait_4", 24, "last_call_sms"),
            ("wait_5", 24, "survey_email"),
        ):
            if wait(step, hours):
                return
            send(nxt)
        reach("done_update")
        self.finish(rows, run_id, user, version, entered, clock, variant, last_message)

    def finish(
        self,
        rows: Rows,
        run_id: str,
        user: str,
        version: str,
        entered: datetime,
        clock: datetime,
        variant: str | None,
        last_message: datetime | None,
        *,
        waiting: str | None = None,
        ended_at: str | None = None,
    ) -> None:
        """The run's row: active while ``waiting`` at a step, ended at the step ``ended_at`` for
        a reason of :data:`END_REASONS`, else completed."""
        rng = self.rng
        # Conversion: more likely with an offer; variant a converts best, so the experiment has a winner.
        chance = {"a": 0.16, "b": 0.13, "control": 0.11, None: 0.08}[variant]
        converted = entered + timedelta(hours=rng.randrange(1, 24 * 7)) if rng.random() < chance else None
        if converted is not None and converted > NOW:
            converted = None
        value = round(rng.uniform(20, 400), 2) if converted is not None else None
        active = waiting is not None
        if active:
            status, ended, reason, step = "active", None, None, waiting
        else:
            status, ended, step = "ended", clock, None
            reason = "completed" if ended_at is None else pick(rng, END_REASONS)
        variants = json.dumps({SPLIT: variant}) if variant and not active else "{}"
        goal_until = entered + timedelta(days=7) if converted is None else None
        rows.runs.append(
            (
                run_id,
                f"{JOURNEY}/{user}",
                JOURNEY,
                version,
                user,
                user,
                status,
                entered,
                ended,
                reason,
                variants,
                converted,
                value,
                step,
                last_message,
                goal_until,
                False,
            )
        )


# --- loading ---------------------------------------------------------------------------------------


def pg_text(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


def sqlite_value(value: Any) -> Any:
    # SQLAlchemy's DateTime on SQLite: ISO text without the zone (every instant here is UTC).
    return value.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(value, datetime) else value


class Loader:
    """Bulk writes into one database, secondary indexes dropped meanwhile and made again after."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith("postgresql")

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        if self.postgres:
            with psycopg.connect(
                self.url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
            ) as conn:
                yield conn
        else:
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            try:
                yield conn
            finally:
                conn.close()

    def indexes(self, conn: Any) -> list[tuple[str, str]]:
        """(name, definition) of every secondary index of the seeded tables."""
        if self.postgres:
            rows = conn.execute(
                "SELECT i.indexname, i.indexdef FROM pg_indexes i JOIN pg_class c ON c.relname = i.indexname "
                "JOIN pg_index x ON x.indexrelid = c.oid WHERE i.tablename = ANY(%s) AND NOT x.indisprimary "
                "AND NOT x.indisunique",
                (list(TABLES),),
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN "
                f"({','.join('?' * len(TABLES))})",
                TABLES,
            ).fetchall()
        return [(name, sql) for name, sql in rows]

    def load(self, seeder: Seeder, runs: int, batch: int = 50_000) -> None:
        with self.connection() as conn:
            indexes = self.indexes(conn)
            for name, _ in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            if not self.postgres:
                conn.execute("PRAGMA synchronous=OFF")
            for start in range(0, runs, batch):
                rows = seeder.batch(start, min(batch, runs - start))
                for table in TABLES:
                    self.write(conn, table, getattr(rows, table))
            for _, sql in indexes:
                conn.execute(sql)
            conn.execute("VACUUM ANALYZE" if self.postgres else "ANALYZE")
            if not self.postgres:
                conn.commit()

    def write(self, conn: Any, table: str, rows: list[tuple[Any, ...]]) -> None:
        columns = COLUMNS[table]
        if self.postgres:
            with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                copy.write("".join("\t".join(map(pg_text, row)) + "\n" for row in rows))
        else:
            marks = ", ".join("?" * len(columns))
            conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                ([sqlite_value(v) for v in row] for row in rows),
            )
            conn.commit()


# --- the floor: what an analyst would write ----------------------------------------------------------


def floor_queries(postgres: bool) -> dict[str, str]:
    """The aggregate queries, by name; ``:journey`` and ``:split`` are parameters."""
    median = (
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM converted_at - entered_at)) "
        "FROM runs WHERE journey = :journey AND converted_at IS NOT NULL"
        if postgres
        else "SELECT (julianday(converted_at) - julianday(entered_at)) * 86400 AS s FROM runs "
        "WHERE journey = :journey AND converted_at IS NOT NULL ORDER BY s "
        "LIMIT 1 OFFSET (SELECT count(converted_at) / 2 FROM runs WHERE journey = :journey)"
    )
    return {
        "runs by version, status, end reason": (
            "SELECT version, status, end_reason, count(*), count(converted_at), sum(conversion_value) "
            "FROM runs WHERE journey = :journey GROUP BY version, status, end_reason"
        ),
        "waiting per step": (
            "SELECT version, step, count(*) FROM runs WHERE journey = :journey AND status = 'active' "
            "GROUP BY version, step"
        ),
        "reached, deferrals, variants per step": (
            "SELECT version, step_id, variant, count(*), sum(deferrals), "
            "count(CASE WHEN deferral_reason = 'quiet_hours' THEN 1 END) "
            "FROM step_reaches WHERE journey = :journey GROUP BY version, step_id, variant"
        ),
        "messages by step, status, reason, channel": (
            "SELECT step_id, status, reason, channel, count(*) FROM messages WHERE journey = :journey "
            "GROUP BY step_id, status, reason, channel"
        ),
        "feedback per step": (
            "SELECT m.step_id, e.event, count(DISTINCT m.id) FROM message_events e "
            "JOIN messages m ON m.idempotency_key = e.idempotency_key WHERE m.journey = :journey "
            "GROUP BY m.step_id, e.event"
        ),
        "conversions per variant": (
            "SELECT s.variant, count(*), count(r.converted_at), sum(r.conversion_value) FROM step_reaches s "
            "LEFT JOIN runs r ON r.run_id = s.run_id AND r.converted_at >= s.reached_at "
            "WHERE s.journey = :journey AND s.step_id = :split GROUP BY s.variant"
        ),
        "median time to convert": median,
    }


def floor(db: Database, queries: dict[str, str]) -> dict[str, list[tuple[Any, ...]]]:
    from sqlalchemy import text

    with db.engine.connect() as conn:
        return {
            name: [tuple(row) for row in conn.execute(text(sql), {"journey": JOURNEY, "split": SPLIT})]
            for name, sql in queries.items()
        }


def explain(db: Database, queries: dict[str, str]) -> None:
    from sqlalchemy import text

    with db.engine.connect() as conn:
        for name, sql in queries.items():
            plan = conn.execute(
                text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"), {"journey": JOURNEY, "split": SPLIT}
            )
            print(f"\n-- {name}")
            for (line,) in plan:
                print(line)


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class Timing:
    engine: str
    runs: int
    seed_seconds: float
    rows: dict[str, int]
    floor: list[float]
    report: list[float]
    parts: dict[str, float]


def measure(url: str, engine: str, journey: Journey, args: argparse.Namespace) -> Timing:
    db = Database(url)
    db.migrate()
    seeder = Seeder([journey.version, "0ld0ld0ld0ld"], args.seed)
    started = time.perf_counter()
    Loader(url).load(seeder, args.runs)
    seed_seconds = time.perf_counter() - started
    postgres = engine == "postgresql"
    queries = floor_queries(postgres)
    with db.engine.connect() as conn:
        from sqlalchemy import text

        rows = {t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in TABLES}
    print(
        f"{engine}: seeded {args.runs:,} runs in {seed_seconds:.1f} s: "
        + ", ".join(f"{t} {n:,}" for t, n in rows.items()),
        flush=True,
    )
    floor(db, queries)  # untimed: caches, plans
    journey_report(db, journey)
    floor_times: list[float] = []
    report_times: list[float] = []
    for index in range(args.repeat):
        order: list[tuple[list[float], Callable[[], Any]]] = [
            (floor_times, lambda: floor(db, queries)),
            (report_times, lambda: journey_report(db, journey)),
        ]
        for times, call in order if index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    parts: dict[str, float] = {}
    for name, sql in queries.items():  # each floor query alone, once, for where the time goes
        start = time.perf_counter()
        floor(db, {name: sql})
        parts[name] = time.perf_counter() - start
    if args.explain and postgres:
        explain(db, queries)
    db.dispose()
    return Timing(engine, args.runs, seed_seconds, rows, floor_times, report_times, parts)


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def print_results(timings: list[Timing]) -> None:
    print()
    print(
        f"{'database':<12}{'runs':>10}{'floor s p50':>13}{'report s p50':>14}{'report/floor':>14}  samples floor | report"
    )
    for t in timings:
        f = statistics.median(t.floor)
        r = statistics.median(t.report)
        samples = " ".join(f"{x:.3f}" for x in t.floor) + " | " + " ".join(f"{x:.3f}" for x in t.report)
        print(f"{t.engine:<12}{t.runs:>10,}{f:>13.3f}{r:>14.3f}{r / f:>14.2f}  {samples}")
    print()
    print(f"{'floor query alone, once (s)':<44}" + "".join(f"{t.engine:>12}" for t in timings))
    for name in timings[0].parts:
        print(f"{name:<44}" + "".join(f"{t.parts[name]:>12.3f}" for t in timings))
    print()
    for t in timings:
        ratio = statistics.median(t.report) / statistics.median(t.floor)
        print(
            f"{t.engine}: report/floor {ratio:.2f} (goal <= {RATIO_GOAL:.0f}x: {'met' if ratio <= RATIO_GOAL else 'NOT met'})"
        )
        if t.engine == "postgresql":
            r = statistics.median(t.report)
            scaled = (
                ""
                if t.runs == 1_000_000
                else f", at {t.runs:,} runs (extrapolate linearly to 1M: {r * 1e6 / t.runs:.2f} s)"
            )
            print(
                f"postgresql: report {r:.3f} s (goal < {POSTGRES_GOAL:.0f} s at 1M runs: "
                f"{'met' if r * 1e6 / t.runs < POSTGRES_GOAL else 'NOT met'}{scaled})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="runs to seed")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes of each, alternating")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server; the database nurture_bench_report_<hex> is made there and dropped",
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed of the synthetic runs")
    parser.add_argument(
        "--explain", action="store_true", help="EXPLAIN ANALYZE every floor query (PostgreSQL)"
    )
    args = parser.parse_args()
    if args.runs < 1 or args.repeat < 1:
        parser.error("--runs and --repeat must be at least 1")
    journey = load_project(Path(__file__).parent / "report_journeys", ROOT / "templates").journeys[JOURNEY]
    print(f"{machine()}; {load_average()}")
    print(
        f"journey {JOURNEY}: 20 steps, split {SPLIT} (a, b, control); {args.runs:,} runs; {args.repeat} passes each"
    )
    timings: list[Timing] = []
    engines = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    with tempfile.TemporaryDirectory(prefix="nurture-report-") as tmp:
        for engine in engines:
            if engine == "sqlite":
                timings.append(measure(f"sqlite:///{Path(tmp) / 'nurture.db'}", engine, journey, args))
                continue
            name = f"nurture_bench_report_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
            try:
                url = database_url({"DATABASE_URL": f"{args.postgres.rsplit('/', 1)[0]}/{name}"})
                timings.append(measure(url, engine, journey, args))
            finally:
                with psycopg.connect(args.postgres, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print_results(timings)
    print(f"\nafter: {load_average()}; pid {os.getpid()}")


if __name__ == "__main__":
    main()
