"""The local dev server helper (``nurture.service.devserver``): what it passes to
``temporal server start-dev`` reaches the server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from nurture.service.devserver import dev_server


async def test_dynamic_configuration_values_reach_the_dev_server(tmp_path: Path) -> None:
    with dev_server(tmp_path, persist=False, config={"limit.maxIDLength": "40"}) as server:
        client = await Client.connect(server.address)
        short = await client.start_workflow("Anything", id=f"ok-{uuid.uuid4().hex[:8]}", task_queue="none")
        assert short.id.startswith("ok-")
        with pytest.raises(RPCError, match=r"(?i)length"):
            await client.start_workflow("Anything", id="x" * 41, task_queue="none")
