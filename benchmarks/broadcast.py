"""Run starts per second of a broadcast against raw ``start_workflow``, worker memory, and sends.

    python benchmarks/broadcast.py [--people 100000] [--floor-people N] [--concurrency 64]
                                   [--page 500] [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

Everything runs on this machine, on loopback: a real dev server (``temporal server start-dev``,
in memory), the operator's worker (``python worker.py``, a subprocess) and this script, which
drives the broadcast itself as ``nurture broadcast start`` does (:class:`Broadcaster` in this
process). SQLite in a temp dir by default; ``--database-url`` names a PostgreSQL server on which
a fresh database is made, and dropped at the end.

``--people`` people are seeded (a profile with a phone number, in a zone where it is daytime so
quiet hours never hold a send) and put in the audience ``everyone`` (``audience_members``, as the
audience upkeep keeps it). The broadcast sends one marketing SMS (``course_launch``) to the
outbox. Two paths start the same workflow (``JourneyRun``, with the broadcast's journey), each
for its own people (``--floor-people`` for the floor, as many by default), one after the other:

- **floor**: this script calls ``client.start_workflow`` itself for each person, with the same
  workflow id, input, id-reuse policy and the same number of calls in flight (``--concurrency``):
  the Temporal work of a run start with nothing in front of it. Its people are in no audience.
- **broadcast**: ``Broadcaster.start``: the occurrence row, the lease, the audience read in pages
  of ``--page`` in person order, the cursor written after each page, and the same starts.

"Starts per second" is people divided by the time from the first start to the last start's
answer (the worker runs meanwhile, as in service, and competes for the same cores). After each
path the script waits until every person's SMS is in the outbox, then counts messages per person
(each exactly once). The worker's resident memory (``VmRSS``) is sampled every second through
the whole run. The goal: the broadcast's starts per second at least 80% of the floor's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from _stack import ROOT, Stack, bounded, database, machine
from sqlalchemy import func, insert
from sqlmodel import col, select
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy

from nurture.engine.interpreter import workflow_id
from nurture.language import ir
from nurture.language.broadcasts import occurrence_journey
from nurture.language.compiler import Project, load_project
from nurture.service.broadcasts import EVENT, Broadcaster
from nurture.service.devserver import dev_server
from nurture.storage.db import Database
from nurture.storage.models import AudienceMember, MessageRecord, ProfileRecord, RunRecord
from workflows.journey import RECORD_STEPS, WORKFLOW_NAME

BROADCAST = "audience: everyone\nsteps:\n  - send: sms\n    template: course_launch\n"
GOAL = 0.8
"""The broadcast's starts per second, as a share of the floor's."""


def daytime_zone() -> str:
    offset = 12 - datetime.now(UTC).hour
    return f"Etc/GMT{-offset:+d}"


def seed(db: Database, people: list[str], audience: str | None, batch: int = 5000) -> None:
    """Profiles with a phone number and a daytime zone; members of ``audience`` when given."""
    zone, now = daytime_zone(), datetime.now(UTC)
    for start in range(0, len(people), batch):
        chunk = people[start : start + batch]
        profiles = [
            ProfileRecord(
                user_id=person,
                traits={"phone": f"+8613{start + index:09d}", "timezone": zone},
                phone=f"+8613{start + index:09d}",
            ).model_dump()
            for index, person in enumerate(chunk)
        ]
        with db.session() as session:
            session.execute(insert(ProfileRecord), profiles)
            if audience is not None:
                session.execute(
                    insert(AudienceMember), [{"audience": audience, "person": p, "entered_at": now} for p in chunk]
                )


class Rss:
    """The worker's resident memory, sampled every second in the background."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def read(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def _sample(self) -> None:
        began = time.monotonic()
        while True:
            self.samples.append((time.monotonic() - began, self.read()))
            await asyncio.sleep(1.0)

    def __enter__(self) -> Rss:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@dataclass
class Leg:
    name: str
    people: int
    seconds: float = 0.0
    drained: float = 0.0
    """Seconds from the first start until every SMS was in the outbox."""
    per_person: dict[int, int] = field(default_factory=dict)
    """How many people got how many messages."""

    @property
    def rate(self) -> float:
        return self.people / self.seconds if self.seconds else 0.0


def sends_per_person(db: Database, journey: str) -> dict[int, int]:
    with db.session() as session:
        per = (
            select(col(MessageRecord.user_id), func.count().label("n"))
            .where(col(MessageRecord.journey) == journey)
            .where(col(MessageRecord.status) == "sent")
            .group_by(col(MessageRecord.user_id))
            .subquery()
        )
        return {int(n): int(k) for n, k in session.execute(select(per.c.n, func.count()).group_by(per.c.n))}


async def drain(db: Database, journey: str, people: int, timeout: float) -> None:
    """Until every SMS is sent and every run has ended (the worker is idle again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session() as session:
            sent = session.execute(
                select(func.count()).where(col(MessageRecord.journey) == journey, col(MessageRecord.status) == "sent")
            ).scalar()
            ended = session.execute(
                select(func.count()).where(col(RunRecord.journey) == journey, col(RunRecord.status) == "ended")
            ).scalar()
        if (sent or 0) >= people and (ended or 0) >= people:
            return
        await asyncio.sleep(1.0)
    raise TimeoutError(f"{journey}: not every SMS sent within {timeout:.0f}s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--people", type=int, default=100_000, help="members of the audience, per round")
    parser.add_argument("--floor-people", type=int, default=None, help="people of the floor path [default: --people]")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; the paths' order alternates")
    parser.add_argument("--concurrency", type=int, default=64, help="starts in flight, both paths")
    parser.add_argument("--page", type=int, default=500, help="audience members per page")
    parser.add_argument(
        "--worker",
        choices=("running", "paused"),
        default="running",
        help="let the worker run while runs are started (as in service), or stop it (SIGSTOP) until they all are",
    )
    parser.add_argument("--database-url", help="a PostgreSQL server: a fresh database is made there")
    parser.add_argument("--timeout", type=float, default=7200.0, help="give up waiting for sends after this")
    args = parser.parse_args()
    floor_people = args.floor_people or args.people

    with tempfile.TemporaryDirectory(prefix="nurture-broadcast-") as tmp:
        home = Path(tmp)
        (home / "broadcasts").mkdir()
        for number in range(args.rounds):
            text = BROADCAST.replace("everyone", f"everyone{number}")
            (home / "broadcasts" / f"bench{number}.yaml").write_text(text, encoding="utf-8")
        project = load_project(
            ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml", broadcasts_dir=home / "broadcasts"
        )
        with dev_server(home, persist=False) as temporal, database(home, args.database_url) as url:
            stack = Stack(home, temporal.address, url)
            db = stack.db()
            print(machine())
            print(
                f"dev server (memory), worker.py as a subprocess ({args.worker} while runs start), "
                f"{'PostgreSQL' if args.database_url else 'SQLite'}; {args.people} people in the audience, "
                f"floor {floor_people}; {args.rounds} round(s); {args.concurrency} starts in flight; pages of {args.page}"
            )
            began = time.monotonic()
            for number in range(args.rounds):
                seed(db, [f"b{number}-{i:07d}" for i in range(args.people)], f"everyone{number}")
                seed(db, [f"f{number}-{i:07d}" for i in range(floor_people)], None)
            print(f"seeded in {time.monotonic() - began:.0f} s")
            client = await Client.connect(temporal.address)
            bench = Bench(args, stack, db, client, project)
            with stack.worker() as worker, Rss(worker.process.pid) as rss:
                bench.worker = worker.process.pid
                for number in range(args.rounds):
                    legs = [bench.floor, bench.broadcast]
                    for leg in legs if number % 2 == 0 else legs[::-1]:
                        found = await leg(number)
                        print(f"round {number + 1}, {found.name}: {found.people} starts in {found.seconds:.1f} s = {found.rate:.0f}/s")
                        bench.results.append(found)
            db.dispose()
    report(bench.results, rss.samples)


class Bench:
    """The two paths, each started, then drained (every SMS in the outbox) and counted."""

    def __init__(self, args: argparse.Namespace, stack: Stack, db: Database, client: Client, project: Project) -> None:
        self.args = args
        self.stack = stack
        self.db = db
        self.client = client
        self.project = project
        self.worker = 0
        self.results: list[Leg] = []

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """While runs start: the worker paused, with ``--worker paused``."""
        pause = self.args.worker == "paused"
        if pause:
            os.kill(self.worker, signal.SIGSTOP)
        try:
            yield
        finally:
            if pause:
                os.kill(self.worker, signal.SIGCONT)

    async def floor(self, number: int) -> Leg:
        people = self.args.floor_people or self.args.people
        journey = occurrence_journey(self.project.broadcasts[f"bench{number}"], None)
        payload = {**ir.journey_payload(journey), "id": f"floor{number}"}
        event = {"name": EVENT, "timestamp": datetime.now(UTC).isoformat(), "properties": {}, "message_id": "floor"}

        async def start(index: int) -> None:
            person = f"f{number}-{index:07d}"
            await self.client.start_workflow(
                WORKFLOW_NAME,
                {"journey": payload, "user_id": person, "key": "once", "event": event, RECORD_STEPS: True},
                id=workflow_id(f"floor{number}", person, "once"),
                task_queue=self.stack.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )

        leg = Leg("floor (raw start_workflow)", people)
        began = time.monotonic()
        with self.starting():
            await bounded(people, self.args.concurrency, start)
            leg.seconds = time.monotonic() - began
        return await self.drained(leg, f"floor{number}", began)

    async def broadcast(self, number: int) -> Leg:
        driver = Broadcaster(
            self.project, self.db, self.client, self.stack.task_queue, page=self.args.page, concurrency=self.args.concurrency
        )
        leg = Leg("broadcast (nurture broadcast start)", self.args.people)
        began = time.monotonic()
        with self.starting():
            done = await driver.start(f"bench{number}")
            leg.seconds = time.monotonic() - began
        assert done.started == self.args.people, done
        return await self.drained(leg, f"broadcast:bench{number}", began)

    async def drained(self, leg: Leg, journey: str, began: float) -> Leg:
        await drain(self.db, journey, leg.people, self.args.timeout)
        leg.drained = time.monotonic() - began
        leg.per_person = sends_per_person(self.db, journey)
        return leg


def report(results: list[Leg], samples: list[tuple[float, float]]) -> None:
    print()
    print(f"{'path':<40}{'people':>9}{'starts/s':>10}{'all sent after':>16}  messages per person")
    for path in results:
        per = ", ".join(f"{n}: {k} people" for n, k in sorted(path.per_person.items())) or "none"
        print(f"{path.name:<40}{path.people:>9}{path.rate:>10.0f}{path.drained:>14.0f} s  {per}")
    floors = [p for p in results if p.name.startswith("floor")]
    broadcasts = [p for p in results if not p.name.startswith("floor")]
    floor = sum(p.people for p in floors) / sum(p.seconds for p in floors)
    broadcast = sum(p.people for p in broadcasts) / sum(p.seconds for p in broadcasts)
    share = broadcast / floor
    print(
        f"starts/s over all rounds: floor {floor:.0f}, broadcast {broadcast:.0f}: {share:.0%} "
        f"(goal {GOAL:.0%}: {'met' if share >= GOAL else 'NOT met'})"
    )
    exact = all(p.per_person == {1: p.people} for p in results)
    print(f"every person sent exactly once: {'yes' if exact else 'NO'}")
    values = [mb for _, mb in samples]
    if values:
        quarter = max(1, len(values) // 4)
        print(
            f"worker RSS over {samples[-1][0]:.0f} s ({len(values)} samples): start {values[0]:.0f} MB, "
            f"median {statistics.median(values):.0f} MB, max {max(values):.0f} MB; first quarter "
            f"mean {statistics.mean(values[:quarter]):.0f} MB, last quarter mean {statistics.mean(values[-quarter:]):.0f} MB"
        )


if __name__ == "__main__":
    asyncio.run(main())
