"""The API keeps an idle connection open longer than clients' own pools do, so a client never sends
a call on a connection the server is closing (under load that was a dropped call: httpx.ReadError)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nurture.service.api import KEEP_ALIVE, serve
from nurture.service.devserver import free_port, wait_for_port
from nurture.service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
REQUEST = b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"


@pytest.fixture
def api_port(tmp_path: Path) -> Iterator[int]:
    settings = Settings(
        write_keys=("keep-alive-write-key",),
        temporal_address="127.0.0.1:1",  # never reached: /openapi.json needs no Temporal
        database=f"sqlite:///{tmp_path / 'nurture.db'}",
        journeys=ROOT / "journeys",
        templates=ROOT / "templates",
    )
    port = free_port()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(serve(settings, port=port, stop=stop)))
    thread.start()
    try:
        wait_for_port(port)
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


def _read(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection")
    return chunk


def _response(sock: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _read(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += _read(sock)
    return head


def test_an_idle_connection_outlives_a_client_pools_idle_time(api_port: int) -> None:
    assert KEEP_ALIVE > 30
    with socket.create_connection(("127.0.0.1", api_port), timeout=10) as sock:
        sock.sendall(REQUEST)
        assert _response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # past uvicorn's default of 5 s, which closed it
        sock.sendall(REQUEST)
        assert _response(sock).startswith(b"HTTP/1.1 200")
