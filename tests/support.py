"""Helpers shared by the service tests: polling, table reads, an API served in a thread, projects
written to disk, a fresh PostgreSQL database, a scenario played on both runtimes."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import uvicorn
from conftest import POSTGRES, postgres_available, postgres_database
from sqlmodel import SQLModel, col, select

from nurture.language.compiler import Project
from nurture.service.devserver import free_port
from nurture.simulation.scenarios import Observed, Scenario, SimRuntime, compare, load_scenario, observe
from nurture.simulation.simulator import Outcome
from nurture.storage.db import Database
from workflows.runtime import TemporalRuntime

T = TypeVar("T")


def clean_env() -> dict[str, str]:
    """This process's environment without Nurture's, Temporal's or the providers' settings: what a
    worker or ``nurture up`` subprocess starts from before a test adds its own."""
    prefixes = ("NURTURE_", "TEMPORAL_", "TWILIO_", "SENDGRID_", "SMTP_", "WECHAT_")
    return {key: value for key, value in os.environ.items() if not key.startswith(prefixes) and key != "DATABASE_URL"}


def v1_link_token(secret: str, payload: bytes) -> str:
    """An unsubscribe token as made before tokens were encrypted (version 1): the payload (compact
    JSON), readable, and its HMAC-SHA256 signature, both base64url without padding."""
    key = hmac.new(secret.encode(), b"nurture/unsubscribe-link/v1", hashlib.sha256).digest()
    signature = hmac.new(key, payload, hashlib.sha256).digest()
    return ".".join(base64.urlsafe_b64encode(part).rstrip(b"=").decode() for part in (payload, signature))


def link_payload(**fields: str) -> bytes:
    """A link's payload as Nurture writes it: compact JSON."""
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def rows(db: Database, model: type[SQLModel], **where: Any) -> list[Any]:
    """The rows of ``model`` whose columns equal ``where``."""
    with db.session() as session:
        query = select(model)
        for name, value in where.items():
            query = query.where(col(getattr(model, name)) == value)
        return list(session.exec(query).all())


def send_request(**changes: Any) -> Any:
    """A :class:`~nurture.engine.model.SendRequest` for unit tests: run ``run-1``, step ``s1``, user
    ``u1``, SMS then email, marketing, UTC, no quiet hours; ``changes`` override any field."""
    from nurture.engine.model import SendRequest

    fields: dict[str, Any] = {
        "run_id": "run-1",
        "journey": "welcome_series",
        "version": "v1",
        "step_id": "s1",
        "user_id": "u1",
        "channels": ("sms", "email"),
        "template": "hello",
        "category": "marketing",
        "timezone": "UTC",
        "quiet_hours": None,
        "variant": None,
        "context": {},
    }
    return SendRequest(**{**fields, **changes})


def messages(db: Database, **where: Any) -> list[Any]:
    """The message rows matching ``where`` whose outcome is recorded (not still ``sending``)."""
    from nurture.storage.models import MessageRecord

    return [row for row in rows(db, MessageRecord, **where) if row.status != "sending"]


async def eventually(check: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``check`` (run in a thread: it reads the database) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {value!r})")
        await asyncio.sleep(0.05)


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a background thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


LATENCY = timedelta(seconds=5)


def on_schedule(scenario: Scenario, outcomes: list[Outcome]) -> list[Outcome]:
    """``outcomes`` with times within :data:`LATENCY` of an expected instant set to it.

    Real provider calls and database writes take real time, during which the time-skipping
    server's clock runs, so a wait that follows a send ends that much later: after a few sends a
    step can land a second past its scenario time (more on a loaded machine). Exact timing is
    checked with in-memory stores (tests/test_scenarios.py); everything else must match exactly.
    """
    expected = {scenario.instant(item.at) for item in scenario.expect}
    snapped = []
    for outcome in outcomes:
        near = [at for at in expected if abs(at - outcome.at) <= LATENCY]
        snapped.append(dataclasses.replace(outcome, at=near[0]) if near else outcome)
    return snapped


def served_settings(dev_server: str, database_url: str, queue: str, **options: Any) -> Any:
    """:class:`~nurture.service.settings.Settings` for an API and worker served in a test: the
    project's journeys and templates, ``dev_server``, the database, and a task queue of its own
    (``queue`` plus a random suffix); ``options`` set keys and anything else."""
    from pathlib import Path

    from nurture.service.settings import Settings

    root = Path(__file__).resolve().parents[1]
    defaults: dict[str, Any] = {"journeys": root / "journeys", "templates": root / "templates"}
    return Settings(
        temporal_address=dev_server,
        task_queue=f"{queue}-{uuid.uuid4().hex[:10]}",
        database=database_url,
        **{**defaults, **options},
    )


DRILL_TEMPLATES = {
    "email/drill.mjml": """\
---
subject: "Drill for {{ user.first_name }}"
---
<mjml><mj-body><mj-section><mj-column>
  <mj-text>Hello {{ user.first_name }}, this is a drill.</mj-text>
</mj-column></mj-section></mj-body></mjml>
""",
    "sms/drill.txt": "Drill SMS for {{ user.first_name }}.\n",
}
"""The templates of the drill journeys the process tests (crash, scale-out) run."""


def write_project(root: Path, journeys: dict[str, str], templates: dict[str, str]) -> tuple[Path, Path]:
    """``journeys/<id>.yaml`` and ``templates/<name>`` under ``root``; the two directories."""
    journey_dir, template_dir = root / "journeys", root / "templates"
    journey_dir.mkdir()
    for journey_id, source in journeys.items():
        (journey_dir / f"{journey_id}.yaml").write_text(source, encoding="utf-8")
    for name, content in templates.items():
        (template_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (template_dir / name).write_text(content, encoding="utf-8")
    return journey_dir, template_dir


@contextmanager
def fresh_postgres() -> Iterator[str]:
    """A new, empty PostgreSQL database (not migrated) for the block; its URL. Dropped after."""
    assert postgres_available(), f"this test needs PostgreSQL at {POSTGRES}"
    with postgres_database() as name:
        yield f"{POSTGRES.rsplit('/', 1)[0]}/{name}"


def _canonical(items: list[Observed]) -> list[Observed]:
    """Outcomes in time order, same-instant ones in a fixed order (they compare as a set)."""
    return sorted(items, key=lambda o: (o.at, o.user, o.journey, o.exit or "", o.send or "", o.template or ""))


LATE = 3
"""Seconds the test server's clock may run on between a scenario's instant and a run's first
workflow task on a loaded machine (see :func:`late_only`)."""


def late_only(expected: list[Observed], actual: list[Observed]) -> bool:
    """Whether ``actual`` is ``expected`` with some outcomes a few seconds late, and nothing else.

    The time-skipping test server's clock runs in real time between skips, so a run that a
    scenario starts at 2h and whose first workflow task waits a second for a busy CPU enters at
    2h1s, and every outcome timed from its start is a second late. That is the machine, not the
    code: such a result is played once more, and must then match exactly."""

    def untimed(o: Observed) -> tuple[str, ...]:
        return tuple(str(v) for v in dataclasses.astuple(dataclasses.replace(o, at=0)))

    if len(expected) != len(actual):
        return False
    pairs = zip(sorted(expected, key=untimed), sorted(actual, key=untimed), strict=True)
    return all(untimed(e) == untimed(a) and 0 <= a.at - e.at <= LATE for e, a in pairs)


async def play_on_both_runtimes(path: Path, project: Project, temporal: TemporalRuntime) -> None:
    """The scenario file at ``path`` passes in the simulator and on Temporal, with the same outcomes
    (played twice on Temporal only when the first play was late by the machine: :func:`late_only`)."""
    scenario = load_scenario(path, project)
    simulated = await SimRuntime().play(scenario, project)
    verdict = compare(scenario, simulated)
    assert verdict.passed, "simulator:\n" + verdict.report()
    durable = await temporal.play(scenario, project)
    verdict = compare(scenario, durable)
    if not verdict.passed and late_only(observe(scenario, simulated), observe(scenario, durable)):
        durable = await temporal.play(scenario, project)
        verdict = compare(scenario, durable)
    assert verdict.passed, "temporal:\n" + verdict.report()
    assert _canonical(observe(scenario, simulated)) == _canonical(observe(scenario, durable))
