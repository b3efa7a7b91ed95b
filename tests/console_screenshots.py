"""Screenshots of every console page into docs/console/, on seeded data (see console_support).

    python tests/console_screenshots.py

Needs Chromium at /usr/bin/chromium (apt-get install chromium fonts-noto-cjk).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

from playwright.sync_api import Page, sync_playwright
from sqlmodel import select

sys.path.insert(0, str(Path(__file__).resolve().parent))

from console_support import ROOT, seed_console
from support import uvicorn_thread

from nurture.console import accounts
from nurture.console.app import create_app
from nurture.language.compiler import load_project
from nurture.service.settings import Settings
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord

CHROMIUM = "/usr/bin/chromium"
OUT = ROOT / "docs" / "console"
EMAIL, PASSWORD = "ana@example.com", "a calm console 1"


def sign_in(page: Page, url: str) -> None:
    page.goto(f"{url}/console/sign-in")
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/console/journeys")


def main() -> None:
    project = load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        db = Database(f"sqlite:///{folder}/nurture.db")
        db.migrate()
        users = seed_console(db, project, people=600)
        accounts.add_user(db, EMAIL, "admin", PASSWORD)
        settings = Settings(
            write_keys=("w" * 24,),
            database=db.url,
            journeys=ROOT / "journeys",
            templates=ROOT / "templates",
            temporal_address="127.0.0.1:1",
        )
        app = create_app(settings, project=project, db=db)
        with db.session() as session:
            skipped = session.exec(
                select(MessageRecord.user_id).where(MessageRecord.status == "skipped").limit(1)
            ).one()
        person = skipped or users[0]
        with uvicorn_thread(app) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            shots = [
                ("sign-in", "/console/sign-in", False),
                ("journeys", "/console/journeys", True),
                ("journey", "/console/journeys/chat_recovery?step=followup_email_a#step", True),
                (
                    "preview",
                    "/console/preview?template=chat_agent_contact&event=Chat+Interrupted"
                    "&properties=" + quote("{chat_id: chat-42, agent_name: Grace Liu, topic: billing}"),
                    True,
                ),
                (
                    "preview-email",
                    "/console/preview?template=cart_reminder&event=Cart+Updated"
                    "&properties=" + quote("{cart_id: c-7, item_count: 2, top_item: Intro to Photography}"),
                    True,
                ),
                ("people", "/console/people", True),
                ("person", f"/console/person?id={quote(person)}", True),
                ("messages", "/console/messages", True),
                ("pause", "/console/journeys/chat_recovery/pause", True),
            ]
            for width, suffix in ((1280, ""), (390, "-phone")):
                context = browser.new_context(viewport={"width": width, "height": 900}, device_scale_factor=1)
                page = context.new_page()
                signed = False
                for name, path, needs_session in shots:
                    if needs_session and not signed:
                        sign_in(page, url)
                        signed = True
                    page.goto(url + path)
                    page.wait_for_load_state("networkidle")
                    if suffix and name not in ("journey", "person", "journeys"):
                        continue
                    # The message log is as long as its page of 50: its first screen shows it.
                    page.screenshot(path=str(OUT / f"{name}{suffix}.png"), full_page=name != "messages")
                context.close()
            browser.close()
        db.dispose()
    print(f"screenshots in {OUT}")


if __name__ == "__main__":
    main()
