"""Events per second through the event API against raw signal-with-start, and accept-to-outbox latency.

    python benchmarks/ingest.py [--events 2000] [--concurrency 32] [--rounds 2] [--warmup 200]
                                [--paced-rates 5 20] [--paced-seconds 15] [--load-worker both]
                                [--database-url postgresql://postgres@127.0.0.1:5432/postgres]
                                [--http-client aiohttp|httpx] [--pin]
    python benchmarks/ingest.py --streams [--stream-events 3000] [--concurrency 32] [--rounds 2]
                                [--database-url ...]

``--streams`` measures everyday traffic instead (calls that trigger nothing, identifies, merges)
against a plain insert of the same calls: see ``benchmarks/_streams.py``. Without it:

Everything runs on this machine, on loopback: a real dev server (``temporal server start-dev``,
its default in-memory store), the operator's worker (``python worker.py``, a subprocess), the
event API (``nurture.service.api.serve``: uvicorn with its defaults, a subprocess) and this script as the
client. Every event is an ``Order Completed`` of a fresh user with a phone number: it starts the
real ``post_purchase`` journey, whose first send is a transactional SMS (quiet hours never defer
it) delivered to the outbox. SQLite in a temp dir by default; ``--database-url`` names a
PostgreSQL server on which a fresh database is created, and dropped at the end.

Two paths carry the same events:

- **temporal (ceiling)**: this script makes the signal-with-start itself, with the workflow id,
  input, id-reuse policy and ``trigger`` signal that ``nurture.service.ingest`` uses: the Temporal work
  of an event with nothing in front of it.
- **api**: ``POST /v1/track`` with a write key (Bearer). The API stores the event, reads the
  user's routes and profile, checks ``re_entry: once``, starts the run (``start_run``: a plain
  start, as the user has no run; a signal-with-start only reaches a run in flight) and records
  the route.

Paced runs come first (after a warm-up): ``--paced-rates`` events per second, open loop, for
``--paced-seconds`` each, to measure latency below saturation. Then ``--rounds`` load rounds keep
``--concurrency`` calls in flight for ``--events`` events per path in all; the order of the two
paths alternates by round. Load rounds run twice (``--load-worker``): with the worker running,
as in service, where it competes with ingestion for the same cores; and with the worker stopped
(SIGSTOP) while the calls are made, which measures ingestion alone. After every run the script waits until each event's SMS is in the
outbox. "Answer to outbox" is the message row's ``created_at`` (set by the worker as the outbox
stores it) minus the instant the client got its answer (the HTTP 200 or the signal-with-start
reply), both wall-clock UTC on this machine. The paced runs' latency is split into stages read
from each run's history. CPU per event is read from /proc for every process, from the first call
of a run until its last message is stored; "other" is what the rest of the machine used meanwhile
(other people's work on a shared machine slows every row). Each core's busy share while the calls
are made (user, nice and system time, from /proc/stat) shows whether the cores were saturated.

The api path's calls are made with aiohttp (``--http-client httpx``: the client used before
2026-12-07; on 2026-12-07 this process's CPU per event was 6 to 11 ms with it and 2 to 3 ms with
aiohttp, the wait for the outbox included, and every millisecond of it is taken from the services
on the same cores). ``--pin`` (root, two cores or more) gives the two tiers a
core each, as a deployment gives them machines of their own: the dev server and the worker on the
first core; the API, PostgreSQL (every process of the server, its new connections included) and
this script on the second. The ceiling is then what one core of Temporal takes, and the api path
reaches it only if the API, its database and the calls' client keep up on the other core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
from _stack import (
    WRITE_KEY,
    CommandCpu,
    Service,
    Stack,
    bounded,
    busy_seconds,
    busy_shares,
    core_ticks,
    cpu_seconds,
    database,
    family,
    machine,
    paced,
    percentile,
    pinned,
    processes_named,
    seed,
)
from _streams import measure_streams, report_streams
from sqlalchemy import func
from sqlmodel import col, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy

from nurture.engine.interpreter import workflow_id
from nurture.engine.model import Event
from nurture.language.compiler import load_project
from nurture.language.ir import Journey, journey_payload
from nurture.service.devserver import dev_server
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord
from workflows.journey import WORKFLOW_NAME, run_input

THROUGHPUT_GOAL = 0.80
LATENCY_GOAL_MS = 250.0
EVENT = "Order Completed"
JOURNEY = "post_purchase"
BUSY = "machine"
NOISE = 0.1
"""Cores of other work above which a run's numbers are flagged."""

Drive = Callable[[int, Callable[[int], Awaitable["Sample"]]], Awaitable[list["Sample"]]]
"""How a run issues its calls: ``drive(count, call)``."""


@dataclass(frozen=True)
class Sample:
    """One accepted event; instants are wall-clock epoch seconds."""

    user_id: str
    workflow_id: str
    sent: float
    accepted: float
    failed: str | None = None
    """Why the call failed (a dropped connection, a status other than 200); ``None`` when accepted."""


class Ingress(Protocol):
    """A way into the service: one event per call."""

    name: str

    async def send(self, user_id: str) -> Sample: ...


def order(user_id: str) -> tuple[str, dict[str, Any]]:
    """The event's run key and properties: a digital order, so the first send is course_access."""
    key = f"order-{user_id}"
    return key, {"order_id": key, "course_name": "Durable Python", "total": 199}


class Ceiling:
    """signal-with-start straight from this process, as nurture.service.ingest makes it."""

    name = "temporal (ceiling)"

    def __init__(self, client: Client, journey: Journey, task_queue: str) -> None:
        self.client = client
        self.journey = journey
        self.payload = journey_payload(journey)
        self.task_queue = task_queue

    async def send(self, user_id: str) -> Sample:
        key, properties = order(user_id)
        event = Event(EVENT, datetime.now(UTC), properties, str(uuid.uuid4())).to_dict()
        wid = workflow_id(self.journey.id, user_id, key)
        sent = time.time()
        await self.client.start_workflow(
            WORKFLOW_NAME,
            run_input(self.payload, user_id, key, event),  # the event API's: its flags set what the worker does
            id=wid,
            task_queue=self.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,  # post_purchase is re_entry: once
            start_signal="trigger",
            start_signal_args=[{"event": event, "journey": self.payload}],
        )
        return Sample(user_id, wid, sent, time.time())


Post = Callable[[str, dict[str, Any]], Awaitable[tuple[int, str]]]
"""An HTTP client's ``POST path`` with a JSON body: the status and the body's text. It raises
:data:`HTTP_ERRORS` when the call fails without an answer."""

HTTP_ERRORS = (httpx.HTTPError, aiohttp.ClientError, TimeoutError)


@asynccontextmanager
async def http_client(kind: str, address: str, concurrency: int) -> AsyncIterator[Post]:
    """The load generator's HTTP client, with the write key and ``concurrency`` connections kept
    alive: ``aiohttp`` (its parser is compiled), or ``httpx``, which costs this process three to
    four times the CPU per call and so leaves the services less of the machine."""
    headers = {"Authorization": f"Bearer {WRITE_KEY}"}
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=address, headers=headers, limits=limits, timeout=60) as http:

            async def post_httpx(path: str, body: dict[str, Any]) -> tuple[int, str]:
                response = await http.post(path, json=body)
                return response.status_code, response.text

            yield post_httpx
        return
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(address, headers=headers, connector=connector, timeout=timeout) as session:

        async def post_aiohttp(path: str, body: dict[str, Any]) -> tuple[int, str]:
            async with session.post(path, json=body) as response:
                return response.status, await response.text()

        yield post_aiohttp


class Api:
    """POST /v1/track through the event API."""

    name = "api (POST /v1/track)"

    def __init__(self, post: Post, journey: Journey) -> None:
        self.post = post
        self.journey = journey

    async def send(self, user_id: str) -> Sample:
        key, properties = order(user_id)
        body = {
            "userId": user_id,
            "event": EVENT,
            "properties": properties,
            "messageId": str(uuid.uuid4()),
            "timestamp": datetime.now(UTC).isoformat(),
        }
        wid = workflow_id(self.journey.id, user_id, key)
        sent = time.time()
        try:
            status, text = await self.post("/v1/track", body)
        except HTTP_ERRORS as exc:  # counted and reported, not fatal: the run goes on
            return Sample(user_id, wid, sent, time.time(), failed=f"{type(exc).__name__}: {exc}")
        accepted = time.time()
        if status != 200 or json.loads(text).get("triggered") != [wid]:
            return Sample(user_id, wid, sent, accepted, failed=f"{status} {text[:200]}")
        return Sample(user_id, wid, sent, accepted)


@dataclass
class Run:
    """One path's events of one measured run."""

    group: str
    """``paced``, or under load with the worker ``running`` or ``paused``."""
    phase: str
    path: str
    samples: list[Sample]
    seconds: float
    """From the first call to the last answer."""
    created: dict[str, float]
    """Each user's outbox ``created_at`` (epoch seconds)."""
    cpu_ms: dict[str, float]
    """CPU milliseconds per event, by process, from the first call until the last message."""
    elapsed: float
    """Seconds from the first call until the last message."""
    stages: dict[str, list[float]] = field(default_factory=dict)
    """For paced runs: milliseconds per event in each of :data:`STAGES`."""
    failed: int = 0
    """Calls that failed (reported; their events are not counted or waited for)."""
    cores_busy: list[float] = field(default_factory=list)
    """How busy each core was while the calls were made (0 to 1; user, nice and system time)."""

    @property
    def outbox_ms(self) -> list[float]:
        return [(self.created[s.user_id] - s.accepted) * 1000 for s in self.samples]

    @property
    def answer_ms(self) -> list[float]:
        return [(s.accepted - s.sent) * 1000 for s in self.samples]

    @property
    def other_cores(self) -> float:
        """Cores the rest of the machine kept busy during the run, on average."""
        return self.cpu_ms["other"] * len(self.samples) / 1000 / self.elapsed

    @property
    def rate(self) -> float:
        return len(self.samples) / self.seconds


class Bench:
    """Runs events through a path and collects what they cost."""

    def __init__(self, db: Database, meters: dict[str, Callable[[], float]], timeout: float) -> None:
        self.db = db
        self.meters = meters
        """CPU seconds used so far, by process name."""
        self.timeout = timeout

    async def run(
        self, group: str, phase: str, path: Ingress, count: int, drive: Drive, *, pause: int | None = None
    ) -> Run:
        """``count`` events through ``path``; with ``pause``, that process (the worker) is stopped
        (SIGSTOP) while the calls are made and resumed for the drain."""
        tag = uuid.uuid4().hex[:10]
        users = [f"{tag}-{i:05d}" for i in range(count)]
        seed(self.db, users)
        before = {name: meter() for name, meter in self.meters.items()}
        if pause is not None:
            os.kill(pause, signal.SIGSTOP)
        try:
            ticks = core_ticks()
            start = time.perf_counter()
            samples = await drive(count, lambda i: path.send(users[i]))
            seconds = time.perf_counter() - start
            cores_busy = busy_shares(ticks, core_ticks())
        finally:
            if pause is not None:
                os.kill(pause, signal.SIGCONT)
        failed = [sample for sample in samples if sample.failed is not None]
        for sample in failed[:3]:
            print(f"failed call ({path.name}): {sample.failed}")
        samples = [sample for sample in samples if sample.failed is None]
        created = await self.drain(tag, len(samples))
        elapsed = time.perf_counter() - start
        used = {name: (meter() - before[name]) * 1000 / count for name, meter in self.meters.items()}
        # Whatever else ran on the machine meanwhile (it competes for the same cores).
        used["other"] = max(0.0, used.pop(BUSY) - sum(used.values()))
        return Run(
            group, phase, path.name, samples, seconds, created, used, elapsed, failed=len(failed), cores_busy=cores_busy
        )

    async def drain(self, tag: str, count: int) -> dict[str, float]:
        """Wait until every user's SMS is in the outbox; each one's ``created_at``."""
        deadline = time.monotonic() + self.timeout
        while (done := sent_count(self.db, tag)) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {done} of {count} messages after {self.timeout}s")
            await asyncio.sleep(0.2)
        with self.db.session() as session:
            rows = session.exec(
                select(MessageRecord.user_id, MessageRecord.created_at).where(
                    col(MessageRecord.user_id).startswith(tag)
                )
            ).all()
        return {user: _utc(created).timestamp() for user, created in rows}


def sent_count(db: Database, tag: str) -> int:
    with db.session() as session:
        query = (
            select(func.count())
            .select_from(MessageRecord)
            .where(col(MessageRecord.user_id).startswith(tag))
            .where(col(MessageRecord.status) == "sent")
        )
        return int(session.exec(query).one())


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)  # SQLite: naive UTC


STAGES = (
    ("run started -> answer received", "started", "accepted"),
    ("run started -> 1st workflow task starts", "started", "task"),
    ("1st workflow task (record_start, update)", "task", "task_done"),
    ("task done -> send activity starts", "task_done", "activity"),
    ("send activity starts -> outbox row", "activity", "created"),
    ("answer received -> outbox row", "accepted", "created"),
)
"""Where an event's time goes: (stage, from, to), instants from the run's history and the client."""

FIRST = {
    "EVENT_TYPE_WORKFLOW_EXECUTION_STARTED": "started",
    "EVENT_TYPE_WORKFLOW_TASK_STARTED": "task",
    "EVENT_TYPE_WORKFLOW_TASK_COMPLETED": "task_done",
    "EVENT_TYPE_ACTIVITY_TASK_STARTED": "activity",
}


async def split(client: Client, run: Run) -> None:
    """Fill ``run.stages`` from every run's history (the server's clock is this machine's)."""
    run.stages = {name: [] for name, _, _ in STAGES}

    async def one(index: int) -> None:
        sample = run.samples[index]
        history = await client.get_workflow_handle(sample.workflow_id).fetch_history()
        at = {"accepted": sample.accepted, "created": run.created[sample.user_id]}
        for event in history.events:
            name = FIRST.get(EventType.Name(event.event_type))
            if name is not None and name not in at:
                at[name] = event.event_time.ToDatetime(UTC).timestamp()
        for stage, begin, end in STAGES:
            run.stages[stage].append((at[end] - at[begin]) * 1000)

    await bounded(len(run.samples), 16, one)


LOAD = {"running": "load", "paused": "paused"}
"""Load groups (the worker running, or stopped while the calls are made) and their run labels."""


async def measure(
    args: argparse.Namespace, stack: Stack, bench: Bench, client: Client, api: Service, worker: int
) -> list[Run]:
    journey = load_project(stack.journeys, stack.templates).journeys[JOURNEY]
    async with http_client(args.http_client, api.address, args.concurrency) as post:
        paths: list[Ingress] = [Ceiling(client, journey, stack.task_queue), Api(post, journey)]

        def closed(count: int, call: Callable[[int], Awaitable[Sample]]) -> Awaitable[list[Sample]]:
            return bounded(count, args.concurrency, call)

        for path in paths:  # warm-up: connections, caches, worker slots
            await bench.run("warm-up", "warm-up", path, args.warmup, closed)
        runs: list[Run] = []
        for rate in args.paced_rates:  # first, while the server holds few runs

            def open_loop(
                count: int, call: Callable[[int], Awaitable[Sample]], rate: float = rate
            ) -> Awaitable[list[Sample]]:
                return paced(count, rate, call)

            for path in paths:
                count = round(rate * args.paced_seconds)
                run = await bench.run("paced", f"{rate:g}/s", path, count, open_loop)
                await split(client, run)
                runs.append(run)
        groups = ("running", "paused") if args.load_worker == "both" else (args.load_worker,)
        for group in groups if args.events else ():
            for index in range(args.rounds):
                for path in paths if index % 2 == 0 else paths[::-1]:
                    runs.append(
                        await bench.run(
                            group,
                            f"{LOAD[group]} {index + 1}",
                            path,
                            args.events // args.rounds,
                            closed,
                            pause=worker if group == "paused" else None,
                        )
                    )
        return runs


def ms(values: list[float]) -> str:
    return f"{percentile(values, 0.5):.0f}/{percentile(values, 0.99):.0f}"


def report(runs: list[Run], args: argparse.Namespace, meters: list[str]) -> None:
    print()
    print(
        f"{'run':<9}{'path':<22}{'events':>7}{'seconds':>9}{'events/s':>10}"
        f"{'answer ms p50/p99':>19}{'answer->outbox ms p50/p99':>27}"
    )
    for run in runs:
        print(
            f"{run.phase:<9}{run.path:<22}{len(run.samples):>7}{run.seconds:>9.2f}{run.rate:>10.1f}"
            f"{ms(run.answer_ms):>19}{ms(run.outbox_ms):>27}"
        )
    print("(load: the worker runs meanwhile; paused: it is stopped while the calls are made)")
    failures = sum(run.failed for run in runs)
    print(f"failed calls: {failures}" + ("" if not failures else " (see the lines above the table)"))
    print()
    print(f"{'CPU ms per event':<30}" + "".join(f"{name:>10}" for name in [*meters, "total"]))
    for run in runs:
        cells = [run.cpu_ms[name] for name in meters]
        label = f"{run.phase} {run.path.split(' ')[0]}"
        print(f"{label:<30}" + "".join(f"{c:>10.2f}" for c in [*cells, sum(cells)]))
    print()
    heads = [f"cpu{i}" for i in range(len(runs[0].cores_busy))]
    print(f"{'each core busy during the calls':<30}" + "".join(f"{head:>10}" for head in heads))
    for run in runs:
        label = f"{run.phase} {run.path.split(' ')[0]}"
        print(f"{label:<30}" + "".join(f"{share * 100:>9.0f}%" for share in run.cores_busy))
    split_runs = [r for r in runs if r.stages]
    if split_runs:
        print()
        heads = [f"{r.phase} {r.path.split(' ')[0]}" for r in split_runs]
        print(f"{'paced, ms p50/p99':<42}" + "".join(f"{h:>15}" for h in heads))
        for stage, _, _ in STAGES:
            print(f"{stage:<42}" + "".join(f"{ms(r.stages[stage]):>15}" for r in split_runs))
    print()
    for group in LOAD:
        chosen = [r for r in runs if r.group == group]
        if not chosen:
            continue
        rate = {
            path: sum(len(r.samples) for r in chosen if r.path == path)
            / sum(r.seconds for r in chosen if r.path == path)
            for path in (Ceiling.name, Api.name)
        }
        share = rate[Api.name] / rate[Ceiling.name]
        print(
            f"throughput, worker {group}: api {rate[Api.name]:.1f} events/s, ceiling "
            f"{rate[Ceiling.name]:.1f} events/s: api = {share * 100:.1f}% of the ceiling "
            f"(goal >= {THROUGHPUT_GOAL * 100:.0f}%: {'met' if share >= THROUGHPUT_GOAL else 'NOT met'})"
        )
    busy = [r for r in runs if r.other_cores > NOISE]
    if busy:
        worst = max(busy, key=lambda r: r.other_cores)
        print(
            f"WARNING: other work kept up to {worst.other_cores:.2f} cores busy ({worst.phase} "
            f"{worst.path}); the runs it overlapped are slower than this machine can do"
        )
    latency = [(f"paced {r.phase}", [r]) for r in runs if r.path == Api.name and r.group == "paced"]
    latency.append(
        (
            f"under load ({args.concurrency} in flight, worker running)",
            [r for r in runs if r.path == Api.name and r.group == "running"],
        )
    )
    for label, chosen in latency:
        if chosen:
            latencies = [x for r in chosen for x in r.outbox_ms]
            p99 = percentile(latencies, 0.99)
            print(
                f"api answer -> outbox, {label}: p50 {percentile(latencies, 0.5):.0f} ms, p99 {p99:.0f} ms "
                f"(goal p99 < {LATENCY_GOAL_MS:.0f} ms: {'met' if p99 < LATENCY_GOAL_MS else 'NOT met'})"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="events per path under load (0: no load)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight under load")
    parser.add_argument("--rounds", type=int, default=2, help="load rounds; the paths' order alternates")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured events per path first")
    parser.add_argument(
        "--paced-rates", type=float, nargs="*", default=[5.0, 20.0], help="events/s of the paced runs"
    )
    parser.add_argument(
        "--load-worker",
        choices=("running", "paused", "both"),
        default="both",
        help="under load, let the worker run, or stop it (SIGSTOP) while the calls are made",
    )
    parser.add_argument("--paced-seconds", type=float, default=15.0, help="length of each paced run")
    parser.add_argument("--database-url", help="a PostgreSQL server: a fresh database is made there")
    parser.add_argument(
        "--temporal-store",
        choices=("memory", "file"),
        default="memory",
        help="the dev server's store: in memory (its default) or a SQLite file in the temp dir",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="Temporal (and the worker) on one core; the API, PostgreSQL and this client on another",
    )
    parser.add_argument(
        "--http-client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="the load generator's HTTP client for the api path (httpx until 2026-12-07)",
    )
    parser.add_argument(
        "--streams", action="store_true", help="the traffic streams against the floor instead"
    )
    parser.add_argument("--stream-events", type=int, default=3000, help="calls per stream and round")
    args = parser.parse_args()
    if min(args.rounds, args.concurrency, args.warmup, args.paced_seconds, *args.paced_rates) <= 0:
        parser.error("--rounds, --concurrency, --warmup, --paced-seconds and --paced-rates must be positive")
    if args.pin and (len(os.sched_getaffinity(0)) < 2 or os.geteuid() != 0 or args.streams):
        parser.error("--pin needs two cores and root (it sets PostgreSQL's processes too), and not --streams")

    with tempfile.TemporaryDirectory(prefix="nurture-ingest-") as tmp:
        home = Path(tmp)
        with (
            dev_server(home, persist=args.temporal_store == "file") as temporal,
            database(home, args.database_url) as url,
        ):
            stack = Stack(home, temporal.address, url)
            print(machine())
            print(
                f"dev server ({args.temporal_store} store), worker.py and the API as subprocesses, "
                f"{'PostgreSQL' if args.database_url else 'SQLite'}; journey {JOURNEY}; warm-up "
                f"{args.warmup}; paced {', '.join(f'{r:g}/s' for r in args.paced_rates)} for "
                f"{args.paced_seconds:g} s; load {args.events} events per path, {args.concurrency} "
                f"in flight, {args.rounds} rounds, worker {args.load_worker}"
                + ("" if args.streams else f"; the api path's client: {args.http_client}")
                + ("; pinned: Temporal and the worker on one core, the rest on another" if args.pin else "")
            )
            if args.streams:
                with stack.worker() as worker, stack.api() as api, stack.floor() as floor:
                    pids = {
                        "temporal": temporal.process.pid,
                        "api": api.process.pid,
                        "floor": floor.process.pid,
                        "client": os.getpid(),
                    }
                    streams = await asyncio.wait_for(
                        measure_streams(
                            stack,
                            api,
                            floor,
                            pids,
                            worker.process.pid,
                            events=args.stream_events,
                            concurrency=args.concurrency,
                            rounds=args.rounds,
                            postgres=bool(args.database_url),
                        ),
                        args.timeout,
                    )
                report_streams(streams)
                return
            db = stack.db()
            with stack.worker() as worker, stack.api() as api:
                pids = {
                    "temporal": temporal.process.pid,
                    "worker": worker.process.pid,
                    "api": api.process.pid,
                    "client": os.getpid(),
                }
                meters: dict[str, Callable[[], float]] = {
                    name: functools.partial(cpu_seconds, pid) for name, pid in pids.items()
                }
                if args.database_url:
                    meters["postgres"] = CommandCpu("postgres")
                meters[BUSY] = busy_seconds
                client = await Client.connect(temporal.address)
                bench = Bench(db, meters, args.timeout)
                pin: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
                if args.pin:
                    first, second, *_ = sorted(os.sched_getaffinity(0))
                    pin = pinned(
                        {
                            first: lambda: [*family(temporal.process.pid), *family(worker.process.pid)],
                            second: lambda: [*family(api.process.pid), os.getpid(), *processes_named("postgres")],
                        }
                    )
                with pin:
                    runs = await asyncio.wait_for(
                        measure(args, stack, bench, client, api, worker.process.pid), args.timeout
                    )
            db.dispose()
    report(runs, args, [name for name in meters if name != BUSY] + ["other"])


if __name__ == "__main__":
    asyncio.run(main())
