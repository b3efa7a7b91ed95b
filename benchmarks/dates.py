"""What dates and pacing cost: identify calls that plan a date trigger, and journeys that wait for
a date, a random time or room under a send rate, each against a named floor measured side by side.

    python benchmarks/dates.py [--calls 1000] [--concurrency 16] [--rounds 2] [--people 2000]
                               [--plays 3] [--database-url postgresql://postgres@127.0.0.1:5432/postgres]
    python benchmarks/dates.py --only api|simulator

**Identify through the event API** (``api``). The project is tests/projects/dates, whose
``birthday`` and ``trial_ending`` journeys start on a date in the person's traits. A real dev
server (``temporal server start-dev``, in memory) and the event API (uvicorn, a subprocess) run on
loopback, with SQLite in a temp dir or, with ``--database-url``, a fresh database on that
PostgreSQL server (dropped at the end). No worker runs: the date trigger workflows are started,
not played. ``--people`` known users are identified first (not timed). Two streams of ``--calls``
identify calls each, ``--concurrency`` in flight, for ``--rounds`` rounds (their order alternating):

- **floor: no date trait**: each call sets ``plan`` and ``visits``, which no date trigger reads:
  the identify as it was before date triggers;
- **dated: birthday changes**: each call gives a known user a new ``birthday``; the API plans
  both trait-date journeys of the person (a signal-with-start of ``birthday``'s workflow, a
  signal to ``trial_ending``'s, which has no date to wait for).

CPU per call is read from /proc for each process; "other" is what the rest of the machine used
meanwhile. After the runs, every dated user must have its ``birthday`` date trigger recorded.

**Journeys in the simulator** (``simulator``): one population of ``--people`` people, each
entering at a random time of a day, plays through the same two-step journey (a hold, then an
email) in five versions, outcome-only (nothing rendered, as ``SimRuntime(render=False)``):

- **floor: plain wait**: ``wait: 3d``;
- ``wait_until: {date: "event.properties.renews_at", offset: -3d, at: "10:00"}``;
- ``wait: {random: 0..3d}``;
- ``wait: 3d`` and ``rate: 60/h`` on the send (most sends are deferred ``rate_limit``);
- no hold, and a date trigger: ``trigger: {date: "event.properties.renews_at", offset: -3d,
  at: "10:00", event: ...}``.

Each version plays ``--plays`` times (after a warm-up, versions interleaved); every play must
start and send to every person once. Journeys per second and CPU seconds are per version.

docs/performance.md ("Dates and pacing") records results.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _stack import (
    ROOT,
    WRITE_KEY,
    CommandCpu,
    Stack,
    bounded,
    busy_seconds,
    cpu_seconds,
    database,
    machine,
    percentile,
)
from sqlalchemy import func
from sqlmodel import col, select

from nurture.delivery.deliverer import Deliverer
from nurture.language.compiler import Project, load_project
from nurture.service.devserver import dev_server
from nurture.simulation.scenarios import Scenario, build_simulator, load_scenario
from nurture.storage.models import DateTriggerRecord

DATES = ROOT / "tests" / "projects" / "dates"
FLOOR = "floor: no date trait"
DATED = "dated: birthday changes"


# --- identify through the event API -------------------------------------------------------------


def identify(user: str, traits: dict[str, Any]) -> dict[str, Any]:
    return {
        "userId": user,
        "traits": traits,
        "messageId": str(uuid.uuid4()),
        "timestamp": datetime.now(UTC).isoformat(),
    }


def stream(name: str, rng: random.Random, people: int, calls: int) -> list[dict[str, Any]]:
    """``calls`` identify bodies for known users: a trait no date reads, or a new birthday."""
    out = []
    for _ in range(calls):
        user = f"known-{rng.randrange(people):05d}"
        if name == FLOOR:
            traits: dict[str, Any] = {"plan": rng.choice(["free", "pro", "team"]), "visits": rng.randrange(100)}
        else:
            traits = {"birthday": f"{rng.randrange(1950, 2008)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"}
        out.append(identify(user, traits))
    return out


@dataclass
class ApiRun:
    stream: str
    calls: int
    seconds: float
    answer_ms: list[float]
    cpu_ms: dict[str, float]
    """CPU milliseconds per call, by process."""
    failed: int


async def run_calls(
    http: httpx.AsyncClient, name: str, bodies: list[dict[str, Any]], concurrency: int, meters: dict[str, Callable[[], float]]
) -> ApiRun:
    answers: list[float] = []
    failed = 0

    async def one(index: int) -> None:
        nonlocal failed
        started = time.perf_counter()
        try:
            response = await http.post("/v1/identify", json=bodies[index])
            failed += response.status_code != 200
        except httpx.HTTPError:
            failed += 1
        answers.append((time.perf_counter() - started) * 1000)

    before = {key: meter() for key, meter in meters.items()}
    start = time.perf_counter()
    await bounded(len(bodies), concurrency, one)
    seconds = time.perf_counter() - start
    used = {key: (meter() - before[key]) * 1000 / len(bodies) for key, meter in meters.items()}
    used["other"] = max(0.0, used.pop("machine") - sum(used.values()))
    return ApiRun(name, len(bodies), seconds, answers, used, failed)


async def measure_api(args: argparse.Namespace) -> list[ApiRun]:
    with tempfile.TemporaryDirectory(prefix="nurture-dates-") as tmp:
        home = Path(tmp)
        with dev_server(home, persist=False) as temporal, database(home, args.database_url) as url:
            stack = Stack(home, temporal.address, url, journeys=DATES / "journeys", templates=DATES / "templates")
            with stack.api() as api:
                meters: dict[str, Callable[[], float]] = {
                    "api": functools.partial(cpu_seconds, api.process.pid),
                    "temporal": functools.partial(cpu_seconds, temporal.process.pid),
                    "client": functools.partial(cpu_seconds, os.getpid()),
                }
                if args.database_url:
                    meters["postgres"] = CommandCpu("postgres")
                meters["machine"] = busy_seconds
                runs, dated = await _api_rounds(args, api.address, meters)
            db = stack.db()
            with db.session() as session:
                planned = session.exec(
                    select(func.count()).select_from(DateTriggerRecord).where(col(DateTriggerRecord.journey) == "birthday")
                ).one()
            db.dispose()
    if planned < len(dated):
        raise SystemExit(f"only {planned} birthday date triggers for {len(dated)} dated users")
    print(f"birthday date triggers recorded: {planned} (users given a birthday: {len(dated)})")
    return runs


async def _api_rounds(
    args: argparse.Namespace, address: str, meters: dict[str, Callable[[], float]]
) -> tuple[list[ApiRun], set[str]]:
    """The known users, a warm-up, then the measured rounds; the runs and the users given a birthday."""
    rng = random.Random(13)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    headers = {"Authorization": f"Bearer {WRITE_KEY}"}
    dated: set[str] = set()
    runs: list[ApiRun] = []
    async with httpx.AsyncClient(base_url=address, headers=headers, limits=limits, timeout=60) as http:
        for start in range(0, args.people, 100):  # known users, with a phone and a name
            batch = [
                {"type": "identify", "messageId": f"seed-{i}", **identify(f"known-{i:05d}", {"first_name": f"K{i}"})}
                for i in range(start, min(args.people, start + 100))
            ]
            (await http.post("/v1/batch", json={"batch": batch})).raise_for_status()
        for name in (FLOOR, DATED):  # warm-up: connections, caches, the first date workflows
            warm = stream(name, rng, args.people, 200)
            dated.update(body["userId"] for body in warm if name == DATED)
            await run_calls(http, "warm-up", warm, args.concurrency, meters)
        for index in range(args.rounds):
            order = (FLOOR, DATED) if index % 2 == 0 else (DATED, FLOOR)
            for name in order:
                bodies = stream(name, rng, args.people, args.calls)
                dated.update(body["userId"] for body in bodies if name == DATED)
                runs.append(await run_calls(http, name, bodies, args.concurrency, meters))
    return runs, dated


def report_api(runs: list[ApiRun], postgres: bool) -> None:
    print()
    print(f"identify through the event API ({'PostgreSQL' if postgres else 'SQLite'}), worker not running")
    print(f"{'stream':<26}{'calls':>7}{'calls/s':>9}{'answer ms p50/p99':>19}{'failed':>8}  CPU ms per call")
    for run in runs:
        cpu = ", ".join(f"{key} {value:.2f}" for key, value in run.cpu_ms.items())
        p50, p99 = percentile(run.answer_ms, 0.5), percentile(run.answer_ms, 0.99)
        print(
            f"{run.stream:<26}{run.calls:>7}{run.calls / run.seconds:>9.1f}{f'{p50:.0f}/{p99:.0f}':>19}"
            f"{run.failed:>8}  {cpu}"
        )

    def total(name: str) -> tuple[float, dict[str, float]]:
        chosen = [r for r in runs if r.stream == name]
        calls = sum(r.calls for r in chosen)
        cpu = {key: sum(r.cpu_ms[key] * r.calls for r in chosen) / calls for key in chosen[0].cpu_ms}
        return calls / sum(r.seconds for r in chosen), cpu

    (floor_rate, floor_cpu), (dated_rate, dated_cpu) = total(FLOOR), total(DATED)
    print()
    for process in ("api", "temporal", *(("postgres",) if postgres else ())):
        dated, floor = dated_cpu[process], floor_cpu[process]
        ratio = f"{dated / floor:.2f}x, " if floor > 0 else ""
        print(f"{process} CPU ms per identify: dated {dated:.2f}, floor {floor:.2f} ({ratio}{dated - floor:+.2f} ms)")
    print(f"calls/s: dated {dated_rate:.1f}, floor {floor_rate:.1f} ({dated_rate / floor_rate * 100:.0f}% of the floor)")
    if sum(r.failed for r in runs):
        print(f"WARNING: {sum(r.failed for r in runs)} calls failed (not 200)")


# --- journeys in the simulator ------------------------------------------------------------------

JOURNEY = """\
journey: {id}
trigger: {trigger}
key: "event.properties.subscription_id"
steps:
{hold}  - id: reminder
    send: email
    template: renewal_reminder
{rate}"""
EVENT = "Subscription Renewal Scheduled"
ON_EVENT = f"{{event: {EVENT}}}"
HOLD = "  - id: hold\n    {wait}\n"
VERSIONS = {
    "floor: plain wait": (ON_EVENT, HOLD.format(wait="wait: 3d"), ""),
    "wait_until: {date, offset, at}": (
        ON_EVENT,
        HOLD.format(wait='wait_until: {date: "event.properties.renews_at", offset: -3d, at: "10:00"}'),
        "",
    ),
    "wait: {random: 0..3d}": (ON_EVENT, HOLD.format(wait="wait: {random: 0..3d}"), ""),
    "wait: 3d, send rate: 60/h": (ON_EVENT, HOLD.format(wait="wait: 3d"), "    rate: 60/h\n"),
    "date trigger (from the event)": (
        f'{{date: "event.properties.renews_at", offset: -3d, at: "10:00", event: {EVENT}}}',
        "",
        "",
    ),
}
SCENARIO = """\
scenario: "{label}"
start: 2026-03-02T10:00:00+08:00
journeys: [{id}]
population:
  count: {people}
  seed: 5
  traits: {{email: "user{{n}}@example.com"}}
  events:
    - event: {event}
      at: 0s..1d
      properties: {{subscription_id: "s{{n}}", renews_at: ["2026-03-20", "2026-03-25T18:00:00+08:00", "2026-04-02"]}}
"""


def simulator_project(home: Path, people: int) -> tuple[Project, dict[str, Scenario]]:
    """The five versions as one project (templates from tests/projects/dates), and a scenario each."""
    (home / "journeys").mkdir()
    (home / "nurture.yaml").write_text("timezone: Asia/Shanghai\n", encoding="utf-8")
    for index, (trigger, hold, rate) in enumerate(VERSIONS.values()):
        text = JOURNEY.format(id=f"version{index}", trigger=trigger, hold=hold, rate=rate)
        (home / "journeys" / f"version{index}.yaml").write_text(text, encoding="utf-8")
    project = load_project(home / "journeys", DATES / "templates", home / "nurture.yaml")
    scenarios = {}
    for index, label in enumerate(VERSIONS):
        path = home / f"version{index}.scenario.yaml"
        path.write_text(SCENARIO.format(label=label, id=f"version{index}", people=people, event=EVENT), encoding="utf-8")
        scenarios[label] = load_scenario(path, project)
    return project, scenarios


@dataclass
class SimRun:
    version: str
    journeys: int
    seconds: float
    cpu: float


async def play(label: str, scenario: Scenario, project: Project, people: int) -> SimRun:
    """One play, outcome-only; every person must be started and sent to once."""
    start, cpu = time.perf_counter(), time.process_time()
    sim = build_simulator(scenario, project, Deliverer(project.templates, {}, render=False), timeline=False)
    await sim.run()
    seconds, used = time.perf_counter() - start, time.process_time() - cpu
    runs = {o.run_id for o in sim.outcomes}
    sent = [o for o in sim.outcomes if o.send is not None and o.send.status == "sent"]
    if len(runs) != people or len(sent) != people:
        raise SystemExit(f"{label}: {len(runs)} runs and {len(sent)} sends for {people} people; measure nothing")
    return SimRun(label, len(runs), seconds, used)


async def measure_simulator(args: argparse.Namespace) -> list[SimRun]:
    with tempfile.TemporaryDirectory(prefix="nurture-dates-sim-") as tmp:
        project, scenarios = simulator_project(Path(tmp), args.people)
    for label, scenario in scenarios.items():  # warm-up
        await play(label, scenario, project, args.people)
    runs = []
    for index in range(args.plays):
        labels = list(scenarios) if index % 2 == 0 else list(reversed(scenarios))
        for label in labels:
            runs.append(await play(label, scenarios[label], project, args.people))
    return runs


def report_simulator(runs: list[SimRun], people: int) -> None:
    print()
    print(f"the simulator, outcome-only: {people} people per play, plays interleaved")
    print(
        f"{'version':<34}{'journeys':>10}{'seconds':>9}{'cpu s':>8}{'journeys/s':>12}{'vs floor':>10}"
        f"{'cpu us/journey':>16}{'vs floor':>10}"
    )

    def total(label: str) -> tuple[int, float, float]:
        chosen = [r for r in runs if r.version == label]
        return sum(r.journeys for r in chosen), sum(r.seconds for r in chosen), sum(r.cpu for r in chosen)

    count, seconds, cpu = total(next(iter(VERSIONS)))
    floor_rate, floor_cpu = count / seconds, cpu * 1e6 / count
    for label in VERSIONS:
        count, seconds, cpu = total(label)
        rate, per = count / seconds, cpu * 1e6 / count
        print(
            f"{label:<34}{count:>10}{seconds:>9.2f}{cpu:>8.2f}{rate:>12.0f}{rate / floor_rate:>9.2f}x"
            f"{per:>16.0f}{per / floor_cpu:>9.2f}x"
        )
    print("(on a busy machine the wall-clock rate follows the other work; CPU per journey is the steadier figure)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", choices=("api", "simulator"), help="one of the two measures")
    parser.add_argument("--calls", type=int, default=1000, help="identify calls per stream and round")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--rounds", type=int, default=2, help="API rounds; the streams' order alternates")
    parser.add_argument("--people", type=int, default=2000, help="known users (API) and people per play (simulator)")
    parser.add_argument("--plays", type=int, default=3, help="measured plays of each simulator version")
    parser.add_argument("--database-url", help="a PostgreSQL server: a fresh database is made there")
    args = parser.parse_args()
    if min(args.calls, args.concurrency, args.rounds, args.people, args.plays) <= 0:
        parser.error("--calls, --concurrency, --rounds, --people and --plays must be positive")
    print(f"{machine()}, load average {os.getloadavg()[0]:.2f}")
    if args.only != "simulator":
        report_api(await measure_api(args), bool(args.database_url))
    if args.only != "api":
        report_simulator(await measure_simulator(args), args.people)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
