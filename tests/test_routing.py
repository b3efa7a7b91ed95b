"""Routing on SQLite and PostgreSQL with a real Temporal dev server: concurrent first triggers all
succeed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import httpx
import pytest
from support import new_user, rows
from temporalio.client import Client
from test_api import Api, serving

from nurture.language.compiler import Project
from nurture.service.ingest import workflow_id
from nurture.storage.db import Database
from nurture.storage.models import Route
from nurture.storage.stores import Routes


@pytest.fixture(scope="module")
async def temporal_client(dev_server: str) -> Client:
    return await Client.connect(dev_server)


@pytest.fixture
async def api(project: Project, database: Database, temporal_client: Client) -> AsyncIterator[Api]:
    async with serving(project, database, temporal_client) as api:
        yield api


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
