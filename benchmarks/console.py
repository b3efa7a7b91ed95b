"""Server time of the console's journey and person pages over the report benchmark's seed.

    python benchmarks/console.py [--runs 100000] [--db sqlite|postgresql|both] [--repeat 20]
                                 [--people 50] [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

Seeds ``--runs`` runs of the report benchmark's 20-step journey (``benchmarks/report.py``'s own
seeder and loader: runs, step reaches, messages, provider events) and a profile and three events
for each of ``--people`` of their users. Then, through the console itself (the event API's app
with the console mounted, a signed-in session, in process), it times, as the ``Server-Timing``
header the console sets reports them:

- the report alone (``journey_report``, all versions, all time), ``--repeat`` times: the query
  time the journey page cannot beat when it counts;
- the journey page counting (its report cache emptied before each request: cold), and the
  journeys list likewise (its counts over every run);
- the journeys list as viewed, ``--repeat`` times (its counts reused for 30 s: warm);
- the journey page as viewers see it, ``--repeat`` times (the report counted at most 30 s ago
  is reused: warm), and with a step selected (its latest people and messages);
- the person page of ``--people`` users (profile, runs, messages, events, deferrals).

Prints p50 and p95 of each and the goal: p95 under 300 ms on PostgreSQL. The full seed is
``--runs 1000000`` (the report benchmark's); the default finishes in a few minutes.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import psycopg
from _stack import ROOT, machine
from fastapi.testclient import TestClient
from report import JOURNEY, NOW, Loader, Seeder, load_average

from nurture.console import accounts
from nurture.console.app import Console, create_app
from nurture.language.compiler import load_project
from nurture.language.ir import Journey
from nurture.reports.report import journey_report
from nurture.service.settings import Settings
from nurture.storage.db import Database, database_url
from nurture.storage.models import EventRecord, ProfileRecord

GOAL_MS = 300.0
JOURNEYS = Path(__file__).parent / "report_journeys"
EMAIL, PASSWORD = "bench@example.com", "a benchmark password"


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def server_ms(answer: object) -> float:
    headers = answer.headers  # type: ignore[attr-defined]
    assert answer.status_code == 200, answer.text[:500]  # type: ignore[attr-defined]
    found = re.fullmatch(r"app;dur=([0-9.]+)", headers["server-timing"])
    assert found is not None
    return float(found.group(1))


def seed_people(db: Database, users: list[str]) -> None:
    with db.session() as session:
        for index, user in enumerate(users):
            session.add(
                ProfileRecord(
                    user_id=user,
                    traits={"email": f"{user}@example.com", "phone": f"+86138{index:08d}", "first_name": "Li"},
                    email=f"{user}@example.com",
                    phone=f"+86138{index:08d}",
                )
            )
            for n, name in enumerate(("Signed Up", "Order Completed", "Page Viewed")):
                session.add(
                    EventRecord(
                        message_id=f"bench-{user}-{n}",
                        kind="track",
                        user_id=user,
                        name=name,
                        properties={"n": n},
                        timestamp=NOW - timedelta(days=3 - n),
                    )
                )


def measure(url: str, engine: str, journey: Journey, args: argparse.Namespace) -> dict[str, list[float]]:
    db = Database(url)
    db.migrate()
    started = time.perf_counter()
    Loader(url).load(Seeder([journey.version, "0ld0ld0ld0ld"], args.seed), args.runs)
    rng = random.Random(args.seed)
    users = [f"user-{rng.randrange(args.runs):08d}" for _ in range(args.people)]
    seed_people(db, sorted(set(users)))
    accounts.add_user(db, EMAIL, "viewer", PASSWORD)
    print(f"{engine}: seeded {args.runs:,} runs and {len(set(users))} people in {time.perf_counter() - started:.1f} s", flush=True)

    project = load_project(JOURNEYS, ROOT / "templates")
    settings = Settings(
        write_keys=("bench-write-key",),
        database=url,
        journeys=JOURNEYS,
        templates=ROOT / "templates",
        temporal_address="127.0.0.1:1",
    )
    app = create_app(settings, project=project, db=db)
    console: Console = app.state.console
    times: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[[], float]) -> None:
        times.setdefault(name, []).append(call())

    with TestClient(app) as client:
        form = client.get("/console/sign-in")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert token is not None
        client.post("/console/sign-in", data={"csrf": token.group(1), "email": EMAIL, "password": PASSWORD})
        page = f"/console/journeys/{JOURNEY}"
        journey_report(db, journey)  # untimed: caches, plans
        for _ in range(args.repeat):
            start = time.perf_counter()
            journey_report(db, journey)
            times.setdefault("report query alone", []).append((time.perf_counter() - start) * 1000)
        for _ in range(max(3, args.repeat // 4)):
            console.forget_counts()
            timed("journey page, counting (cold)", lambda: server_ms(client.get(page)))
            console.forget_counts()
            timed("journeys list, counting (cold)", lambda: server_ms(client.get("/console/journeys")))
        for _ in range(args.repeat):
            timed("journeys list, as viewed (warm)", lambda: server_ms(client.get("/console/journeys")))
        for _ in range(args.repeat):
            timed("journey page, as viewed (warm)", lambda: server_ms(client.get(page)))
            timed("journey page, a step selected", lambda: server_ms(client.get(f"{page}?step=offer_email_a")))
        client.get(f"/console/person?id={users[0]}")  # untimed
        for user in users:
            timed("person page", lambda user=user: server_ms(client.get(f"/console/person?id={user}")))  # type: ignore[misc]
    db.dispose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs to seed (the report benchmark's: 1000000)")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=20, help="timed requests of each journey page")
    parser.add_argument("--people", type=int, default=50, help="person pages timed (one per person)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if min(args.runs, args.repeat, args.people) < 1:
        parser.error("--runs, --repeat and --people must be at least 1")
    journey = load_project(JOURNEYS, ROOT / "templates").journeys[JOURNEY]
    print(f"{machine()}; {load_average()}")
    results: dict[str, dict[str, list[float]]] = {}
    engines = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    with tempfile.TemporaryDirectory(prefix="nurture-console-") as tmp:
        for engine in engines:
            if engine == "sqlite":
                results[engine] = measure(f"sqlite:///{Path(tmp) / 'nurture.db'}", engine, journey, args)
                continue
            name = f"nurture_bench_console_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(args.postgres, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
            try:
                url = database_url({"DATABASE_URL": f"{args.postgres.rsplit('/', 1)[0]}/{name}"})
                results[engine] = measure(url, engine, journey, args)
            finally:
                with psycopg.connect(args.postgres, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print()
    print(f"{'database':<12}{'what (server time, ms)':<36}{'n':>5}{'p50':>10}{'p95':>10}")
    for engine, times in results.items():
        for what, samples in times.items():
            print(
                f"{engine:<12}{what:<36}{len(samples):>5}{statistics.median(samples):>10.1f}{percentile(samples, 0.95):>10.1f}"
            )
    if "postgresql" in results:
        print()
        for what in (
            "journeys list, as viewed (warm)",
            "journey page, as viewed (warm)",
            "journey page, a step selected",
            "person page",
        ):
            p95 = percentile(results["postgresql"][what], 0.95)
            print(f"postgresql: {what}: p95 {p95:.1f} ms (goal < {GOAL_MS:.0f} ms: {'met' if p95 < GOAL_MS else 'NOT met'})")
        cold = percentile(results["postgresql"]["journey page, counting (cold)"], 0.95)
        print(f"postgresql: journey page while counting: p95 {cold:.1f} ms (the report query's own time bounds it)")
    print(f"\nafter: {load_average()}; pid {os.getpid()}")


if __name__ == "__main__":
    main()
