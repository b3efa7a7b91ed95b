"""Routing on SQLite and PostgreSQL with a real Temporal dev server: concurrent first triggers all
succeed, and workflow ids fit Temporal's limit whatever the user id and key.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from support import eventually, new_user, rows
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from test_api import Api, serving

from nurture.engine.interpreter import WORKFLOW_ID_LIMIT, workflow_id
from nurture.language.compiler import Project
from nurture.storage.db import Database
from nurture.storage.models import Route, RunRecord
from nurture.storage.stores import Routes


@pytest.fixture(scope="module")
async def temporal_client(dev_server: str) -> Client:
    return await Client.connect(dev_server)


@pytest.fixture
async def api(project: Project, database: Database, temporal_client: Client) -> AsyncIterator[Api]:
    async with serving(project, database, temporal_client) as api:
        yield api


async def status(client: Client, wid: str) -> WorkflowExecutionStatus | None:
    try:
        return (await client.get_workflow_handle(wid).describe()).status
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return None


# Concurrent first triggers ------------------------------------------------------------------


def test_concurrent_route_activations_of_one_workflow_all_succeed(database: Database) -> None:
    routes, errors = Routes(database), []
    barrier = threading.Barrier(12)

    def activate(index: int) -> None:
        barrier.wait()
        try:
            routes.activate("wf-1", user_id="u1", journey="j", key="", listens=[f"E{index % 2}"])
        except Exception as exc:  # collected: the assertion below names them
            errors.append(exc)

    threads = [threading.Thread(target=activate, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    [route] = rows(database, Route, workflow_id="wf-1")
    assert route.active and route.listens in (["E0"], ["E1"])


async def test_concurrent_first_triggers_of_one_run_all_succeed(api: Api) -> None:
    user = new_user()
    wid = workflow_id("cart_abandonment", user, "c-1")

    async def update_cart(count: int) -> httpx.Response:
        return await api.post(
            "/v1/track",
            {"userId": user, "event": "Cart Updated", "properties": {"cart_id": "c-1", "item_count": count}},
        )

    answers = await asyncio.gather(*(update_cart(count) for count in range(1, 17)))

    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200]
    assert all(a.json()["triggered"] == [wid] for a in answers)
    assert [r.workflow_id for r in rows(api.db, Route, user_id=user)] == [wid]


# Workflow ids ---------------------------------------------------------------------------------


def test_workflow_ids_are_readable_when_they_fit_and_always_fit() -> None:
    assert workflow_id("welcome_series", "ada@example.com", "") == "nurture/welcome_series/ada%40example.com/"
    long_key, accents = "k" * 1500, "é" * 163
    for user, key in ((accents, ""), ("u1", long_key), (accents * 2, long_key), ("a/b", "é" * 600)):
        wid = workflow_id("cart_abandonment", user, key)
        assert len(wid.encode()) <= WORKFLOW_ID_LIMIT, (len(wid), user[:5], key[:5])
        assert wid.startswith("nurture/cart_abandonment/") and wid == workflow_id("cart_abandonment", user, key)
    # The hash keeps ids of values that share their kept prefix apart.
    assert workflow_id("j", "u", long_key + "1") != workflow_id("j", "u", long_key + "2")
    assert workflow_id("j", accents + "a", "") != workflow_id("j", accents + "b", "")
    short = workflow_id("j", "u", long_key)
    assert short.startswith("nurture/j/u/kkkk") and "#" in short


async def test_long_user_ids_and_keys_start_runs_that_keep_them_in_full(api: Api) -> None:
    accents = "é" * 163 + uuid.uuid4().hex[:8]
    long_order = "o-" + "9" * 1500 + uuid.uuid4().hex
    identify = await api.post("/v1/identify", {"userId": accents, "traits": {"email": "e@example.com"}})
    assert identify.status_code == 200, identify.text

    signed_up = await api.post("/v1/track", {"userId": accents, "event": "Signed Up"})
    ordered = await api.post(
        "/v1/track", {"userId": accents, "event": "Order Completed", "properties": {"order_id": long_order}}
    )

    assert (signed_up.status_code, ordered.status_code) == (200, 200), (signed_up.text, ordered.text)
    welcome, purchase = workflow_id("welcome_series", accents, ""), workflow_id("post_purchase", accents, long_order)
    assert signed_up.json()["triggered"] == [welcome] and ordered.json()["triggered"] == [purchase]
    for wid in (welcome, purchase):
        assert len(wid) <= WORKFLOW_ID_LIMIT
        assert await status(api.temporal, wid) is not None
    [run] = await eventually(lambda: rows(api.db, RunRecord, workflow_id=purchase), timeout=10, what="run record")
    assert (run.user_id, run.key) == (accents, long_order)
    assert [r.key for r in rows(api.db, Route, workflow_id=purchase)] == [long_order]
