"""The local dev server helper (``nurture.service.devserver``): what it passes to
``temporal server start-dev`` reaches the server."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import RPCError

from nurture.service.devserver import ServerExited, dev_server, free_port, wait_until_answering


async def test_dynamic_configuration_values_reach_the_dev_server(tmp_path: Path) -> None:
    with dev_server(tmp_path, persist=False, config={"limit.maxIDLength": "40"}) as server:
        client = await Client.connect(server.address)
        short = await client.start_workflow("Anything", id=f"ok-{uuid.uuid4().hex[:8]}", task_queue="none")
        assert short.id.startswith("ok-")
        with pytest.raises(RPCError, match=r"(?i)length"):
            await client.start_workflow("Anything", id="x" * 41, task_queue="none")


def test_waiting_for_a_server_that_exits_fails_at_once_with_its_exit_code() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(0.5); sys.exit(3)"])
    try:
        began = time.monotonic()
        with pytest.raises(ServerExited, match="exited with 3 before answering") as raised:
            wait_until_answering(f"127.0.0.1:{free_port()}", process, timeout=60)
        assert raised.value.returncode == 3
        assert time.monotonic() - began < 30  # not the 60 s limit
    finally:
        process.kill()
        process.wait()


def test_waiting_for_a_server_that_never_answers_times_out() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(TimeoutError, match=r"did not answer within 1s"):
            wait_until_answering(f"127.0.0.1:{free_port()}", process, timeout=1)
    finally:
        process.kill()
        process.wait()
