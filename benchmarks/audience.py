"""Audiences: evaluating one from scratch against the plain SQL query for the same membership, and
the CPU per incoming event of keeping 20 audiences current against the same calls with none.

    python benchmarks/audience.py [--people 1000000] [--events-per-person 20] [--db both]
                                  [--repeat 3] [--calls 2000] [--rounds 2]
                                  [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

**Seed.** ``--people`` profiles (traits ``interest``, one of five, and ``vip``; 10% opted out of
the topic ``news``), each with a ``user_id`` identifier, and ``--events-per-person`` track events
each on average, spread over the last 90 days: ``Item Purchased`` (10%, with ``total``), ``Item
Viewed`` (40%), ``Page Seen`` (35%), ``Search Made`` (10%), ``Review Written`` (5%). Rows go in
with PostgreSQL ``COPY`` and SQLite ``executemany``; the events' secondary indexes are dropped for
the load and made again, then the tables are analysed. SQLite in a temp dir; PostgreSQL: a fresh
database on ``--database-url``'s server, dropped at the end.

**From scratch** (``AudienceStore.evaluate_all``): each timed pass evaluates a new audience id with
the same definition, so every pass writes every member (members, history, one ``Audience
Entered`` event each) as a deploy does. Two audiences:

- ``lapsed``: did ``Item Purchased``, not in the last 30 days. Floor: ``SELECT user_id FROM events
  WHERE name = 'Item Purchased' GROUP BY user_id HAVING max(timestamp) <= now - 30 days``.
- ``python_browsers``: ``user.interest == "python"``, did ``Item Viewed`` at least 3 times in the
  last 7 days. Floor: the events of the last 7 days joined to the profiles, the trait read with
  the database's JSON operator, ``GROUP BY ... HAVING count(*) >= 3``.

Each floor is timed twice: the query alone, its rows fetched ("floor"); and ``INSERT INTO
audience_members SELECT ...`` under a fresh audience id, storing the same membership set-based
("floor+store", still without history or events). Passes alternate, after one untimed pass each.

**Upkeep** (``Ingest.track`` without Temporal: no journey listens for these events): ``--calls``
events for random people, of the five names (and ``Cart Touched``, which no audience counts), go
through the event API's ingest path with 20 audiences deployed (evaluated from scratch first, as
a deploy does), and through the same path with none (the floor). Each round: the floor, the 20
audiences "cold" (most people have no upkeep state yet: their tallies are counted from their
stored events), the same people again "warm", the floor again. CPU is this process's (SQLite
runs in it) plus, on PostgreSQL, every ``postgres`` process's; per event, and the difference is
the upkeep's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from _stack import ROOT, CommandCpu, database, machine

from nurture.engine.model import Event
from nurture.language.audiences import Activity, Audience
from nurture.language.compiler import Project, load_project
from nurture.language.expressions import compile_expression
from nurture.service.ingest import Ingest
from nurture.storage.audiences import AudienceStore
from nurture.storage.db import Database, database_url

DAY = 86400
NAMES = (
    ("Item Purchased", 0.10),
    ("Item Viewed", 0.40),
    ("Page Seen", 0.35),
    ("Search Made", 0.10),
    ("Review Written", 0.05),
)
INTERESTS = ("python", "go", "rust", "design", "data")
NOW = datetime.now(UTC)


# --- the audiences ---------------------------------------------------------------------------------


def timed_audiences() -> dict[str, Audience]:
    """The two audiences evaluated from scratch."""
    bought = Activity("Item Purchased")
    return {
        "lapsed": Audience("lapsed", did=(bought,), not_did=(Activity("Item Purchased", within=30 * DAY),)),
        "python_browsers": Audience(
            "python_browsers",
            where=compile_expression('user.interest == "python"'),
            did=(Activity("Item Viewed", at_least=3, within=7 * DAY),),
        ),
    }


def twenty_audiences() -> dict[str, Audience]:
    """20 audiences over the seeded events and traits: every kind of clause."""
    found: list[Audience] = [*timed_audiences().values()]
    for name, _ in NAMES:
        found.append(Audience(f"did_{name}", did=(Activity(name),)))
        found.append(Audience(f"recent_{name}", did=(Activity(name, within=7 * DAY),)))
        found.append(Audience(f"often_{name}", did=(Activity(name, at_least=5, within=30 * DAY),)))
    found.append(Audience("big_spenders", did=(Activity("Item Purchased", compile_expression("event.properties.total > 80")),)))
    found.append(Audience("vip_news", where=compile_expression("user.vip"), subscribed=("news",)))
    found.append(Audience("quiet", not_did=(Activity("Page Seen", within=14 * DAY),)))
    return {a.id: a for a in found[:20]}


# --- seeding ---------------------------------------------------------------------------------------


def person(index: int) -> str:
    return f"p{index:08d}"


def seed_rows(start: int, count: int, per_person: int, rng: random.Random) -> tuple[list[tuple[Any, ...]], ...]:
    profiles, identities, events = [], [], []
    weights = [w for _, w in NAMES]
    names = [n for n, _ in NAMES]
    for index in range(start, start + count):
        user = person(index)
        traits = {"interest": rng.choice(INTERESTS), "vip": rng.random() < 0.2}
        opted = ["news"] if rng.random() < 0.1 else []
        profiles.append((user, json.dumps(traits), json.dumps(opted), NOW, NOW, "{}"))
        identities.append(("user_id", user, user, NOW))
        for _ in range(rng.randint(0, 2 * per_person)):
            name = rng.choices(names, weights)[0]
            at = NOW - timedelta(seconds=rng.randrange(90 * DAY))
            properties = {"total": rng.randrange(100)} if name == "Item Purchased" else {}
            events.append((uuid.uuid4().hex, "track", user, name, json.dumps(properties), at, at, at))
    return profiles, identities, events


COLUMNS = {
    "profiles": ("user_id", "traits", "opted_out", "created_at", "updated_at", "trait_times"),
    "identities": ("kind", "value", "person_id", "created_at"),
    "events": ("message_id", "kind", "user_id", "name", "properties", "timestamp", "received_at", "routed_at"),
}


def _pg(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _sqlite(value: Any) -> Any:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(value, datetime) else value


@contextlib.contextmanager
def raw(url: str) -> Iterator[Any]:
    if url.startswith("postgresql"):
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
            yield conn
    else:
        lite = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            yield lite
        finally:
            lite.close()


def seed(url: str, people: int, per_person: int) -> int:
    """Write the population; events written."""
    postgres = url.startswith("postgresql")
    rng = random.Random(20261206)
    written = 0
    with raw(url) as conn:
        if postgres:
            indexes = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events' AND indexname LIKE 'ix_%'").fetchall()
        else:
            indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events' AND name LIKE 'ix_%'").fetchall()
            conn.execute("PRAGMA synchronous=OFF")
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        for start in range(0, people, 20_000):
            batches = seed_rows(start, min(20_000, people - start), per_person, rng)
            for table, rows in zip(COLUMNS, batches, strict=True):
                columns = COLUMNS[table]
                if postgres:
                    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                        copy.write("".join("\t".join(map(_pg, row)) + "\n" for row in rows))
                else:
                    marks = ", ".join("?" * len(columns))
                    conn.executemany(
                        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",
                        ([_sqlite(v) for v in row] for row in rows),
                    )
                    conn.commit()
            written += len(batches[2])
        for _, sql in indexes:
            conn.execute(sql)
        conn.execute("VACUUM ANALYZE" if postgres else "ANALYZE")
        if not postgres:
            conn.commit()
    return written


# --- from scratch against the floor ----------------------------------------------------------------


def floor_sql(audience: str, postgres: bool) -> str:
    """The plain query for the membership of ``audience`` (``:cut`` is the window's start)."""
    if audience == "lapsed":
        return (
            "SELECT user_id FROM events WHERE kind = 'track' AND name = 'Item Purchased' "
            "GROUP BY user_id HAVING max(timestamp) <= :cut"
        )
    trait = "p.traits->>'interest'" if postgres else "json_extract(p.traits, '$.interest')"
    return (
        "SELECT e.user_id FROM events e JOIN profiles p ON p.user_id = e.user_id "
        f"WHERE e.kind = 'track' AND e.name = 'Item Viewed' AND e.timestamp > :cut AND {trait} = 'python' "
        "GROUP BY e.user_id HAVING count(*) >= 3"
    )


def run_floor(db: Database, audience: str, store_as: str | None) -> tuple[float, int]:
    from sqlalchemy import text

    postgres = db.url.startswith("postgresql")
    cut = NOW - timedelta(days=30 if audience == "lapsed" else 7)
    if not postgres:
        cut_value: Any = cut.strftime("%Y-%m-%d %H:%M:%S.%f")
    else:
        cut_value = cut
    query = floor_sql(audience, postgres)
    started = time.perf_counter()
    with db.session() as session:
        if store_as is None:
            found = len(session.execute(text(query), {"cut": cut_value}).all())
        else:
            stamp = "now()" if postgres else "datetime('now')"
            result = session.execute(
                text(f"INSERT INTO audience_members (audience, person, entered_at) SELECT :id, user_id, {stamp} FROM ({query}) q"),
                {"cut": cut_value, "id": store_as},
            )
            found = int(getattr(result, "rowcount", 0) or 0)
    return time.perf_counter() - started, found


def from_scratch(db: Database, audience: str, pass_id: str) -> tuple[float, int]:
    definition = dataclasses.replace(timed_audiences()[audience], id=pass_id)
    store = AudienceStore(db, {pass_id: definition})
    store.deploy()
    started = time.perf_counter()
    evaluated = store.evaluate_all(pass_id, NOW)
    return time.perf_counter() - started, evaluated.members


def measure_scratch(db: Database, engine: str, repeat: int) -> list[str]:
    lines = []
    for audience in timed_audiences():
        times: dict[str, list[float]] = {"floor": [], "floor+store": [], "nurture": []}
        sizes: dict[str, int] = {}
        for attempt in range(repeat + 1):  # the first pass of each warms caches, untimed
            tag = uuid.uuid4().hex[:6]
            order = ["floor", "floor+store", "nurture"] if attempt % 2 else ["nurture", "floor+store", "floor"]
            for kind in order:
                if kind == "floor":
                    took, size = run_floor(db, audience, None)
                elif kind == "floor+store":
                    took, size = run_floor(db, audience, f"floor_{audience}_{tag}")
                else:
                    took, size = from_scratch(db, audience, f"{audience}_{tag}")
                sizes[kind] = size
                if attempt:
                    times[kind].append(took)
        if len(set(sizes.values())) != 1:
            raise AssertionError(f"{engine} {audience}: the sizes differ: {sizes}")
        p50 = {kind: statistics.median(values) for kind, values in times.items()}
        lines.append(
            f"{engine:<11} {audience:<16} {sizes['nurture']:>9,} {p50['floor']:>9.2f} {p50['floor+store']:>12.2f} "
            f"{p50['nurture']:>10.2f} {p50['nurture'] / p50['floor']:>8.2f} {p50['nurture'] / p50['floor+store']:>10.2f}"
            f"   samples: {' '.join(f'{t:.2f}' for t in times['nurture'])}"
        )
    return lines


# --- upkeep against no audiences -------------------------------------------------------------------


def calls(people: int, count: int, rng: random.Random) -> list[tuple[str, Event]]:
    names = [n for n, _ in NAMES] + ["Cart Touched"]
    made = []
    for _ in range(count):
        name = rng.choice(names)
        properties = {"total": rng.randrange(100)} if name == "Item Purchased" else {}
        made.append((person(rng.randrange(people)), Event(name, datetime.now(UTC), properties, uuid.uuid4().hex)))
    return made


async def run_calls(ingest: Ingest, made: list[tuple[str, Event]], postgres: CommandCpu | None) -> float:
    """CPU seconds per call for ``made``, through the ingest path."""
    own, server = time.process_time(), postgres() if postgres else 0.0
    for user, event in made:
        # A fresh message id each round: a repeated one would be a duplicate, doing nothing.
        await ingest.track(user, dataclasses.replace(event, message_id=uuid.uuid4().hex))
    spent = time.process_time() - own + ((postgres() - server) if postgres else 0.0)
    return spent / len(made)


async def measure_upkeep(db: Database, engine: str, project: Project, people: int, count: int, rounds: int) -> list[str]:
    rng = random.Random(7)
    deployed = twenty_audiences()
    with_audiences = Ingest(dataclasses.replace(project, audiences=deployed), db, None, "unused")
    without = Ingest(dataclasses.replace(project, audiences={}), db, None, "unused")
    started = time.perf_counter()
    for audience in with_audiences.audiences.deploy():  # as the API's start does: the steady state
        with_audiences.audiences.evaluate_all(audience.id)
    deploy = time.perf_counter() - started
    print(f"{engine}: 20 audiences evaluated from scratch in {deploy:.0f} s", flush=True)
    meter = CommandCpu("postgres") if engine == "postgresql" else None
    samples: dict[str, list[float]] = {"none": [], "cold": [], "warm": []}
    await run_calls(without, calls(people, 200, rng), meter)  # warm-up, untimed
    await run_calls(with_audiences, calls(people, 200, rng), meter)
    for _ in range(rounds):
        made = calls(people, count, rng)
        samples["none"].append(await run_calls(without, made, meter))
        samples["cold"].append(await run_calls(with_audiences, made, meter))  # no upkeep state yet
        samples["warm"].append(await run_calls(with_audiences, made, meter))  # the same people again
        samples["none"].append(await run_calls(without, made, meter))
    p50 = {kind: statistics.median(values) * 1000 for kind, values in samples.items()}
    return [
        f"{engine:<11} {count:>6} x{rounds} {p50['none']:>12.3f} {p50['cold']:>10.3f} {p50['warm']:>10.3f}"
        f" {p50['cold'] - p50['none']:>10.3f} {p50['warm'] - p50['none']:>10.3f}"
        f"   samples ms: none {' '.join(f'{v * 1000:.2f}' for v in samples['none'])}"
        f" | cold {' '.join(f'{v * 1000:.2f}' for v in samples['cold'])}"
        f" | warm {' '.join(f'{v * 1000:.2f}' for v in samples['warm'])}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--people", type=int, default=1_000_000)
    parser.add_argument("--events-per-person", type=int, default=20)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    engines = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    print(machine())
    scratch, upkeep = [], []
    for engine in engines:
        with tempfile.TemporaryDirectory() as home, database(Path(home), None if engine == "sqlite" else args.database_url) as url:
            full = database_url({"DATABASE_URL": url})
            started = time.perf_counter()
            events = seed(full, args.people, args.events_per_person)
            print(f"{engine}: seeded {args.people:,} people and {events:,} events in {time.perf_counter() - started:.0f} s", flush=True)
            db = Database(full)
            try:
                found = measure_scratch(db, engine, args.repeat)
                print("\n".join(found), flush=True)
                scratch += found
                found = asyncio.run(measure_upkeep(db, engine, project, args.people, args.calls, args.rounds))
                print("\n".join(found), flush=True)
                upkeep += found
            finally:
                db.dispose()
    print()
    print("from scratch, seconds (p50)")
    print(f"{'database':<11} {'audience':<16} {'members':>9} {'floor':>9} {'floor+store':>12} {'nurture':>10} {'/floor':>8} {'/fl+store':>10}")
    for line in scratch:
        print(line)
    print()
    print("upkeep, CPU ms per incoming event (p50 of rounds); cold: the person's first event since the")
    print("deploy (their tallies counted from their stored events), warm: the same people again")
    print(f"{'database':<11} {'calls':>9} {'no audiences':>12} {'20 cold':>10} {'20 warm':>10} {'+cold':>10} {'+warm':>10}")
    for line in upkeep:
        print(line)


if __name__ == "__main__":
    main()
