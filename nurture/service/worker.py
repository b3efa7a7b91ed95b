"""The journey worker: a Temporal worker that runs journeys.

    python worker.py            (or: nurture worker)

All configuration comes from the environment (see :class:`nurture.service.settings.Settings` and
:class:`WorkerOptions`). The journeys are compiled at start-up and the worker refuses to start on
any compile error (the diagnostics go to stderr, the exit code is 1). SIGTERM or SIGINT stops it
gracefully: it stops polling, gives in-flight activities ``NURTURE_SHUTDOWN_TIMEOUT`` seconds to
finish, and exits 0. Each channel goes through the provider ``providers:`` in ``nurture.yaml``
names (default: the outbox, rendered messages in the ``messages`` table); the worker refuses to
start while a configured provider's environment variables are missing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

from prometheus_client import start_http_server
from temporalio.client import Client
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)
from temporalio.worker import Worker

from channels import Channel
from nurture.delivery.deliverer import Deliverer, UnsubscribeUrl, for_every_channel
from nurture.language.compiler import Project, compile_project
from nurture.language.diagnostics import CompileError
from nurture.storage.db import Database
from nurture.storage.rates import DbRates
from nurture.storage.stores import DbHistory, DbLedger, DbOutbox, DbProfiles, DbRecorder, store_versions
from workflows.activities import JourneyActivities
from workflows.dates import DateActivities, DateTriggerWorkflow
from workflows.journey import JourneyWorkflow
from workflows.sandbox import workflow_runner

from .ingest import Ingest
from .observability import JOURNEYS, ActivityMetrics, InstrumentedRecorder, configure_logging
from .providers import Channels, advisories, build_channels
from .settings import Settings, SettingsError

log = logging.getLogger("nurture.worker")


class StartupError(Exception):
    """The worker cannot start (Temporal unreachable, TLS rejected, a port taken); the message says why."""


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How the worker process runs, beyond what :class:`Settings` configures."""

    shutdown_timeout: float = 10.0
    """``NURTURE_SHUTDOWN_TIMEOUT``: seconds in-flight activities get to finish on SIGTERM/SIGINT."""
    temporal_metrics_port: int | None = None
    """``NURTURE_TEMPORAL_METRICS_PORT``: where the Temporal SDK's own metrics are served
    (default: ``NURTURE_METRICS_PORT`` + 1 when that is set; ``0`` turns them off)."""
    max_cached_workflows: int = 100
    """``NURTURE_MAX_CACHED_WORKFLOWS``: runs the worker keeps in memory between their workflow
    tasks (the SDK's default is 1,000). Journeys sleep for hours or days, so a cached run is
    rarely reused before it is evicted; a run not in the cache is replayed from its history when
    it wakes. The cache bounds the worker's memory, whatever the number of sleeping runs, and the
    cost of a full garbage collection (docs/performance.md, "Sleeping runs")."""
    gc_freeze: bool = True
    """``NURTURE_GC_FREEZE`` (``0`` turns it off): after compiling the journeys and connecting,
    move every object so far to the collector's permanent generation (``gc.freeze()``), so full
    collections no longer walk the compiled project, the SDK and the imported modules."""
    gc_threshold: tuple[int, int, int] | None = None
    """``NURTURE_GC_THRESHOLD``: three numbers for ``gc.set_threshold``, e.g. ``700,10,10``
    (default: Python's own)."""

    @classmethod
    def from_env(cls, settings: Settings, env: Mapping[str, str] | None = None) -> WorkerOptions:
        env = os.environ if env is None else env
        raw = env.get("NURTURE_SHUTDOWN_TIMEOUT", "").strip()
        try:
            timeout = float(raw) if raw else cls.shutdown_timeout
        except ValueError:
            raise SettingsError(
                f"NURTURE_SHUTDOWN_TIMEOUT must be a number of seconds, got {raw!r}"
            ) from None
        if timeout < 0:
            raise SettingsError(f"NURTURE_SHUTDOWN_TIMEOUT must not be negative, got {raw!r}")
        port = env.get("NURTURE_TEMPORAL_METRICS_PORT", "").strip()
        if port and not port.isdigit():
            raise SettingsError(f"NURTURE_TEMPORAL_METRICS_PORT must be a port number, got {port!r}")
        default = settings.metrics_port + 1 if settings.metrics_port else None
        cache = env.get("NURTURE_MAX_CACHED_WORKFLOWS", "").strip()
        if cache and not cache.isdigit():
            raise SettingsError(f"NURTURE_MAX_CACHED_WORKFLOWS must be a whole number, got {cache!r}")
        freeze = env.get("NURTURE_GC_FREEZE", "").strip().lower()
        if freeze not in ("", "0", "1", "true", "false", "yes", "no"):
            raise SettingsError(f"NURTURE_GC_FREEZE must be 1 or 0, got {freeze!r}")
        return cls(
            shutdown_timeout=timeout,
            temporal_metrics_port=(int(port) or None) if port else default,
            max_cached_workflows=int(cache) if cache else cls.max_cached_workflows,
            gc_freeze=freeze in ("1", "true", "yes") if freeze else cls.gc_freeze,
            gc_threshold=_threshold(env.get("NURTURE_GC_THRESHOLD", "").strip()),
        )


def _threshold(raw: str) -> tuple[int, int, int] | None:
    if not raw:
        return None
    parts = [part.strip() for part in raw.split(",")]
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise SettingsError(f"NURTURE_GC_THRESHOLD must be three whole numbers such as 700,10,10, got {raw!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def apply_gc_policy(options: WorkerOptions) -> None:
    """The garbage collector's thresholds, then (once the long-lived objects exist) its freeze."""
    if options.gc_threshold is not None:
        gc.set_threshold(*options.gc_threshold)
    if options.gc_freeze:
        gc.collect()
        gc.freeze()


def compile_journeys(settings: Settings) -> Project:
    """The project, or :class:`CompileError` carrying every diagnostic (``file:line:col: ...``)."""
    result = compile_project(
        settings.journeys,
        settings.templates,
        settings.config,
        audiences_dir=settings.audiences,
        broadcasts_dir=settings.broadcasts,
    )
    if result.project is None:
        raise CompileError(result.errors)
    for warning in result.project.warnings:
        log.warning("%s", warning.headline())
    return result.project


def temporal_runtime(options: WorkerOptions) -> Runtime:
    """A Temporal runtime whose Core logs join ours and whose SDK metrics are served if asked."""
    metrics = None
    if options.temporal_metrics_port:
        metrics = PrometheusConfig(bind_address=f"0.0.0.0:{options.temporal_metrics_port}")
    try:
        return Runtime(
            telemetry=TelemetryConfig(
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
                    forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
                ),
                metrics=metrics,
            )
        )
    except ValueError as exc:  # the Prometheus exporter could not bind
        raise StartupError(
            f"cannot serve Temporal SDK metrics on :{options.temporal_metrics_port} "
            f"(NURTURE_TEMPORAL_METRICS_PORT): {exc}"
        ) from None


def build_worker(
    client: Client,
    project: Project,
    db: Database,
    task_queue: str,
    *,
    shutdown_timeout: float = WorkerOptions.shutdown_timeout,
    max_cached_workflows: int = WorkerOptions.max_cached_workflows,
    channels: Mapping[str, Channel] | None = None,
    links: UnsubscribeUrl | None = None,
) -> Worker:
    """The journey and date trigger workflows and their activities on the database-backed stores,
    instrumented.

    ``channels`` maps each channel to its provider adapter (default: the outbox for all);
    ``links`` makes the signed unsubscribe URL for marketing messages.
    """
    activities = JourneyActivities(
        Deliverer(
            project.templates,
            channels if channels is not None else for_every_channel(DbOutbox()),
            ledger=DbLedger(db),
            links=links,
            history=DbHistory(db),
            profiles=DbProfiles(db),
            rates=DbRates(db),
        ),
        DbProfiles(db),
        InstrumentedRecorder(DbRecorder(db)),
    )
    # A date trigger's moment starts the journey as an event would: through the event router.
    dates = DateActivities(Ingest(project, db, client, task_queue))
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[JourneyWorkflow, DateTriggerWorkflow],
        activities=[*activities.all(), *dates.all()],
        interceptors=[ActivityMetrics()],
        graceful_shutdown_timeout=timedelta(seconds=shutdown_timeout),
        max_cached_workflows=max_cached_workflows,
        workflow_runner=workflow_runner(),
    )


def provider_channels(project: Project, db: Database, env: Mapping[str, str] | None = None) -> Channels:
    """The adapters ``nurture.yaml`` asks for, or :class:`StartupError` naming what is missing."""
    env = os.environ if env is None else env
    try:
        channels = build_channels(project.settings.providers, env, db=db, outbox=DbOutbox())
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    for channel, adapter in channels.by_channel.items():
        log.info("%s via %s", channel, adapter.provider, extra={"channel": channel, "provider": adapter.provider})
    for note in advisories(project.settings.providers, env):
        log.warning("%s", note)
    return channels


async def run(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    options: WorkerOptions | None = None,
    project: Project | None = None,
    client: Client | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Compile, migrate, connect, and serve until ``stop`` is set (or SIGINT/SIGTERM).

    ``nurture up`` passes its own ``stop``, compiled ``project`` and ``client``; on its own the
    worker handles the signals itself. ``ready`` is set once the worker polls its queue.
    """
    options = options or WorkerOptions.from_env(settings)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _stopper(stop, sig))
    if project is None:
        project = compile_journeys(settings)
    log.info(
        "compiled %d journeys: %s",
        len(project.journeys),
        ", ".join(sorted(project.journeys)),
        extra={"journeys": {j.id: j.version for j in project.journeys.values()}},
    )
    for journey in project.journeys.values():
        JOURNEYS.labels(journey.id, journey.version).set(1)
    db = settings.open_database()
    metrics_server = None
    channels: Channels | None = None
    try:
        db.migrate()
        store_versions(db, list(project.journeys.values()))
        channels = provider_channels(project, db)
        if settings.metrics_port:
            try:
                metrics_server, _ = start_http_server(settings.metrics_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on :{settings.metrics_port} (NURTURE_METRICS_PORT): {exc}"
                ) from None
            log.info(
                "metrics on :%d/metrics (Temporal SDK metrics: %s)",
                settings.metrics_port,
                f":{options.temporal_metrics_port}/metrics" if options.temporal_metrics_port else "off",
                extra={
                    "metrics_port": settings.metrics_port,
                    "temporal_metrics_port": options.temporal_metrics_port,
                },
            )
        if client is None:
            runtime = temporal_runtime(options)
            try:
                client = await settings.connect(runtime)
            except RuntimeError as exc:  # how the SDK reports an unreachable or refusing frontend
                raise StartupError(
                    f"cannot connect to Temporal at {settings.temporal_address} "
                    f"(namespace {settings.namespace}): {exc}"
                ) from None
        worker = build_worker(
            client,
            project,
            db,
            settings.task_queue,
            shutdown_timeout=options.shutdown_timeout,
            max_cached_workflows=options.max_cached_workflows,
            channels=channels.by_channel,
            links=unsubscribe_url(settings),
        )
        apply_gc_policy(options)
        async with worker:
            log.info(
                "worker ready on %s namespace %s queue %s",
                settings.temporal_address,
                settings.namespace,
                settings.task_queue,
                extra={
                    "temporal_address": settings.temporal_address,
                    "namespace": settings.namespace,
                    "task_queue": settings.task_queue,
                },
            )
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info(
                "stopping: finishing in-flight tasks (up to %gs)",
                options.shutdown_timeout,
                extra={"shutdown_timeout": options.shutdown_timeout},
            )
    finally:
        if channels is not None:
            await channels.aclose()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        db.dispose()
    log.info("worker stopped")


def unsubscribe_url(settings: Settings) -> UnsubscribeUrl | None:
    """Signed one-click unsubscribe links, when ``NURTURE_PUBLIC_URL`` and ``NURTURE_SECRET`` are set."""
    links = settings.unsubscribe_links()
    return None if links is None else links.url


def _stopper(stop: asyncio.Event, sig: signal.Signals) -> Callable[[], None]:
    def handle() -> None:
        if not stop.is_set():
            log.info("%s received", sig.name, extra={"signal": sig.name})
        stop.set()

    return handle


def main() -> None:
    """``python worker.py``: exit code 0 after a graceful stop, 1 when it cannot start."""
    configure_logging()
    try:
        settings = Settings.from_env()
        asyncio.run(run(settings, options=WorkerOptions.from_env(settings)))
    except CompileError as exc:
        log.error(
            "not starting: %d compile error(s) in %s",
            len(exc.diagnostics),
            settings.journeys,
            extra={"errors": [d.headline() for d in exc.diagnostics]},
        )
        print(f"nurture worker: the journeys do not compile; not starting.\n{exc}", file=sys.stderr)
        exit_now(1)
    except StartupError as exc:
        log.error("not starting: %s", exc)
        exit_now(1)
    except SettingsError as exc:
        log.error("not starting: %s", exc.code)
        exit_now(1)
    exit_now(0)


def exit_now(code: int) -> NoReturn:
    """Flush the logs and exit without interpreter finalization.

    The Temporal SDK's native threads can abort a finalizing interpreter ("PyGILState_Release:
    thread state must be current", temporalio/sdk-python#300), which would turn a clean stop
    into SIGABRT and exit code 134.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
