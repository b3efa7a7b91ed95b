"""``re_entry: {after: 7d}`` in the service, on SQLite and PostgreSQL with a real Temporal dev
server: the event API starts no run until that long after the latest run entered, judged from the
``runs`` table (so it holds beyond Temporal's retention)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import eventually, new_user, rows
from temporalio.client import Client
from test_api import Api, serving

from nurture.engine.interpreter import workflow_id
from nurture.language.compiler import Project, load_project
from nurture.storage.db import Database
from nurture.storage.models import RunRecord
from nurture.storage.stores import last_entry

PROJECT = Path(__file__).parent / "projects" / "dates"


@pytest.fixture(scope="module")
def dates_project() -> Project:
    return load_project(PROJECT / "journeys", PROJECT / "templates", PROJECT / "nurture.yaml")


@pytest.fixture(scope="module")
async def temporal_client(dev_server: str) -> Client:
    return await Client.connect(dev_server)


@pytest.fixture
async def api(dates_project: Project, database: Database, temporal_client: Client) -> AsyncIterator[Api]:
    async with serving(dates_project, database, temporal_client) as api:
        yield api


def earlier_run(db: Database, user: str, entered: timedelta, number: int = 1) -> None:
    """A run of browse_abandonment for ``user`` that entered ``entered`` ago and has ended."""
    now = datetime.now(UTC)
    with db.session() as session:
        session.add(
            RunRecord(
                run_id=f"{user}-run-{number}",
                workflow_id=workflow_id("browse_abandonment", user, ""),
                journey="browse_abandonment",
                version="v0",
                user_id=user,
                status="ended",
                entered_at=now - entered,
                ended_at=now - entered + timedelta(hours=1),
                end_reason="completed",
            )
        )


def viewed(user: str) -> dict[str, object]:
    return {"userId": user, "event": "Product Viewed", "properties": {"title": "Lightroom"}}


async def test_a_view_within_a_week_of_the_last_entry_starts_no_run(api: Api) -> None:
    user = new_user()
    earlier_run(api.db, user, timedelta(days=8), number=1)
    earlier_run(api.db, user, timedelta(days=6, hours=23), number=2)  # the latest entry counts
    body = (await api.post("/v1/track", viewed(user))).json()
    assert (body["triggered"], body["skipped"]) == ([], ["browse_abandonment"])


async def test_a_view_a_week_after_the_last_entry_starts_a_run(api: Api) -> None:
    user = new_user()
    earlier_run(api.db, user, timedelta(days=7, minutes=1))
    body = (await api.post("/v1/track", viewed(user))).json()
    assert (body["triggered"], body["skipped"]) == ([workflow_id("browse_abandonment", user, "")], [])


async def test_a_first_view_starts_a_run_and_the_next_is_kept_out(api: Api) -> None:
    user = new_user()
    first = (await api.post("/v1/track", viewed(user))).json()
    assert first["triggered"] == [workflow_id("browse_abandonment", user, "")]
    # Once the run's entry is recorded, the next view is judged by it (before that, it reaches the
    # active run, which ignores it as after_exit does).
    await eventually(lambda: rows(api.db, RunRecord, user_id=user), what="the run's entry")
    second = (await api.post("/v1/track", viewed(user))).json()
    assert (second["triggered"], second["skipped"]) == ([], ["browse_abandonment"])
    assert len(rows(api.db, RunRecord, user_id=user)) == 1


def test_last_entry_reads_the_latest_entry_as_utc(database: Database) -> None:
    user = new_user()
    assert last_entry(database, "browse_abandonment", user, "") is None
    earlier_run(database, user, timedelta(days=9), number=1)
    earlier_run(database, user, timedelta(days=2), number=2)
    entered = last_entry(database, "browse_abandonment", user, "")
    assert entered is not None and entered.tzinfo is not None
    assert timedelta(days=2) <= datetime.now(UTC) - entered < timedelta(days=2, minutes=1)
    assert last_entry(database, "browse_abandonment", user, "other key") is None
