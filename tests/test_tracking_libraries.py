"""Conformance: the tracking libraries engineers already use (Segment's and RudderStack's for
Python, Segment's for Node.js) pointed at the served API (uvicorn on loopback, SQLite, a real
Temporal dev server and worker), each call checked by its effect in the database."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics.client import Client as SegmentClient
from sqlmodel import select
from support import served_settings, uvicorn_thread
from temporalio.client import Client as TemporalClient

from nurture.language.compiler import Project
from nurture.service.api import create_app
from nurture.service.settings import Settings
from nurture.service.worker import build_worker
from nurture.storage.db import Database
from nurture.storage.identities import DbIdentities
from nurture.storage.models import EventRecord, GroupRecord, ProfileRecord, RunRecord

KEY = "libraries-write-key-0123"


@pytest.fixture
def settings(dev_server: str, tmp_path: Path) -> Settings:
    settings: Settings = served_settings(
        dev_server, f"sqlite:///{tmp_path / 'nurture.db'}", "test-libraries", write_keys=(KEY,)
    )
    return settings


@pytest.fixture
def url(settings: Settings) -> Iterator[str]:
    with uvicorn_thread(create_app(settings)) as url:
        yield url


@pytest.fixture
async def db(settings: Settings, project: Project, dev_server: str) -> AsyncIterator[Database]:
    """The API's database, with a worker running its journeys."""
    temporal = await TemporalClient.connect(dev_server)
    db = Database(settings.database)
    db.migrate()
    async with build_worker(temporal, project, db, settings.task_queue):
        yield db
    db.dispose()


def events(db: Database, user: str) -> dict[str, dict[str, Any]]:
    with db.session() as session:
        found = session.exec(select(EventRecord).where(EventRecord.user_id == user)).all()
    return {str(e.name): dict(e.properties) for e in found}


def traits(db: Database, user: str) -> dict[str, Any]:
    with db.session() as session:
        profile = session.get(ProfileRecord, user)
    assert profile is not None, f"no profile for {user}"
    return dict(profile.traits)


async def runs(db: Database, user: str) -> list[tuple[str, str]]:
    """The user's runs, once the trigger has started one (routing is done when the call returns,
    the run row is written by the workflow)."""
    for _ in range(100):
        with db.session() as session:
            found = session.exec(select(RunRecord).where(RunRecord.user_id == user)).all()
        if found:
            return [(r.journey, r.key) for r in found]
        await asyncio.sleep(0.1)
    return []


def check_effects(db: Database, user: str, library: str) -> str:
    """Every call's effect, on the person ``user`` became; that person's id."""
    store = DbIdentities(db)
    # The visitor was seen first: the identify with both ids merged the user into them, and the
    # alias's unknown previousId became one of their anonymous ids.
    person = store.resolve("user_id", user)
    assert person == f"anonymous_id:visitor-{user}", library
    assert store.resolve("anonymous_id", f"previous-{user}") == person, library
    expected = {"phone": "+8613800138000", "timezone": "Asia/Shanghai", "locale": "zh-CN", "first_name": "Li"}
    # The post_purchase journey may already have added last_order_id.
    assert {k: v for k, v in traits(db, person).items() if k in expected} == expected, library
    seen = events(db, person)
    assert seen["Course Viewed"] == {"course": "c-1"}, library  # sent anonymously
    assert seen["Order Completed"] == {"order_id": "o-1", "total": 10}, library
    assert seen["Page Viewed"] == {"url": "https://example.com/pricing", "name": "Pricing", "category": "Docs"}
    assert seen["Screen Viewed"] == {"name": "Settings"}, library
    with db.session() as session:
        profile = session.get(ProfileRecord, person)
        assert profile is not None and profile.group_id == f"acme-{user}", library
        group = session.get(GroupRecord, f"acme-{user}")
        assert group is not None and group.traits == {"plan": "enterprise"}, library
    return person


CONTEXT = {"timezone": "Asia/Shanghai", "locale": "zh-CN"}


def drive(client: SegmentClient | RudderClient, user: str) -> None:
    """Every call type, as an application would make them, then a flush: a visitor browses
    anonymously, signs in, buys, joins an account."""
    visitor = f"visitor-{user}"
    client.track(anonymous_id=visitor, event="Course Viewed", properties={"course": "c-1"})
    client.flush()  # the visitor is seen first
    client.identify(
        user, {"phone": "+8613800138000", "first_name": "Li"}, context=dict(CONTEXT), anonymous_id=visitor
    )
    client.track(user, "Order Completed", {"order_id": "o-1", "total": 10})
    client.page(user, "Docs", "Pricing", {"url": "https://example.com/pricing"})
    client.screen(user, name="Settings")
    client.group(user, f"acme-{user}", {"plan": "enterprise"})
    client.alias("previous-" + user, user)
    client.flush()


@pytest.mark.parametrize("library", ["segment", "rudderstack"])
async def test_the_python_libraries_reach_profiles_events_and_journeys(
    url: str, db: Database, library: str
) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    errors: list[Exception] = []
    client: SegmentClient | RudderClient
    if library == "segment":
        client = SegmentClient(KEY, host=url, gzip=True, on_error=lambda e, _: errors.append(e), max_retries=0)
    else:  # RudderStack gzips by default
        client = RudderClient(KEY, host=url, on_error=lambda e, _: errors.append(e), max_retries=0)

    await asyncio.to_thread(drive, client, user)
    await asyncio.to_thread(client.shutdown)

    assert errors == []
    person = check_effects(db, user, library)
    assert await runs(db, person) == [("post_purchase", "o-1")]


async def test_a_library_batch_with_one_bad_item_applies_the_others(url: str, db: Database) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    errors: list[Exception] = []
    client = RudderClient(KEY, host=url, on_error=lambda e, _: errors.append(e), max_retries=0)

    def calls() -> None:
        client.track(user, "Signed Up")
        client.identify(user, {"opted_out": ["fax"]})  # not a channel or topic: refused alone
        client.track(user, "Logged In")
        client.flush()

    await asyncio.to_thread(calls)
    await asyncio.to_thread(client.shutdown)

    assert errors == []
    assert set(events(db, user)) == {"Signed Up", "Logged In"}


NODE_SCRIPT = """
const { Analytics } = require('@segment/analytics-node');
const [host, key, user] = process.argv.slice(2);
const analytics = new Analytics({ writeKey: key, host, maxRetries: 0, flushAt: 10 });
const failures = [];
analytics.on('error', (e) => failures.push(String(e && (e.reason || e.message || e.code))));
const visitor = 'visitor-' + user;
analytics.track({ anonymousId: visitor, event: 'Course Viewed', properties: { course: 'c-1' } });
analytics.closeAndFlush({ timeout: 20000 }).then(() => {  // the visitor is seen first
  const signedIn = new Analytics({ writeKey: key, host, maxRetries: 0, flushAt: 10 });
  signedIn.on('error', (e) => failures.push(String(e && (e.reason || e.message || e.code))));
  signedIn.identify({ userId: user, anonymousId: visitor, traits: { phone: '+8613800138000', first_name: 'Li' },
                      context: { timezone: 'Asia/Shanghai', locale: 'zh-CN' } });
  signedIn.track({ userId: user, event: 'Order Completed', properties: { order_id: 'o-1', total: 10 } });
  signedIn.page({ userId: user, category: 'Docs', name: 'Pricing',
                  properties: { url: 'https://example.com/pricing' } });
  signedIn.screen({ userId: user, name: 'Settings' });
  signedIn.group({ userId: user, groupId: 'acme-' + user, traits: { plan: 'enterprise' } });
  signedIn.alias({ userId: user, previousId: 'previous-' + user });
  return signedIn.closeAndFlush({ timeout: 20000 });
}).then(() => {
  console.log(JSON.stringify({ failures }));
  process.exit(failures.length ? 1 : 0);
});
"""


@pytest.fixture(scope="module")
def analytics_node(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """@segment/analytics-node 3, installed from the npm registry into a temp dir."""
    npm, node = shutil.which("npm"), shutil.which("node")
    assert npm is not None and node is not None, "node and npm are needed to test @segment/analytics-node"
    where = tmp_path_factory.mktemp("analytics-node")
    installed = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(where), "@segment/analytics-node@3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, (
        "npm could not install @segment/analytics-node@3, so the Node.js library is UNTESTED:\n"
        + installed.stderr[-2000:]
    )
    (where / "send.js").write_text(NODE_SCRIPT)
    return where


async def test_segments_node_library_reaches_profiles_events_and_journeys(
    url: str, db: Database, analytics_node: Path
) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"

    sent = await asyncio.create_subprocess_exec(
        "node",
        str(analytics_node / "send.js"),
        url,
        KEY,
        user,
        cwd=analytics_node,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(sent.communicate(), 60)

    assert sent.returncode == 0, (out.decode(), err.decode())
    assert json.loads(out.decode().strip().splitlines()[-1]) == {"failures": []}
    person = check_effects(db, user, "analytics-node")
    assert await runs(db, person) == [("post_purchase", "o-1")]
