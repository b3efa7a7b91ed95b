"""The operator's worker: refuses bad journeys, serves metrics, masks logs, stops on SIGTERM.

The process tests run ``python worker.py`` for real against the ``dev_server`` fixture and feed
it through the service's own router (:class:`nurture.service.ingest.Ingest`).
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import ROOT
from sqlalchemy import text
from support import clean_env
from temporalio.client import Client

from channels import mask_address
from nurture.engine.model import Event
from nurture.language.compiler import load_project
from nurture.language.diagnostics import CompileError
from nurture.service import worker
from nurture.service.devserver import free_port
from nurture.service.ingest import Ingest
from nurture.service.observability import (
    METRIC_NAMES,
    JsonFormatter,
    MaskingFilter,
    configure_logging,
    log_fields,
    mask_text,
)
from nurture.service.settings import Settings, SettingsError
from nurture.storage.db import Database

EMAIL = "ada.lovelace@example.com"
PHONE = "+8613800138000"

BROKEN = """\
journey: broken
trigger:
  event: Signed Up
steps:
  - send: email
    template: welcom
"""


TOPICS = list(yaml.safe_load((ROOT / "nurture.yaml").read_text(encoding="utf-8"))["topics"])


def project_dir(tmp_path: Path, *extra: tuple[str, str]) -> Path:
    """The repo's journeys (a nurture.yaml with the project's topics, no quiet hours or caps) plus
    ``extra`` (name, text) files."""
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    (tmp_path / "nurture.yaml").write_text(f"topics: {TOPICS}\n", encoding="utf-8")
    for path in (ROOT / "journeys").glob("*.yaml"):
        shutil.copy(path, journeys / path.name)
    for name, content in extra:
        (journeys / name).write_text(content, encoding="utf-8")
    return journeys


def worker_env(tmp_path: Path, journeys: Path, address: str, **extra: str) -> dict[str, str]:
    env = clean_env()
    env.update(
        TEMPORAL_ADDRESS=address,
        NURTURE_HOME=str(tmp_path / "home"),
        NURTURE_JOURNEYS=str(journeys),
        NURTURE_TEMPLATES=str(ROOT / "templates"),
        NURTURE_TASK_QUEUE=f"test-worker-{uuid.uuid4().hex[:8]}",
        **extra,
    )
    return env


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# Start-up refusals (no server needed) --------------------------------------------------------


def test_compile_errors_stop_the_worker_before_it_connects(tmp_path: Path) -> None:
    journeys = project_dir(tmp_path, ("broken.yaml", BROKEN))
    env = worker_env(tmp_path, journeys, f"127.0.0.1:{free_port()}")  # nothing listens there

    done = subprocess.run(
        [sys.executable, str(ROOT / "worker.py")], env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 1
    assert f"{journeys / 'broken.yaml'}:6:15: steps[0].template: no email template 'welcom'" in done.stderr
    assert "did you mean 'welcome'?" in done.stderr
    assert "cannot connect" not in done.stderr  # it refused before trying Temporal
    assert "worker ready" not in done.stderr


async def test_run_raises_the_diagnostics_with_their_location(tmp_path: Path) -> None:
    journeys = project_dir(tmp_path, ("broken.yaml", BROKEN))
    settings = Settings.from_env(worker_env(tmp_path, journeys, f"127.0.0.1:{free_port()}"))

    with pytest.raises(CompileError) as raised:
        await worker.run(settings, asyncio.Event())

    assert "broken.yaml:6:15: steps[0].template" in str(raised.value)
    assert not (tmp_path / "home" / "nurture.db").exists()  # nothing was touched


@pytest.mark.parametrize("taken", ["NURTURE_METRICS_PORT", "NURTURE_TEMPORAL_METRICS_PORT", None])
def test_start_up_failures_exit_1_naming_the_cause(tmp_path: Path, taken: str | None) -> None:
    temporal = free_port()  # nothing listens there
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        ports = {"NURTURE_METRICS_PORT": str(free_port()), "NURTURE_TEMPORAL_METRICS_PORT": str(free_port())}
        if taken is not None:
            ports[taken] = str(busy.getsockname()[1])
        env = worker_env(tmp_path, project_dir(tmp_path), f"127.0.0.1:{temporal}", **ports)

        done = subprocess.run(
            [sys.executable, str(ROOT / "worker.py")], env=env, capture_output=True, text=True, timeout=60
        )

    assert done.returncode == 1
    errors = [json.loads(line) for line in done.stderr.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1
    expected = {
        "NURTURE_METRICS_PORT": f"not starting: cannot serve metrics on :{ports['NURTURE_METRICS_PORT']} (NURTURE_METRICS_PORT)",
        "NURTURE_TEMPORAL_METRICS_PORT": (
            f"not starting: cannot serve Temporal SDK metrics on :{ports['NURTURE_TEMPORAL_METRICS_PORT']} "
            "(NURTURE_TEMPORAL_METRICS_PORT)"
        ),
        None: f"not starting: cannot connect to Temporal at 127.0.0.1:{temporal}",
    }[taken]
    assert errors[0]["message"].startswith(expected)


def test_a_configured_provider_without_its_secrets_stops_the_worker(tmp_path: Path) -> None:
    config = tmp_path / "providers.yaml"
    config.write_text(
        'providers:\n  email: {provider: sendgrid, from: "Nurture <hello@example.com>"}\n'
        '  sms: {provider: twilio, messaging_service: MG0123}\n'
        f"topics: {TOPICS}\n",
        encoding="utf-8",
    )
    env = worker_env(
        tmp_path, project_dir(tmp_path), f"127.0.0.1:{free_port()}", NURTURE_CONFIG=str(config)
    )
    env["TWILIO_ACCOUNT_SID"] = "AC" + "0" * 32  # one of Twilio's two is there
    env.pop("TWILIO_AUTH_TOKEN", None)

    done = subprocess.run(
        [sys.executable, str(ROOT / "worker.py")], env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 1
    [error] = [json.loads(line) for line in done.stderr.splitlines() if '"ERROR"' in line]
    message = error["message"]
    assert message.startswith("not starting: missing provider settings:")
    for variable in ("SENDGRID_API_KEY", "NURTURE_PUBLIC_URL", "NURTURE_SECRET", "TWILIO_AUTH_TOKEN"):
        assert f"{variable} (" in message
    assert "TWILIO_ACCOUNT_SID" not in message
    assert "cannot connect" not in done.stderr  # refused before trying Temporal


def test_logged_fields_are_masked_once_in_the_message_and_the_fields(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured

    log_fields(logger, {"call": "track", "event": f"Invited {EMAIL}", "to": [PHONE], "triggered": 2})

    (line,) = lines(stream)
    assert line["message"] == 'call="track" event="Invited a***@example.com" to=["+86*******8000"] triggered=2'
    assert line["nurture"] == {
        "call": "track",
        "event": "Invited a***@example.com",
        "to": ["+86*******8000"],
        "triggered": 2,
    }
    assert "_nurture_masked" not in line
    assert EMAIL not in stream.getvalue() and PHONE not in stream.getvalue()


def test_logged_fields_cost_nothing_below_the_level(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.setLevel(logging.WARNING)

    log_fields(logger, {"call": "track", "event": object()})  # json.dumps would fail on it

    assert stream.getvalue() == ""


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("NURTURE_SHUTDOWN_TIMEOUT", "soon", "NURTURE_SHUTDOWN_TIMEOUT must be a number of seconds"),
        ("NURTURE_SHUTDOWN_TIMEOUT", "-1", "NURTURE_SHUTDOWN_TIMEOUT must not be negative"),
        ("NURTURE_TEMPORAL_METRICS_PORT", "x", "NURTURE_TEMPORAL_METRICS_PORT must be a port number"),
        ("NURTURE_MAX_CACHED_WORKFLOWS", "many", "NURTURE_MAX_CACHED_WORKFLOWS must be a whole number"),
        ("NURTURE_MAX_CACHED_WORKFLOWS", "-5", "NURTURE_MAX_CACHED_WORKFLOWS must be a whole number"),
        ("NURTURE_GC_FREEZE", "maybe", "NURTURE_GC_FREEZE must be 1 or 0"),
        ("NURTURE_GC_THRESHOLD", "700,10", "NURTURE_GC_THRESHOLD must be three whole numbers"),
        ("NURTURE_GC_THRESHOLD", "700,ten,10", "NURTURE_GC_THRESHOLD must be three whole numbers"),
    ],
)
def test_bad_worker_options_name_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        worker.WorkerOptions.from_env(Settings(), {variable: value})


def test_worker_options_defaults() -> None:
    assert worker.WorkerOptions.from_env(Settings(), {}) == worker.WorkerOptions(
        shutdown_timeout=10.0, temporal_metrics_port=None
    )
    with_metrics = Settings(metrics_port=9464)
    assert worker.WorkerOptions.from_env(with_metrics, {}).temporal_metrics_port == 9465
    assert (
        worker.WorkerOptions.from_env(
            with_metrics, {"NURTURE_TEMPORAL_METRICS_PORT": "0"}
        ).temporal_metrics_port
        is None
    )
    assert (
        worker.WorkerOptions.from_env(Settings(), {"NURTURE_SHUTDOWN_TIMEOUT": "2.5"}).shutdown_timeout == 2.5
    )


def test_worker_cache_and_gc_settings() -> None:
    """A bounded workflow cache and a frozen collector by default (docs/operations.md); each can be set."""
    default = worker.WorkerOptions.from_env(Settings(), {})
    assert (default.max_cached_workflows, default.gc_freeze, default.gc_threshold) == (100, True, None)
    tuned = worker.WorkerOptions.from_env(
        Settings(),
        {"NURTURE_MAX_CACHED_WORKFLOWS": "250", "NURTURE_GC_FREEZE": "0", "NURTURE_GC_THRESHOLD": "5000, 20, 40"},
    )
    assert (tuned.max_cached_workflows, tuned.gc_freeze, tuned.gc_threshold) == (250, False, (5000, 20, 40))


async def test_the_worker_is_built_with_the_cache_size(dev_server: str, tmp_path: Path) -> None:
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    client = await Client.connect(dev_server)
    built = worker.build_worker(client, project, db, "q", max_cached_workflows=7)
    assert built.config()["max_cached_workflows"] == 7
    db.dispose()


def test_gc_policy_sets_thresholds_and_freezes() -> None:
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        worker.apply_gc_policy(worker.WorkerOptions(gc_threshold=(5000, 20, 40), gc_freeze=True))
        assert gc.get_threshold() == (5000, 20, 40)
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# Masked JSON logs (unit) ---------------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger whose records go through the masking filter into JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.masking.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_addresses_in_message_arguments_are_masked(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured

    logger.info("sent to %s and %s", EMAIL, PHONE)

    (line,) = lines(stream)
    assert line["message"] == "sent to a***@example.com and +86*******8000"
    assert line["level"] == "INFO"
    assert line["logger"] == logger.name
    assert datetime.fromisoformat(str(line["time"])).tzinfo is not None
    assert EMAIL not in stream.getvalue() and PHONE not in stream.getvalue()


def test_addresses_in_fields_containers_and_tracebacks_are_masked(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured

    try:
        raise ValueError(f"provider rejected {PHONE}")
    except ValueError:
        logger.exception(
            "profile %s",
            {"email": EMAIL, "phone": PHONE},
            extra={"user": EMAIL, "workflow_id": "nurture/welcome_series/ada%40example.com/", "attempt": 3},
        )

    (line,) = lines(stream)
    assert line["message"] == "profile {'email': 'a***@example.com', 'phone': '+86*******8000'}"
    assert line["user"] == "a***@example.com"
    assert line["workflow_id"] == "nurture/welcome_series/a***%40example.com/"
    assert line["attempt"] == 3
    assert "ValueError: provider rejected +86*******8000" in str(line["exception"])
    assert EMAIL not in stream.getvalue() and PHONE not in stream.getvalue()


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("to li@example.com.", "to l***@example.com."),
        ("李 li.wei+promo@mail.example.cn", "李 l***@mail.example.cn"),
        ("sms to +14155552671 ok", "sms to +14*****2671 ok"),
        ("call 13800138000", "call *******8000"),
        ("user %2B8613800138000 quoted", "user %2B86*******8000 quoted"),
        ("already l***@example.com and +86*******8000", "already l***@example.com and +86*******8000"),
        # Not addresses: ids, times, ports, amounts and short numbers stay readable.
        ("run 8890eb76-7a7e-465b-9f25-cb3efcc3ada8", "run 8890eb76-7a7e-465b-9f25-cb3efcc3ada8"),
        ("message_id=27161601-052c-4a19-bdd7-b0a21b68438f", "message_id=27161601-052c-4a19-bdd7-b0a21b68438f"),
        ("at 2026-03-02T10:00:00+08:00 on :8000", "at 2026-03-02T10:00:00+08:00 on :8000"),
        ("order 123456 total 1234.567890123", "order 123456 total 1234.567890123"),
        # A phone number written for people, as a user id: in text, and quoted in a workflow id.
        ("run started: welcome for +1 (500) 555-0143", "run started: welcome for +15*****0143"),
        ("nurture/welcome/%2B1%20%28500%29%20555-0143/", "nurture/welcome/%2B15*****0143/"),
        # Secrets in URLs: an unsubscribe token, a status callback's key.
        ('"POST /u/eyJ1IjoiYUBiLmNvIn0.c2ln HTTP/1.1" 200', '"POST /u/*** HTTP/1.1" 200'),
        ("/webhooks/twilio/status?key=run-1%3As1&x=1", "/webhooks/twilio/status?key=***&x=1"),
    ],
)
def test_mask_text(raw: str, masked: str) -> None:
    assert mask_text(raw) == masked


def test_configure_logging_installs_one_masking_handler() -> None:
    root = logging.getLogger()
    level = root.level
    first, second = io.StringIO(), io.StringIO()
    access = logging.getLogger("uvicorn.access")
    saved = (list(access.handlers), access.propagate, access.level, access.disabled)
    access.addHandler(logging.StreamHandler(io.StringIO()))  # as the uvicorn CLI configures it
    access.propagate, access.disabled = False, False
    access.setLevel(logging.INFO)
    try:
        configure_logging(stream=first, env={"NURTURE_LOG_FORMAT": "text", "NURTURE_LOG_LEVEL": "warning"})
        handler = configure_logging(stream=second, env={"NURTURE_LOG_LEVEL": "INFO"})
        logging.getLogger("nurture.test").info("hello %s", EMAIL)
        access.info('%s - "GET /v1/users/%s HTTP/1.1" 200', "127.0.0.1:5000", EMAIL)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        handlers, propagate, access_level, disabled = saved
        access.handlers, access.propagate, access.disabled = handlers, propagate, disabled
        access.setLevel(access_level)

    assert [h for h in root.handlers if h.get_name() == "nurture"] == []
    assert first.getvalue() == ""  # replaced, not duplicated
    hello, request = (json.loads(line) for line in second.getvalue().splitlines())
    assert hello["message"] == "hello a***@example.com"
    # uvicorn's access logger had its own handler and did not propagate: it was rerouted to ours.
    assert (request["logger"], request["message"]) == (
        "uvicorn.access",
        '127.0.0.1:5000 - "GET /v1/users/a***@example.com HTTP/1.1" 200',
    )
    with pytest.raises(SettingsError, match="NURTURE_LOG_FORMAT"):
        configure_logging(env={"NURTURE_LOG_FORMAT": "xml"})


# The worker process ----------------------------------------------------------------------------


def log_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def messages_sent(db: Database, user_id: str) -> int:
    with db.engine.connect() as connection:
        count = connection.execute(
            text("SELECT count(*) FROM messages WHERE user_id = :user AND status = 'sent'"), {"user": user_id}
        ).scalar_one()
    return int(count)


async def test_worker_process_counts_masks_and_stops_on_sigterm(dev_server: str, tmp_path: Path) -> None:
    journeys = project_dir(tmp_path)
    metrics_port, sdk_port = free_port(), free_port()
    env = worker_env(
        tmp_path,
        journeys,
        dev_server,
        NURTURE_METRICS_PORT=str(metrics_port),
        NURTURE_TEMPORAL_METRICS_PORT=str(sdk_port),
        NURTURE_SHUTDOWN_TIMEOUT="5",
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py")], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: "worker ready" in log_path.read_text(), 30, "the worker to be ready")

        # A user whose id is their email orders a learning kit: post_purchase sends the
        # transactional shipping SMS at once (no quiet hours).
        user_id = f"{uuid.uuid4().hex[:6]}.{EMAIL}"
        settings = Settings.from_env(env)
        db = Database(settings.database)
        ingest = Ingest(
            load_project(journeys, ROOT / "templates"),
            db,
            await Client.connect(dev_server),
            settings.task_queue,
        )
        now = datetime.now(UTC)
        await ingest.identify(
            user_id,
            {"email": user_id, "phone": PHONE, "first_name": "Ada"},
            message_id=uuid.uuid4().hex,
            event=Event("identify", now),
        )
        routed = await ingest.track(
            user_id,
            Event(
                "Order Completed",
                now,
                {"order_id": "o-1", "tracking_number": "SF1", "total": 0},
                uuid.uuid4().hex,
            ),
        )
        assert len(routed.triggered) == 1
        wait_until(lambda: messages_sent(db, user_id) == 1, 30, "the shipping SMS")

        send_latency = 'nurture_activity_duration_seconds_count{activity="nurture.send",outcome="ok"} 1.0'
        wait_until(lambda: send_latency in scrape(metrics_port), 10, "the send's latency to be observed")
        metrics = scrape(metrics_port)
        for name in METRIC_NAMES:
            assert f"# TYPE {name} " in metrics
        assert 'nurture_sends_total{channel="sms",journey="post_purchase",status="sent"} 1.0' in metrics
        assert 'nurture_runs_started_total{journey="post_purchase"} 1.0' in metrics
        # The wait after the SMS is recorded with the SMS (records_ride), and counted as reached.
        assert 'nurture_step_reached_total{journey="post_purchase",step="wait_day_3"} 1.0' in metrics
        assert 'nurture_journey_info{journey="post_purchase",version="' in metrics
        sdk = httpx.get(f"http://127.0.0.1:{sdk_port}/metrics", timeout=10).text
        assert f'task_queue="{settings.task_queue}"' in sdk
        assert "temporal_request" in sdk

        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - stopping < 5 + 5  # the shutdown timeout, plus slack for a busy machine
        db.dispose()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    records = log_lines(log_path)  # every line is JSON with the four base fields
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    messages = [record["message"] for record in records]
    assert "SIGTERM received" in messages
    assert messages[-1] == "worker stopped"
    started = [r for r in records if r["logger"] == "nurture.runs" and r.get("journey") == "post_purchase"]
    assert started and started[0]["user"] == mask_address(user_id)
    assert any(mask_address(PHONE) in str(message) for message in messages)
    raw = log_path.read_text(encoding="utf-8")
    assert user_id not in raw and EMAIL not in raw and PHONE not in raw
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)


# The start record riding on a run's first recording activity (start_rides) ------------------


async def test_a_start_record_riding_on_the_first_wait_writes_the_run_before_its_step(tmp_path: Path) -> None:
    """A run whose first step is a wait: its row is inserted, then updated with where it waits,
    in one activity; the recorder gets the step record without the start in it."""
    from temporalio.testing import ActivityEnvironment

    from nurture.delivery.deliverer import Deliverer, MemoryProfiles, for_every_channel
    from nurture.storage.models import RunRecord
    from nurture.storage.stores import DbOutbox, DbRecorder
    from workflows.activities import JourneyActivities

    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    activities = JourneyActivities(
        Deliverer(project.templates, for_every_channel(DbOutbox())), MemoryProfiles(), DbRecorder(db)
    )
    start = {
        "run_id": "r-1", "workflow_id": "w-1", "journey": "welcome_series", "version": "v1", "user_id": "u-1",
        "key": "", "trigger_message_id": "m-1", "at": "2026-03-02T04:00:00Z", "holdout": False,
    }
    steps: dict[str, object] = {"run_id": "r-1", "journey": "welcome_series", "version": "v1", "reached": [], "waiting": "day_two", "deferred": None}
    await ActivityEnvironment().run(activities.record_steps, {**steps, "start": start})
    await ActivityEnvironment().run(activities.record_steps, steps)  # a later wait carries no start
    with db.session() as session:
        run = session.get(RunRecord, "r-1")
        assert run is not None and (run.user_id, run.step, run.status) == ("u-1", "day_two", "active")
    db.dispose()


# The record after a send riding on it (records_ride) -------------------------------------------


async def test_a_send_writes_the_record_riding_on_it_only_when_it_went_out_on_its_first_attempt(
    tmp_path: Path,
) -> None:
    """The send activity writes its rider after the message: a first attempt that sent does, and
    says so (``rode``); a retried attempt, or a send that reached nobody, leaves it to the run."""
    import dataclasses

    from sqlmodel import select
    from temporalio.testing import ActivityEnvironment

    from nurture.delivery.deliverer import Deliverer, MemoryProfiles, for_every_channel
    from nurture.engine.clock import format_instant
    from nurture.engine.interpreter import Deliver, Run
    from nurture.storage.models import RunRecord, StepReach
    from nurture.storage.stores import DbOutbox, DbRecorder
    from workflows.activities import JourneyActivities

    (tmp_path / "journeys").mkdir()
    (tmp_path / "journeys" / "series.yaml").write_text(
        "journey: series\ntrigger: {event: Joined}\nsteps:\n"
        "  - {id: hello, send: sms, template: hello, category: transactional}\n"
        "  - {id: pause, wait: 1d}\n"
    )
    (tmp_path / "templates" / "sms").mkdir(parents=True)
    (tmp_path / "templates" / "sms" / "hello.txt").write_text("Hello")
    project = load_project(tmp_path / "journeys", tmp_path / "templates")
    journey = project.journeys["series"]
    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    profiles = MemoryProfiles()
    await profiles.update("texted", {"phone": "+15555550100"})
    await profiles.update("retried", {"phone": "+15555550101"})
    activities = JourneyActivities(
        Deliverer(project.templates, for_every_channel(DbOutbox())), profiles, DbRecorder(db)
    )
    now = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

    async def send(user: str, attempt: int) -> dict[str, object]:
        run = Run(journey, run_id=f"r-{user}", user_id=user, key="", event=Event("Joined", now), entered_at=now)
        command = run.start()
        assert isinstance(command, Deliver)
        payload = {
            "request": command.request.to_dict(),
            "now": format_instant(now),
            "after": run.send_rider(f"w-{user}", steps=True),
            "start": run.start_record(f"w-{user}"),
        }
        env = ActivityEnvironment()
        env.info = dataclasses.replace(env.info, attempt=attempt)
        answer: dict[str, object] = await env.run(activities.send, payload)
        return answer

    assert (await send("texted", 1)).get("rode") is True
    assert "rode" not in await send("retried", 2)
    assert "rode" not in await send("nobody", 1)  # no phone: skipped, no message
    with db.session() as session:
        steps = {user: session.get(RunRecord, f"r-{user}") for user in ("texted", "retried", "nobody")}
        assert {user: run.step if run else "-" for user, run in steps.items()} == {
            "texted": "pause",
            "retried": None,
            "nobody": None,
        }
        reached = {(r.run_id, r.step_id) for r in session.exec(select(StepReach)).all()}
    assert reached == {("r-texted", "hello"), ("r-texted", "pause")}
    db.dispose()

