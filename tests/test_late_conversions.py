"""Conversions after a run has ended, through the running service: the event API counts a goal
event for an ended run while its goal window is open (no workflow is kept alive for it), once,
with its value, and nothing once the window has closed or for a goal without a window.

The same rule on the simulator and the Temporal scenario runtime is covered by the report's
tests; here it is the service's own router on a real dev server, SQLite and PostgreSQL.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col
from support import eventually, new_user, rows, served_settings, uvicorn_thread
from temporalio.client import Client as TemporalClient

from nurture.language.compiler import Project, load_project
from nurture.service.api import create_app
from nurture.service.client import AsyncClient
from nurture.service.worker import build_worker
from nurture.storage.db import Database
from nurture.storage.models import RunRecord, StepReach

ROOT = Path(__file__).resolve().parents[1]
KEY = "late-conversion-key"

JOURNEYS = {
    # Sends at once and ends: every conversion after that is a late one.
    "quiz_follow_up": """
        journey: quiz_follow_up
        trigger: {event: Quiz Done}
        goal: {event: Course Bought, within: 1d, value: "event.properties.price", exit: false}
        steps:
          - id: thanks
            send: email
            template: welcome
    """,
    # A goal without a window lasts the run's life only.
    "open_ended": """
        journey: open_ended
        trigger: {event: Quiz Done}
        goal: {event: Course Bought}
        steps:
          - id: note
            send: email
            template: welcome
    """,
}


@pytest.fixture
async def service(dev_server: str, database: Database, tmp_path: Path) -> AsyncIterator[tuple[AsyncClient, Database]]:
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    for name, text in JOURNEYS.items():
        (journeys / f"{name}.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    project: Project = load_project(journeys, tmp_path / "templates")
    settings = served_settings(
        dev_server, database.url, "test-late", write_keys=(KEY,), journeys=journeys, templates=tmp_path / "templates"
    )
    temporal = await TemporalClient.connect(dev_server)
    with uvicorn_thread(create_app(settings)) as url:
        async with (
            build_worker(temporal, project, database, settings.task_queue),
            AsyncClient(KEY, base_url=url, retries=0) as api,
        ):
            yield api, database


async def test_an_ended_run_converts_while_its_window_is_open_and_only_once(
    service: tuple[AsyncClient, Database],
) -> None:
    api, db = service
    user = new_user()
    await api.identify(user, {"email": "li@example.com"})
    await api.track(user, "Quiz Done")
    def both_ended() -> list[RunRecord]:
        ended: list[RunRecord] = rows(db, RunRecord, user_id=user, status="ended")
        return ended if len(ended) == 2 else []

    runs = await eventually(both_ended, timeout=15, what="both runs to send and end")
    by_journey = {run.journey: run for run in runs}
    quiz = by_journey["quiz_follow_up"]
    assert quiz.end_reason == "completed" and quiz.converted_at is None
    assert quiz.goal_until == quiz.entered_at + timedelta(days=1)
    assert by_journey["open_ended"].goal_until is None
    assert {r.step_id for r in rows(db, StepReach, run_id=quiz.run_id)} == {"thanks"}

    await api.track(user, "Course Bought", {"price": 49.5})
    await api.track(user, "Course Bought", {"price": 10})  # a second order converts nothing more

    [after] = rows(db, RunRecord, run_id=quiz.run_id)
    assert after.converted_at is not None and after.conversion_value == 49.5
    [open_ended] = rows(db, RunRecord, run_id=by_journey["open_ended"].run_id)
    assert open_ended.converted_at is None


async def test_nothing_converts_once_the_window_has_closed(service: tuple[AsyncClient, Database]) -> None:
    api, db = service
    user = new_user()
    await api.identify(user, {"email": "mei@example.com"})
    await api.track(user, "Quiz Done")
    [quiz] = await eventually(
        lambda: rows(db, RunRecord, user_id=user, journey="quiz_follow_up", status="ended"),
        timeout=15,
        what="the run to end",
    )
    with db.session() as session:  # the window closed a minute ago
        session.execute(
            update(RunRecord)
            .where(col(RunRecord.run_id) == quiz.run_id)
            .values(goal_until=datetime.now(UTC) - timedelta(minutes=1))
        )

    await api.track(user, "Course Bought", {"price": 49.5})

    [after] = rows(db, RunRecord, run_id=quiz.run_id)
    assert after.converted_at is None and after.conversion_value is None
