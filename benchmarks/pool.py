"""Connections kept against threads: routing's CPU and PostgreSQL's per event, with the pool as
large as the threads that do database work, against a smaller pool (the floor: 5, the default
before 2026-12-07).

    python benchmarks/pool.py [--threads 12] [--pools 12 5] [--events 2000] [--rounds 2]
                              [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

The event router (``nurture.service.ingest.Ingest``) runs in this process, as in an API process,
without HTTP: ``--events`` ``Order Completed`` events of new persons, 32 in flight, each starting
a ``post_purchase`` run on a dev server (no worker, so the runs only wait). Its database work
runs on a default executor of ``--threads`` threads (an API process has the machine's cores + 4,
32 at most: 12 on 8 cores). Each round runs every pool size of ``--pools`` in turn, each on a
fresh engine, after a warm-up of 300 events.

For each, it prints the connections the engine opened (its ``connect`` event), this
process's CPU per event, every ``postgres`` process's CPU per event (backends that exited
included: :class:`_stack.CommandCpu`), and the events per second; then the ratios of each pool
to the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from _stack import ROOT, CommandCpu, bounded, database, machine
from ingest import EVENT, order
from sqlalchemy import event
from temporalio.client import Client

from nurture.engine.identity import call_identifiers
from nurture.engine.model import Event
from nurture.language.compiler import Project, load_project
from nurture.service.devserver import dev_server
from nurture.service.ingest import Ingest
from nurture.storage.db import Database, Pool, database_url

SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Pass:
    pool: int
    connections: int
    router_ms: float
    postgres_ms: float
    rate: float


async def measure(ingest: Ingest, users: list[str]) -> float:
    """Route one event per user, 32 in flight; the seconds it took."""

    async def one(index: int) -> None:
        user = users[index]
        _, properties = order(user)
        await ingest.track(call_identifiers(user, None), Event(EVENT, datetime.now(UTC), properties, f"m-{user}"))

    started = time.perf_counter()
    await bounded(len(users), 32, one)
    return time.perf_counter() - started


async def run_pool(args: argparse.Namespace, project: Project, url: str, temporal: Client, size: int) -> Pass:
    db = Database(database_url({"DATABASE_URL": url}), pool=Pool(size=size))
    opened: list[int] = []
    event.listen(db.engine, "connect", lambda *_: opened.append(1))
    threads = ThreadPoolExecutor(args.threads)
    asyncio.get_running_loop().set_default_executor(threads)
    try:
        ingest = Ingest(project, db, temporal, f"pool-{uuid.uuid4().hex[:8]}")
        await measure(ingest, [f"warm-{uuid.uuid4().hex}" for _ in range(300)])
        users = [f"p{size}-{uuid.uuid4().hex}" for _ in range(args.events)]
        postgres, before = CommandCpu("postgres"), len(opened)
        postgres()
        cpu = time.process_time()
        seconds = await measure(ingest, users)
        cpu = time.process_time() - cpu
        used = postgres()
        return Pass(
            size,
            len(opened) - before,
            1000 * cpu / args.events,
            1000 * used / args.events,
            args.events / seconds,
        )
    finally:
        db.dispose()
        threads.shutdown(wait=False)  # the next pass sets its own


async def main(args: argparse.Namespace) -> None:
    print(machine())
    print(f"{args.events} events per pass, 32 in flight, {args.threads} threads, pools {args.pools}, {args.rounds} rounds")
    passes: list[Pass] = []
    with tempfile.TemporaryDirectory(prefix="nurture-pool-") as tmp:
        home = Path(tmp)
        with dev_server(home) as temporal, database(home, args.database_url) as url:
            client = await Client.connect(temporal.address)
            project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
            for round_ in range(args.rounds):
                for size in args.pools:
                    found = await run_pool(args, project, url, client, size)
                    passes.append(found)
                    print(
                        f"round {round_ + 1}, pool {size:>2}: {found.connections:>4} connections opened, "
                        f"router {found.router_ms:.2f} ms/event, postgres {found.postgres_ms:.2f} ms/event, "
                        f"{found.rate:.0f} events/s",
                        flush=True,
                    )
    floor = args.pools[-1]
    print(f"\nmeans, and ratios to the pool of {floor}:")
    base = [p for p in passes if p.pool == floor]
    for size in args.pools:
        mine = [p for p in passes if p.pool == size]

        def mean(name: str, of: list[Pass]) -> float:
            return sum(getattr(p, name) for p in of) / len(of)

        print(
            f"pool {size:>2}: connections {mean('connections', mine):.0f}, "
            f"router {mean('router_ms', mine):.2f} ms ({mean('router_ms', mine) / mean('router_ms', base):.2f}x), "
            f"postgres {mean('postgres_ms', mine):.2f} ms ({mean('postgres_ms', mine) / mean('postgres_ms', base):.2f}x), "
            f"{mean('rate', mine):.0f} events/s ({mean('rate', mine) / mean('rate', base):.2f}x)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=12, help="threads of the default executor")
    parser.add_argument("--pools", type=int, nargs="+", default=[12, 5], help="pool sizes; the last is the floor")
    parser.add_argument("--events", type=int, default=2000, help="events per pass")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every pool size")
    parser.add_argument("--database-url", default=SERVER, help="a PostgreSQL server: a fresh database is made there")
    asyncio.run(main(parser.parse_args()))
