"""The operator's entry point: a Temporal worker that runs journeys.

    python worker.py            (or: nurture worker)

Configuration comes from the environment:

- ``TEMPORAL_ADDRESS`` (default ``localhost:7233``), ``TEMPORAL_NAMESPACE`` (``default``),
  ``NURTURE_TASK_QUEUE`` (``nurture``);
- ``NURTURE_JOURNEYS`` (``journeys``), ``NURTURE_TEMPLATES`` (``templates``).

The journeys are compiled at start-up and the worker refuses to start on any compile error.
Until real providers are configured every channel delivers to the outbox (``.nurture/outbox.jsonl``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client
from temporalio.worker import Worker

from channels.outbox import Outbox
from nurture.compiler import load_project
from nurture.delivery import Deliverer, MemoryProfiles
from workflows.activities import JourneyActivities
from workflows.journey import JourneyWorkflow
from workflows.runtime import MemoryRecorder

log = logging.getLogger("nurture.worker")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """Worker options, read from the environment."""

    address: str = "localhost:7233"
    """Temporal frontend address (host:port)."""
    namespace: str = "default"
    """Temporal namespace."""
    task_queue: str = "nurture"
    """Task queue the journey workflows run on."""
    journeys: Path = Path("journeys")
    """Directory of journey files."""
    templates: Path = Path("templates")
    """Directory of templates."""
    outbox: Path = Path(".nurture/outbox.jsonl")
    """Where the outbox channel appends rendered messages."""

    @classmethod
    def from_env(cls) -> WorkerSettings:
        env = os.environ
        return cls(
            address=env.get("TEMPORAL_ADDRESS", cls.address),
            namespace=env.get("TEMPORAL_NAMESPACE", cls.namespace),
            task_queue=env.get("NURTURE_TASK_QUEUE", cls.task_queue),
            journeys=Path(env.get("NURTURE_JOURNEYS", str(cls.journeys))),
            templates=Path(env.get("NURTURE_TEMPLATES", str(cls.templates))),
            outbox=Path(env.get("NURTURE_OUTBOX", str(cls.outbox))),
        )


async def run(settings: WorkerSettings) -> None:
    """Compile, connect, and serve until SIGINT or SIGTERM."""
    project = load_project(settings.journeys, settings.templates)
    log.info("compiled %d journeys: %s", len(project.journeys), ", ".join(project.journeys))
    settings.outbox.parent.mkdir(parents=True, exist_ok=True)
    outbox = Outbox(path=settings.outbox)
    activities = JourneyActivities(
        Deliverer(project.templates, dict.fromkeys(("email", "sms", "wechat"), outbox)),
        MemoryProfiles(),
        MemoryRecorder(),
    )
    client = await Client.connect(settings.address, namespace=settings.namespace)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[JourneyWorkflow],
        activities=list(activities.all()),
    ):
        log.info("worker on %s/%s queue %s", settings.address, settings.namespace, settings.task_queue)
        await stop.wait()
    log.info("worker stopped")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(WorkerSettings.from_env()))


if __name__ == "__main__":
    main()
