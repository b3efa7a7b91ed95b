"""Scale-out: one event API and one worker against two of each, then one of each killed mid-load.

    python benchmarks/scale_out.py [--events 600] [--concurrency 32] [--rounds 2] [--warmup 100]
                                   [--kill-events 400] [--cores-each 0.25]
                                   [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

Everything runs on this machine, on loopback: one Temporal dev server (in-memory store), one
PostgreSQL database (a fresh one on ``--database-url``'s server, dropped at the end), and two
sets of service processes on task queues of their own: **1+1**, one event API and one worker
(``python worker.py``); **2+2**, two event APIs and two workers. The APIs are
``nurture.service.api.serve`` (uvicorn) subprocesses; this script is the client and spreads its
calls over a set's APIs in turn, as a load balancer would. Each event is an ``Order Completed``
of a fresh user with a phone number, which starts ``post_purchase``, whose first send is an SMS
to the outbox (as in ``benchmarks/ingest.py``).

Each round sends ``--events`` events through each set (``--concurrency`` calls in flight; the
order of the sets alternates by round) and waits until every SMS is in the outbox. Reported per
set: events accepted per second (first call to last answer), events carried to the outbox per
second (first call to last message), and CPU milliseconds per event of every process, read from
/proc over the same span ("other" is whatever else the machine ran meanwhile: on a shared
machine, other people's work).

Then the kill run, on the 2+2 set: ``--kill-events`` events, the client retrying a call that met
a dropped connection or a 5xx on the next API with the same ``messageId`` (as tracking libraries
do). A third of the way through the calls one API is killed (SIGKILL) and, as a supervisor would,
started again on its port; once a quarter of the messages are out, one worker is killed for good.
Counted at the end: events stored twice or missing, users with more or fewer than one run, and
messages sent twice or missing.

On one machine, two of each share the cores one of each had, so 2+2 can only go faster than 1+1
where those cores were idle. ``--cores-each N`` (root, and a cgroup cpu controller) gives every
API and worker process a cgroup of its own held to N cores of CPU time, as a container's CPU limit
or a machine of that size would: 2+2 then has twice the service CPU of 1+1, as two more machines
would give it, while the dev server and PostgreSQL, the shared back end, are not limited. Each
process's "throttled" share (of the 100 ms periods it ran in, those in which its limit stopped it:
an API's while the calls are made, a worker's until the last message is out) shows whether its
limit was what bounded the set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _stack import (
    WRITE_KEY,
    CommandCpu,
    CpuLimit,
    Stack,
    bounded,
    busy_seconds,
    cgroup_cpu_root,
    cpu_limited,
    cpu_seconds,
    database,
    machine,
    seed,
)
from ingest import EVENT, order, sent_count
from sqlalchemy import text

from nurture.service.devserver import Service, dev_server, free_port
from nurture.storage.db import Database

POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
BUSY = "machine"


@dataclass
class Set:
    """One set of service processes on a task queue of its own."""

    label: str
    apis: list[Service]
    workers: list[Service]
    limits: dict[str, CpuLimit] = field(default_factory=dict)
    """Each process's CPU limit, by the names of :meth:`pids`, with ``--cores-each``."""

    def pids(self) -> dict[str, int]:
        return {
            **{f"api-{i}": api.process.pid for i, api in enumerate(self.apis)},
            **{f"worker-{i}": worker.process.pid for i, worker in enumerate(self.workers)},
        }


@dataclass
class Balancer:
    """Calls spread over ``urls`` in turn; a dropped connection or a 5xx is retried on the next
    one with the same body, after a growing pause (counted in ``retried``)."""

    http: httpx.AsyncClient
    urls: list[str]
    retried: int = 0
    failed: list[str] = field(default_factory=list)
    turn: Iterator[int] = field(default_factory=itertools.count)

    async def track(self, user: str, message_id: str, deadline: float = 120.0) -> bool:
        _, properties = order(user)
        body = {"userId": user, "event": EVENT, "properties": properties, "messageId": message_id}
        give_up = time.monotonic() + deadline
        for attempt in itertools.count():
            url = self.urls[next(self.turn) % len(self.urls)]
            try:
                response = await self.http.post(f"{url}/v1/track", json=body)
                if response.status_code == 200:
                    return True
                if response.status_code < 500:
                    self.failed.append(f"{response.status_code} {response.text[:200]}")
                    return False
            except httpx.TransportError:
                pass
            self.retried += 1
            if time.monotonic() > give_up:
                self.failed.append(f"{message_id}: still failing after {deadline:g} s")
                return False
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        return False


@dataclass
class Result:
    label: str
    round: int
    events: int
    calls_seconds: float
    outbox_seconds: float
    cpu_ms: dict[str, float]
    retried: int
    throttled: dict[str, float] = field(default_factory=dict)
    """With ``--cores-each``: for each limited process, the share of the periods it ran in in which
    its limit stopped it (near 100%: the limit bounded it): an API's while the calls were made, a
    worker's until the last message was out."""


def throttled_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the periods between two :meth:`CpuLimit.periods` readings in which the limit
    stopped the process."""
    periods, throttled = after[0] - before[0], after[1] - before[1]
    return throttled / periods if periods else 0.0


async def drain(db: Database, tag: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (done := sent_count(db, tag)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {done} of {count} messages after {timeout:g} s")
        await asyncio.sleep(0.1)


def meters(services: Set, temporal: int) -> dict[str, Callable[[], float]]:
    """CPU seconds used so far, by process."""
    pids = {**services.pids(), "temporal": temporal, "client": os.getpid()}
    found: dict[str, Callable[[], float]] = {name: functools.partial(cpu_seconds, pid) for name, pid in pids.items()}
    found["postgres"] = CommandCpu("postgres")
    found[BUSY] = busy_seconds
    return found


async def one_run(
    db: Database, services: Set, temporal: int, http: httpx.AsyncClient, count: int, args: argparse.Namespace,
    number: int,
) -> Result:
    tag = uuid.uuid4().hex[:10]
    users = [f"{tag}-{i:05d}" for i in range(count)]
    seed(db, users)
    lb = Balancer(http, [api.address for api in services.apis])
    meter = meters(services, temporal)
    meter["postgres"]()  # the postgres meter counts from its first call
    before = {name: read() for name, read in meter.items()}
    stopped = {name: limit.periods() for name, limit in services.limits.items()}
    start = time.perf_counter()
    accepted = await bounded(count, args.concurrency, lambda i: lb.track(users[i], f"{tag}-{i}"))
    calls = time.perf_counter() - start
    calling = {name: limit.periods() for name, limit in services.limits.items()}
    if lb.failed or not all(accepted):
        raise SystemExit(f"{services.label}: calls failed: {lb.failed[:3]}")
    await drain(db, tag, count, args.timeout)
    outbox = time.perf_counter() - start
    used = {name: (read() - before[name]) * 1000 / count for name, read in meter.items()}
    used["other"] = max(0.0, used.pop(BUSY) - sum(used.values()))
    throttled = {
        # An API works while the calls are made, a worker until the last message is out.
        name: throttled_share(stopped[name], calling[name] if name.startswith("api") else limit.periods())
        for name, limit in services.limits.items()
    }
    return Result(services.label, number, count, calls, outbox, used, lb.retried, throttled)


@dataclass
class Damage:
    events: int
    seconds: float
    retried: int
    stored_twice: int
    missing_events: int
    unrouted: int
    extra_runs: int
    missing_runs: int
    sent_twice: int
    missing_messages: int


async def kill_run(
    db: Database, stack: Stack, services: Set, http: httpx.AsyncClient, args: argparse.Namespace,
    exits: contextlib.ExitStack,
) -> Damage:
    count = args.kill_events
    tag = uuid.uuid4().hex[:10]
    users = [f"{tag}-{i:05d}" for i in range(count)]
    seed(db, users)
    lb = Balancer(http, [api.address for api in services.apis])
    issued = 0
    third = asyncio.Event()

    async def call(index: int) -> bool:
        nonlocal issued
        issued += 1
        if issued == count // 3:
            third.set()
        return await lb.track(users[index], f"{tag}-{index}")

    async def kill_api() -> None:
        await third.wait()
        victim = services.apis[0]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        await asyncio.sleep(1.0)
        port = int(victim.address.rsplit(":", 1)[1])
        again = await asyncio.to_thread(exits.enter_context, stack.api(name="b-api-0-again", port=port))
        if args.cores_each:  # on a machine of the same size as the one it replaces
            exits.enter_context(cpu_limited(again.process.pid, args.cores_each, "b-api-0-again"))

    async def kill_worker() -> None:
        while sent_count(db, tag) < count // 4:
            await asyncio.sleep(0.1)
        services.workers[0].process.send_signal(signal.SIGKILL)
        services.workers[0].process.wait()

    start = time.perf_counter()
    killers = [asyncio.create_task(kill_api()), asyncio.create_task(kill_worker())]
    await bounded(count, args.concurrency, call)
    await asyncio.gather(*killers)
    with contextlib.suppress(SystemExit):  # what never arrives is counted below
        await drain(db, tag, count, args.timeout)
    seconds = time.perf_counter() - start
    with db.engine.connect() as connection:

        def rows(sql: str) -> list[Any]:
            return list(connection.execute(text(sql), {"tag": f"{tag}-%"}).all())

        events = rows("SELECT message_id, count(*) FROM events WHERE message_id LIKE :tag GROUP BY message_id")
        unrouted = rows("SELECT message_id FROM events WHERE message_id LIKE :tag AND routed_at IS NULL")
        runs = rows("SELECT user_id, count(*) FROM runs WHERE user_id LIKE :tag GROUP BY user_id")
        sent = rows(
            "SELECT user_id, count(*) FROM messages WHERE user_id LIKE :tag AND status = 'sent' GROUP BY user_id"
        )
    return Damage(
        events=count,
        seconds=seconds,
        retried=lb.retried,
        stored_twice=sum(n - 1 for _, n in events),
        missing_events=count - len(events),
        unrouted=len(unrouted),
        extra_runs=sum(n - 1 for _, n in runs),
        missing_runs=count - len(runs),
        sent_twice=sum(n - 1 for _, n in sent),
        missing_messages=count - len(sent),
    )


def report(results: list[Result], damage: Damage | None) -> None:
    print()
    print(f"{'set':<6}{'round':>6}{'events':>8}{'accepted/s':>12}{'to outbox/s':>13}{'retried':>9}")
    for r in results:
        print(
            f"{r.label:<6}{r.round:>6}{r.events:>8}{r.events / r.calls_seconds:>12.1f}"
            f"{r.events / r.outbox_seconds:>13.1f}{r.retried:>9}"
        )
    print()
    names = sorted({name for r in results for name in r.cpu_ms}, key=_order)
    print(f"{'CPU ms per event':<18}" + "".join(f"{name:>10}" for name in [*names, "total"]))
    for r in results:
        cells = [r.cpu_ms.get(name, 0.0) for name in names]
        print(f"{r.label + ' round ' + str(r.round):<18}" + "".join(f"{c:>10.2f}" for c in [*cells, sum(cells)]))
    if any(r.throttled for r in results):
        print()
        limited = sorted({name for r in results for name in r.throttled}, key=_order)
        print(f"{'throttled (share)':<18}" + "".join(f"{name:>10}" for name in limited))
        for r in results:
            print(
                f"{r.label + ' round ' + str(r.round):<18}"
                + "".join(f"{r.throttled[name]:>10.0%}" if name in r.throttled else f"{'':>10}" for name in limited)
            )
    print()
    rates: dict[str, tuple[float, float]] = {}
    for label in ("1+1", "2+2"):
        chosen = [r for r in results if r.label == label]
        events = sum(r.events for r in chosen)
        rates[label] = (events / sum(r.calls_seconds for r in chosen), events / sum(r.outbox_seconds for r in chosen))
        api = sum(v for r in chosen for k, v in r.cpu_ms.items() if k.startswith("api")) / len(chosen)
        worker = sum(v for r in chosen for k, v in r.cpu_ms.items() if k.startswith("worker")) / len(chosen)
        other = sum(r.cpu_ms["other"] for r in chosen) / len(chosen)
        print(
            f"{label}: accepted {rates[label][0]:.1f} events/s, to the outbox {rates[label][1]:.1f} events/s; "
            f"CPU per event: APIs {api:.2f} ms, workers {worker:.2f} ms (other work: {other:.2f} ms)"
        )
    print(
        f"2+2 against 1+1: accepted x{rates['2+2'][0] / rates['1+1'][0]:.2f}, "
        f"to the outbox x{rates['2+2'][1] / rates['1+1'][1]:.2f} ({os.cpu_count()} cores on this machine)"
    )
    if damage is None:
        return
    print()
    print(
        f"kill run (2+2, one API killed and restarted, one worker killed): {damage.events} events in "
        f"{damage.seconds:.1f} s, {damage.retried} calls retried"
    )
    print(
        f"  events stored twice {damage.stored_twice}, missing {damage.missing_events}, unrouted "
        f"{damage.unrouted}; runs extra {damage.extra_runs}, missing {damage.missing_runs}; messages sent "
        f"twice {damage.sent_twice}, missing {damage.missing_messages}"
    )


def _order(name: str) -> tuple[int, str]:
    kinds = ("api", "worker", "temporal", "postgres", "client", "other")
    return next((i for i, kind in enumerate(kinds) if name.startswith(kind)), len(kinds)), name


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=600, help="events per set and round")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the sets' order alternates")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured events per set first")
    parser.add_argument("--kill-events", type=int, default=400, help="events of the kill run (0: none)")
    parser.add_argument("--database-url", default=POSTGRES, help="the PostgreSQL server to make a database on")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for the outbox")
    parser.add_argument(
        "--cores-each",
        type=float,
        default=None,
        help="hold every API and worker process to this many cores of CPU (a cgroup each; needs root)",
    )
    args = parser.parse_args()
    if min(args.events, args.concurrency, args.rounds, args.warmup) <= 0:
        parser.error("--events, --concurrency, --rounds and --warmup must be positive")
    if args.cores_each is not None and (args.cores_each <= 0 or cgroup_cpu_root() is None):
        parser.error("--cores-each needs a positive number of cores, root and a cgroup cpu controller")

    with tempfile.TemporaryDirectory(prefix="nurture-scale-") as tmp, contextlib.ExitStack() as exits:
        home = Path(tmp)
        temporal = exits.enter_context(dev_server(home, persist=False))
        url = exits.enter_context(database(home, args.database_url))
        print(machine())
        print(
            f"dev server (memory store), PostgreSQL; journey post_purchase; warm-up {args.warmup}; "
            f"{args.events} events per set and round, {args.concurrency} in flight, {args.rounds} rounds; "
            f"kill run {args.kill_events} events"
            + (
                f"; every API and worker held to {args.cores_each:g} cores (a cgroup each)"
                if args.cores_each
                else "; no CPU limits"
            )
        )
        stacks = {label: Stack(home, temporal.address, url, task_queue=f"scale-{label}") for label in ("1+1", "2+2")}
        sets = {}
        for label, size in (("1+1", 1), ("2+2", 2)):
            stack, prefix = stacks[label], "a" if size == 1 else "b"
            sets[label] = Set(
                label,
                apis=[exits.enter_context(stack.api(name=f"{prefix}-api-{i}", port=free_port())) for i in range(size)],
                workers=[exits.enter_context(stack.worker(name=f"{prefix}-worker-{i}")) for i in range(size)],
            )
            if args.cores_each:
                sets[label].limits = {
                    name: exits.enter_context(cpu_limited(pid, args.cores_each, f"{prefix}-{name}"))
                    for name, pid in sets[label].pids().items()
                }
        db = stacks["1+1"].db()
        exits.callback(db.dispose)
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        http = httpx.AsyncClient(headers={"Authorization": f"Bearer {WRITE_KEY}"}, limits=limits, timeout=60)
        try:
            for services in sets.values():
                await one_run(db, services, temporal.process.pid, http, args.warmup, args, 0)
            results = []
            for number in range(1, args.rounds + 1):
                order_ = list(sets.values()) if number % 2 else list(sets.values())[::-1]
                for services in order_:
                    result = await one_run(db, services, temporal.process.pid, http, args.events, args, number)
                    print(
                        f"{result.label} round {number}: {result.events / result.calls_seconds:.1f} accepted/s, "
                        f"{result.events / result.outbox_seconds:.1f} to the outbox/s",
                        flush=True,
                    )
                    results.append(result)
            damage = await kill_run(db, stacks["2+2"], sets["2+2"], http, args, exits) if args.kill_events else None
        finally:
            await http.aclose()
    report(results, damage)


if __name__ == "__main__":
    asyncio.run(main())
