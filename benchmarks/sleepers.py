"""Many sleeping runs: the worker's memory and CPU while runs sleep, the start rate, and the
wake-up of every run in the same minute, against the same journey written by hand.

    python benchmarks/sleepers.py [--runs 100000] [--concurrency 64] [--database-url postgresql://...]
                                  [--worker-env NAME=VALUE ...] [--sample 1.0] [--timeout 7200]
                                  [--records ride|local] [--opening router|run] [--floor default|passthrough]
                                  [--kinds both|HandwrittenJourney|JourneyRun] [--no-wake] [--temporal-store memory|file]
                                  [--temporal-config KEY=VALUE ...] [--shared]

The journey sleeps until an instant its trigger carries, then sends one transactional SMS
(``wait_until: {date: event.properties.due_at}``), run by ``JourneyRun``; the hand-written
workflow (``benchmarks/handwritten.py`` with ``until``) sleeps with ``workflow.sleep`` and sends
through the same ``nurture.send`` activity. Each kind, the hand-written one first, has a dev server
(in memory, or a SQLite file), a worker subprocess (``worker.run``, configured by the environment
as ``worker.py`` is, serving both workflows) and a database (SQLite, or a fresh PostgreSQL
database) of its own, so the kind measured second does not wake against the first's finished
runs (``--shared``: one of each for both kinds, as before 2026-12-07, 10:00 UTC). For each kind, a
warm-up, then:

1. **start**: ``--runs`` runs, ``--concurrency`` starts in flight: the hand-written workflow with
   a plain ``start_workflow`` (the floor: what any Temporal application pays to start a run),
   ``JourneyRun`` as the event API starts a person's first run of a journey
   (``workflows.journey.new_run``, ``nurture.service.ingest.start_run``, then the router's write
   of the run's start and first wait, ``record_opening``; ``--opening run``: the run writes them
   with a local activity of its own, as runs started before ``opened``);
2. **settle**: until every run has taken its first workflow task and sleeps (JourneyRun: its
   ``runs`` row says it waits, and for an opened run, whose router wrote that row, the worker and
   the dev server have both been idle for 3 s; the hand-written workflow writes nothing, so: until
   they have been idle for 3 s);
3. **sleep**: the worker's resident memory (RSS) and CPU, sampled every ``--sample`` seconds;
4. **wake**: every run of the kind is due in the same minute (evenly over 60 s from one instant);
   the time from that instant until the last message is in the outbox, then a check that every
   run sent exactly one message.

At the end of each phase the benchmark reads two counters of the Temporal SDK's own metrics
(``NURTURE_TEMPORAL_METRICS_PORT``, on a free port unless ``--worker-env`` names one): the
workflow tasks the worker ran, and its cache misses (``temporal_sticky_cache_miss``: a task for a
run no longer in the worker's cache, so the run's whole history is fetched and replayed before the
task). Per run and phase, they show where a wake-up under a backlog replays runs.

Through all four, the worker writes each full garbage collection's pause to a file (``_stack.py``,
``NURTURE_BENCH_GC_LOG``); they are counted per phase.

The instant is worked out from a warm-up of 200 runs of each kind (their start and settle time
per run, times 1.3, plus 30 s of sleep). Each phase's figures are printed as it ends. Prints a table per phase, the worker's RSS as the runs
started (to show it flat in the number of sleeping runs, bounded by the workflow cache), the CPU
per run, and the ratios against the goals (wake-up within 1.10x of the hand-written workflow).
``--worker-env`` passes settings to the worker (``NURTURE_MAX_CACHED_WORKFLOWS=1000``, ...).
``--floor passthrough`` passes the hand-written workflow's module through the sandbox as the worker
passes Nurture's (``workflows/sandbox.py``); by default it is imported again for every run, as the
SDK does for any workflow module not configured otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _stack import (
    FLOOR_PASSTHROUGH,
    GC_LOG,
    ROOT,
    Stack,
    bounded,
    busy_seconds,
    cpu_seconds,
    database,
    machine,
)
from handwritten import WORKFLOW_NAME as HANDWRITTEN
from sqlalchemy import func
from sqlmodel import col, select
from temporalio.client import Client

from nurture.engine.interpreter import workflow_id
from nurture.engine.model import Event
from nurture.language.compiler import load_project
from nurture.language.ir import Journey, journey_payload
from nurture.service.devserver import dev_server, free_port
from nurture.service.ingest import start_run
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord, ProfileRecord, RunRecord
from nurture.storage.stores import record_opening
from workflows.journey import RECORDS_RIDE, new_run
from workflows.journey import WORKFLOW_NAME as GENERIC

WAKE_GOAL = 1.10
SPREAD = 60.0
"""Runs are due evenly over this many seconds from the wake-up instant: all in the same minute."""
ASLEEP_ONLY = 60.0
"""With ``--no-wake``: seconds the measured runs are watched asleep."""
WARM_UP = 200
TEMPLATE = "course_access"
JOURNEY = """journey: bench_sleepers
trigger: {event: Bench Started}
key: "event.properties.order_id"
steps:
  - id: until_due
    wait_until: {date: "event.properties.due_at"}
  - id: reminder
    send: sms
    template: course_access
    category: transactional
"""


def rss_bytes(pid: int) -> int:
    """A process's resident set size; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Sample:
    at: float
    wall: float
    phase: str
    started: int
    worker_rss: int
    worker_cpu: float
    temporal_rss: int
    temporal_cpu: float
    busy: float


@dataclass
class Meter:
    """Samples the worker and the dev server every ``every`` seconds, tagged with the phase."""

    worker: int
    temporal: int
    every: float
    phase: str = "idle"
    started: int = 0
    samples: list[Sample] = field(default_factory=list)

    def sample(self) -> Sample:
        s = Sample(
            time.perf_counter(),
            time.time(),
            self.phase,
            self.started,
            rss_bytes(self.worker),
            cpu_seconds(self.worker),
            rss_bytes(self.temporal),
            cpu_seconds(self.temporal),
            busy_seconds(),
        )
        self.samples.append(s)
        return s

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)

    def idle(self, seconds: float) -> bool:
        """Whether the worker and the dev server both used under 3% of a core over the last
        ``seconds`` (a worker starved by a busy server is not idle: the server is not either)."""
        recent = [s for s in self.samples if s.at >= self.samples[-1].at - seconds]
        if len(recent) < 2 or recent[-1].at - recent[0].at < seconds * 0.5:
            return False
        span = recent[-1].at - recent[0].at
        worker = (recent[-1].worker_cpu - recent[0].worker_cpu) / span
        temporal = (recent[-1].temporal_cpu - recent[0].temporal_cpu) / span
        return worker < 0.03 and temporal < 0.03


@dataclass
class Phase:
    """What one kind's runs cost, phase by phase."""

    kind: str
    runs: int
    start_s: float = 0.0
    settle_s: float = 0.0
    wake_s: float = 0.0
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per phase: worker and temporal CPU seconds, other cores' busy seconds, wall seconds."""
    rss: dict[str, int] = field(default_factory=dict)
    """The worker's RSS at the end of each phase, and the highest seen."""
    by_started: list[tuple[int, int]] = field(default_factory=list)
    """(runs started, worker RSS) through the start and settle phases."""
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Each phase's beginning and end, POSIX seconds."""
    sdk: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per phase: the worker's workflow tasks (of this kind) and cache misses, from the SDK's metrics."""
    history: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Per run, from :data:`HISTORY_SAMPLE` runs' histories once woken: events, bytes, and the
    bytes a cache miss at the wake-up's second task fetches (the events before the send completed)."""


SDK_COUNTERS = {
    "tasks": "temporal_workflow_task_execution_latency_count",
    "misses": "temporal_sticky_cache_miss",
}
"""The SDK metrics read per phase (Prometheus names): workflow tasks run, per workflow type, and
tasks that found their run evicted from the cache (for every type; the phases of the two kinds
do not overlap)."""


HISTORY_SAMPLE = 20
"""Runs per kind whose histories are fetched after the wake-up, for their size."""


async def history_size(client: Client, workflow_ids: list[str]) -> tuple[float, float, float]:
    """Mean events and bytes per history of ``workflow_ids``, and the bytes of the events before the
    first ``ActivityTaskCompleted``: what a task after the send fetches when its run was evicted."""
    events = size = before = 0
    for wid in workflow_ids:
        history = await client.get_workflow_handle(wid).fetch_history()
        events += len(history.events)
        size += sum(e.ByteSize() for e in history.events)
        for e in history.events:
            if e.HasField("activity_task_completed_event_attributes"):
                break
            before += e.ByteSize()
    n = max(1, len(workflow_ids))
    return events / n, size / n, before / n


def sdk_counters(port: int, kind: str) -> dict[str, float]:
    """:data:`SDK_COUNTERS` from the worker's SDK metrics on ``port`` (0 for a counter not yet
    exported): ``tasks`` of workflow type ``kind``, ``misses`` of every type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = dict.fromkeys(SDK_COUNTERS, 0.0)
    for line in text.splitlines():
        for name, metric in SDK_COUNTERS.items():
            if line.startswith(metric + "{") and (name == "misses" or f'workflow_type="{kind}"' in line):
                found[name] += float(line.rsplit(" ", 1)[1])
    return found


def order_key(user: str) -> str:
    """The key of ``user``'s run (its trigger's ``order_id``), of either kind."""
    return f"order-{user}"


class Bench:
    def __init__(
        self,
        client: Client,
        stack: Stack,
        journey: Journey,
        meter: Meter,
        concurrency: int,
        traits: dict[str, dict[str, Any]],
        db: Database,
        *,
        sdk_port: int,
        records_ride: bool = True,
        opened: bool = True,
    ) -> None:
        self.client = client
        self.sdk_port = sdk_port
        """Where the worker serves the Temporal SDK's metrics."""
        self.db = db
        self.records_ride = records_ride
        self.opened = opened
        self.traits = traits
        """Each person's traits as seeded: what the event API has read when it starts a run."""
        self.stack = stack
        self.journey = journey
        self.payload = journey_payload(journey)
        self.meter = meter
        self.concurrency = concurrency

    def workflow_id(self, kind: str, user: str) -> str:
        key = order_key(user)
        return f"handwritten/{user}/{key}" if kind == HANDWRITTEN else workflow_id(self.journey.id, user, key)

    async def start(self, kind: str, user: str, due: datetime) -> None:
        """Start ``user``'s run of ``kind``, due at ``due``."""
        key = order_key(user)
        if kind == HANDWRITTEN:
            params: dict[str, Any] = {
                "journey": self.journey.id,
                "user_id": user,
                "key": key,
                "event": {"name": "Bench Started", "properties": {"order_id": key, "course_name": "Durable Python"}},
                "wait_seconds": 0,
                "until": due.isoformat(),
                "sends": [{"step_id": "reminder", "channel": "sms", "template": TEMPLATE}],
            }
            await self.client.start_workflow(
                HANDWRITTEN, params, id=self.workflow_id(kind, user), task_queue=self.stack.task_queue
            )
            return
        event = Event(
            name="Bench Started",
            timestamp=datetime.now(UTC),
            properties={"order_id": key, "course_name": "Durable Python", "due_at": due.isoformat()},
            message_id=uuid.uuid4().hex,
        )
        # What nurture.service.ingest does for a trigger when the person has no run of the journey:
        # the traits it read go with the start of a run whose first step reads them, and a run that
        # then waits first is opened: its start and first wait written once it has started.
        params, opens = new_run(
            self.journey, self.payload, user, key, event.to_dict(), self.traits[user], event.timestamp, opens=self.opened
        )
        params[RECORDS_RIDE] = self.records_ride
        wid = self.workflow_id(kind, user)
        run_id = await start_run(self.client, params, wid=wid, task_queue=self.stack.task_queue, once=False, running=False)
        if opens is not None and run_id is not None:
            await asyncio.to_thread(self.open, *opens.records(run_id, wid))

    def open(self, start: dict[str, Any], steps: dict[str, Any]) -> None:
        """The router's write of an opening (with the run's route, in the event API)."""
        with self.db.session() as session:
            record_opening(session, start, steps)

    def asleep(self, kind: str, users: list[str], db: Database) -> bool:
        """Every run has taken its first workflow task: JourneyRun's record where it waits (its
        ``runs`` row at ``until_due``; written by the router for an opened run, so then also the
        worker and the dev server both idle), which the hand-written workflow does not write, so
        for it the worker and the dev server both idle."""
        if kind == HANDWRITTEN:
            return self.meter.idle(3.0)
        with db.session() as session:
            query = (
                select(func.count())
                .select_from(RunRecord)
                .where(col(RunRecord.user_id).like(users[0].rsplit("-", 1)[0] + "-%"))
                .where(col(RunRecord.step) == "until_due")
            )
            waiting = int(session.exec(query).one()) == len(users)
        return waiting and (not self.opened or self.meter.idle(3.0))

    async def phase(
        self, kind: str, users: list[str], due: datetime | None, lead: float, db: Database, *, wake: bool = True
    ) -> Phase:
        """Start, settle, sleep and wake ``users``' runs; ``due`` None: ``lead`` seconds after the start.
        Without ``wake``, the runs are due a day later and the phase ends :data:`ASLEEP_ONLY` seconds
        after they all sleep (their RSS and CPU sampled meanwhile)."""
        result = Phase(kind, len(users))
        due = due or datetime.now(UTC) + timedelta(seconds=lead)
        if not wake:
            due += timedelta(days=1)
        marks: dict[str, Sample] = {"begin": self.meter.sample()}
        counters = {"begin": sdk_counters(self.sdk_port, kind)}
        self.meter.phase, self.meter.started = f"{kind}:start", 0

        tenth = max(1, len(users) // 10)

        async def one(index: int) -> bool:
            await self.start(kind, users[index], due + timedelta(seconds=SPREAD * index / len(users)))
            self.meter.started += 1
            if len(users) >= 10_000 and self.meter.started % tenth == 0:
                print(f"{kind}: {self.meter.started} started ({datetime.now(UTC):%H:%M:%S})", flush=True)
            return True

        began = time.perf_counter()
        await bounded(len(users), self.concurrency, one)
        result.start_s = time.perf_counter() - began
        marks["start"] = self.meter.sample()
        counters["start"] = sdk_counters(self.sdk_port, kind)
        self.meter.phase = f"{kind}:settle"
        while not self.asleep(kind, users, db):
            if datetime.now(UTC) >= due:
                raise SystemExit(f"{kind}: the runs were still being started when they became due; raise the lead")
            await asyncio.sleep(0.5)
        result.settle_s = time.perf_counter() - began
        marks["settle"] = self.meter.sample()
        counters["settle"] = sdk_counters(self.sdk_port, kind)
        print(
            f"{kind}: {len(users)} started in {result.start_s:.1f} s, all asleep after {result.settle_s:.1f} s; "
            f"worker RSS {mib(marks['begin'].worker_rss)} -> {mib(marks['settle'].worker_rss)} MiB, CPU "
            f"{(marks['settle'].worker_cpu - marks['begin'].worker_cpu) * 1000 / len(users):.2f} ms per run",
            flush=True,
        )
        self.meter.phase = f"{kind}:sleep"
        await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()) if wake else ASLEEP_ONLY)
        marks["sleep"] = self.meter.sample()
        counters["sleep"] = sdk_counters(self.sdk_port, kind)
        if wake:
            await self.wake(kind, users, due, db, result)
            step = max(1, len(users) // HISTORY_SAMPLE)
            result.history = await history_size(self.client, [self.workflow_id(kind, u) for u in users[::step][:HISTORY_SAMPLE]])
        else:
            result.wake_s = float("nan")
            print(f"{kind}: {len(users)} asleep for {ASLEEP_ONLY:.0f} s; worker RSS {mib(marks['sleep'].worker_rss)} MiB; "
                  "not woken (--no-wake)", flush=True)
        marks["wake"] = self.meter.sample()
        counters["wake"] = sdk_counters(self.sdk_port, kind)
        self.meter.phase = "idle"
        previous, before = marks["begin"], "begin"
        for name in ("start", "settle", "sleep", "wake"):
            now = marks[name]
            worker, temporal = now.worker_cpu - previous.worker_cpu, now.temporal_cpu - previous.temporal_cpu
            result.cpu[name] = {
                "worker": worker,
                "temporal": temporal,
                "other": max(0.0, now.busy - previous.busy - worker - temporal),
                "wall": now.at - previous.at,
            }
            result.rss[name] = now.worker_rss
            result.bounds[name] = (previous.wall, now.wall)
            result.sdk[name] = {key: counters[name][key] - counters[before][key] for key in SDK_COUNTERS}
            previous, before = now, name
        # This phase's samples only: a warm-up of the same kind came before it.
        mine = [s for s in self.meter.samples if s.phase.startswith(f"{kind}:") and s.at >= marks["begin"].at]
        result.rss["max"] = max(s.worker_rss for s in mine)
        result.by_started = [(s.started, s.worker_rss) for s in mine if s.phase in (f"{kind}:start", f"{kind}:settle")]
        return result

    async def wake(self, kind: str, users: list[str], due: datetime, db: Database, result: Phase) -> None:
        """Until every run has sent its message; then each run must have sent exactly one."""
        self.meter.phase = f"{kind}:wake"
        deadline = time.monotonic() + max(600.0, len(users) * 0.2)
        while outbox(db, users)[0] < len(users):
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind}: {outbox(db, users)[0]} of {len(users)} messages after the wake-up timed out")
            await asyncio.sleep(0.25)
        count, distinct, last = outbox(db, users)
        if count != len(users) or distinct != len(users):
            raise SystemExit(f"{kind}: {count} messages for {distinct} of {len(users)} runs: lost or duplicated")
        result.wake_s = (last - due).total_seconds()
        print(f"{kind}: {len(users)} messages, the last {result.wake_s:.1f} s after the first run was due", flush=True)


def outbox(db: Database, users: list[str]) -> tuple[int, int, datetime]:
    """Messages sent to ``users``: how many, to how many people, and when the last was written.

    The kind's people share a prefix ending in ``-``; a range on it reads only their rows through
    the ``user_id`` index (``LIKE`` reads the whole table on SQLite, so the second kind's polls
    cost more than the first's)."""
    prefix = users[0].rsplit("-", 1)[0]
    with db.session() as session:
        query = select(
            func.count(), func.count(func.distinct(MessageRecord.user_id)), func.max(MessageRecord.created_at)
        ).where(col(MessageRecord.user_id) >= prefix + "-", col(MessageRecord.user_id) < prefix + ".")
        count, distinct, last = session.exec(query).one()
    when = last if last is not None else datetime.now(UTC)
    return int(count), int(distinct), when if when.tzinfo else when.replace(tzinfo=UTC)


def seed(db: Database, users: list[str], traits: dict[str, dict[str, Any]]) -> None:
    """Profiles with a phone number, in batches (not timed); ``traits`` gets each one's traits."""
    for offset in range(0, len(users), 5000):
        with db.session() as session:
            for i, user in enumerate(users[offset : offset + 5000]):
                traits[user] = {"phone": f"+86139{offset + i:08d}"}
                session.add(ProfileRecord(user_id=user, traits=traits[user], phone=traits[user]["phone"]))


def people(kind: str, count: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    short = "hw" if kind == HANDWRITTEN else "jr"
    return [f"{short}{tag}-{i:07d}" for i in range(count)]


def mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def collections(path: Path) -> list[tuple[float, float]]:
    """The worker's full garbage collections: (when, pause ms)."""
    if not path.exists():
        return []
    return [(float(a), float(b)) for a, b in (line.split() for line in path.read_text().splitlines() if line)]


def report_collections(phases: list[Phase], pauses: list[tuple[float, float]]) -> None:
    print()
    print(f"{'full GC pauses':<20}{'phase':<8}{'count':>7}{'p50 ms':>9}{'max ms':>9}{'total ms':>10}")
    for p in phases:
        for name, (begin, end) in p.bounds.items():
            mine = sorted(ms for at, ms in pauses if begin <= at < end)
            if mine:
                print(f"{p.kind:<20}{name:<8}{len(mine):>7}{mine[len(mine) // 2]:>9.1f}{mine[-1]:>9.1f}{sum(mine):>10.1f}")
            else:
                print(f"{p.kind:<20}{name:<8}{0:>7}{'-':>9}{'-':>9}{0:>10.1f}")


def report(phases: list[Phase], warm: dict[str, float]) -> None:
    print()
    print(f"{'workflow':<20}{'runs':>8}{'start s':>9}{'starts/s':>10}{'settled s':>11}{'wake s':>9}{'msgs/s':>9}")
    for p in phases:
        print(
            f"{p.kind:<20}{p.runs:>8}{p.start_s:>9.1f}{p.runs / p.start_s:>10.1f}{p.settle_s:>11.1f}"
            f"{p.wake_s:>9.1f}{p.runs / p.wake_s:>9.1f}"
        )
    print("(start: the client's starts; settled: until the worker is idle, every run sleeping; wake: from the")
    print(f" first instant a run is due (they are due over {SPREAD:.0f} s) until the last message is in the outbox)")
    print()
    print(f"{'CPU ms per run':<20}{'phase':<8}{'worker':>9}{'temporal':>10}{'other':>8}{'wall s':>8}")
    for p in phases:
        for name in ("start", "settle", "sleep", "wake"):
            c = p.cpu[name]
            per = 1000 / p.runs
            print(
                f"{p.kind:<20}{name:<8}{c['worker'] * per:>9.2f}{c['temporal'] * per:>10.2f}"
                f"{c['other'] * per:>8.2f}{c['wall']:>8.1f}"
            )
    print("(start and settle: until every run sleeps; other: the rest of the machine meanwhile)")
    print()
    print(f"{'SDK per run':<20}{'phase':<8}{'wf tasks':>9}{'misses':>8}")
    for p in phases:
        for name in ("start", "settle", "sleep", "wake"):
            c = p.sdk[name]
            print(f"{p.kind:<20}{name:<8}{c['tasks'] / p.runs:>9.2f}{c['misses'] / p.runs:>8.2f}")
    print("(wf tasks: workflow tasks the worker ran; misses: tasks whose run was no longer in its cache,")
    print(" so its whole history was fetched and replayed first)")
    print()
    print(f"{'history per run':<20}{'events':>8}{'bytes':>9}{'to send':>9}")
    for p in phases:
        print(f"{p.kind:<20}{p.history[0]:>8.1f}{p.history[1]:>9.0f}{p.history[2]:>9.0f}")
    print(f"(from {HISTORY_SAMPLE} woken runs of each kind; to send: the bytes before the send's activity completed,")
    print(" what a cache miss at the wake-up's second task fetches and replays)")
    print()
    print(f"{'worker RSS MiB':<20}{'before':>8}{'started':>9}{'settled':>9}{'asleep':>8}{'woken':>8}{'max':>8}")
    for p in phases:
        print(
            f"{p.kind:<20}{mib(p.by_started[0][1] if p.by_started else 0):>8}{mib(p.rss['start']):>9}"
            f"{mib(p.rss['settle']):>9}{mib(p.rss['sleep']):>8}{mib(p.rss['wake']):>8}{mib(p.rss['max']):>8}"
        )
    for p in phases:
        print(f"worker RSS MiB as {p.kind} runs started: " + ", ".join(rss_by_tenth(p)))
    for p in phases:
        c = p.cpu["sleep"]
        print(f"worker CPU while {p.runs} {p.kind} runs sleep: {c['worker'] / max(c['wall'], 1e-9) * 100:.2f}% of a core")
    hand = next((p for p in phases if p.kind == HANDWRITTEN), None)
    generic = next((p for p in phases if p.kind == GENERIC), None)
    print()
    if hand is None or generic is None:
        for p in phases:
            print(f"{p.kind}: {p.runs / p.start_s:.1f} starts/s, worker CPU per start {start_cpu(p) * 1000:.2f} ms")
    else:
        report_ratios(hand, generic)
    print("warm-up, start and settle seconds per run: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in warm.items()))


def start_cpu(p: Phase) -> float:
    """The worker's CPU seconds per run, from the first start until every run sleeps."""
    return (p.cpu["start"]["worker"] + p.cpu["settle"]["worker"]) / p.runs


def report_ratios(hand: Phase, generic: Phase) -> None:
    start = hand.start_s / generic.start_s
    print(f"start rate JourneyRun/raw start_workflow: {start:.3f} ({generic.runs / generic.start_s:.1f} vs {hand.runs / hand.start_s:.1f} starts/s)")
    cpu, cpu_hand = start_cpu(generic), start_cpu(hand)
    print(f"worker CPU per start JourneyRun/hand-written: {cpu / cpu_hand:.3f} ({cpu * 1000:.2f} vs {cpu_hand * 1000:.2f} ms)")
    if math.isnan(generic.wake_s):
        print("wake-up: not measured (--no-wake)")
    else:
        wake = generic.wake_s / hand.wake_s
        verdict = "met" if wake <= WAKE_GOAL else "NOT met"
        print(f"wake-up time JourneyRun/hand-written: {wake:.3f} ({generic.wake_s:.1f} vs {hand.wake_s:.1f} s; goal <= {WAKE_GOAL:.2f}: {verdict})")
        print(f"messages: {generic.runs} + {hand.runs}, one per run, none lost or duplicated")


def rss_by_tenth(p: Phase) -> list[str]:
    out = []
    for tenth in range(1, 11):
        goal = p.runs * tenth // 10
        found = next((rss for started, rss in p.by_started if started >= goal), None)
        if found is not None:
            out.append(f"{tenth * 10}% {mib(found)}")
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs of each kind")
    parser.add_argument("--concurrency", type=int, default=64, help="starts in flight")
    parser.add_argument("--sample", type=float, default=1.0, help="seconds between samples of the worker")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server; a fresh database is made there")
    parser.add_argument(
        "--worker-env", action="append", default=[], metavar="NAME=VALUE", help="a setting for the worker"
    )
    parser.add_argument(
        "--records",
        choices=("ride", "local"),
        default="ride",
        help="JourneyRun's end record: on its send's activity, as the event API starts runs "
        "(records_ride), or a local activity of its own, as runs started before it",
    )
    parser.add_argument(
        "--opening",
        choices=("router", "run"),
        default="router",
        help="JourneyRun's start and first wait: written by the router that starts it, as the event API "
        "does (opened), or by the run's own local activity, as runs started before it",
    )
    parser.add_argument(
        "--floor",
        choices=("default", "passthrough"),
        default="default",
        help="the hand-written workflow's module in the worker's sandbox: imported again for every run, "
        "the SDK's default (the floor of the goals), or passed through as Nurture's workflow modules are",
    )
    parser.add_argument(
        "--temporal-store",
        choices=("memory", "file"),
        default="memory",
        help="the dev server's store: in memory, or a SQLite file in WAL mode (as `nurture up` keeps it)",
    )
    parser.add_argument(
        "--temporal-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dynamic configuration value for the dev server, the value in JSON "
        "(history.taskSchedulerMaxQPS=1000, ...)",
    )
    parser.add_argument(
        "--kinds", choices=("both", HANDWRITTEN, GENERIC), default="both", help="which workflows to measure"
    )
    parser.add_argument(
        "--no-wake",
        dest="wake",
        action="store_false",
        help=f"start, settle and sleep only: the measured runs are not woken (the phase ends {ASLEEP_ONLY:.0f} s "
        "after they all sleep), for sizes whose wake-up would outlast the session; the warm-up still wakes",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="both kinds on one dev server, database and worker, the hand-written one first (by default "
        "each kind has its own, so neither wakes against the other's finished runs)",
    )
    parser.add_argument("--timeout", type=float, default=7200.0, help="give up after this many seconds (per kind)")
    args = parser.parse_args()
    if args.runs < 1 or args.concurrency < 1:
        parser.error("--runs and --concurrency must be at least 1")
    given = dict(item.split("=", 1) for item in args.worker_env)
    kinds = (HANDWRITTEN, GENERIC) if args.kinds == "both" else (args.kinds,)
    phases: list[Phase] = []
    warm: dict[str, float] = {}
    pauses: list[tuple[float, float]] = []
    # Each kind on a dev server, database and worker of its own (unless --shared): a kind measured
    # second would otherwise wake against the first kind's finished runs in the same stores.
    for group in [kinds] if args.shared else [(kind,) for kind in kinds]:
        extra = {"NURTURE_TEMPORAL_METRICS_PORT": str(free_port()), **given}  # each worker's own port
        done, seconds, collected = await measure(group, args, extra)
        phases += done
        warm.update(seconds)
        pauses += collected
    report(phases, warm)
    report_collections(phases, pauses)


async def measure(
    kinds: tuple[str, ...], args: argparse.Namespace, extra: dict[str, str]
) -> tuple[list[Phase], dict[str, float], list[tuple[float, float]]]:
    """``kinds``' warm-ups, then their measured phases, on one fresh dev server, database and
    worker: the phases, the warm-ups' seconds per run, and the worker's full collections."""
    server = dict(item.split("=", 1) for item in args.temporal_config)
    with tempfile.TemporaryDirectory(prefix="nurture-sleepers-") as tmp:
        home = Path(tmp)
        journeys = home / "journeys"
        journeys.mkdir()
        (journeys / "bench_sleepers.yaml").write_text(JOURNEY)
        journey = load_project(journeys, ROOT / "templates").journeys["bench_sleepers"]
        with dev_server(home, persist=args.temporal_store == "file", config=server) as temporal, database(home, args.database_url) as url:
            stack = Stack(home, temporal.address, url, journeys=journeys)
            db = stack.db()
            engine = "PostgreSQL" if args.database_url else "SQLite"
            print(f"{' and '.join(kinds)}: {machine()}; dev server (store: {args.temporal_store}; settings {server or 'defaults'}); "
                  f"worker subprocess on {engine}; load {load()}")
            print(f"journey: wait_until an instant, then one transactional SMS; {args.runs} runs of each kind, "
                  f"{args.concurrency} starts in flight; worker settings {extra or 'defaults'}; "
                  f"hand-written module: {'passed through' if args.floor == 'passthrough' else 'imported per run'}")
            users = {kind: (people(kind, WARM_UP), people(kind, args.runs)) for kind in kinds}
            began = time.perf_counter()
            traits: dict[str, dict[str, Any]] = {}
            for warm_up, measured in users.values():
                seed(db, warm_up + measured, traits)
            print(f"seeded {len(kinds) * (args.runs + WARM_UP)} profiles in {time.perf_counter() - began:.0f} s", flush=True)
            os.environ.update(extra)  # the worker's environment is this process's (Stack.env)
            os.environ[GC_LOG] = str(home / "gc.log")
            if args.floor == "passthrough":
                os.environ[FLOOR_PASSTHROUGH] = "1"
            with stack.worker(handwritten=True) as worker:
                client = await Client.connect(temporal.address)
                meter = Meter(worker.process.pid, temporal.process.pid, args.sample)
                sampler = asyncio.create_task(meter.run())
                try:
                    bench = Bench(
                        client,
                        stack,
                        journey,
                        meter,
                        args.concurrency,
                        traits,
                        db,
                        sdk_port=int(extra["NURTURE_TEMPORAL_METRICS_PORT"]),
                        records_ride=args.records == "ride",
                        opened=args.opening == "router",
                    )
                    phases, warm = await asyncio.wait_for(run(bench, users, args.runs, db, wake=args.wake), args.timeout)
                finally:
                    sampler.cancel()
            db.dispose()
            print(f"load after: {load()}", flush=True)
            return phases, warm, collections(home / "gc.log")


async def run(
    bench: Bench, users: dict[str, tuple[list[str], list[str]]], runs: int, db: Database, *, wake: bool = True
) -> tuple[list[Phase], dict[str, float]]:
    warm: dict[str, float] = {}
    for kind, (warm_up, _) in users.items():  # warm-up: caches, sticky queues, pools; the time per run
        done = await bench.phase(kind, warm_up, None, 20.0 + WARM_UP * 0.1, db)
        warm[kind] = done.settle_s / WARM_UP
        print(f"warm-up {kind}: settled in {done.settle_s:.1f} s, woken in {done.wake_s:.1f} s", flush=True)
    phases = []
    for kind, (_, measured) in users.items():
        lead = runs * warm[kind] * 1.3 + 30.0
        when = f"due in {lead:.0f} s" if wake else "not to be woken (--no-wake)"
        print(f"{kind}: {runs} runs {when} ({datetime.now(UTC):%H:%M:%S})", flush=True)
        due = datetime.now(UTC) + timedelta(seconds=lead)
        phases.append(await bench.phase(kind, measured, due, lead, db, wake=wake))
    return phases, warm


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    asyncio.run(main())
