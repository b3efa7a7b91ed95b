"""The operator's entry point: a Temporal worker that runs journeys.

    python worker.py            (or: nurture worker)

All configuration comes from the environment (see :class:`WorkerSettings`). The journeys are
compiled at start-up and the worker refuses to start on any compile error. Until providers are
configured every channel delivers to the outbox: rendered messages in the ``messages`` table.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client, TLSConfig
from temporalio.worker import Worker

from nurture.compiler import Project, load_project
from nurture.delivery import Deliverer
from nurture.storage.db import Database, database_url
from nurture.storage.stores import DbOutbox, DbProfiles, DbRecorder
from workflows.activities import JourneyActivities
from workflows.journey import JourneyWorkflow

log = logging.getLogger("nurture.worker")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """Worker options, read from the environment by :meth:`from_env`."""

    address: str = "localhost:7233"
    """``TEMPORAL_ADDRESS``: the Temporal frontend, host:port."""
    namespace: str = "default"
    """``TEMPORAL_NAMESPACE``."""
    task_queue: str = "nurture"
    """``NURTURE_TASK_QUEUE``: the queue journey workflows run on."""
    tls_cert: Path | None = None
    """``TEMPORAL_TLS_CERT``: client certificate (PEM) for mTLS; with ``TEMPORAL_TLS_KEY``."""
    tls_key: Path | None = None
    """``TEMPORAL_TLS_KEY``: the client certificate's private key (PEM)."""
    tls_ca: Path | None = None
    """``TEMPORAL_TLS_CA``: CA bundle to verify the server; ``TEMPORAL_TLS=1`` for system roots."""
    tls: bool = False
    """Whether to use TLS at all (implied by any of the files above)."""
    journeys: Path = Path("journeys")
    """``NURTURE_JOURNEYS``: directory of journey files."""
    templates: Path = Path("templates")
    """``NURTURE_TEMPLATES``: directory of templates."""
    database: str = field(default_factory=database_url)
    """``DATABASE_URL`` (default: SQLite under ``NURTURE_HOME``, ``.nurture/``)."""

    @classmethod
    def from_env(cls) -> WorkerSettings:
        env = os.environ

        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        cert, key, ca = path("TEMPORAL_TLS_CERT"), path("TEMPORAL_TLS_KEY"), path("TEMPORAL_TLS_CA")
        if bool(cert) != bool(key):
            raise SystemExit("TEMPORAL_TLS_CERT and TEMPORAL_TLS_KEY go together: set both or neither")
        return cls(
            address=env.get("TEMPORAL_ADDRESS", cls.address),
            namespace=env.get("TEMPORAL_NAMESPACE", cls.namespace),
            task_queue=env.get("NURTURE_TASK_QUEUE", cls.task_queue),
            tls_cert=cert,
            tls_key=key,
            tls_ca=ca,
            tls=env.get("TEMPORAL_TLS", "").lower() in ("1", "true", "yes") or bool(cert or ca),
            journeys=Path(env.get("NURTURE_JOURNEYS", str(cls.journeys))),
            templates=Path(env.get("NURTURE_TEMPLATES", str(cls.templates))),
            database=database_url(env),
        )

    def tls_config(self) -> TLSConfig | bool:
        if not self.tls:
            return False
        return TLSConfig(
            server_root_ca_cert=self.tls_ca.read_bytes() if self.tls_ca else None,
            client_cert=self.tls_cert.read_bytes() if self.tls_cert else None,
            client_private_key=self.tls_key.read_bytes() if self.tls_key else None,
        )


async def connect(settings: WorkerSettings) -> Client:
    return await Client.connect(settings.address, namespace=settings.namespace, tls=settings.tls_config())


def build_worker(client: Client, project: Project, db: Database, task_queue: str) -> Worker:
    """The journey workflow and its activities on the database-backed stores."""
    outbox = DbOutbox(db)
    activities = JourneyActivities(
        Deliverer(project.templates, dict.fromkeys(("email", "sms", "wechat"), outbox)),
        DbProfiles(db),
        DbRecorder(db),
    )
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[JourneyWorkflow],
        activities=list(activities.all()),
    )


async def run(settings: WorkerSettings, stop: asyncio.Event | None = None) -> None:
    """Compile, migrate, connect, and serve until ``stop`` is set (or SIGINT/SIGTERM)."""
    project = load_project(settings.journeys, settings.templates)
    log.info("compiled %d journeys: %s", len(project.journeys), ", ".join(sorted(project.journeys)))
    db = Database(settings.database)
    db.migrate()
    client = await connect(settings)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    async with build_worker(client, project, db, settings.task_queue):
        log.info("worker on %s namespace %s queue %s", settings.address, settings.namespace, settings.task_queue)
        await stop.wait()
        log.info("stopping: finishing in-flight tasks")
    db.dispose()
    log.info("worker stopped")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(WorkerSettings.from_env()))


if __name__ == "__main__":
    main()
