"""Audiences in the service, on SQLite and PostgreSQL: an entry is an ``Audience Entered`` event
that starts the journeys it triggers (with a real Temporal dev server and worker), a new audience
finds the people who qualified before it existed, and the API and CLI answer who is in one."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from support import eventually, messages, new_user, rows
from temporalio.client import Client
from test_api import KEY, READ_KEY, Api, serving

from nurture.cli.main import main
from nurture.engine.model import Event
from nurture.language.audiences import ENTERED, Activity, Audience
from nurture.language.compiler import Project, load_project
from nurture.language.expressions import compile_expression
from nurture.service.api import create_app
from nurture.service.ingest import Ingest
from nurture.service.settings import Settings
from nurture.service.worker import build_worker
from nurture.storage.db import Database
from nurture.storage.models import AudienceMember, EventRecord, RunRecord

PROJECT = Path(__file__).parent / "projects" / "audience_service"
VIP = Audience("vip", name="VIPs", where=compile_expression("user.vip"))
LAPSED = Audience(
    "lapsed",
    did=(Activity("Order Completed"),),
    not_did=(Activity("Order Completed", within=30 * 86400, within_written="30d"),),
)


@pytest.fixture(scope="module")
def audience_project() -> Project:
    project = load_project(PROJECT / "journeys", PROJECT / "templates", PROJECT / "nurture.yaml")
    return dataclasses.replace(project, audiences={"vip": VIP, "lapsed": LAPSED})


@pytest.fixture(scope="module")
async def temporal_client(dev_server: str) -> Client:
    return await Client.connect(dev_server)


@pytest.fixture
async def api(audience_project: Project, database: Database, temporal_client: Client) -> AsyncIterator[Api]:
    async with serving(audience_project, database, temporal_client) as api:
        yield api


def runs_of(db: Database, user: str) -> list[RunRecord]:
    return rows(db, RunRecord, journey="vip_welcome", user_id=user)


async def test_entering_an_audience_starts_the_journey_it_triggers(api: Api) -> None:
    user = new_user()
    answer = await api.post("/v1/identify", {"userId": user, "traits": {"email": f"{user}@example.com", "vip": True}})
    assert answer.status_code == 200, answer.text
    [entered] = rows(api.db, EventRecord, user_id=user, name=ENTERED)
    assert entered.properties == {"audience": "vip"}
    [run] = await eventually(lambda: runs_of(api.db, user), timeout=20, what="the run")
    assert run.trigger_message_id == entered.message_id  # started by the entry itself
    [message] = await eventually(lambda: messages(api.db, user_id=user), timeout=20, what="the welcome")
    assert (message.template, message.status) == ("vip_welcome", "sent")
    # The person lookup names the audiences; an identify that changes nothing enters no one again.
    profile = (await api.get(f"/v1/users/{user}")).json()
    assert profile["audiences"] == ["vip"]
    await api.post("/v1/identify", {"userId": user, "traits": {"vip": True, "plan": "pro"}})
    assert len(rows(api.db, EventRecord, user_id=user, name=ENTERED)) == 1
    # Leaving is an exit event, which starts nothing here.
    await api.post("/v1/identify", {"userId": user, "traits": {"vip": False}})
    assert (await api.get(f"/v1/users/{user}")).json()["audiences"] == []
    assert len(runs_of(api.db, user)) == 1


async def test_a_new_audience_finds_the_people_who_qualified_before_it(
    audience_project: Project, database: Database, temporal_client: Client
) -> None:
    """The win-back case: customers who stopped ordering before the audience existed enter it when
    it is deployed (its evaluation from scratch), and a journey on its entry starts for them."""
    before = dataclasses.replace(audience_project, audiences={})
    old, recent = new_user(), new_user()
    earlier = Ingest(before, database, None, "unused")
    await earlier.track(old, Event("Order Completed", datetime.now(UTC) - timedelta(days=40), {}, "o1"))
    await earlier.track(recent, Event("Order Completed", datetime.now(UTC) - timedelta(days=2), {}, "o2"))
    # The audience trigger's journey for lapsed customers (the sugar `trigger: {audience: ...}`).
    journey = dataclasses.replace(
        audience_project.journeys["vip_welcome"],
        trigger=dataclasses.replace(
            audience_project.journeys["vip_welcome"].trigger,
            cond=compile_expression('event.properties.audience == "lapsed"'),
        ),
    )
    project = dataclasses.replace(audience_project, journeys={"vip_welcome": journey})
    queue = f"test-audiences-{uuid.uuid4().hex[:10]}"
    async with build_worker(temporal_client, project, database, queue):
        ingest = Ingest(project, database, temporal_client, queue)
        [lapsed, vip] = sorted(await ingest.evaluate_audiences(), key=lambda e: e.audience)
        assert (lapsed.audience, lapsed.members, vip.members) == ("lapsed", 1, 0)
        assert {row.person for row in rows(database, AudienceMember, audience="lapsed")} == {old}
        [run] = await eventually(lambda: runs_of(database, old), timeout=20, what="the win-back run")
        assert run.trigger_message_id is not None and run.trigger_message_id.startswith("audience:")
        assert runs_of(database, recent) == []
        assert await ingest.evaluate_audiences() == []  # each version is evaluated once
        # Thirty days after the recent order, the sweep moves the recent customer in too.
        [change] = await ingest.sweep_audiences(datetime.now(UTC) + timedelta(days=29))
        assert (change.person, change.audience, change.entered) == (recent, "lapsed", True)
        await eventually(lambda: runs_of(database, recent), timeout=20, what="the second win-back run")


async def test_the_audience_endpoints_and_commands(
    audience_project: Project, database: Database, tmp_path: Path
) -> None:
    ingest = Ingest(audience_project, database, None, "unused")
    await ingest.evaluate_audiences()  # nobody yet; records the versions
    people = sorted(new_user() for _ in range(5))
    for person in people:
        await ingest.identify(person, {"vip": True}, message_id=f"i-{person}", event=Event("identify", datetime.now(UTC)))
    await ingest.identify("ann@example.com", {"vip": True}, message_id="i-ann", event=Event("identify", datetime.now(UTC)))
    settings = Settings(write_keys=(KEY,), read_keys=(READ_KEY,), database=database.url)
    app = create_app(settings, project=audience_project, db=database)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://nurture", auth=(READ_KEY, "")
    ) as http:
        listed = (await http.get("/v1/audiences")).json()
        assert [(a["id"], a["name"], a["size"]) for a in listed] == [("lapsed", "lapsed", 0), ("vip", "VIPs", 6)]
        one = (await http.get("/v1/audiences/vip")).json()
        assert one["size"] == 6 and one["definition"] == "where user.vip" and one["evaluated_at"]
        page = (await http.get("/v1/audiences/vip/members", params={"limit": 4})).json()
        rest = (await http.get("/v1/audiences/vip/members", params={"limit": 4, "after": page["next"]})).json()
        everyone = [m["person"] for m in page["members"] + rest["members"]]
        assert len(everyone) == 6 and set(everyone) == {*people, "ann@example.com"} and rest["next"] is None
        missing = await http.get("/v1/audiences/vipp")
        assert missing.status_code == 404 and "did you mean 'vip'" in missing.text
        assert (await http.get("/v1/audiences/vipp/members")).status_code == 404
        assert (await http.get("/v1/audiences/vip/members", params={"limit": 0})).status_code == 400
        assert (await http.get("/v1/audiences/vip/members", params={"after": ""})).status_code == 400
        assert (await http.get("/v1/audiences", auth=("nope", ""))).status_code == 401
        assert (await http.get("/v1/audiences", auth=(KEY, ""))).status_code == 403
    runner = CliRunner()
    env = {"DATABASE_URL": database.url}
    size = runner.invoke(main, ["audience", "size", "vip"], env=env)
    assert size.exit_code == 0 and size.output == "vip: 6 members\n", size.output
    listing = runner.invoke(main, ["audience", "list", "vip", "--limit", "10"], env=env)
    assert listing.exit_code == 0 and "a***@example.com" in listing.output and "ann@example.com" not in listing.output
    assert all(person in listing.output for person in people)
    first = runner.invoke(main, ["audience", "list", "vip", "--limit", "4"], env=env)
    cursor = first.output.splitlines()[-1].removeprefix("more: --after ")
    assert "@" not in cursor
    second = runner.invoke(main, ["audience", "list", "vip", "--limit", "4", "--after", cursor], env=env)
    assert len(second.output.splitlines()) == 2 and "more:" not in second.output  # 6 members: 4, then 2
    assert runner.invoke(main, ["audience", "list", "vip", "--after", "%%%"], env=env).exit_code == 2
    changes = runner.invoke(main, ["audience", "history", "vip"], env=env)
    assert changes.exit_code == 0 and changes.output.count("entered") == 6
    unknown = runner.invoke(main, ["audience", "size", "vipp"], env=env)
    assert unknown.exit_code != 0 and "no audience 'vipp'" in unknown.output


async def test_audience_files_and_the_journey_forms_end_to_end(database: Database, temporal_client: Client) -> None:
    """The whole path with nothing built by hand: audience files and a journey written
    `trigger: {audience: python_fans}`, compiled from disk; an identify through the API enters the
    person and the journey sends its email."""
    folder = Path(__file__).parent / "projects" / "audiences"
    project = load_project(folder / "journeys", folder / "templates", folder / "nurture.yaml")
    assert "python_fans" in project.audiences
    async with serving(project, database, temporal_client) as api:
        user = new_user()
        traits = {"email": f"{user}@example.com", "interest": "python"}
        answer = await api.post("/v1/identify", {"userId": user, "traits": traits})
        assert answer.status_code == 200, answer.text
        entered = rows(api.db, EventRecord, user_id=user, name=ENTERED)
        assert {e.properties["audience"] for e in entered} >= {"python_fans"}
        sent = await eventually(
            lambda: [m for m in messages(api.db, user_id=user) if m.template == "python_launch"],
            timeout=30,
            what="the launch email",
        )
        assert [m.status for m in sent] == ["sent"]
        size = (await api.get("/v1/audiences/python_fans")).json()
        assert size["size"] >= 1
