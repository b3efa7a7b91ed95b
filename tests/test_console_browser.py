"""The console in real Chromium (Debian's /usr/bin/chromium, driven by Playwright), served by the
event API's process with a worker on a real Temporal dev server, on SQLite and PostgreSQL:
sign-in, every page, a step of the map, a person found by phone, pause and resume and what they
do to a new event, ending a run, forgetting a person, revealing an address, CSRF and role
refusals, and no page signed out."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import pytest
from console_support import seed
from playwright.async_api import Browser, Page, async_playwright, expect
from support import eventually, new_user, rows, served_settings, uvicorn_thread
from temporalio.client import Client as TemporalClient

from nurture.console import accounts
from nurture.console.app import create_app
from nurture.language.compiler import Project
from nurture.service.worker import build_worker
from nurture.storage.audit import AuditRecord
from nurture.storage.console import PausedJourneys
from nurture.storage.db import Database
from nurture.storage.models import ProfileRecord, RunRecord

CHROMIUM = "/usr/bin/chromium"
KEY = "console-browser-write-key"
PASSWORD = "a long enough password"


@dataclass
class Stack:
    url: str
    db: Database
    browser: Browser
    people: list[str]

    async def page(self, role: str | None) -> Page:
        """A new browser (no cookies) signed in as ``role``'s account, or signed out."""
        context = await self.browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        if role is not None:
            await page.goto(f"{self.url}/console/sign-in")
            await page.get_by_label("Email").fill(f"{role}@example.com")
            await page.get_by_label("Password").fill(PASSWORD)
            await page.get_by_role("button", name="Sign in").click()
            await page.wait_for_url("**/console/journeys")
        return page

    async def track(self, user: str, event: str) -> dict[str, object]:
        async with httpx.AsyncClient(base_url=self.url, auth=(KEY, ""), timeout=30.0) as http:
            await http.post("/v1/identify", json={"userId": user, "traits": {"email": f"{user}@example.com"}})
            answer = await http.post("/v1/track", json={"userId": user, "event": event})
        assert answer.status_code == 200, answer.text
        result: dict[str, object] = answer.json()
        return result


@pytest.fixture
async def stack(dev_server: str, database: Database, project: Project) -> AsyncIterator[Stack]:
    people = await seed(database, project, people=40)
    for role in ("viewer", "operator", "admin"):
        accounts.add_user(database, f"{role}@example.com", role, PASSWORD)
    settings = served_settings(dev_server, database.url, "test-console", write_keys=(KEY,))
    temporal = await TemporalClient.connect(dev_server)
    with uvicorn_thread(create_app(settings)) as url:
        async with build_worker(temporal, project, database, settings.task_queue), async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM)
            try:
                yield Stack(url, database, browser, people)
            finally:
                await browser.close()


async def test_signed_out_every_page_leads_to_sign_in(stack: Stack) -> None:
    page = await stack.page(None)
    for path in ("/console", "/console/journeys", "/console/journeys/welcome_series", "/console/messages",
                 "/console/people", "/console/person?id=learner1", "/console/preview",
                 "/console/journeys/welcome_series/pause"):
        await page.goto(stack.url + path)
        await expect(page.get_by_role("heading", name="Sign in to Nurture")).to_be_visible()
        assert "/console/sign-in?next=" in page.url
    await page.get_by_label("Email").fill("viewer@example.com")
    await page.get_by_label("Password").fill("not the password")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("The email or the password is not right.")


async def test_a_viewer_reads_every_page_and_may_not_act(stack: Stack) -> None:
    page = await stack.page("viewer")
    await expect(page.get_by_role("link", name="Chat recovery")).to_be_visible()
    await page.get_by_role("link", name="Chat recovery").click()
    await expect(page.locator("svg.journey-map")).to_be_visible()
    await expect(page.get_by_role("heading", name="Experiment chat_followup_copy")).to_be_visible()
    assert await page.get_by_role("link", name="Pause journey").count() == 0

    # A step of the map: its latest people and the messages it sent.
    await page.locator('svg.journey-map a[href*="step=agent_contact_sms"]').click()
    await expect(page.get_by_role("heading", name="Step agent_contact_sms")).to_be_visible()
    await expect(page.get_by_role("heading", name="Latest people here")).to_be_visible()
    await expect(page.get_by_role("heading", name="Messages it sent")).to_be_visible()
    assert await page.locator("#step .list li").count() > 0

    # The messages page filters as a select changes (our own script).
    await page.get_by_role("link", name="Messages", exact=True).click()
    await page.get_by_label("Channel").select_option("sms")
    await page.wait_for_url(re.compile(r".*channel=sms.*"))
    channels = await page.locator("td[data-label=Channel]").all_inner_texts()
    assert channels and all(text.startswith("sms") for text in channels)

    # A person found by phone, written with spaces; addresses masked.
    someone = next(p for p in rows(stack.db, ProfileRecord) if p.phone)
    await page.get_by_role("link", name="People").click()
    await page.get_by_label("User id, email, phone or WeChat openid").fill(
        f"{someone.phone[:3]} {someone.phone[3:7]} {someone.phone[7:]}"
    )
    await page.get_by_role("button", name="Look up").click()
    await expect(page.get_by_role("heading", name=someone.user_id)).to_be_visible()
    await expect(page.get_by_role("heading", name="Timeline")).to_be_visible()
    body = await page.content()
    assert someone.phone not in body and someone.phone[-4:] in body
    assert await page.get_by_role("button", name="Reveal addresses").count() == 0

    # The preview: every variant; the email in a sandboxed frame; SMS encoding and segments.
    await page.goto(f"{stack.url}/console/preview?template=cart_reminder")
    frames = page.locator("iframe.email")
    assert await frames.count() == 2
    assert await frames.first.get_attribute("sandbox") == ""
    await expect(page.frame_locator("iframe.email").first.get_by_text("Return to my cart").first).to_be_visible()
    await page.goto(f"{stack.url}/console/preview?template=cart_last_call")
    await expect(page.get_by_text(re.compile(r"GSM-7|UCS-2")).first).to_be_visible()
    await expect(page.get_by_role("heading", name="wechat · base")).to_be_visible()

    # Role refusals: the confirm page, and a forged form with the viewer's own token.
    await page.goto(f"{stack.url}/console/journeys/welcome_series/pause")
    await expect(page.get_by_role("alert")).to_contain_text("needs the operator role")
    token = await page.locator('input[name="csrf"]').first.get_attribute("value")
    refused = await page.request.post(
        f"{stack.url}/console/person/reveal", form={"csrf": token or "", "id": someone.user_id}
    )
    assert refused.status == 403 and "needs the admin role" in await refused.text()
    assert PausedJourneys(stack.db).all() == frozenset()


async def test_an_operator_pauses_and_resumes_a_journey_and_ends_a_run(stack: Stack) -> None:
    page = await stack.page("operator")
    await page.goto(f"{stack.url}/console/journeys/welcome_series")
    await page.get_by_role("link", name="Pause journey").click()
    await expect(page.get_by_role("heading", name=re.compile(r"^Pause Welcome series\?$"))).to_be_visible()
    await page.get_by_role("button", name="Pause journey").click()
    await expect(page.get_by_role("status")).to_contain_text("This journey is paused")
    await expect(page.get_by_role("status")).to_contain_text("by operator@example.com")

    paused_user = new_user()
    answer = await stack.track(paused_user, "Signed Up")
    assert answer["skipped"] == ["welcome_series"] and answer["skip_reasons"] == {"welcome_series": "journey_paused"}
    assert answer["triggered"] == []

    await page.get_by_role("link", name="Resume journey").click()
    await page.get_by_role("button", name="Resume journey").click()
    await expect(page.locator(".badge.live").first).to_be_visible()
    user = new_user()
    answer = await stack.track(user, "Signed Up")
    assert answer["skipped"] == [] and len(answer["triggered"]) == 1  # type: ignore[arg-type]
    [run] = await eventually(
        lambda: [r for r in rows(stack.db, RunRecord, user_id=user) if r.step], timeout=20, what="the run to wait"
    )
    assert rows(stack.db, RunRecord, user_id=paused_user) == []
    assert [e.action for e in rows(stack.db, AuditRecord)] == ["pause", "resume"]

    await page.goto(f"{stack.url}/console/person?id={quote(user)}")
    await page.get_by_role("link", name="End run").click()
    await page.get_by_role("button", name="End run").click()
    await expect(page.get_by_role("heading", name=user)).to_be_visible()
    [ended] = await eventually(
        lambda: rows(stack.db, RunRecord, run_id=run.run_id, status="ended"), timeout=20, what="the run to end"
    )
    assert ended.end_reason == "ended_by_operator"
    [entry] = rows(stack.db, AuditRecord, action="end_run")
    assert entry.actor == "console:operator@example.com" and entry.details["outcome"] == "stopped"


async def test_an_operator_forgets_a_person_and_a_forged_form_changes_nothing(stack: Stack) -> None:
    person = new_user()
    await stack.track(person, "Signed Up")
    await eventually(
        lambda: [r for r in rows(stack.db, RunRecord, user_id=person) if r.step], timeout=20, what="the run to wait"
    )
    page = await stack.page("operator")
    await page.goto(f"{stack.url}/console/person/forget?id={quote(person)}")
    await page.evaluate("document.querySelector('main input[name=csrf]').value = 'forged'")
    await page.get_by_role("button", name="Forget this person").click()
    await expect(page.get_by_role("heading", name="Form expired")).to_be_visible()
    assert rows(stack.db, ProfileRecord, user_id=person)

    await page.goto(f"{stack.url}/console/person/forget?id={quote(person)}")
    await page.get_by_role("button", name="Forget this person").click()
    await expect(page.get_by_role("status")).to_contain_text("Audit entry")
    assert rows(stack.db, ProfileRecord, user_id=person) == []
    assert rows(stack.db, RunRecord, user_id=person) == []
    [run] = [r for r in rows(stack.db, RunRecord, journey="welcome_series") if r.end_reason == "forgotten"]
    assert run.user_id == "" or run.user_id is None
    [entry] = rows(stack.db, AuditRecord, action="forget")
    assert entry.actor == "console:operator@example.com"


async def test_an_admin_reveals_an_address_and_it_is_audited(stack: Stack) -> None:
    someone = next(p for p in rows(stack.db, ProfileRecord) if p.email)
    page = await stack.page("admin")
    await page.goto(f"{stack.url}/console/person?id={quote(someone.user_id)}")
    assert someone.email not in await page.content()
    await page.get_by_role("button", name="Reveal addresses").click()
    await expect(page.get_by_text(someone.email or "").first).to_be_visible()
    await expect(page.get_by_role("status")).to_contain_text("written to the audit log")
    [entry] = rows(stack.db, AuditRecord, action="reveal")
    assert entry.actor == "console:admin@example.com"
