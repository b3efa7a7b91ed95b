"""The running service for benchmarks: a real Temporal dev server, a database, the worker and the
event API, each a process of its own, on loopback ports, with every file in a temporary directory.

    python benchmarks/_stack.py worker-handwritten   (started by benchmarks/overhead.py)
    python benchmarks/_stack.py worker-unrecorded
                                                     (started by overhead.py --compare recording|writes)
    python benchmarks/_stack.py api --port PORT      (started by benchmarks/ingest.py)

The worker is the operator's ``worker.py``; like it, these two entry points read their
configuration from the environment (:class:`nurture.service.settings.Settings`), which
:meth:`Stack.env` writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from nurture.engine.identity import call_identifiers
from nurture.service.devserver import Service, command_line, free_port, stop, wait_for_port
from nurture.storage.db import Database, database_url
from nurture.storage.identities import DbIdentities

ROOT = Path(__file__).resolve().parents[1]
TASK_QUEUE = "nurture-bench"
GC_LOG = "NURTURE_BENCH_GC_LOG"
"""Set for ``worker-handwritten``: the file its full garbage collections are written to."""
FLOOR_PASSTHROUGH = "NURTURE_BENCH_FLOOR_PASSTHROUGH"
"""Set (to 1) for ``worker-handwritten``: the hand-written workflow's module is passed through the
sandbox as Nurture's are (``workflows/sandbox.py``), not imported again for every run."""
WRITE_KEY = "bench-write-key"

T = TypeVar("T")


def wait_for_text(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until ``text`` appears in the log file ``path``; fails early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-60:])
            raise RuntimeError(f"{command_line(process)} exited with {process.returncode}:\n{tail}")
        time.sleep(0.05)
    raise TimeoutError(f"'{text}' not in {path} after {timeout}s")


def seed(db: Database, users: list[str]) -> None:
    """People with a phone number (written before a run, not timed), so every SMS is delivered.

    Each is made as an identify call naming only the userId makes one, so that events for the
    userId find that person (a profile row alone is no person: the event would make a new one,
    without the phone). No phone number is given twice."""
    identities = DbIdentities(db)
    now = datetime.now(UTC)
    for user in users:
        phone = f"+8613{next(_PHONES):09d}"
        identities.apply(call_identifiers(user, None), at=now, traits={"phone": phone})


_PHONES = itertools.count()


@contextlib.contextmanager
def database(home: Path, postgres: str | None = None) -> Iterator[str]:
    """A migrated, empty database; its ``DATABASE_URL``.

    SQLite in ``home`` by default. With ``postgres`` (a server URL such as
    ``postgresql://postgres@127.0.0.1:5432/postgres``, whose database is only used to connect),
    a fresh database is created on that server and dropped on exit.
    """
    if postgres is None:
        url = f"sqlite:///{home / 'nurture.db'}"
        _migrate(url)
        yield url
        return
    name = f"nurture_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{postgres.rsplit('/', 1)[0]}/{name}"
        _migrate(url)
        yield url
    finally:
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _migrate(url: str) -> None:
    # Once, before any service process starts: two processes migrating an empty database race.
    db = Database(database_url({"DATABASE_URL": url}))
    db.migrate()
    db.dispose()


@dataclass(frozen=True)
class Stack:
    """Where the service processes find Temporal, the database and the journeys."""

    home: Path
    temporal_address: str
    database_url: str
    journeys: Path = ROOT / "journeys"
    templates: Path = ROOT / "templates"
    task_queue: str = TASK_QUEUE

    def db(self) -> Database:
        """An engine on the stack's database, for the benchmark's own reads and set-up."""
        return Database(database_url({"DATABASE_URL": self.database_url}))

    def env(self) -> dict[str, str]:
        """The service's environment (see :class:`nurture.service.settings.Settings`)."""
        env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
        return {
            **env,
            # Bytecode is cached (outside the repository) as in any installed deployment: without
            # it, the workflow sandbox compiles workflows/journey.py from source for every new run.
            "PYTHONPYCACHEPREFIX": str(self.home / "pycache"),
            "TEMPORAL_ADDRESS": self.temporal_address,
            "NURTURE_TASK_QUEUE": self.task_queue,
            "DATABASE_URL": self.database_url,
            "NURTURE_HOME": str(self.home),
            "NURTURE_JOURNEYS": str(self.journeys),
            "NURTURE_TEMPLATES": str(self.templates),
            "NURTURE_WRITE_KEYS": WRITE_KEY,
            "PYTHONUNBUFFERED": "1",
        }

    @contextlib.contextmanager
    def worker(
        self, *, handwritten: bool = False, unrecorded: bool = False, name: str = "worker"
    ) -> Iterator[Service]:
        """The operator's worker (``python worker.py``) as a subprocess, once it polls its queue.

        ``handwritten``: the same worker serving ``benchmarks/handwritten.py`` as well;
        ``unrecorded``: the same worker without step-reach recording's writes (see
        ``_serve_unrecorded``). ``name`` names its log (one per process).
        """
        if handwritten or unrecorded:
            name = "worker-handwritten" if handwritten else "worker-unrecorded"
            args = [sys.executable, str(Path(__file__)), name]
        else:
            args = [sys.executable, str(ROOT / "worker.py")]
        with self._process(name, args) as (process, log):
            wait_for_text(log, "worker ready", process)
            yield Service(self.task_queue, process)

    @contextlib.contextmanager
    def api(self, name: str = "api", port: int | None = None) -> Iterator[Service]:
        """The event API (``nurture.service.api.serve``: uvicorn, default options) as a subprocess;
        ``name`` names its log, ``port`` is where it listens (default: a free one)."""
        port = port or free_port()
        args = [sys.executable, str(Path(__file__)), "api", "--port", str(port)]
        with self._process(name, args) as (process, _log):
            wait_for_port(port, process)
            yield Service(f"http://127.0.0.1:{port}", process)

    @contextlib.contextmanager
    def floor(self) -> Iterator[Service]:
        """The ingest floor (see ``_serve_floor``) as a subprocess, like :meth:`api`."""
        port = free_port()
        args = [sys.executable, str(Path(__file__)), "floor", "--port", str(port)]
        with self._process("floor", args) as (process, _log):
            wait_for_port(port, process)
            yield Service(f"http://127.0.0.1:{port}", process)

    @contextlib.contextmanager
    def _process(self, name: str, args: Sequence[str]) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
        path = self.home / f"{name}.log"
        with path.open("wb") as log:
            process = subprocess.Popen(args, cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
            try:
                yield process, path
            finally:
                stop(process)


async def bounded(count: int, concurrency: int, call: Callable[[int], Awaitable[T]]) -> list[T]:
    """``call(0) .. call(count - 1)`` with at most ``concurrency`` in flight; results in order."""
    results: list[T | None] = [None] * count
    indexes = iter(range(count))

    async def lane() -> None:
        for index in indexes:  # one shared iterator: each lane takes the next index
            results[index] = await call(index)

    await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
    return [r for r in results if r is not None]


async def paced(count: int, rate: float, call: Callable[[int], Awaitable[T]]) -> list[T]:
    """``call(i)`` started at ``i / rate`` seconds (open loop: a slow call does not delay the next)."""
    start = time.perf_counter()

    async def at(index: int) -> T:
        await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
        return await call(index)

    return list(await asyncio.gather(*(at(i) for i in range(count))))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """CPU time (user + system, all threads) a process has used so far, with ``children`` that of
    the children it has waited for; 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    used = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return used / os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU time all processes have used (user, nice and system, all cores: :func:`core_ticks`);
    0 without /proc.

    Interrupt time is left out: the kernel's loopback networking for our own traffic lands there.
    """
    return sum(busy for busy, _ in core_ticks()) / os.sysconf("SC_CLK_TCK")


def core_ticks() -> list[tuple[int, int]]:
    """Each core's (busy, all) clock ticks since boot, from /proc/stat; busy is user, nice and
    system. Empty without /proc."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return []
    cores = []
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(x) for x in fields]
            cores.append((sum(ticks[:3]), sum(ticks[:8])))  # user nice system idle iowait irq softirq steal
    return cores


def busy_shares(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    """How busy each core was between two :func:`core_ticks` readings, from 0 to 1."""
    return [(b1 - b0) / max(1, a1 - a0) for (b0, a0), (b1, a1) in zip(before, after, strict=True)]


class CommandCpu:
    """CPU time used by every process whose command is ``name`` (e.g. ``postgres``), counted from
    the first call, including processes that started and exited in between.

    The meter reads each such process's own CPU plus that of its children it has reaped. A
    PostgreSQL backend that exits (a connection closed) moves its whole CPU into the postmaster's
    reaped-children count, so nothing is lost or counted twice as connections come and go. (A
    process whose parent has another name takes its CPU with it when it exits.)"""

    def __init__(self, name: str) -> None:
        self.name = name
        self.first: float | None = None

    def __call__(self) -> float:
        level = 0.0
        for pid in processes_named(self.name):
            with contextlib.suppress(OSError):
                level += cpu_seconds(pid, children=True)
        if self.first is None:
            self.first = level
        return level - self.first


def processes_named(name: str) -> list[int]:
    """The ids of every process whose command is ``name`` (e.g. ``postgres``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found


def parent_of(pid: int) -> int:
    """The id of ``pid``'s parent process (``OSError`` when ``pid`` is gone)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def family(pid: int) -> list[int]:
    """``pid`` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                children.setdefault(parent_of(int(entry.name)), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], ()))
    return found


@contextlib.contextmanager
def pinned(cores: Mapping[int, Callable[[], Iterable[int]]]) -> Iterator[None]:
    """The processes each core's callable lists (``core -> lambda: [pid, ...]``), every thread of
    them, kept to that one core; threads and processes they start meanwhile inherit it. At the end
    the callables list them again, and each is given back the cores it had (one started meanwhile,
    such as a new PostgreSQL connection's process, those of its parent). Setting another user's
    processes (PostgreSQL's: every one on the machine, not only the benchmark's database) needs
    root, and a script killed before the end leaves them pinned."""
    own = os.sched_getaffinity(0)
    had: dict[int, set[int]] = {}
    """Each listed process's cores before it was pinned."""

    def had_before(pid: int) -> set[int]:
        if pid in had:
            return had[pid]
        with contextlib.suppress(OSError):  # started meanwhile: its parent's
            return had.get(parent_of(pid), own)
        return own

    def set_threads(pid: int, allowed: set[int]) -> None:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(task.name), allowed)

    try:
        for core, processes in cores.items():
            for pid in processes():
                with contextlib.suppress(OSError):
                    had[pid] = os.sched_getaffinity(pid)
                    set_threads(pid, {core})
        yield
    finally:
        for processes in cores.values():
            for pid in processes():
                set_threads(pid, had_before(pid))


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
"""Where cgroup v1's ``cpu`` controller is mounted on most Linux machines (``cpu.cfs_quota_us``)."""
CGROUP_V2 = Path("/sys/fs/cgroup")
"""Where the unified cgroup v2 tree is mounted (``cpu.max``), when the machine uses it."""
CFS_PERIOD_US = 100_000


def cgroup_cpu_root() -> Path | None:
    """The cgroup directory under which a CPU-limited group can be made, or ``None`` (no cpu
    controller that this process may write to: not root, or a container without one)."""
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists() and os.access(CGROUP_V1_CPU, os.W_OK):
        return CGROUP_V1_CPU
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split() and os.access(CGROUP_V2, os.W_OK):
        return CGROUP_V2
    return None


@dataclass
class CpuLimit:
    """A cgroup holding one process (every thread, and the processes it starts) to ``cores`` of
    CPU time, as a container's CPU limit or a machine of that size would: the kernel's CFS
    bandwidth control gives it ``cores`` times 100 ms of CPU per 100 ms period, then stops it until
    the next (:meth:`periods`)."""

    group: Path
    cores: float

    def periods(self) -> tuple[int, int]:
        """How many 100 ms periods the group has run in so far, and in how many of them its limit
        stopped it (the kernel's ``nr_periods`` and ``nr_throttled``, in cgroup v1 and v2 alike)."""
        counts = dict.fromkeys(("nr_periods", "nr_throttled"), 0)
        with contextlib.suppress(OSError):
            for line in (self.group / "cpu.stat").read_text().splitlines():
                name, value = line.split()
                if name in counts:
                    counts[name] = int(value)
        return counts["nr_periods"], counts["nr_throttled"]


@contextlib.contextmanager
def cpu_limited(pid: int, cores: float, name: str) -> Iterator[CpuLimit]:
    """``pid`` held to ``cores`` of CPU (:class:`CpuLimit`) until the end, when it is moved back to
    the root group (if still alive) and the group removed. Needs root and a cpu controller
    (:func:`cgroup_cpu_root`)."""
    root = cgroup_cpu_root()
    if root is None:
        raise SystemExit("a CPU limit needs root and a cgroup cpu controller (/sys/fs/cgroup/cpu or cgroup v2)")
    group = root / f"nurture-bench-{name}-{pid}"
    group.mkdir()
    quota = max(1000, round(cores * CFS_PERIOD_US))
    try:
        if root == CGROUP_V1_CPU:
            (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            with contextlib.suppress(OSError):  # already enabled for the root's children
                (root / "cgroup.subtree_control").write_text("+cpu")
            (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        for process in family(pid):
            (group / "cgroup.procs").write_text(str(process))
        yield CpuLimit(group, cores)
    finally:
        with contextlib.suppress(OSError):
            for left in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(left)
        with contextlib.suppress(OSError):
            group.rmdir()


def machine() -> str:
    """One line naming the machine, for the printed results."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), python {platform.python_version()}, {platform.system()}"


# --- subprocess entry points --------------------------------------------------------------------


def _serve_handwritten() -> None:
    """``worker.run`` with ``build_worker``'s worker plus the hand-written workflow."""
    # Imported here: only this entry point needs the worker's and the workflow's modules.
    from handwritten import HandwrittenJourney
    from temporalio.worker import Worker

    from nurture.service import worker
    from nurture.service.observability import configure_logging
    from nurture.service.settings import Settings

    def with_handwritten(client: Any, **options: Any) -> Worker:
        if os.environ.get(FLOOR_PASSTHROUGH) == "1":
            runner = options["workflow_runner"]
            restrictions = runner.restrictions.with_passthrough_modules(HandwrittenJourney.__module__)
            options["workflow_runner"] = type(runner)(restrictions=restrictions)
        return Worker(client, **{**options, "workflows": [*options["workflows"], HandwrittenJourney]})

    # build_worker takes no extra workflows; the Worker it builds gets one more, so both workflows
    # share one worker (its activities, recorder, interceptors, slots) exactly as configured there.
    worker.Worker = with_handwritten  # type: ignore[assignment,attr-defined]
    if os.environ.get(GC_LOG):
        _log_full_collections(Path(os.environ[GC_LOG]))
    configure_logging()
    settings = Settings.from_env()
    asyncio.run(worker.run(settings))


def _log_full_collections(path: Path) -> None:
    """Append each full garbage collection to ``path``: when it ended (POSIX seconds) and how long
    it paused the process (ms). ``benchmarks/sleepers.py`` reads it."""
    log = path.open("a", buffering=1)
    began = [0.0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            log.write(f"{time.time():.3f} {(time.perf_counter() - began[0]) * 1000:.2f}\n")

    gc.callbacks.append(on_collection)


def _serve_unrecorded() -> None:
    """``worker.py`` without the database writes of step-reach recording: the baseline of
    ``overhead.py --compare recording|writes``.

    Runs started without the ``record_steps`` flag (``--compare recording``) run no
    ``nurture.record_steps`` local activity, as runs started before the recording existed; with
    the flag (``--compare writes``) they run it and only its writes go. Either way the steps a
    run's end record carries are not inserted (``_add_reaches`` does nothing). The interpreter
    still notes the steps it reaches; that is a list append per step.
    """
    from nurture.service import observability, worker
    from nurture.service.observability import configure_logging
    from nurture.service.settings import Settings
    from nurture.storage import stores

    async def no_steps(self: Any, record: Any) -> None:
        return None

    observability.InstrumentedRecorder.steps = no_steps  # type: ignore[method-assign]
    stores._add_reaches = lambda session, record: None
    configure_logging()
    asyncio.run(worker.run(Settings.from_env()))


def _serve_api(port: int) -> None:
    from nurture.service.api import serve  # imported here: the other entry points work without it
    from nurture.service.settings import Settings

    asyncio.run(serve(Settings.from_env(), "127.0.0.1", port))


def _serve_floor(port: int) -> None:
    from _floor import serve  # imported here: the other entry points work without it

    serve(Database(database_url(dict(os.environ))), port)


def main() -> None:
    parser = argparse.ArgumentParser(description="service processes for the benchmarks")
    sub = parser.add_subparsers(dest="role", required=True)
    sub.add_parser("worker-handwritten", help="the journey worker, also serving the hand-written workflow")
    sub.add_parser("worker-unrecorded", help="the journey worker without step-reach recording's writes")
    api = sub.add_parser("api", help="the event API")
    api.add_argument("--port", type=int, required=True)
    floor = sub.add_parser("floor", help="the ingest floor: FastAPI inserting each call as one row")
    floor.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    if args.role == "worker-handwritten":
        _serve_handwritten()
    elif args.role == "worker-unrecorded":
        _serve_unrecorded()
    elif args.role == "floor":
        _serve_floor(args.port)
    else:
        _serve_api(args.port)


if __name__ == "__main__":
    main()
