"""The console's security and pages over HTTP, on SQLite and PostgreSQL: accounts and argon2id
hashes, throttled sign-in, one-time links, cookies, CSRF, roles, headers, no page signed out,
the API's keys opening nothing, 4xx naming the field, and the paused journeys' effect on routing.
(tests/test_console_browser.py drives the same pages in Chromium.)"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from console_support import seed_console
from fastapi.testclient import TestClient
from support import rows

from nurture.cli.main import main as cli
from nurture.console import accounts
from nurture.console.app import create_app
from nurture.engine.model import Event
from nurture.language.compiler import Project
from nurture.service.ingest import Ingest
from nurture.service.settings import Settings
from nurture.storage.audit import AuditRecord
from nurture.storage.console import ConsoleUser, PausedJourneys
from nurture.storage.db import Database
from nurture.storage.models import ProfileRecord, RunRecord

ROOT = Path(__file__).resolve().parents[1]
WRITE, READ, ADMIN = "console-write-key-0123456789", "console-read-key-0123456789", "console-admin-key-0123456789"
PASSWORD = "a long enough password"
PAGES = [
    "/console",
    "/console/journeys",
    "/console/journeys/welcome_series",
    "/console/journeys/welcome_series?step=welcome_email",
    "/console/journeys/welcome_series/pause",
    "/console/journeys/welcome_series/resume",
    "/console/preview",
    "/console/preview/frame?template=welcome",
    "/console/people?q=x",
    "/console/person?id=learner1",
    "/console/person/forget?id=learner1",
    "/console/person/end-run?run=x",
    "/console/messages",
    "/console/account",
]


@pytest.fixture
def console(database: Database, project: Project) -> Iterator[TestClient]:
    seed_console(database, project, people=30)
    for role in ("viewer", "operator", "admin"):
        accounts.add_user(database, f"{role}@example.com", role, PASSWORD)
    settings = Settings(
        write_keys=(WRITE,),
        read_keys=(READ,),
        admin_keys=(ADMIN,),
        database=database.url,
        journeys=ROOT / "journeys",
        templates=ROOT / "templates",
        temporal_address="127.0.0.1:1",
        secret="s" * 32,
    )
    with TestClient(create_app(settings, project=project, db=database), base_url="http://console.test") as client:
        yield client


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has a form with a CSRF token"
    return found.group(1)


def sign_in(client: TestClient, role: str, password: str = PASSWORD) -> str:
    """Sign in as ``role`` (in a fresh browser); the session's CSRF token."""
    client.cookies.clear()
    form = client.get("/console/sign-in")
    answer = client.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "email": f"{role}@example.com", "password": password},
        follow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    return csrf_of(client.get("/console/journeys").text)


def test_passwords_are_argon2id_hashes_and_a_wrong_one_is_refused(database: Database) -> None:
    accounts.add_user(database, " Ana@Example.com ", "operator", PASSWORD)
    [user] = rows(database, ConsoleUser)
    assert user.email == "ana@example.com" and user.password_hash.startswith("$argon2id$")
    assert PASSWORD not in user.password_hash
    assert accounts.check_password(database, "ANA@example.com", PASSWORD, "10.0.0.1") == "ana@example.com"
    assert accounts.check_password(database, "ana@example.com", PASSWORD + "x", "10.0.0.1") is None
    assert accounts.check_password(database, "nobody@example.com", PASSWORD, "10.0.0.1") is None
    with pytest.raises(accounts.AccountError, match="at least 10"):
        accounts.add_user(database, "b@example.com", "viewer", "short")
    with pytest.raises(accounts.AccountError, match="role must be one of viewer, operator, admin"):
        accounts.add_user(database, "b@example.com", "root", PASSWORD)


def test_sign_in_is_throttled_per_account_and_per_client(database: Database) -> None:
    accounts.add_user(database, "ana@example.com", "admin", PASSWORD)
    for _ in range(accounts.MAX_FAILURES):
        assert accounts.check_password(database, "ana@example.com", "wrong", "10.0.0.1") is None
    with pytest.raises(accounts.Throttled):  # even the right password, from anywhere
        accounts.check_password(database, "ana@example.com", PASSWORD, "10.0.0.2")
    accounts.add_user(database, "bo@example.com", "admin", PASSWORD)
    assert accounts.check_password(database, "bo@example.com", PASSWORD, "10.0.0.1") == "bo@example.com"
    for n in range(accounts.MAX_CLIENT_FAILURES - accounts.MAX_FAILURES):  # other accounts, one client
        assert accounts.check_password(database, f"guess{n}@example.com", "wrong", "10.0.0.1") is None
    with pytest.raises(accounts.Throttled):  # the same client, any account
        accounts.check_password(database, "bo@example.com", PASSWORD, "10.0.0.1")
    assert accounts.check_password(database, "bo@example.com", PASSWORD, "10.0.0.3") == "bo@example.com"


def test_a_sign_in_link_works_once_and_not_after_it_expires(database: Database) -> None:
    accounts.add_user(database, "ana@example.com", "viewer", None)
    token = accounts.make_link(database, "ana@example.com")
    assert accounts.use_link(database, token) == "ana@example.com"
    assert accounts.use_link(database, token) is None
    late = accounts.make_link(database, "ana@example.com", lifetime=timedelta(seconds=-1))
    assert accounts.use_link(database, late) is None
    assert accounts.use_link(database, "forged") is None
    with pytest.raises(accounts.AccountError, match="no console account"):
        accounts.make_link(database, "nobody@example.com")


def test_up_makes_a_first_admin_only_while_there_is_no_account(database: Database) -> None:
    first = accounts.first_admin_link(database)
    assert first is not None and first[0] == "admin@localhost"
    [user] = rows(database, ConsoleUser)
    assert (user.role, user.password_hash) == ("admin", None)
    assert accounts.use_link(database, first[1]) == "admin@localhost"
    again = accounts.first_admin_link(database)
    assert again is not None and again[1] != first[1]
    assert accounts.first_admin_link(database, "other@example.com") is None
    assert len(rows(database, ConsoleUser)) == 1


def test_no_console_page_is_reachable_signed_out_or_with_an_api_key(console: TestClient) -> None:
    for path in PAGES:
        for headers in ({}, {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": f"Bearer {READ}"}):
            answer = console.get(path, headers=headers, follow_redirects=False)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/console/sign-in?next="), path
    answer = console.get("/console/journeys", auth=(ADMIN, ""), follow_redirects=False)
    assert answer.status_code == 303
    for path in ("/console/journeys/welcome_series/pause", "/console/person/forget", "/console/person/reveal"):
        assert console.post(path, data={"csrf": "x", "id": "learner1"}, follow_redirects=False).status_code == 303
    assert PausedJourneys(console.app.state.nurture.db).all() == frozenset()  # type: ignore[attr-defined]


def test_the_session_cookie_and_the_headers(console: TestClient, database: Database, project: Project) -> None:
    form = console.get("/console/sign-in")
    assert form.headers["x-frame-options"] == "DENY"
    csp = form.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    assert "<script>" not in form.text and " style=" not in form.text
    answer = console.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "email": "viewer@example.com", "password": PASSWORD},
        follow_redirects=False,
    )
    cookie = next(v for k, v in answer.headers.multi_items() if k == "set-cookie" and v.startswith("nurture_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # http here
    page = console.get("/console/journeys/chat_recovery")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert "<svg" in page.text and " style=" not in page.text and "<script>" not in page.text
    frame = console.get("/console/preview/frame?template=welcome")
    assert frame.status_code == 200 and "sandbox" in frame.headers["content-security-policy"]
    assert frame.headers["x-frame-options"] == "SAMEORIGIN"

    https = Settings(
        write_keys=(WRITE,), database=database.url, public_url="https://nurture.example", temporal_address="127.0.0.1:1"
    )
    with TestClient(create_app(https, project=project, db=database), base_url="https://nurture.example") as secure:
        form = secure.get("/console/sign-in")
        answer = secure.post(
            "/console/sign-in",
            data={"csrf": csrf_of(form.text), "email": "viewer@example.com", "password": PASSWORD},
            follow_redirects=False,
        )
        assert any(
            k == "set-cookie" and v.startswith("nurture_console=") and "Secure" in v for k, v in answer.headers.multi_items()
        )


def test_sign_in_refuses_a_wrong_password_a_missing_token_and_too_many_attempts(console: TestClient) -> None:
    form = console.get("/console/sign-in")
    token = csrf_of(form.text)
    missing = console.post("/console/sign-in", data={"email": "viewer@example.com", "password": PASSWORD})
    assert missing.status_code == 403 and "security token" in missing.text
    for _ in range(accounts.MAX_FAILURES):
        wrong = console.post("/console/sign-in", data={"csrf": token, "email": "viewer@example.com", "password": "no"})
        assert wrong.status_code == 401 and "not right" in wrong.text
    throttled = console.post("/console/sign-in", data={"csrf": token, "email": "viewer@example.com", "password": PASSWORD})
    assert throttled.status_code == 429 and "Too many failed attempts" in throttled.text


def test_next_goes_only_to_a_console_page(console: TestClient) -> None:
    form = console.get("/console/sign-in?next=//evil.example/x")
    answer = console.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "email": "viewer@example.com", "password": PASSWORD, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert answer.headers["location"] == "/console/journeys"


def test_forms_without_the_sessions_token_change_nothing(console: TestClient, database: Database) -> None:
    sign_in(console, "operator")
    for data in ({}, {"csrf": "forged"}):
        refused = console.post("/console/journeys/welcome_series/pause", data=data)
        assert refused.status_code == 403 and "security token" in refused.text
    assert PausedJourneys(database).all() == frozenset()


def test_roles(console: TestClient, database: Database) -> None:
    token = sign_in(console, "viewer")
    journey = console.get("/console/journeys/welcome_series")
    assert "Pause journey" not in journey.text
    for path in ("/console/journeys/welcome_series/pause", "/console/person/forget?id=learner1"):
        refused = console.get(path)
        assert refused.status_code == 403 and "needs the operator role" in refused.text
    assert console.post("/console/journeys/welcome_series/pause", data={"csrf": token}).status_code == 403
    person = console.get("/console/person?id=learner1")
    assert person.status_code == 200 and "Reveal addresses" not in person.text
    assert "learner1@example.com" not in person.text and "l***@example.com" in person.text
    refused = console.post("/console/person/reveal", data={"csrf": token, "id": "learner1"})
    assert refused.status_code == 403 and "needs the admin role" in refused.text
    assert PausedJourneys(database).all() == frozenset()

    token = sign_in(console, "operator")
    assert console.post("/console/person/reveal", data={"csrf": token, "id": "learner1"}).status_code == 403
    assert console.post("/console/journeys/welcome_series/pause", data={"csrf": token}).status_code == 200
    assert PausedJourneys(database).all() == {"welcome_series"}
    [entry] = rows(database, AuditRecord, action="pause")
    assert entry.actor == "console:operator@example.com" and entry.subject == "journey:welcome_series"

    token = sign_in(console, "admin")
    revealed = console.post("/console/person/reveal", data={"csrf": token, "id": "learner1"})
    assert revealed.status_code == 200 and "learner1@example.com" in revealed.text
    [entry] = rows(database, AuditRecord, action="reveal")
    assert entry.actor == "console:admin@example.com" and "learner1" not in entry.subject


def test_bad_input_is_a_4xx_naming_the_field(console: TestClient) -> None:
    sign_in(console, "viewer")
    cases = {
        "/console/journeys/welcome_series?range=forever": (400, "range:"),
        "/console/journeys/welcome_series?since=yesterday": (400, "since:"),
        "/console/journeys/welcome_series?step=nope": (404, "step:"),
        "/console/journeys/nope": (404, "no journey"),
        "/console/messages?status=lost": (400, "status:"),
        "/console/messages?channel=fax": (400, "channel:"),
        "/console/messages?before=x": (400, "before:"),
        "/console/preview?template=nope": (404, "template:"),
        "/console/preview?properties=%5B1%5D": (400, "properties:"),
        "/console/person": (400, "id:"),
        "/console/person?id=nobody-at-all": (404, "id:"),
    }
    for path, (status, words) in cases.items():
        answer = console.get(path)
        assert (answer.status_code, words in answer.text) == (status, True), path


def test_every_page_renders_for_a_viewer(console: TestClient, database: Database) -> None:
    sign_in(console, "viewer")
    someone = next(p for p in rows(database, ProfileRecord) if p.phone)
    spaced = f"{someone.phone[:3]} {someone.phone[3:7]} {someone.phone[7:]}"  # as a person reads it out
    looked_up = console.get("/console/people", params={"q": spaced}, follow_redirects=False)
    assert looked_up.status_code == 303
    assert looked_up.headers["location"] == f"/console/person?id={someone.user_id}"
    for path in [p for p in PAGES if "forget" not in p and "end-run" not in p and "pause" not in p and "resume" not in p]:
        answer = console.get(path)
        assert answer.status_code in (200, 404), (path, answer.status_code)
    preview = console.get("/console/preview?template=chat_agent_contact")
    assert "GSM-7" in preview.text or "UCS-2" in preview.text
    assert "segment" in preview.text
    wechat = console.get("/console/preview?template=welcome_coupon")
    assert "template_id" in wechat.text and "touser" in wechat.text
    email = console.get("/console/preview?template=welcome")
    assert '<iframe class="email" sandbox=""' in email.text and "zh-CN" in email.text


def test_the_cli_adds_accounts_and_prints_links(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", database.url)
    runner = CliRunner()
    added = runner.invoke(cli, ["console", "add-user", "Ana@Example.com", "--role", "operator", "--password-stdin"], input=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    assert "ana@example.com is a console operator" in added.output
    assert accounts.check_password(database, "ana@example.com", PASSWORD, "x") == "ana@example.com"
    short = runner.invoke(cli, ["console", "add-user", "b@example.com", "--role", "viewer", "--password-stdin"], input="short\n")
    assert short.exit_code == 1 and "at least 10 characters" in short.output
    wrong = runner.invoke(cli, ["console", "add-user", "b@example.com", "--role", "root", "--no-password"])
    assert wrong.exit_code == 2 and "root" in wrong.output
    link = runner.invoke(cli, ["console", "link", "ana@example.com", "--url", "https://nurture.example/"])
    assert link.exit_code == 0
    token = link.output.strip().removeprefix("https://nurture.example/console/link/")
    assert accounts.use_link(database, token) == "ana@example.com"


async def test_a_paused_journey_starts_no_run_and_says_why(database: Database, project: Project) -> None:
    # No Temporal client: a paused journey's trigger is skipped before anything would reach it.
    ingest = Ingest(project, database, None, "unused")
    PausedJourneys(database).pause("welcome_series", "console:ana@example.com")
    routed = await ingest.track("u-paused", Event("Signed Up", datetime.now(UTC), {}, "m-paused"))
    assert routed.skipped == ["welcome_series"] and routed.skip_reasons == {"welcome_series": "journey_paused"}
    assert routed.triggered == [] and rows(database, RunRecord, user_id="u-paused") == []
    assert not PausedJourneys(database).pause("welcome_series", "again")
    assert PausedJourneys(database).resume("welcome_series") and not PausedJourneys(database).resume("welcome_series")


def test_the_map_draws_every_step_and_fork_as_nurture_graph_does(project: Project) -> None:
    import xml.etree.ElementTree as ET

    from nurture.console.charts import journey_map
    from nurture.language import ir
    from nurture.language.graph import mermaid

    svg = "{http://www.w3.org/2000/svg}"
    for journey in project.journeys.values():
        drawn = ET.fromstring(str(journey_map(journey, {}, selected=None, link="?step=", entered=0)))
        links = [a.get("href") for a in drawn.iter(f"{svg}a")]
        assert links == [f"?step={step.id}#step" for step in ir.walk(journey.steps)], journey.id
        labels = {t.text for t in drawn.iter(f"{svg}text") if t.get("class") == "edge-label"}
        # Every labelled edge of the Mermaid graph (then, timeout, conditions, variants) is drawn.
        graph_labels = set(re.findall(r'-->\|"([^"]*)"\|', mermaid(journey)))
        assert {label if len(label) <= 28 else label[:27] + "…" for label in graph_labels} == labels, journey.id


def test_a_form_larger_than_any_console_form_is_refused_unread(console: TestClient) -> None:
    token = csrf_of(console.get("/console/sign-in").text)
    answer = console.post("/console/sign-in", data={"csrf": token, "email": "a" * 20_000, "password": "x"})
    assert answer.status_code == 413 and "larger than the console accepts" in answer.text


def test_the_journeys_page_shows_compile_errors_as_validate_prints_them(
    database: Database, project: Project, tmp_path: Path
) -> None:
    import shutil

    journeys = tmp_path / "journeys"
    shutil.copytree(ROOT / "journeys", journeys)
    shutil.copy(ROOT / "nurture.yaml", tmp_path / "nurture.yaml")
    broken = journeys / "welcome_series.yaml"
    broken.write_text(broken.read_text().replace("template: welcome\n", "template: welcom\n", 1))
    accounts.add_user(database, "viewer@example.com", "viewer", PASSWORD)
    settings = Settings(
        write_keys=(WRITE,), database=database.url, journeys=journeys, templates=ROOT / "templates",
        temporal_address="127.0.0.1:1",
    )
    with TestClient(create_app(settings, project=project, db=database)) as client:
        sign_in(client, "viewer")
        page = client.get("/console/journeys").text
    validate = CliRunner().invoke(cli, ["validate", "--journeys", str(journeys), "--templates", str(ROOT / "templates")])
    assert validate.exit_code == 1
    first = next(line for line in validate.output.splitlines() if "welcome_series.yaml:" in line)
    assert first.split(": ", 1)[0] in page and "did you mean" in page
    assert page.count(">errors</summary>") == 1 and page.count(">compiles<") == len(project.journeys) - 1


def test_a_link_signs_in_and_a_password_is_set_then_changed_only_with_the_current_one(
    console: TestClient, database: Database
) -> None:
    accounts.add_user(database, "new@example.com", "viewer", None)
    token = accounts.make_link(database, "new@example.com")
    opened = console.get(f"/console/link/{token}", follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/console/account"
    form = console.get("/console/account")
    assert "Set a password" in form.text and 'name="current"' not in form.text
    csrf = csrf_of(form.text)
    differ = console.post("/console/account", data={"csrf": csrf, "password": PASSWORD, "again": PASSWORD + "x"})
    assert differ.status_code == 400 and "again:" in differ.text
    saved = console.post("/console/account", data={"csrf": csrf, "password": PASSWORD, "again": PASSWORD})
    assert saved.status_code == 200 and "Your password is set" in saved.text
    assert accounts.check_password(database, "new@example.com", PASSWORD, "t") == "new@example.com"
    change = {"csrf": csrf, "password": "another long password", "again": "another long password"}
    refused = console.post("/console/account", data={**change, "current": "wrong"})
    assert refused.status_code == 400 and "current:" in refused.text
    assert console.post("/console/account", data={**change, "current": PASSWORD}).status_code == 200
    assert accounts.check_password(database, "new@example.com", "another long password", "t") == "new@example.com"
    assert console.get(f"/console/link/{token}").status_code == 400  # once only
