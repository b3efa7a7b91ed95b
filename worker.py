"""The operator's entry point: a Temporal worker that runs journeys.

    python worker.py            (or: nurture worker)

All configuration comes from the environment (see :class:`nurture.settings.Settings`). The journeys are
compiled at start-up and the worker refuses to start on any compile error. Until providers are
configured every channel delivers to the outbox: rendered messages in the ``messages`` table.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from temporalio.client import Client
from temporalio.worker import Worker

from nurture.compiler import Project, load_project
from nurture.delivery import Deliverer
from nurture.settings import Settings
from nurture.storage.db import Database
from nurture.storage.stores import DbOutbox, DbProfiles, DbRecorder
from workflows.activities import JourneyActivities
from workflows.journey import JourneyWorkflow

log = logging.getLogger("nurture.worker")


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


async def run(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Compile, migrate, connect, and serve until ``stop`` is set (or SIGINT/SIGTERM)."""
    project = load_project(settings.journeys, settings.templates)
    log.info("compiled %d journeys: %s", len(project.journeys), ", ".join(sorted(project.journeys)))
    db = Database(settings.database)
    db.migrate()
    client = await settings.connect()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    async with build_worker(client, project, db, settings.task_queue):
        log.info(
            "worker on %s namespace %s queue %s", settings.temporal_address, settings.namespace, settings.task_queue
        )
        await stop.wait()
        log.info("stopping: finishing in-flight tasks")
    db.dispose()
    log.info("worker stopped")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(Settings.from_env()))


if __name__ == "__main__":
    main()
