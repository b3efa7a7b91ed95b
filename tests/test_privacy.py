"""Forgetting and exporting a user: ``DELETE /v1/users/{id}``, ``GET /v1/users/{id}/export`` and
``nurture forget``/``export``, on SQLite and PostgreSQL. After a forget no column of any table
holds the user's id, addresses or name, the message counts are unchanged, and the audit log
records it under a hash; with a real Temporal dev server, a sleeping run ends as ``forgotten``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import inspect, select
from sqlmodel import SQLModel
from support import eventually, messages, new_user, rows
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from nurture.cli.main import main
from nurture.engine.identity import call_identifiers
from nurture.language.compiler import Project
from nurture.service.api import create_app
from nurture.service.devserver import free_port
from nurture.service.ingest import workflow_id
from nurture.service.privacy import key_fingerprint
from nurture.service.settings import Settings
from nurture.service.worker import build_worker
from nurture.storage.audit import AuditRecord, subject_hash, subject_hashes
from nurture.storage.db import Database
from nurture.storage.identities import DbIdentities
from nurture.storage.models import (
    EventRecord,
    EventRow,
    IdentityRecord,
    MessageEvent,
    MessageRecord,
    ProfileRecord,
    Route,
    RunRecord,
)
from nurture.storage.stores import DbProfiles, has_run

KEY = "privacy-test-key-0123"
ADMIN_KEY = "privacy-admin-key-0123"
READ_KEY = "privacy-read-key-0123"
SECRET = "privacy-test-secret-0123456789"
NOW = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Person:
    user: str
    email: str
    phone: str
    openid: str
    first_name: str

    def needles(self) -> list[str]:
        """Everything that identifies them, including the user id as workflow ids quote it."""
        return [self.user, quote(self.user, safe=""), self.email, self.phone, self.openid, self.first_name]


def person() -> Person:
    tag = uuid.uuid4().hex[:8]
    digits = str(uuid.uuid4().int)[:8]
    return Person(
        user=f"u.{tag}@example.com",  # an email as user id: quoted in workflow ids
        email=f"li.{tag}@example.org",
        phone=f"+86139{digits}",
        openid=f"oWx{tag}OPENID",
        first_name=f"Xiaoli{tag}",
    )


def seed(db: Database, p: Person, *, active: bool = False) -> None:
    """Rows about ``p`` in every table that can hold them: two runs (the cart run active when
    ``active``), two sent messages and four provider events found four different ways."""
    traits = {
        "email": p.email,
        "phone": p.phone,
        "wechat_openid": p.openid,
        "first_name": p.first_name,
        "plan": "pro",
    }
    tag = uuid.uuid4().hex[:8]
    welcome, cart = workflow_id("welcome_series", p.user, ""), workflow_id("cart_abandonment", p.user, "c-1")
    with db.session() as session:
        session.add(
            ProfileRecord(
                user_id=p.user,
                traits=traits,
                email=p.email,
                phone=p.phone,
                wechat_openid=p.openid,
                opted_out=["sms"],
            )
        )
        # Their identifiers, as the identity migration or the event API keep them.
        for kind, value in (("user_id", p.user), ("email", p.email), ("phone", p.phone), ("wechat_openid", p.openid)):
            session.add(IdentityRecord(kind=kind, value=value, person_id=p.user))
        session.add(
            EventRecord(
                message_id=f"i-{tag}", kind="identify", user_id=p.user, properties=traits, timestamp=NOW
            )
        )
        session.add(
            EventRecord(
                message_id=f"t-{tag}",
                kind="track",
                user_id=p.user,
                name="Cart Updated",
                properties={"cart_id": "c-1", "item_count": 1, "note": f"gift for {p.first_name}"},
                timestamp=NOW,
            )
        )
        for wid, journey, key, run_active in (
            (welcome, "welcome_series", "", False),
            (cart, "cart_abandonment", "c-1", active),
        ):
            session.add(
                RunRecord(
                    run_id=f"{journey}-{tag}",
                    workflow_id=wid,
                    journey=journey,
                    version="v1",
                    user_id=p.user,
                    key=key,
                    status="active" if run_active else "ended",
                    entered_at=NOW,
                    ended_at=None if run_active else NOW + timedelta(hours=1),
                    end_reason=None if run_active else "goal",
                    variants={"subject": "a"},
                    converted_at=None if run_active else NOW + timedelta(hours=1),
                )
            )
            session.add(
                Route(
                    workflow_id=wid,
                    user_id=p.user,
                    journey=journey,
                    key=key,
                    listens=["Order Completed"],
                    active=run_active,
                )
            )
        session.add(
            MessageRecord(
                idempotency_key=f"welcome_series-{tag}:welcome",
                run_id=f"welcome_series-{tag}",
                user_id=p.user,
                journey="welcome_series",
                step_id="welcome",
                channel="email",
                template="welcome",
                provider="outbox",
                provider_id=f"outbox-e{tag}",
                status="sent",
                category="marketing",
                address=p.email,
                subject=f"Welcome, {p.first_name}!",
                preview=f"Hi {p.first_name}, glad you are here",
                content={"html": f"<p>Hi {p.first_name}</p>", "text": f"Hi {p.first_name} <{p.email}>"},
                attempts=[{"channel": "email", "provider": "outbox", "state": "sent"}],
                sent_at=NOW,
            )
        )
        session.add(
            MessageRecord(
                idempotency_key=f"cart_abandonment-{tag}:last_call_sms",
                run_id=f"cart_abandonment-{tag}",
                user_id=p.user,
                journey="cart_abandonment",
                step_id="last_call_sms",
                channel="sms",
                template="cart_last_call",
                provider="outbox",
                provider_id=f"outbox-s{tag}",
                status="sent",
                category="marketing",
                address=p.phone,
                preview=f"{p.first_name}, your cart",
                content={"text": f"{p.first_name}, your cart is waiting"},
                sent_at=NOW,
            )
        )
        events = [
            MessageEvent(
                provider="nurture", event="unsubscribe", user_id=p.user, at=NOW, data={"channel": "email"}
            ),
            MessageEvent(
                provider="sendgrid",
                event="open",
                idempotency_key=f"welcome_series-{tag}:welcome",
                at=NOW,
                data={"email": p.email, "sg_event_id": f"sg-{tag}"},
            ),
            MessageEvent(
                provider="twilio",
                event="delivered",
                provider_id=f"outbox-s{tag}",
                at=NOW,
                data={"status": "delivered"},
            ),
            # Inbound, unattributed (the number was on several profiles): only the payload names them.
            MessageEvent(
                provider="twilio",
                event="inbound",
                provider_event_id=f"SM{tag}",
                at=NOW,
                data={"from": p.phone, "body": "hello", "users": [p.user]},
            ),
        ]
        session.add_all(events)


def leftovers(db: Database, needles: list[str]) -> list[str]:
    """``table.column: needle`` for every text or JSON value, in every table, containing a needle."""
    found = []
    with db.engine.connect() as connection:
        existing = set(inspect(connection).get_table_names()) - {"alembic_version"}
        tables = [t for t in SQLModel.metadata.sorted_tables if t.name in existing]
        assert existing == {t.name for t in tables}, "a table the scan does not know about"
        for table in tables:
            # Every column, judged by its values: column types (sqlmodel's AutoString is no String
            # subclass) would let a text column slip through.
            for row in connection.execute(select(table)):
                for column, value in zip(table.columns, row, strict=True):
                    if isinstance(value, str):
                        text = value
                    elif isinstance(value, dict | list):
                        text = json.dumps(value)
                    else:
                        continue
                    found += [
                        f"{table.name}.{column.name}: {n}" for n in needles if n.lower() in text.lower()
                    ]
    return found


def counts(db: Database) -> Counter[tuple[str, str, str, str]]:
    """Messages by (journey, template, channel, status): what the statistics count."""
    return Counter((m.journey, m.template, m.channel, m.status) for m in rows(db, MessageRecord))


def only_counts(value: Any) -> bool:
    if isinstance(value, dict):
        return all(only_counts(v) for v in value.values())
    return isinstance(value, int)


def closed_address() -> str:
    """Where no Temporal listens: an outage."""
    return f"127.0.0.1:{free_port()}"


@asynccontextmanager
async def api(
    db: Database,
    project: Project,
    *,
    client: Client | None = None,
    temporal: str | None = None,
    queue: str = "test-privacy",
) -> AsyncIterator[httpx.AsyncClient]:
    """The event API on ``db``, called with the admin key; Temporal unreachable unless ``client``
    and ``temporal`` are given."""
    settings = Settings(
        write_keys=(KEY,),
        read_keys=(READ_KEY,),
        admin_keys=(ADMIN_KEY,),
        database=db.url,
        secret=SECRET,
        temporal_address=temporal or closed_address(),
        task_queue=queue,
    )
    app = create_app(settings, project=project, db=db, client=client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://nurture", auth=(ADMIN_KEY, "")
    ) as http:
        yield http


# Storage ---------------------------------------------------------------------------------------


def test_the_migration_adds_the_audit_log(database: Database) -> None:
    columns = {c["name"] for c in inspect(database.engine).get_columns("audit_log")}
    assert columns == {"id", "at", "action", "subject", "actor", "details"}
    database.migrate()  # idempotent


def test_the_subject_is_a_one_way_hash_keyed_by_the_secret() -> None:
    plain = subject_hash("u-1")
    keyed = subject_hash("u-1", SECRET)
    assert plain == hashlib.sha256(b"u-1").hexdigest() and len(keyed) == 64
    assert (
        keyed != plain and keyed != subject_hash("u-1", SECRET + "x") and keyed != subject_hash("u-2", SECRET)
    )
    assert subject_hashes("u-1", SECRET) == [keyed, plain] and subject_hashes("u-1") == [plain]


# The API ---------------------------------------------------------------------------------------


async def test_export_then_forget_leaves_nothing_but_counts(database: Database, project: Project) -> None:
    p, bystander = person(), person()
    seed(database, p)
    seed(database, bystander)
    # A visitor who browsed before signing in, merged into p: forgetting p forgets them too.
    anon, visitor_name = f"anon-{uuid.uuid4().hex}", f"Visitor{uuid.uuid4().hex[:8]}"
    store = DbIdentities(database, secret=SECRET)
    page = EventRow(
        message_id=f"p-{anon}", kind="track", name="Page Viewed", properties={"who": visitor_name},
        timestamp=NOW, anonymous_id=anon,
    )
    store.apply(call_identifiers(None, anon), at=NOW, record=page, traits={"nickname": visitor_name})
    merged = store.apply(call_identifiers(p.user, anon), at=NOW)
    assert merged is not None and merged.plan.merges == ((p.user, f"anonymous_id:{anon}"),)
    needles = [*p.needles(), anon, visitor_name]
    assert all(leftovers(database, [needle]) for needle in needles), "the scan finds every needle"
    before = counts(database)

    async with api(database, project) as http:
        exported = await http.get(f"/v1/users/{p.user}/export")
        assert exported.status_code == 200, exported.text
        data = exported.json()
        assert data["user_id"] == p.user and data["profile"]["traits"]["first_name"] == p.first_name
        assert data["profile"]["opted_out"] == ["sms"] and data["profile"]["wechat_openid"] == p.openid
        assert sorted(e["kind"] for e in data["events"]) == ["identify", "track", "track"]
        assert data["merged"] == [f"anonymous_id:{anon}"]
        assert {(i["kind"], i["value"]) for i in data["identifiers"]} == {
            ("user_id", p.user),
            ("anonymous_id", anon),
            ("email", p.email),
            ("phone", p.phone),
            ("wechat_openid", p.openid),
        }
        assert {r["journey"] for r in data["runs"]} == {"welcome_series", "cart_abandonment"}
        assert len(data["routes"]) == 2
        assert {(m["channel"], m["address"]) for m in data["messages"]} == {
            ("email", p.email),
            ("sms", p.phone),
        }
        assert any(p.first_name in (m["content"] or {}).get("text", "") for m in data["messages"])
        assert sorted(e["event"] for e in data["message_events"]) == [
            "delivered",
            "inbound",
            "open",
            "unsubscribe",
        ]
        assert bystander.email not in exported.text and bystander.user not in exported.text
        assert [a["action"] for a in data["audit"]] == ["merge", "export"]
        audit = data["audit"][1]
        assert (audit["action"], audit["actor"]) == ("export", key_fingerprint(ADMIN_KEY))
        assert audit["details"] == {
            "profiles": 1,
            "events": 3,
            "runs": 2,
            "routes": 2,
            "messages": 2,
            "message_events": 4,
        }

        forgotten = await http.delete(f"/v1/users/{p.user}")

        assert forgotten.status_code == 200, forgotten.text
        report = forgotten.json()
        assert report["deleted"] == {
            "profiles": 2,
            "identifiers": 5,
            "events": 3,
            "routes": 2,
            "message_events": 4,
        }
        assert report["anonymized"] == {"messages": 2, "runs": 2}
        # Temporal is down, which is fine without active runs: the histories await retention.
        assert report["temporal"] == {
            "stopped": 0,
            "terminated": 0,
            "histories_deleted": 0,
            "histories_kept": 2,
        }
        assert leftovers(database, needles) == []
        assert counts(database) == before, "the message counts per journey stay"
        assert rows(database, ProfileRecord, user_id=bystander.user), "nobody else is touched"
        assert len(leftovers(database, [bystander.email])) >= 4
        assert [r.end_reason for r in rows(database, RunRecord, user_id="")] == ["goal", "goal"]
        assert all(r.converted_at is not None for r in rows(database, RunRecord, user_id=""))

        entries = rows(database, AuditRecord)
        assert [e.action for e in entries] == ["merge", "export", "forget"]
        assert {e.subject for e in entries} == {subject_hash(p.user, SECRET)}
        assert entries[0].actor == "api"  # the merge: an event call did it
        assert all(e.actor == key_fingerprint(ADMIN_KEY) and ADMIN_KEY not in e.actor for e in entries[1:])
        assert entries[2].id == report["audit_id"] and only_counts(entries[2].details)

        again = await http.delete(f"/v1/users/{p.user}")
        assert again.status_code == 200, "a retried erasure request is safe"
        assert again.json()["deleted"] == {
            "profiles": 0,
            "identifiers": 0,
            "events": 0,
            "routes": 0,
            "message_events": 0,
        }
        assert again.json()["anonymized"] == {"messages": 0, "runs": 0}
        after = (await http.get(f"/v1/users/{p.user}/export")).json()

    assert after["profile"] is None
    assert [after[k] for k in ("events", "runs", "routes", "messages", "message_events")] == [[]] * 5
    assert [e["action"] for e in after["audit"]] == ["merge", "export", "forget", "forget", "export"]
    assert DbIdentities(database).resolve("anonymous_id", anon) is None, "every identifier is forgotten"
    assert counts(database) == before
    # A later event for the same id starts from scratch.
    assert DbProfiles(database).read(p.user).traits == {}
    assert not has_run(database, "cart_abandonment", p.user, "c-1")


@pytest.mark.parametrize(
    ("auth", "status"),
    [(None, 401), (("wrong-key", ""), 401), ((KEY, ""), 403), ((READ_KEY, ""), 403)],
    ids=["no-key", "wrong-key", "write-key", "read-key"],
)
async def test_both_need_an_admin_key(
    database: Database, project: Project, auth: tuple[str, str] | None, status: int
) -> None:
    p = person()
    seed(database, p)
    async with api(database, project) as http:
        for method in ("GET", "DELETE"):
            path = f"/v1/users/{p.user}" + ("/export" if method == "GET" else "")
            answer = await http.request(method, path, auth=auth)  # type: ignore[arg-type]
            assert answer.status_code == status, answer.text
            if status == 403:
                assert answer.json()["error"] == "forbidden"
                assert "needs an admin key (NURTURE_ADMIN_KEYS)" in answer.json()["message"]
            else:
                assert answer.json()["error"] == "unauthorized"
    assert rows(database, ProfileRecord, user_id=p.user) and rows(database, AuditRecord) == []


async def test_a_temporal_outage_with_active_runs_is_a_503_that_changes_nothing(
    database: Database, project: Project
) -> None:
    p = person()
    seed(database, p, active=True)
    before = leftovers(database, p.needles())

    async with api(database, project) as http:
        answer = await http.delete(f"/v1/users/{p.user}")

    assert answer.status_code == 503, answer.text
    assert answer.headers["Retry-After"] and "nothing was forgotten" in answer.json()["message"]
    assert p.user not in answer.text
    assert leftovers(database, p.needles()) == before
    assert rows(database, AuditRecord) == []


async def test_openapi_documents_both(database: Database, project: Project) -> None:
    async with api(database, project) as http:
        doc = (await http.get("/openapi.json")).json()
    forget = doc["paths"]["/v1/users/{user_id}"]["delete"]
    export = doc["paths"]["/v1/users/{user_id}/export"]["get"]
    assert forget["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ForgetReport"
    )
    assert export["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/UserExport")
    assert {"401", "503"} <= set(forget["responses"]) and "idempotent" in forget["description"].lower()
    assert "forgotten" in forget["description"]


# With Temporal -----------------------------------------------------------------------------------


async def closed(temporal: Client, wid: str) -> bool:
    """Whether the workflow no longer runs: completed, or already deleted (Temporal deletes
    histories asynchronously; the dev server takes about half a minute)."""
    try:
        description = await temporal.get_workflow_handle(wid).describe()
    except RPCError as exc:
        return exc.status == RPCStatusCode.NOT_FOUND
    return description.status == WorkflowExecutionStatus.COMPLETED


async def test_forget_ends_sleeping_runs_as_forgotten(
    dev_server: str, database: Database, project: Project
) -> None:
    temporal = await Client.connect(dev_server)
    user = new_user()
    queue = f"test-privacy-{uuid.uuid4().hex[:10]}"  # its own worker: no other test's runs
    async with (
        api(database, project, client=temporal, temporal=dev_server, queue=queue) as http,
        build_worker(temporal, project, database, queue),
    ):
        traits = {
            "phone": "+8613900001111",
            "email": "fei@example.com",
            "first_name": "Feiyu",
            "timezone": "UTC",
        }
        write = httpx.BasicAuth(KEY, "")
        assert (
            await http.post("/v1/identify", json={"userId": user, "traits": traits}, auth=write)
        ).status_code == 200
        order = {"order_id": "o-1", "total": 49}
        assert (
            await http.post(
                "/v1/track",
                json={"userId": user, "event": "Order Completed", "properties": order},
                auth=write,
            )
        ).status_code == 200
        cart = {
            "userId": user,
            "event": "Cart Updated",
            "properties": {"cart_id": "c-1", "item_count": 1},
        }
        assert (await http.post("/v1/track", json=cart, auth=write)).status_code == 200

        def both_running() -> list[RunRecord]:
            found = [r for r in rows(database, RunRecord, user_id=user) if r.status == "active"]
            return found if len(found) == 2 and messages(database, user_id=user) else []

        runs = await eventually(both_running, timeout=10, what="two sleeping runs and the order SMS")
        with database.session() as session:  # a route whose workflow Temporal never had
            session.add(Route(workflow_id=f"nurture/gone/{user}/", user_id=user, journey="gone", active=True))
        sent = len(rows(database, MessageRecord))

        answer = await http.delete(f"/v1/users/{user}")

        assert answer.status_code == 200, answer.text
        report = answer.json()
        assert report["temporal"]["stopped"] == 2 and report["temporal"]["terminated"] == 0
        assert report["temporal"]["histories_deleted"] == 2
        assert report["deleted"]["routes"] == 3 and report["deleted"]["profiles"] == 1
        for run in runs:
            [ended] = rows(database, RunRecord, run_id=run.run_id)
            assert (ended.status, ended.end_reason, ended.user_id, ended.workflow_id) == (
                "ended",
                "forgotten",
                "",
                "",
            )
            assert await closed(temporal, run.workflow_id), "the workflow ended itself"
        await asyncio.sleep(0.5)
        assert len(rows(database, MessageRecord)) == sent, "nothing more is sent"
        assert rows(database, ProfileRecord, user_id=user) == [], "no activity wrote the profile back"
        assert leftovers(database, [user, "fei@example.com", "+8613900001111", "Feiyu"]) == []

        # The same id later starts from scratch, and forgetting again ends that run too.
        again = await http.post("/v1/track", json=cart, auth=write)
        assert again.json()["triggered"] == [workflow_id("cart_abandonment", user, "c-1")]
        await eventually(lambda: rows(database, RunRecord, user_id=user), what="a fresh run")
        second = await http.delete(f"/v1/users/{user}")
        assert second.status_code == 200 and second.json()["temporal"]["stopped"] == 1


# The command line --------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    db.dispose()
    yield tmp_path


def nurture(home: Path, *args: str, input: str | None = None) -> Result:
    env = {"DATABASE_URL": None, "NURTURE_SECRET": SECRET, "TEMPORAL_ADDRESS": closed_address()}
    return CliRunner().invoke(main, [*args, "--home", str(home)], input=input, env=env)


def test_cli_forget_without_temporal(home: Path) -> None:
    db = Database(f"sqlite:///{home / 'nurture.db'}")
    p = person()
    seed(db, p)

    refused = nurture(home, "forget", p.user, input="n\n")
    assert refused.exit_code == 1 and "a profile, 2 event(s), 2 run(s), 2 message(s)" in refused.stderr
    assert rows(db, ProfileRecord, user_id=p.user), "answering no changes nothing"

    done = nurture(home, "forget", p.user, "--yes")

    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["deleted"]["profiles"] == 1 and report["anonymized"] == {"messages": 2, "runs": 2}
    assert "retention" in done.stderr
    assert leftovers(db, p.needles()) == []
    [entry] = rows(db, AuditRecord)
    assert (entry.action, entry.actor, entry.subject) == ("forget", "cli", subject_hash(p.user, SECRET))
    db.dispose()


def test_cli_forget_with_active_runs_needs_temporal(home: Path) -> None:
    db = Database(f"sqlite:///{home / 'nurture.db'}")
    p = person()
    seed(db, p, active=True)

    result = nurture(home, "forget", p.user, "--yes")

    assert result.exit_code == 1
    assert "1 active run(s)" in result.stderr and "Temporal at 127.0.0.1:" in result.stderr
    assert "Nothing was forgotten" in result.stderr
    assert rows(db, ProfileRecord, user_id=p.user) and rows(db, AuditRecord) == []
    db.dispose()


def test_cli_export(home: Path) -> None:
    db = Database(f"sqlite:///{home / 'nurture.db'}")
    p = person()
    seed(db, p)
    out = home / "export.json"

    printed = nurture(home, "export", p.user)
    written = nurture(home, "export", p.user, "--out", str(out))

    assert printed.exit_code == 0 and written.exit_code == 0, printed.output + written.output
    assert json.loads(printed.stdout)["profile"]["email"] == p.email
    data = json.loads(out.read_text(encoding="utf-8"))
    assert len(data["messages"]) == 2 and [e["actor"] for e in data["audit"]] == ["cli", "cli"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert written.stdout == "" and p.email not in written.stderr
    db.dispose()


def test_cli_finds_the_user_by_any_identifier(home: Path) -> None:
    db = Database(f"sqlite:///{home / 'nurture.db'}")
    p = person()
    seed(db, p)
    anon = f"anon-{uuid.uuid4().hex}"
    store = DbIdentities(db)
    store.apply(call_identifiers(None, anon), at=NOW, traits={"seen": "browser"})
    store.apply(call_identifiers(p.user, anon), at=NOW)

    for option, value in (
        ("--email", p.email.upper()),
        ("--phone", p.phone),
        ("--anonymous-id", anon),
        ("--wechat-openid", p.openid),
        ("--person", f"anonymous_id:{anon}"),
    ):
        exported = nurture(home, "export", option, value)
        assert exported.exit_code == 0, exported.output
        data = json.loads(exported.stdout)
        assert data["user_id"] == p.user and data["merged"] == [f"anonymous_id:{anon}"], option
    both = nurture(home, "export", p.user, "--email", p.email)
    assert both.exit_code == 2 and "exactly one of --email" in both.stderr

    done = nurture(home, "forget", "--anonymous-id", anon, "--yes")

    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["deleted"]["profiles"] == 2
    assert leftovers(db, [*p.needles(), anon]) == []
    db.dispose()


def test_cli_refuses_a_missing_database(tmp_path: Path) -> None:
    result = nurture(tmp_path / "nowhere", "forget", "u-1", "--yes")
    assert result.exit_code == 1 and "no database at sqlite:///" in result.stderr
    assert not (tmp_path / "nowhere").exists()
