"""``nurture up``: the embedded default stack in one process.

Starts (or reuses) a local Temporal dev server whose state lives in ``<home>/temporal.db``, then
runs the worker and the event API in this process on one Temporal client, with every channel
delivering to the database-backed outbox. Ctrl-C, SIGTERM or SIGHUP stops the API, then the
worker (in-flight activities finish), then the dev server; the next ``nurture up`` on the same
home resumes every in-flight journey, because both the Temporal state and ``nurture.db`` persist.

The home is owner-only (0700, its files 0600): the databases hold traits, addresses and event
properties. The dev server's gRPC port and UI stay on loopback whatever ``--host`` says (the UI
has no login), unless ``--temporal-host`` asks otherwise; an API listening beyond loopback is
warned about.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import uvicorn
from sqlalchemy.engine import make_url
from temporalio.client import Client
from temporalio.runtime import Runtime

from nurture.console import accounts
from nurture.console.app import PREFIX, create_app
from nurture.language.compiler import Project
from nurture.service import worker
from nurture.service.api import KEEP_ALIVE
from nurture.service.devserver import PRIVATE_UMASK, ServerExited, answering, private_file, until_answering
from nurture.service.settings import Settings
from nurture.storage.db import Database
from workflows.runtime import binary

log = logging.getLogger("nurture.up")

T = TypeVar("T")

PID_FILE = "temporal.pid"
DEV_SERVER_WAIT = 60.0
"""Seconds a started dev server has to answer before `nurture up` gives up."""
KEY_KINDS = ("write", "read", "admin")
STATE_FILES = frozenset({"nurture.db", "temporal.db", "temporal.log", PID_FILE, *(f"{kind}_key" for kind in KEY_KINDS)})
"""What ``nurture up`` keeps in its home (SQLite adds ``-wal``, ``-shm`` and ``-journal`` files)."""
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, a service manager, a closed terminal: each stops the stack in order."""


class UpError(Exception):
    """The stack cannot start, or a piece of it died; the message says what to do."""


class Interrupted(Exception):
    """A stop signal arrived while the stack was starting."""


@dataclass(frozen=True, kw_only=True)
class UpOptions:
    """What ``nurture up`` runs and where."""

    home: Path = Path(".nurture")
    """Local state: ``nurture.db``, ``temporal.db``, ``temporal.log``, and the API's keys ``write_key``,
    ``read_key`` and ``admin_key``."""
    host: str = "127.0.0.1"
    """Interface the event API listens on."""
    temporal_host: str = "127.0.0.1"
    """Interface the dev server's gRPC port and UI listen on: loopback unless asked, since the UI
    has no login and shows every run's traits and event properties."""
    port: int = 8000
    """The event API's port."""
    temporal_port: int = 7233
    """The dev server's gRPC port; a Temporal server already listening there is reused."""
    ui_port: int | None = None
    """The Temporal UI's port (default: ``temporal_port`` + 1000, as the Temporal CLI does)."""
    journeys: Path | None = None
    """Journeys directory (default: ``NURTURE_JOURNEYS`` or ``./journeys``)."""
    templates: Path | None = None
    """Templates directory (default: ``NURTURE_TEMPLATES`` or ``./templates``)."""

    @property
    def temporal_ui_port(self) -> int:
        return self.ui_port if self.ui_port is not None else self.temporal_port + 1000


TEMPORAL_CONNECTION = (
    "TEMPORAL_TLS",
    "TEMPORAL_TLS_CERT",
    "TEMPORAL_TLS_KEY",
    "TEMPORAL_TLS_CA",
    "TEMPORAL_TLS_SERVER_NAME",
    "TEMPORAL_API_KEY",
)
"""How to reach a remote Temporal: ``nurture up`` ignores these for its own dev server."""


def stack_settings(options: UpOptions, env: Mapping[str, str] | None = None) -> Settings:
    """Settings for the stack: the home and the local dev server override ``NURTURE_HOME`` and
    ``TEMPORAL_ADDRESS``; ``DATABASE_URL`` still wins over the SQLite default."""
    env = dict(os.environ if env is None else env)
    env["NURTURE_HOME"] = str(options.home)
    env["TEMPORAL_ADDRESS"] = f"{_url_host(options.temporal_host)}:{options.temporal_port}"
    for name in TEMPORAL_CONNECTION:
        env.pop(name, None)  # the local dev server speaks plain gRPC and takes no key
    settings = Settings.from_env(env)
    overrides: dict[str, Any] = {}
    if options.journeys is not None:
        overrides["journeys"] = options.journeys
    if options.templates is not None:
        overrides["templates"] = options.templates
    return dataclasses.replace(settings, **overrides)


def with_keys(settings: Settings, home: Path) -> tuple[Settings, dict[str, str]]:
    """``settings`` with a write, a read and an admin key, and where each came from (for the banner).

    For each kind, its variable (``NURTURE_WRITE_KEYS``, ...) wins; otherwise the key in
    ``home/write_key`` (``read_key``, ``admin_key``), created (mode 0600) on the first run.
    """
    keys = {"write": settings.write_keys, "read": settings.read_keys, "admin": settings.admin_keys}
    origins = {}
    for kind, given in keys.items():
        if given:
            origins[kind] = f"from NURTURE_{kind.upper()}_KEYS"
            continue
        key, created = stored_key(home, kind)
        keys[kind] = (key,)
        where = home / f"{kind}_key"
        origins[kind] = f"new, saved in {where}" if created else f"from {where}"
    keyed = dataclasses.replace(
        settings, write_keys=keys["write"], read_keys=keys["read"], admin_keys=keys["admin"]
    )
    return keyed, origins


def stored_key(home: Path, kind: str) -> tuple[str, bool]:
    """The key in ``home/<kind>_key``, creating it (owner-only) when missing; and whether it was new."""
    path = home / f"{kind}_key"
    if path.exists():
        key = path.read_text(encoding="utf-8").strip()
        if key:
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
            return key, False
        path.unlink()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    return key, True


def private_home(home: Path) -> None:
    """Create ``home`` readable by its owner only (0700). A home an earlier version made with the
    default modes is tightened, with Nurture's files in it (0600); a directory holding none of
    them is left as its owner set it."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = [path for path in home.iterdir() if path.name.partition("-")[0] in STATE_FILES]
    for path in [home, *state] if state else []:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700 if path.is_dir() else 0o600)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (a name other than localhost may not be)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warnings(options: UpOptions) -> list[str]:
    """What ``options`` expose beyond this machine, in words."""
    warnings = []
    if not is_loopback(options.host):
        warnings.append(
            f"the API listens on {options.host}, beyond this machine: its write key travels in clear "
            "over HTTP, and the webhooks and unsubscribe links take none; put it behind HTTPS or use "
            "--host 127.0.0.1"
        )
    if not is_loopback(options.temporal_host):
        warnings.append(
            f"the Temporal dev server (gRPC and UI) listens on {options.temporal_host}, beyond this "
            "machine: its UI has no login and shows every run's traits and event properties"
        )
    return warnings


def port_is_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def ensure_bindable(host: str, port: int, option: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and Temporal bind
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UpError(
                f"{host}:{port} is not available ({exc.strerror}); choose another {option}"
            ) from None


async def until(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T:
    """``work``'s result, unless ``stop`` is set first: then ``work`` is cancelled."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise Interrupted
    return task.result()


class QuietServer(uvicorn.Server):
    """Uvicorn without its own signal handling: ``nurture up`` orders the shutdown itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve_until_stopped(self) -> None:
        try:
            await self.serve()
        except SystemExit as exc:  # uvicorn's way to report a failed start-up
            raise UpError(f"the API could not start (uvicorn exit code {exc.code})") from None


class Stack:
    """The running pieces, started in order and stopped in reverse."""

    def __init__(self, options: UpOptions, settings: Settings, project: Project, runtime: Runtime) -> None:
        self.options = options
        self.settings = settings
        self.project = project
        self.runtime = runtime
        self.dev_server: subprocess.Popen[bytes] | None = None
        self.adopted: int | None = None
        """The pid of a dev server an earlier, killed ``nurture up`` on this home left running."""
        self.reused = False
        self.client: Client | None = None
        self.db: Database | None = None
        self.worker_stop = asyncio.Event()
        self.worker_ready = asyncio.Event()
        self.api: QuietServer | None = None
        self.tasks: dict[str, asyncio.Future[Any]] = {}

    @property
    def pid_file(self) -> Path:
        return self.options.home / PID_FILE

    async def start(self) -> None:
        await self.start_temporal()
        assert self.client is not None
        self.db = self.settings.open_database()
        await asyncio.to_thread(self.db.migrate)
        self.tasks["worker"] = asyncio.ensure_future(
            worker.run(
                self.settings,
                self.worker_stop,
                options=worker.WorkerOptions.from_env(self.settings),
                project=self.project,
                client=self.client,
                ready=self.worker_ready,
            )
        )
        app = create_app(self.settings, project=self.project, db=self.db, client=self.client)
        config = uvicorn.Config(
            app,
            host=self.options.host,
            port=self.options.port,
            log_config=None,  # uvicorn's records go through our masked JSON handler
            lifespan="on",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE,
        )
        self.api = QuietServer(config)
        self.tasks["API"] = asyncio.ensure_future(self.api.serve_until_stopped())
        while not (self.api.started and self.worker_ready.is_set()):
            problem = self.failed()
            if problem is not None:
                raise UpError(problem)
            await asyncio.sleep(0.05)

    async def start_temporal(self) -> None:
        host, port = self.options.temporal_host, self.options.temporal_port
        address = self.settings.temporal_address
        if port_is_open(_url_host(host).strip("[]"), port):
            try:
                self.client = await asyncio.wait_for(self._connect(), timeout=10)
            except (RuntimeError, TimeoutError) as exc:
                raise UpError(
                    f"{address} is taken by something that is not a Temporal server ({exc}); "
                    "choose another --temporal-port"
                ) from None
            self.reused = True
            self.adopted = self._orphan()
            if self.adopted is not None:
                log.info("adopting the dev server a killed nurture up left running (pid %d)", self.adopted)
            else:
                log.info("reusing the Temporal server on %s", address, extra={"temporal_address": address})
            return
        ensure_bindable(host, self.options.temporal_ui_port, "--ui-port")
        try:
            temporal = binary("temporal")
        except RuntimeError as exc:
            raise UpError(str(exc)) from None
        command = [
            temporal,
            "server",
            "start-dev",
            "--ip",
            host,
            "--port",
            str(port),
            "--ui-port",
            str(self.options.temporal_ui_port),
            "--db-filename",
            str(self.options.home / "temporal.db"),
            # WAL with synchronous=NORMAL survives a killed process (not a power cut) and makes
            # the dev server several times faster than its default of a sync on every commit.
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
            "--log-level",
            "warn",
        ]
        if self.settings.namespace != "default":
            command += ["--namespace", self.settings.namespace]
        log_path = self.options.home / "temporal.log"
        log.info("starting the Temporal dev server on %s", address, extra={"command": shlex.join(command)})
        with private_file(log_path, "ab") as output:
            # Its own session: Ctrl-C in the terminal reaches only us, and we stop it last.
            self.dev_server = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
                umask=PRIVATE_UMASK,
            )
        with private_file(self.pid_file) as pid_file:
            pid_file.write(f"{self.dev_server.pid}\n".encode())
        self.tasks["Temporal dev server"] = asyncio.ensure_future(asyncio.to_thread(self.dev_server.wait))
        try:
            self.client = await until_answering(
                address, self.dev_server, namespace=self.settings.namespace, runtime=self.runtime, timeout=DEV_SERVER_WAIT
            )
        except ServerExited as exc:
            raise UpError(
                f"the Temporal dev server exited with code {exc.returncode}; "
                f"its log ({log_path}) ends with:\n{_tail(log_path)}"
            ) from None
        except TimeoutError:
            raise UpError(f"the Temporal dev server did not answer on {address} within {DEV_SERVER_WAIT:g}s") from None

    async def _connect(self) -> Client:
        """A client once the frontend answers and the namespace exists."""
        return await answering(self.settings.temporal_address, self.settings.namespace, self.runtime)

    def _orphan(self) -> int | None:
        """The pid in ``temporal.pid`` when it is still a dev server on this home's database.

        Only a process whose command line names this home's ``temporal.db`` qualifies (checked in
        /proc, so on Linux only): a recycled pid is never mistaken for it.
        """
        try:
            pid = int(self.pid_file.read_text(encoding="utf-8"))
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        database = str(self.options.home / "temporal.db").encode()
        return pid if b"start-dev" in arguments and database in arguments else None

    def failed(self) -> str | None:
        """Which piece stopped on its own, and why."""
        for name, task in self.tasks.items():
            if task.done():
                return f"the {name} stopped unexpectedly: {_failure(task)}"
        return None

    async def stop(self) -> None:
        """API first (no new events), then the worker (in-flight tasks finish), then Temporal."""
        if self.api is not None:
            log.info("stopping the API")
            self.api.should_exit = True
            await _settle(self.tasks["API"])
        if "worker" in self.tasks:
            self.worker_stop.set()
            await _settle(self.tasks["worker"])
        if self.db is not None:
            self.db.dispose()
        if self.dev_server is not None:
            if self.dev_server.poll() is None:
                log.info("stopping the Temporal dev server")
                self.dev_server.terminate()
                try:
                    await asyncio.to_thread(self.dev_server.wait, 20)
                except subprocess.TimeoutExpired:
                    self.dev_server.kill()
                    await asyncio.to_thread(self.dev_server.wait)
            await _settle(self.tasks["Temporal dev server"])
            self.pid_file.unlink(missing_ok=True)
        elif self.adopted is not None:
            log.info("stopping the Temporal dev server (pid %d)", self.adopted)
            await asyncio.to_thread(_terminate, self.adopted)
            self.pid_file.unlink(missing_ok=True)


def _terminate(pid: int, timeout: float = 20) -> None:
    """SIGTERM a process that is not our child, then SIGKILL if it outlives ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie its new parent has not reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def _settle(task: asyncio.Future[Any]) -> None:
    try:
        await task
    except Exception as exc:
        log.error("%s while stopping", exc, exc_info=exc)


def _failure(task: asyncio.Future[Any]) -> str:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    if exc is None:
        return "exited"
    return str(exc) if isinstance(exc, UpError) else f"{type(exc).__name__}: {exc}"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def up(options: UpOptions, *, out: IO[str]) -> None:
    """Run the stack until a stop signal; raises :class:`UpError` when it cannot run.

    Compile errors raise :class:`~nurture.language.diagnostics.CompileError` before anything starts.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    ports = (options.port, options.temporal_port, options.temporal_ui_port)
    if len(set(ports)) < len(ports):
        raise UpError(f"--port, --temporal-port and --ui-port must differ, got {', '.join(map(str, ports))}")
    for warning in exposure_warnings(options):
        log.warning("%s", warning)
    settings = stack_settings(options)
    project = worker.compile_journeys(settings)
    private_home(options.home)
    ensure_bindable(options.host, options.port, "--port")
    settings, key_origins = with_keys(settings, options.home)
    runtime = worker.temporal_runtime(worker.WorkerOptions.from_env(settings))
    stack = Stack(options, settings, project, runtime)
    try:
        try:
            await until(stack.start(), stop)
        except Interrupted:
            log.info("interrupted while starting")
            return
        assert stack.db is not None
        admin = os.environ.get("NURTURE_CONSOLE_ADMIN") or accounts.FIRST_ADMIN
        console = await asyncio.to_thread(accounts.first_admin_link, stack.db, admin)
        out.write(
            banner(
                options, settings, project, key_origins, reused=stack.reused and not stack.adopted, console=console
            )
        )
        out.flush()
        while not stop.is_set():
            problem = stack.failed()
            if problem is not None:
                raise UpError(problem)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
    finally:
        await stack.stop()
        log.info("nurture up stopped")


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if stop.is_set():
        log.info("%s received: already stopping", sig.name)
    else:
        log.info("%s received: stopping", sig.name, extra={"signal": sig.name})
    stop.set()


def banner(
    options: UpOptions,
    settings: Settings,
    project: Project,
    key_origins: Mapping[str, str],
    *,
    reused: bool,
    console: tuple[str, str] | None = None,
) -> str:
    """What ``nurture up`` prints once everything is ready; ``console`` is the first admin's
    email and one-time sign-in token."""
    api = f"http://{_url_host(options.host)}:{options.port}"
    minutes = int(accounts.LINK_LIFETIME.total_seconds() // 60)
    sign_in = (
        f"  Sign in       {api}{PREFIX}/link/{console[1]}\n"
        f"                (once, within {minutes} minutes, as {console[0]}; then set a password)\n"
        if console is not None
        else "  Sign in       with your console account (nurture console link EMAIL prints a link)\n"
    )
    key, read_key, admin_key = settings.write_keys[0], settings.read_keys[0], settings.admin_keys[0]
    ui = f"http://{_url_host(options.temporal_host)}:{options.temporal_ui_port}"
    temporal = (
        f"{settings.temporal_address} (reused: already running)"
        if reused
        else f"{settings.temporal_address} (dev server, state in {options.home / 'temporal.db'})"
    )
    journeys = ", ".join(sorted(project.journeys)) or "none"
    home_flag = "" if options.home == Path(".nurture") else f" --home {shlex.quote(str(options.home))}"
    database = make_url(settings.database).render_as_string(hide_password=True)
    warnings = "".join(f"\n  Warning: {warning}.\n" for warning in exposure_warnings(options))
    return f"""
Nurture is up.
{warnings}
  Console       {api}{PREFIX}
{sign_in}  API           {api}
  API docs      {api}/docs
  Temporal UI   {ui}{" (if the reused server serves one)" if reused else ""}
  Temporal      {temporal}
  Database      {database}
  Journeys      {journeys}
  Write key     {key}   ({key_origins["write"]}: sends events)
  Read key      {read_key}   ({key_origins["read"]}: reads people, messages, the outbox)
  Admin key     {admin_key}   ({key_origins["admin"]}: reads, exports and forgets users)

Start the welcome series for a new user (identify with an email, then "Signed Up"):

{curl_example(api, key)}
{_quiet_note(project)}
See what was sent:

  nurture outbox{home_flag}
  curl -sS -u {shlex.quote(read_key + ":")} {api}/v1/outbox

Ctrl-C stops everything; the next `nurture up{home_flag}` resumes in-flight journeys.
"""


def _quiet_note(project: Project) -> str:
    quiet = project.settings.quiet_hours
    if quiet is None:
        return ""
    window = f"{quiet.start // 60:02d}:{quiet.start % 60:02d}-{quiet.end // 60:02d}:{quiet.end % 60:02d}"
    return (
        f"\n  (Quiet hours {window} apply to marketing sends in the user's time zone; the example\n"
        f"   user's zone, {daytime_zone()}, is one where it is daytime now, so the email goes at once.)\n"
    )


def daytime_zone(now: datetime | None = None) -> str:
    """A fixed-offset zone where it is about 13:00 now, so the example is outside quiet hours."""
    now = now or datetime.now(UTC)
    offset = (13 - now.hour + 12) % 24 - 12  # hours ahead of UTC, in -12..+11
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"  # POSIX signs: Etc/GMT-8 is UTC+8


def curl_example(api: str, key: str, *, user_id: str = "user-1", email: str = "ada@example.com") -> str:
    """A ready-to-paste batch call: identify the user, then track ``Signed Up``."""
    body = {
        "batch": [
            {
                "type": "identify",
                "userId": user_id,
                "traits": {"email": email, "first_name": "Ada", "timezone": daytime_zone()},
            },
            {"type": "track", "userId": user_id, "event": "Signed Up"},
        ]
    }
    return (
        f"  curl -sS -u {shlex.quote(key + ':')} {api}/v1/batch \\\n"
        f"    -H 'Content-Type: application/json' \\\n"
        f"    -d {shlex.quote(json.dumps(body))}"
    )


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
