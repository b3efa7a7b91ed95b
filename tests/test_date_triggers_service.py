"""Date triggers in the service, on SQLite and PostgreSQL with a real Temporal dev server: the
event API hands each date to a date trigger workflow, which starts the journey's run at the
moment through the worker; a later date moves it, and a date that goes away cancels it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from support import eventually, messages, new_user, rows
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from test_api import ADMIN_KEY, Api, serving

from nurture.engine.clock import format_instant, parse_instant
from nurture.engine.interpreter import workflow_id
from nurture.language.compiler import Project, load_project
from nurture.storage.db import Database
from nurture.storage.models import DateTriggerRecord, RunRecord

PROJECT = Path(__file__).parent / "projects" / "dates"
LEAD = 4.0
"""Seconds ahead of now each test's moment lies: long enough to see that nothing starts early."""


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


def booked(user: str, starts_in: float, webinar: str = "w1") -> dict[str, Any]:
    """A booking whose reminder (15 minutes before the start) is due ``starts_in`` seconds from now."""
    starts_at = datetime.now(UTC) + timedelta(minutes=15, seconds=starts_in)
    return {
        "userId": user,
        "event": "Webinar Booked",
        "properties": {"webinar_id": webinar, "title": "Color grading", "starts_at": format_instant(starts_at)},
    }


def entered(db: Database, journey: str, user: str) -> list[datetime]:
    return sorted(
        (r.entered_at if r.entered_at.tzinfo else r.entered_at.replace(tzinfo=UTC))
        for r in rows(db, RunRecord, journey=journey, user_id=user)
    )


async def test_a_booking_starts_the_run_at_its_moment_not_before(api: Api) -> None:
    user = new_user()
    await api.post("/v1/identify", {"userId": user, "traits": {"email": f"{user}@example.com"}})
    call = booked(user, LEAD)
    moment = datetime.fromisoformat(call["properties"]["starts_at"].replace("Z", "+00:00")) - timedelta(minutes=15)
    body = (await api.post("/v1/track", call)).json()
    assert body["triggered"] == []  # the booking itself starts no run
    date = api.temporal.get_workflow_handle(workflow_id("webinar_reminder", user, "w1", prefix="nurture-date"))
    assert (await date.describe()).status == WorkflowExecutionStatus.RUNNING
    await asyncio.sleep(LEAD / 2)
    assert entered(api.db, "webinar_reminder", user) == []
    [start] = await eventually(lambda: entered(api.db, "webinar_reminder", user), timeout=LEAD + 20, what="the run")
    assert timedelta(0) <= start - moment < timedelta(seconds=5)
    [message] = await eventually(lambda: messages(api.db, user_id=user), timeout=10, what="the reminder")
    assert (message.template, message.status) == ("webinar_reminder", "sent"), message
    assert "Color grading" in (message.subject or "")
    assert await date.result() == 1  # one run started; the trigger is done


async def test_a_new_booking_moves_the_moment(api: Api) -> None:
    user = new_user()
    await api.post("/v1/track", booked(user, LEAD))
    later = booked(user, 2 * LEAD)
    await api.post("/v1/track", later)
    moment = datetime.fromisoformat(later["properties"]["starts_at"].replace("Z", "+00:00")) - timedelta(minutes=15)
    [start] = await eventually(lambda: entered(api.db, "webinar_reminder", user), timeout=3 * LEAD + 20, what="the run")
    assert timedelta(0) <= start - moment < timedelta(seconds=5)  # the second moment, not the first
    await asyncio.sleep(1)
    assert len(entered(api.db, "webinar_reminder", user)) == 1


async def test_a_trait_date_starts_the_run_and_removing_it_cancels(api: Api) -> None:
    kept, dropped = new_user(), new_user()
    ends = format_instant(datetime.now(UTC) + timedelta(days=1, seconds=LEAD))
    for user in (kept, dropped):
        answer = await api.post("/v1/identify", {"userId": user, "traits": {"email": f"{user}@example.com", "trial_ends_at": ends}})
        assert answer.status_code == 200, answer.text
    await api.post("/v1/identify", {"userId": dropped, "traits": {"trial_ends_at": None}})
    await eventually(lambda: entered(api.db, "trial_ending", kept), timeout=LEAD + 20, what="the kept trial's run")
    cancelled = api.temporal.get_workflow_handle(workflow_id("trial_ending", dropped, "", prefix="nurture-date"))
    assert await cancelled.result() == 0
    assert entered(api.db, "trial_ending", dropped) == []


async def test_an_identify_that_leaves_the_date_alone_tells_no_workflow(api: Api) -> None:
    user = new_user()
    await api.post("/v1/identify", {"userId": user, "traits": {"first_name": "Ann"}})
    date = api.temporal.get_workflow_handle(workflow_id("trial_ending", user, "", prefix="nurture-date"))
    with pytest.raises(Exception, match="not found"):
        await date.describe()


async def test_two_people_with_a_trial_merged_get_one_reminder(api: Api) -> None:
    """Each had a trial date waited for; merged, the survivor's is waited for and the other's is
    withdrawn, so one run starts."""
    user, visitor = new_user(), f"anon-{new_user()}"
    ends = format_instant(datetime.now(UTC) + timedelta(days=1, seconds=2 * LEAD))
    known = {"userId": user, "traits": {"email": f"{user}@example.com", "trial_ends_at": ends}}
    first = (await api.post("/v1/identify", known)).json()["person"]
    anonymous = {"anonymousId": visitor, "traits": {"trial_ends_at": ends}}
    second = (await api.post("/v1/identify", anonymous)).json()["person"]
    survivor = (await api.post("/v1/identify", {"userId": user, "anonymousId": visitor, "traits": {}})).json()["person"]
    [gone] = {first, second} - {survivor}

    def date(person: str) -> Any:
        return api.temporal.get_workflow_handle(workflow_id("trial_ending", person, "", prefix="nurture-date"))

    assert await date(gone).result() == 0
    assert await date(survivor).result() == 1
    await asyncio.sleep(1)
    started = [r.user_id for r in rows(api.db, RunRecord, journey="trial_ending") if r.user_id in (first, second)]
    assert started == [survivor]


async def test_forgetting_a_person_ends_their_date_trigger_and_erases_its_record(api: Api) -> None:
    """A date waited for holds the person's id in a workflow: forgetting them ends it (before its
    moment, so no run ever starts) and leaves no record of it."""
    user = new_user()
    lead = 3 * LEAD  # the forget must come before the moment, on a loaded machine too
    ends = format_instant(datetime.now(UTC) + timedelta(days=1, seconds=lead))
    answer = await api.post("/v1/identify", {"userId": user, "traits": {"email": f"{user}@example.com", "trial_ends_at": ends}})
    assert answer.status_code == 200, answer.text
    wid = workflow_id("trial_ending", user, "", prefix="nurture-date")
    assert [r.user_id for r in rows(api.db, DateTriggerRecord, workflow_id=wid)] == [user]
    assert (await api.temporal.get_workflow_handle(wid).describe()).status == WorkflowExecutionStatus.RUNNING

    forgot = await api.http.delete(f"/v1/users/{user}", auth=(ADMIN_KEY, ""))

    assert forgot.status_code == 200, forgot.text
    assert rows(api.db, DateTriggerRecord, workflow_id=wid) == []
    try:
        status = (await api.temporal.get_workflow_handle(wid).describe()).status
    except RPCError as exc:  # its history deleted
        assert exc.status == RPCStatusCode.NOT_FOUND
    else:
        assert status != WorkflowExecutionStatus.RUNNING
    await asyncio.sleep(max(0.0, (parse_instant(ends) - timedelta(days=1) - datetime.now(UTC)).total_seconds()) + 2)
    assert entered(api.db, "trial_ending", user) == []
