"""Listing runs by journey, version, state and step, and counting them per version: the database
query on both engines, `GET /v1/runs` with a read key, and `nurture runs`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from nurture.cli.main import main
from nurture.language.compiler import Project
from nurture.reports.runs import (
    UnknownFilter,
    active_runs,
    check_filters,
    decode_cursor,
    list_runs,
    version_counts,
)
from nurture.service.api import create_app
from nurture.service.settings import Settings
from nurture.storage.db import Database
from nurture.storage.models import RunRecord
from nurture.storage.stores import Routes, store_versions

START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
READ_KEY = "read-key-0123456789"


def seed(db: Database) -> None:
    """Seven runs of `welcome`: four at version v1 (three waiting, one ended), three at v2; and one
    of another journey."""
    plan = [
        ("welcome", "v1", "active", "first_wait"),
        ("welcome", "v1", "active", "first_wait"),
        ("welcome", "v1", "active", "await_click"),
        ("welcome", "v1", "ended", None),
        ("welcome", "v2", "active", "first_wait"),
        ("welcome", "v2", "ended", None),
        ("welcome", "v2", "ended", None),
        ("other", "v9", "active", "somewhere"),
    ]
    with db.session() as session:
        for number, (journey, version, status, step) in enumerate(plan):
            session.add(
                RunRecord(
                    run_id=f"run-{number}",
                    workflow_id=f"nurture/{journey}/u{number}/",
                    journey=journey,
                    version=version,
                    user_id=f"u{number}@example.com",
                    status=status,
                    step=step,
                    # two runs enter at the same instant: the run id orders them
                    entered_at=START + timedelta(hours=min(number, 5)),
                    ended_at=None if status == "active" else START + timedelta(days=1),
                    end_reason=None if status == "active" else "completed",
                )
            )


def test_runs_are_listed_by_every_filter_and_paged(database: Database) -> None:
    seed(database)

    every = list_runs(database, "welcome")
    assert [r.run_id for r in every.runs] == [f"run-{n}" for n in range(7)] and every.next is None
    assert every.runs[0].entered_at.tzinfo is not None
    assert [r.run_id for r in list_runs(database, "welcome", version="v1", state="active").runs] == [
        "run-0",
        "run-1",
        "run-2",
    ]
    assert [r.run_id for r in list_runs(database, "welcome", step="first_wait").runs] == ["run-0", "run-1", "run-4"]
    assert [r.run_id for r in list_runs(database, "welcome", state="ended").runs] == ["run-3", "run-5", "run-6"]
    assert [r.run_id for r in list_runs(database).runs][-1] == "run-7"

    seen, after = [], None
    while True:
        page = list_runs(database, "welcome", limit=2, after=after)
        seen.append([r.run_id for r in page.runs])
        if page.next is None:
            break
        after = page.next
    # run-5 and run-6 entered at the same instant and still fall on either side of a page edge
    assert seen == [["run-0", "run-1"], ["run-2", "run-3"], ["run-4", "run-5"], ["run-6"]]
    assert decode_cursor(list_runs(database, "welcome", limit=1).next or "") == (START, "run-0")
    with pytest.raises(ValueError, match="not a cursor"):
        list_runs(database, "welcome", after="garbage!")
    assert [r.run_id for r in active_runs(database, "welcome", "v1")] == ["run-0", "run-1", "run-2"]


def test_counts_per_version_say_where_active_runs_wait(database: Database) -> None:
    seed(database)

    counts = version_counts(database, "welcome")

    assert [(c.version, c.active, c.ended, c.waiting) for c in counts] == [
        ("v1", 3, 1, {"await_click": 1, "first_wait": 2}),
        ("v2", 1, 2, {"first_wait": 1}),
    ]
    assert version_counts(database, "nobody") == []


def test_a_journey_version_or_step_no_run_or_stored_version_has_is_refused(database: Database, project: Project) -> None:
    """A typo must not look like "no runs": the filter is named, with the closest known name."""
    seed(database)  # runs of versions stored nowhere (older than the versions' store)
    journey = project.journeys["welcome_series"]
    store_versions(database, [journey])

    def refused(name: str, **filters: str) -> UnknownFilter:
        with pytest.raises(UnknownFilter) as caught:
            check_filters(database, name, **filters)
        return caught.value

    check_filters(database, "welcome", version="v1", step="first_wait")  # known by their runs alone
    check_filters(database, "welcome_series", version=journey.version, step="wait_day_1")
    typo = refused("welcome_serie")
    assert typo.field == "journey" and "did you mean 'welcome_series'?" in str(typo)
    assert refused("welcome", version="v3").field == "version"
    version = refused("welcome_series", version=journey.version[:-1] + "x")
    assert version.field == "version" and journey.version in str(version)
    step = refused("welcome_series", step="wait_day1")
    assert step.field == "step" and "did you mean 'wait_day_1'?" in str(step)


async def test_the_api_lists_and_counts_runs_with_a_read_key(project: Project, tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    seed(db)
    settings = Settings(write_keys=("write-key-0123456789",), read_keys=(READ_KEY,), database=db.url)
    app = create_app(settings, project=project, db=db)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://nurture", auth=(READ_KEY, "")) as http:
        page = await http.get("/v1/runs", params={"journey": "welcome", "state": "active", "limit": 2})
        assert page.status_code == 200, page.text
        body = page.json()
        assert [r["run_id"] for r in body["runs"]] == ["run-0", "run-1"]
        assert body["runs"][0]["step"] == "first_wait" and body["runs"][0]["version"] == "v1"
        rest = (await http.get("/v1/runs", params={"journey": "welcome", "state": "active", "after": body["next"]})).json()
        assert [r["run_id"] for r in rest["runs"]] == ["run-2", "run-4"] and rest["next"] is None

        counts = await http.get("/v1/runs/counts", params={"journey": "welcome"})
        assert counts.status_code == 200
        assert [(c["version"], c["active"], c["ended"]) for c in counts.json()] == [("v1", 3, 1), ("v2", 1, 2)]

        bad_state = await http.get("/v1/runs", params={"state": "sleeping"})
        assert bad_state.status_code == 400 and bad_state.json()["detail"][0]["field"] == "state"
        bad_cursor = await http.get("/v1/runs", params={"after": "nope"})
        assert bad_cursor.status_code == 400 and bad_cursor.json()["detail"][0]["field"] == "after"
        too_many = await http.get("/v1/runs", params={"limit": 501})
        assert too_many.status_code == 400 and too_many.json()["detail"][0]["field"] == "limit"
        writer = await http.get("/v1/runs", auth=("write-key-0123456789", ""))
        assert writer.status_code == 403
        for path in ("/v1/runs", "/v1/runs/counts"):
            unknown = await http.get(path, params={"journey": "welcom"})
            assert unknown.status_code == 404 and unknown.json()["detail"][0]["field"] == "journey", unknown.text
        no_version = await http.get("/v1/runs", params={"journey": "welcome", "version": "v3"})
        assert no_version.status_code == 400 and no_version.json()["detail"][0]["field"] == "version"
        no_step = await http.get("/v1/runs", params={"journey": "welcome_series", "step": "nowhere"})
        assert no_step.status_code == 400 and no_step.json()["detail"][0]["field"] == "step"
    db.dispose()


def test_the_command_lists_and_counts_runs(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    seed(db)
    db.dispose()
    runner = CliRunner()

    def run(*argv: str) -> str:
        result = runner.invoke(main, [*argv, "--home", str(tmp_path)], env={"DATABASE_URL": ""})
        assert result.exit_code == 0, result.output
        return result.output

    counts = run("runs", "welcome", "--counts")
    assert counts.splitlines() == [
        "version         active   ended  waiting at",
        "v1                   3       1  await_click 1, first_wait 2",
        "v2                   1       2  first_wait 1",
    ]
    listed = run("runs", "welcome", "--version", "v1", "--limit", "2").splitlines()
    assert listed[0].startswith("run-0  v1  u***@example.com  entered 2026-03-02T09:00:00Z  waiting at first_wait")
    assert listed[2].startswith("more: --after ")
    rest = run("runs", "welcome", "--version", "v1", "--after", listed[2].split()[-1])
    assert [line.split()[0] for line in rest.splitlines()] == ["run-2", "run-3"]
    assert rest.splitlines()[1].endswith("ended completed")
    doc = json.loads(run("runs", "welcome", "--step", "first_wait", "--json"))
    assert [r["run_id"] for r in doc["runs"]] == ["run-0", "run-1", "run-4"]
    assert (doc["runs"][0]["user_id"], doc["runs"][0]["workflow_id"]) == ("u***@example.com", "nurture/welcome/u%2A%2A%2A%40example.com/")
    assert "u0@" not in run("runs", "welcome", "--json")
    assert json.loads(run("runs", "welcome", "--counts", "--json"))[1]["waiting"] == {"first_wait": 1}
    def refused(*argv: str) -> str:
        result = runner.invoke(main, [*argv, "--home", str(tmp_path)], env={"DATABASE_URL": ""})
        assert result.exit_code == 2, result.output
        return result.output

    assert "--after" in refused("runs", "welcome", "--after", "x")
    assert "no run or stored version of a journey welcom (did you mean 'welcome'?" in refused("runs", "welcom", "--counts")
    assert "welcome has no version v3" in refused("runs", "welcome", "--version", "v3")
    assert "--version, --step apply to the listing" in refused("runs", "welcome", "--counts", "--version", "v1", "--step", "x")
    assert "--limit apply to the listing" in refused("runs", "welcome", "--counts", "--limit", "5")


def test_moved_runs_routes_listen_for_the_new_versions_events(database: Database) -> None:
    routes = Routes(database)
    routes.activate("nurture/welcome/u1/", user_id="u1", journey="welcome", key="", listens=["Clicked"])
    routes.activate("nurture/welcome/u2/", user_id="u2", journey="welcome", key="", listens=["Clicked"])

    routes.listen_also(["nurture/welcome/u1/"], ["Upgraded", "Clicked"])

    assert routes.active_for("u1")[0].listens == ["Clicked", "Upgraded"]
    assert routes.active_for("u2")[0].listens == ["Clicked"]
