"""Interpreter overhead: the generic JourneyRun against a hand-written workflow, side by side;
or, with ``--compare recording``, the worker's cost of recording the steps runs reach.

    python benchmarks/overhead.py [--runs 100] [--sends 3] [--wait 2s] [--rounds 2]
                                  [--start service|signal|plain] [--database-url postgresql://...]
                                  [--compare handwritten|recording|writes] [--record-start rides|local]

One journey, "send, wait, send, wait, send" (``--sends`` transactional SMS, ``--wait`` apart),
compiled from YAML and run by ``JourneyRun``, against ``benchmarks/handwritten.py`` doing the
same sends through the same ``nurture.send`` activity and the same waits with
``workflow.sleep``. Both run on one real dev server (``temporal server start-dev``) and one
worker subprocess serving both workflows on SQLite (or a fresh PostgreSQL database). Each round
starts ``--runs`` of one kind at once and waits for all to complete, then the other kind (the
order alternates by round). ``--start service`` starts JourneyRun the way the event API does a
first trigger (``nurture.service.ingest.start_run``: a plain start, no run being active);
``signal`` the way it did before, and still does when a run may be active (signal-with-start with
the ``trigger`` signal); ``plain`` a plain start with no id reuse policy. JourneyRun's
start record rides on its first recording activity as the event API's runs do (``start_rides``);
``--record-start local`` starts runs as before that (a local activity before the first step). Prints wall times,
history events per run by type, and the two ratios against the goals (<= 1.10 and <= +10%).

``--compare recording``: JourneyRun on two workers, each a subprocess on its own task queue and
the same database: ``worker.py`` as it is, and the same worker with step-reach recording taken
out (``_stack.py worker-unrecorded``). Prints the worker CPU per run of each and their ratio
against the goal (recording costs the worker < 5% more CPU per run). ``--compare writes``: the
baseline keeps the ``nurture.record_steps`` local activity and drops only the database writes,
which splits the cost between the two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _stack import (
    ROOT,
    Stack,
    bounded,
    busy_seconds,
    cpu_seconds,
    database,
    machine,
    percentile,
    seed,
)
from handwritten import WORKFLOW_NAME as HANDWRITTEN
from sqlalchemy import func
from sqlmodel import col, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy

from nurture.engine.interpreter import workflow_id
from nurture.engine.model import Event
from nurture.language.compiler import load_project
from nurture.language.durations import parse_duration
from nurture.language.ir import Journey, Send, journey_payload
from nurture.service.devserver import dev_server
from nurture.service.ingest import start_run
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord, RunRecord, StepReach
from workflows.journey import RECORD_STEPS, RECORDS_RIDE, START_RIDES, run_input
from workflows.journey import WORKFLOW_NAME as GENERIC

WALL_GOAL = 1.10
EVENTS_GOAL = 1.10
RECORDING_CPU_GOAL = 1.05
RECORDED = "recording on"
UNRECORDED = "recording off"
UNWRITTEN = "writes off"
TEMPLATE = "course_access"  # a transactional SMS: quiet hours never defer it


def journey_yaml(sends: int, wait: str) -> str:
    steps: list[str] = []
    for index in range(sends):
        if index:
            steps.append(f"  - wait: {wait}")
        steps.append(f"  - send: sms\n    template: {TEMPLATE}\n    category: transactional")
    return (
        "journey: bench_overhead\n"
        "trigger: {event: Bench Started}\n"
        'key: "event.properties.order_id"\n'
        "steps:\n" + "\n".join(steps) + "\n"
    )


@dataclass(frozen=True)
class Lane:
    """Where one kind of run goes: its workflow, task queue and the processes to meter."""

    workflow: str
    task_queue: str
    pids: dict[str, int]
    """The dev server, the worker serving the queue and this script."""
    record_steps: bool = True
    """Start generic runs recording the steps they reach, as the service does."""


@dataclass
class Batch:
    """One kind's runs of one round."""

    kind: str
    wall: float
    durations: list[float]
    handles: list[WorkflowHandle[Any, Any]]
    users: list[str]
    cpu: dict[str, float]
    """CPU seconds used by the dev server, the worker and this script."""
    other: float
    """Cores the rest of the machine kept busy meanwhile, on average."""


@dataclass
class Histories:
    """History events of a set of runs, by type."""

    runs: int = 0
    events: Counter[str] = field(default_factory=Counter)
    size: int = 0

    def per_run(self, name: str | None = None) -> float:
        total = sum(self.events.values()) if name is None else self.events[name]
        return total / self.runs


class Bench:
    def __init__(
        self,
        client: Client,
        lanes: dict[str, Lane],
        journey: Journey,
        *,
        wait: int,
        start: str,
        start_rides: bool = True,
        records_ride: bool = True,
    ) -> None:
        self.client = client
        self.lanes = lanes
        self.journey = journey
        self.payload = journey_payload(journey)
        self.wait = wait
        self.start = start
        self.start_rides = start_rides
        self.records_ride = records_ride
        self.sends = [
            {"step_id": s.id, "channel": s.channels[0], "template": s.template}
            for s in journey.steps
            if isinstance(s, Send)
        ]

    async def batch(self, kind: str, runs: int, db: Database) -> Batch:
        tag = uuid.uuid4().hex[:8]
        users = [f"{kind}-{tag}-{i:04d}" for i in range(runs)]
        seed(db, users)
        pids = self.lanes[kind].pids
        busy, before = busy_seconds(), {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.perf_counter()
        durations_handles = await asyncio.gather(*(self.run(kind, user) for user in users))
        wall = time.perf_counter() - start
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        other = max(0.0, busy_seconds() - busy - sum(cpu.values())) / wall
        durations, handles = [d for d, _ in durations_handles], [h for _, h in durations_handles]
        return Batch(kind, wall, durations, handles, users, cpu, other)

    async def run(self, kind: str, user: str) -> tuple[float, WorkflowHandle[Any, Any]]:
        key = f"order-{user}"
        lane = self.lanes[kind]
        event = Event(
            name="Bench Started",
            timestamp=datetime.now(UTC),
            properties={"order_id": key, "course_name": "Durable Python"},
            message_id=uuid.uuid4().hex,
        )
        start = time.perf_counter()
        handle: WorkflowHandle[Any, Any]
        params: dict[str, Any]
        if lane.workflow == GENERIC:
            params = {
                **run_input(self.payload, user, key, event.to_dict()),
                RECORD_STEPS: lane.record_steps,
                START_RIDES: self.start_rides,
                RECORDS_RIDE: self.records_ride,
            }
            wid = workflow_id(self.journey.id, user, key)
            if self.start == "service":
                await start_run(self.client, params, wid=wid, task_queue=lane.task_queue, once=False, running=False)
                handle = self.client.get_workflow_handle(wid)
            else:
                extra: dict[str, Any] = {}
                if self.start == "signal":  # what nurture.service.ingest does for a run that may be active
                    extra = {
                        "id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                        "start_signal": "trigger",
                        "start_signal_args": [{"event": event.to_dict(), "journey": self.payload}],
                    }
                handle = await self.client.start_workflow(GENERIC, params, id=wid, task_queue=lane.task_queue, **extra)
        else:
            params = {
                "journey": self.journey.id,
                "user_id": user,
                "key": key,
                "event": event.scope(),
                "wait_seconds": self.wait,
                "sends": self.sends,
            }
            handle = await self.client.start_workflow(
                HANDWRITTEN, params, id=f"handwritten/{user}/{key}", task_queue=lane.task_queue
            )
        result = await handle.result()
        if result.get("reason") != "completed":
            raise SystemExit(f"{kind} run {handle.id} ended with {result}; measure nothing")
        return time.perf_counter() - start, handle


def sent_messages(db: Database, users: list[str]) -> int:
    with db.session() as session:
        query = (
            select(func.count())
            .select_from(MessageRecord)
            .where(col(MessageRecord.user_id).in_(users))
            .where(col(MessageRecord.status) == "sent")
        )
        return int(session.exec(query).one())


async def histories(handles: list[WorkflowHandle[Any, Any]]) -> Histories:
    out = Histories(runs=len(handles))

    async def fetch(index: int) -> None:
        history = await handles[index].fetch_history()
        for event in history.events:
            out.events[EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")] += 1
            out.size += event.ByteSize()

    await bounded(len(handles), 16, fetch)
    return out


def verdict(ratio: float, goal: float) -> str:
    return "met" if ratio <= goal else "NOT met"


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="runs of each kind per round, started at once")
    parser.add_argument("--sends", type=int, default=3, help="sends in the journey")
    parser.add_argument("--wait", default="2s", help="wait between two sends (a journey duration)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the order of the two kinds alternates")
    parser.add_argument(
        "--start", choices=("service", "signal", "plain"), default="service", help="how JourneyRun starts"
    )
    parser.add_argument(
        "--database-url", default=None, help="PostgreSQL server; a fresh database is made there"
    )
    parser.add_argument(
        "--temporal-store",
        choices=("memory", "file"),
        default="memory",
        help="the dev server's store: in memory (its default) or a SQLite file in the temp dir",
    )
    parser.add_argument(
        "--compare",
        choices=("handwritten", "recording", "writes"),
        default="handwritten",
        help="JourneyRun against the hand-written workflow, or with step-reach recording against without",
    )
    parser.add_argument(
        "--record-start",
        choices=("rides", "local"),
        default="rides",
        help="JourneyRun's start record: on its first recording activity, as the event API starts runs "
        "(start_rides), or its own local activity before the first step, as runs started before it",
    )
    parser.add_argument(
        "--records",
        choices=("ride", "local"),
        default="ride",
        help="the record JourneyRun writes right after a send: on that send's activity, as the event API "
        "starts runs (records_ride), or a local activity of its own, as runs started before it",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    args = parser.parse_args()
    if args.sends < 1 or args.runs < 1 or args.rounds < 1:
        parser.error("--sends, --runs and --rounds must be at least 1")
    wait = parse_duration(args.wait)

    with tempfile.TemporaryDirectory(prefix="nurture-overhead-") as tmp:
        home = Path(tmp)
        journeys = home / "journeys"
        journeys.mkdir()
        (journeys / "bench_overhead.yaml").write_text(journey_yaml(args.sends, args.wait))
        journey = load_project(journeys, ROOT / "templates").journeys["bench_overhead"]
        with (
            dev_server(home, persist=args.temporal_store == "file") as temporal,
            database(home, args.database_url) as url,
        ):
            stack = Stack(home, temporal.address, url, journeys=journeys)
            engine = "PostgreSQL" if args.database_url else "SQLite"
            print(f"{machine()}; dev server (store: {args.temporal_store}); worker subprocess on {engine}")
            print(
                f"journey: {args.sends} transactional SMS, {args.wait} apart; {args.runs} runs of each kind "
                f"per round, {args.rounds} rounds; JourneyRun started {args.start}, start record {args.record_start}"
            )
            db = stack.db()
            off_stack = replace(stack, task_queue=f"{stack.task_queue}-unrecorded")
            recording = args.compare != "handwritten"
            with contextlib.ExitStack() as workers:
                worker = workers.enter_context(stack.worker(handwritten=not recording))
                client = await Client.connect(temporal.address)

                def lane(workflow: str, queue: str, pid: int, *, record_steps: bool = True) -> Lane:
                    return Lane(
                        workflow,
                        queue,
                        {"temporal": temporal.process.pid, "worker": pid, "client": os.getpid()},
                        record_steps,
                    )

                if recording:
                    keep = args.compare == "writes"
                    off = workers.enter_context(off_stack.worker(unrecorded=True))
                    kinds = (RECORDED, UNWRITTEN if keep else UNRECORDED)
                    lanes = {
                        RECORDED: lane(GENERIC, stack.task_queue, worker.process.pid),
                        # Runs started without the flag run as before the recording existed.
                        kinds[1]: lane(GENERIC, off_stack.task_queue, off.process.pid, record_steps=keep),
                    }
                else:
                    kinds = (GENERIC, HANDWRITTEN)
                    lanes = {kind: lane(kind, stack.task_queue, worker.process.pid) for kind in kinds}
                bench = Bench(
                    client,
                    lanes,
                    journey,
                    wait=wait,
                    start=args.start,
                    start_rides=args.record_start == "rides",
                    records_ride=args.records == "ride",
                )
                batches = await asyncio.wait_for(
                    run_rounds(bench, db, kinds, args.runs, args.rounds), args.timeout
                )
                first = [b for b in batches if b.kind == kinds[0]]
                second = [b for b in batches if b.kind == kinds[1]]
                first_hist = await histories([h for b in first for h in b.handles])
                second_hist = await histories([h for b in second for h in b.handles])
            for batch in batches:
                got = sent_messages(db, batch.users)
                if got != len(batch.users) * args.sends:
                    raise SystemExit(
                        f"{batch.kind}: {got} messages in the outbox, expected {len(batch.users) * args.sends}"
                    )
            if recording:
                check_reaches(db, batches, recorded=args.sends * 2 - 1)
            db.dispose()
    report(batches, kinds, first, second, first_hist, second_hist, (args.sends - 1) * wait)
    if recording:
        report_recording(kinds[1], first, second)


def check_reaches(db: Database, batches: list[Batch], recorded: int) -> None:
    """Recorded runs wrote a row per step (sends and waits), the others none: the A/B is real."""
    for batch in batches:
        with db.session() as session:
            query = (
                select(func.count())
                .select_from(StepReach)
                .join(RunRecord, col(RunRecord.run_id) == col(StepReach.run_id))
                .where(col(RunRecord.user_id).in_(batch.users))
            )
            got = int(session.exec(query).one())
        expected = len(batch.users) * recorded if batch.kind == RECORDED else 0
        if got != expected:
            raise SystemExit(f"{batch.kind}: {got} step_reaches rows, expected {expected}")


async def run_rounds(
    bench: Bench, db: Database, kinds: tuple[str, str], runs: int, rounds: int
) -> list[Batch]:
    for kind in kinds:  # warm-up: worker caches, sticky queues, DB pools
        await bench.batch(kind, min(10, runs), db)
    batches: list[Batch] = []
    for index in range(rounds):
        order = kinds if index % 2 == 0 else kinds[::-1]
        for kind in order:
            batches.append(await bench.batch(kind, runs, db))
    return batches


def report(
    batches: list[Batch],
    kinds: tuple[str, str],
    generic: list[Batch],
    hand: list[Batch],
    g_hist: Histories,
    h_hist: Histories,
    floor: int,
) -> None:
    print()
    print(
        f"{'round':<7}{'workflow':<22}{'runs':>6}{'wall s':>9}{'run p50 s':>11}{'run p99 s':>11}"
        f"{'CPU ms/run temporal/worker/client':>35}{'other cores':>13}"
    )
    for index, batch in enumerate(batches):
        print(
            f"{index // 2 + 1:<7}{batch.kind:<22}{len(batch.durations):>6}{batch.wall:>9.2f}"
            f"{percentile(batch.durations, 0.5):>11.2f}{percentile(batch.durations, 0.99):>11.2f}"
            f"{'/'.join(f'{c * 1000 / len(batch.durations):.1f}' for c in batch.cpu.values()):>35}"
            f"{batch.other:>13.2f}"
        )
    print(f"(the waits alone take {floor} s per run; other cores: busy with other work on the machine)")
    print()
    print(f"{'workflow':<22}{'wall s (sum)':>13}{'run mean s':>12}{'events/run':>12}{'history B/run':>15}")
    for name, kind_batches, hist in ((kinds[0], generic, g_hist), (kinds[1], hand, h_hist)):
        wall = sum(b.wall for b in kind_batches)
        mean = statistics.fmean(d for b in kind_batches for d in b.durations)
        print(f"{name:<22}{wall:>13.2f}{mean:>12.3f}{hist.per_run():>12.1f}{hist.size / hist.runs:>15.0f}")
    print()
    print(f"{'history event type':<42}{kinds[0]:>12}{kinds[1]:>20}{'extra':>8}")
    for name in sorted(set(g_hist.events) | set(h_hist.events)):
        g, h = g_hist.per_run(name), h_hist.per_run(name)
        print(f"{name:<42}{g:>12.2f}{h:>20.2f}{g - h:>+8.2f}")
    noisy = max(b.other for b in batches)
    if noisy > 0.1:
        print(f"\nWARNING: other work kept up to {noisy:.2f} cores busy during a round; the ratios are noisy")
    wall_ratio = sum(b.wall for b in generic) / sum(b.wall for b in hand)
    events_ratio = g_hist.per_run() / h_hist.per_run()
    if kinds[1] != HANDWRITTEN:
        return
    print()
    print(
        f"wall-time ratio JourneyRun/hand-written: {wall_ratio:.3f} (goal <= {WALL_GOAL:.2f}: {verdict(wall_ratio, WALL_GOAL)})"
    )
    print(
        f"history events ratio JourneyRun/hand-written: {events_ratio:.3f} ({(events_ratio - 1) * 100:+.1f}%; "
        f"goal <= +{(EVENTS_GOAL - 1) * 100:.0f}%: {verdict(events_ratio, EVENTS_GOAL)})"
    )


def report_recording(baseline: str, recorded: list[Batch], unrecorded: list[Batch]) -> None:
    def per_run(batches: list[Batch], process: str) -> float:
        return sum(b.cpu[process] for b in batches) * 1000 / sum(len(b.durations) for b in batches)

    print()
    print(f"{'CPU ms per run':<22}{'worker':>10}{'temporal':>10}{'client':>10}")
    for name, batches in ((RECORDED, recorded), (baseline, unrecorded)):
        print(
            f"{name:<22}" + "".join(f"{per_run(batches, p):>10.2f}" for p in ("worker", "temporal", "client"))
        )
    print(f"per round (the ratio of the worker CPU, {RECORDED}/{baseline}, round by round):")
    for index, (on, off) in enumerate(zip(recorded, unrecorded, strict=True)):
        ratio = on.cpu["worker"] / off.cpu["worker"] if off.cpu["worker"] else float("nan")
        print(f"  round {index + 1}: {ratio:.3f}")
    ratio = per_run(recorded, "worker") / per_run(unrecorded, "worker")
    print(
        f"worker CPU ratio {RECORDED}/{baseline}: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%; "
        f"goal < +{(RECORDING_CPU_GOAL - 1) * 100:.0f}%: {verdict(ratio, RECORDING_CPU_GOAL)})"
    )


if __name__ == "__main__":
    asyncio.run(main())
