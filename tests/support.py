"""Helpers shared by the service tests: polling, table reads, an API served in a thread."""

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
from typing import Any, TypeVar

import uvicorn
from sqlmodel import SQLModel, col, select

from nurture.service.devserver import free_port
from nurture.simulation.scenarios import Scenario
from nurture.simulation.simulator import Outcome
from nurture.storage.db import Database

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
