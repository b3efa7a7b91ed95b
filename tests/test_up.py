"""``nurture up``: the whole stack from one command, stopped by a signal, resumed by the next run.

Each test runs ``nurture up`` as a real process (``python -m nurture.cli.service up``) with a
temporary home and free ports, and talks to it the way a user would: the printed curl, the HTTP
API, ``nurture outbox``. The journeys are the repo's, with a ``nurture.yaml`` that sets no quiet
hours, so the welcome email goes out whatever the wall-clock hour.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT
from sqlmodel import col, select
from support import clean_env, send_request
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from nurture.cli.service import outbox
from nurture.cli.up import UpOptions, exposure_warnings, private_home, stack_settings
from nurture.language.templates import RenderedMessage
from nurture.service.devserver import free_port
from nurture.storage.db import Database
from nurture.storage.models import EventRecord, RunRecord
from nurture.storage.stores import DbLedger

BANNER_END = "Ctrl-C stops everything"
CART = "nurture/cart_abandonment/user-1/c1"
WELCOME = "nurture/welcome_series/user-1/"


class Up:
    """One ``nurture up`` process; its stdout is collected line by line, its stderr logged."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nurture.cli.service", "up", *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def banner(self, timeout: float = 60) -> str:
        """Everything printed up to the last banner line, once the stack is ready."""
        wait_until(
            lambda: (
                any(line.startswith(BANNER_END) for line in self.lines) or self.process.poll() is not None
            ),
            timeout,
            "the banner",
            self.log,
        )
        assert self.process.poll() is None, f"nurture up exited {self.process.returncode}:\n{tail(self.log)}"
        return "\n".join(self.lines)

    def stop(self, sig: signal.Signals, timeout: float = 60) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{tail(log)}" if log else ""))


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def listeners(port: int) -> set[str]:
    """The addresses a socket listens on at ``port``, from the kernel's tables."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host)  # in host byte order, 32 bits at a time
            flipped = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(flipped)))
    return found


def modes(directory: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()}


def outbox_cli(home: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "nurture.cli.service", "outbox", "--home", str(home), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def events(home: Path) -> list[EventRecord]:
    db = Database(f"sqlite:///{home / 'nurture.db'}")
    try:
        with db.session() as session:
            return list(session.exec(select(EventRecord)).all())
    finally:
        db.dispose()


def runs(home: Path) -> dict[str, RunRecord]:
    """The runs table by workflow id (the latest run of each)."""
    db = Database(f"sqlite:///{home / 'nurture.db'}")
    try:
        with db.session() as session:
            rows = session.exec(select(RunRecord).order_by(col(RunRecord.entered_at))).all()
            return {row.workflow_id: row for row in rows}
    finally:
        db.dispose()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Arguments for ``nurture up`` on a temp home, free ports and a quiet-hours-free project."""
    project = tmp_path / "project"
    journeys = project / "journeys"
    journeys.mkdir(parents=True)
    for path in (ROOT / "journeys").glob("*.yaml"):
        shutil.copy(path, journeys / path.name)
    # No quiet hours or caps; the project's topics, which the journeys name.
    topics = yaml.safe_load((ROOT / "nurture.yaml").read_text(encoding="utf-8"))["topics"]
    (project / "nurture.yaml").write_text(f"timezone: UTC\ntopics: {list(topics)}\n", encoding="utf-8")
    ports = {"api": free_port(), "temporal": free_port(), "ui": free_port()}
    home = tmp_path / "home"
    args = [
        "--home", str(home),
        "--port", str(ports["api"]),
        "--temporal-port", str(ports["temporal"]),
        "--ui-port", str(ports["ui"]),
        "--journeys", str(journeys),
        "--templates", str(ROOT / "templates"),
    ]  # fmt: skip
    started: list[Up] = []

    def up(*extra: str) -> Up:
        process = Up([*args, *extra], clean_env(), tmp_path / "up.log")
        started.append(process)
        return process

    yield {"up": up, "home": home, "ports": ports, "api": f"http://127.0.0.1:{ports['api']}", "args": args}
    for process in started:
        process.kill()


def curl_command(banner: str) -> str:
    """The printed curl example, as pasted into a shell."""
    lines = banner.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl") and "/v1/batch" in line)
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    return "\n".join(lines[start : end + 1])


async def test_up_serves_the_welcome_series_then_resumes_after_a_restart(stack: dict[str, Any]) -> None:
    home: Path = stack["home"]
    ports: dict[str, int] = stack["ports"]
    api: str = stack["api"]

    first: Up = stack["up"]()
    banner = first.banner()

    key, read_key, admin_key = (
        (home / f"{kind}_key").read_text().strip() for kind in ("write", "read", "admin")
    )
    for kind in ("write", "read", "admin"):
        assert stat.S_IMODE((home / f"{kind}_key").stat().st_mode) == 0o600
    assert len({key, read_key, admin_key}) == 3
    assert f"Write key     {key}   (new, saved in {home / 'write_key'}: sends events)" in banner
    assert f"Read key      {read_key}   (new, saved in {home / 'read_key'}: reads people" in banner
    assert f"Admin key     {admin_key}   (new, saved in {home / 'admin_key'}: reads, exports" in banner
    assert f"curl -sS -u {read_key}: {api}/v1/outbox" in banner
    assert f"API           {api}\n" in banner
    assert f"API docs      {api}/docs" in banner
    assert f"Temporal UI   http://127.0.0.1:{ports['ui']}" in banner
    assert httpx.get(f"{api}/docs", timeout=10).status_code == 200
    assert listening(ports["ui"])

    # The console is served at once; the printed link signs its first admin in, once.
    assert f"Console       {api}/console\n" in banner
    link = re.search(rf"Sign in       ({re.escape(api)}/console/link/\S+)", banner)
    assert link is not None and "as admin@localhost" in banner
    with httpx.Client(base_url=api, timeout=10) as browser:
        assert browser.get("/console/journeys").status_code == 303  # signed out
        signed = browser.get(link.group(1))
        assert signed.status_code == 303 and signed.headers["location"] == "/console/account"
        journeys = browser.get("/console/journeys")
        assert journeys.status_code == 200 and "Welcome series" in journeys.text
    assert httpx.get(link.group(1), timeout=10).status_code == 400  # once only

    # The printed curl, pasted into a shell, starts the welcome series.
    curl = subprocess.run(["sh", "-c", curl_command(banner)], capture_output=True, text=True, timeout=60)
    assert curl.returncode == 0, curl.stderr
    answer = json.loads(curl.stdout)
    assert [r["type"] for r in answer["results"]] == ["identify", "track"]
    assert answer["results"][1]["triggered"] == [WELCOME]

    auth = httpx.BasicAuth(key, "")
    reader = httpx.BasicAuth(read_key, "")

    def welcome_sent() -> bool:
        outbox = httpx.get(f"{api}/v1/outbox", auth=reader, timeout=10).json()
        return any(m["template"] == "welcome" for m in outbox)

    wait_until(welcome_sent, 20, "the welcome email in GET /v1/outbox", first.log)
    (email,) = httpx.get(f"{api}/v1/outbox", auth=reader, timeout=10).json()
    assert httpx.get(f"{api}/v1/outbox", auth=auth, timeout=10).status_code == 403, (
        "a write key does not read"
    )
    assert (email["channel"], email["step_id"], email["status"], email["address"]) == (
        "email",
        "welcome_email",
        "sent",
        "a***@example.com",
    )
    forgotten = httpx.request(
        "DELETE", f"{api}/v1/user", params={"id": "nobody"}, auth=httpx.BasicAuth(admin_key, "")
    )
    assert forgotten.status_code == 200, forgotten.text
    assert email["subject"] == "Welcome to Nurture Academy, Ada!"

    printed = outbox_cli(home)
    assert "email   a***@example.com  welcome  (welcome_series / welcome_email)" in printed
    assert "Subject: Welcome to Nurture Academy, Ada!" in printed
    assert "ada@example.com" not in printed
    (entry,) = json.loads(outbox_cli(home, "--json", "--limit", "5"))
    assert (entry["address"], entry["subject"]) == ("a***@example.com", email["subject"])
    assert "Ada" in entry["text"]

    # A cart run that sleeps its hour across the restart.
    tracked = httpx.post(
        f"{api}/v1/track",
        headers={"Authorization": f"Bearer {key}"},
        json={"userId": "user-1", "event": "Cart Updated", "properties": {"cart_id": "c1", "item_count": 1}},
        timeout=30,
    ).json()
    assert tracked["triggered"] == [CART]
    wait_until(lambda: CART in runs(home), 20, "the cart run to be recorded", first.log)
    cart_run = runs(home)[CART].run_id

    assert first.stop(signal.SIGINT) == 0
    log = tail(first.log, 200)
    assert (
        log.index("stopping the API")
        < log.index("worker stopped")
        < log.index("stopping the Temporal dev server")
    )
    for name, port in ports.items():
        assert not listening(port), f"{name} port {port} still open after nurture up stopped"

    second: Up = stack["up"]()
    banner = second.banner()
    assert f"Write key     {key}   (from {home / 'write_key'}: sends events)" in banner
    assert f"Sign in       {api}/console/link/" in banner  # a fresh link for the same admin
    assert f"Admin key     {admin_key}   (from {home / 'admin_key'}: " in banner

    recorded = runs(home)
    assert recorded[CART].run_id == cart_run and recorded[CART].status == "active"
    assert recorded[WELCOME].status == "active"
    client = await Client.connect(f"127.0.0.1:{ports['temporal']}")
    for workflow_id in (CART, WELCOME):
        described = await client.get_workflow_handle(workflow_id).describe()
        assert described.status == WorkflowExecutionStatus.RUNNING, workflow_id

    # The restarted worker drives the resumed run: emptying the cart ends it at once.
    emptied = httpx.post(
        f"{api}/v1/track",
        auth=auth,
        json={"userId": "user-1", "event": "Cart Emptied", "properties": {"cart_id": "c1"}},
        timeout=30,
    ).json()
    assert emptied["signalled"] == [CART]
    wait_until(lambda: runs(home)[CART].status == "ended", 20, "the cart run to end", second.log)
    assert runs(home)[CART].end_reason == "exit_on"
    assert (await client.get_workflow_handle(CART).describe()).status == WorkflowExecutionStatus.COMPLETED

    assert second.stop(signal.SIGTERM) == 0
    assert not listening(ports["temporal"]) and not listening(ports["api"])


def test_up_on_all_interfaces_keeps_temporal_on_loopback_and_its_home_private(
    stack: dict[str, Any],
) -> None:
    home: Path = stack["home"]
    ports: dict[str, int] = stack["ports"]
    umask = os.umask(0o022)  # the usual default: what made the home 0755 and its files 0644
    try:
        first: Up = stack["up"]("--host", "0.0.0.0")
        banner = first.banner()
    finally:
        os.umask(umask)

    assert "Warning: the API listens on 0.0.0.0, beyond this machine" in banner
    assert f"Temporal UI   http://127.0.0.1:{ports['ui']}" in banner
    assert listeners(ports["api"]) == {"0.0.0.0"}
    assert listeners(ports["temporal"]) == {"127.0.0.1"}, "the dev server's gRPC stays on loopback"
    assert listeners(ports["ui"]) == {"127.0.0.1"}, "the UI, which has no login, stays on loopback"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    running = modes(home)
    assert {"nurture.db", "temporal.db", "temporal.log", "temporal.pid", "write_key"} <= running.keys()
    assert {"nurture.db-wal", "temporal.db-wal"} & running.keys(), running  # SQLite's own, created later
    assert set(running.values()) == {0o600}, running
    assert first.stop(signal.SIGINT) == 0
    assert set(modes(home).values()) == {0o600}


def test_the_dev_server_leaves_loopback_only_when_asked(tmp_path: Path) -> None:
    exposed = UpOptions(home=tmp_path, temporal_host="0.0.0.0")
    assert stack_settings(exposed, env={}).temporal_address == "127.0.0.1:7233"
    assert [w.split(",")[0] for w in exposure_warnings(exposed)] == [
        "the Temporal dev server (gRPC and UI) listens on 0.0.0.0"
    ]
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warnings(UpOptions(host=host)) == [], host
    for host in ("0.0.0.0", "::", "192.0.2.10", "api.example.com"):
        assert len(exposure_warnings(UpOptions(host=host))) == 1, host


def test_a_home_made_by_an_earlier_version_is_made_private(tmp_path: Path) -> None:
    home, mine = tmp_path / "home", tmp_path / "mine"
    home.mkdir(mode=0o755)
    mine.mkdir(mode=0o755)
    for name in ("nurture.db", "nurture.db-wal", "temporal.db", "temporal.log"):
        (home / name).write_bytes(b"")
        (home / name).chmod(0o644)
    (mine / "notes.txt").write_bytes(b"")
    (mine / "notes.txt").chmod(0o644)

    private_home(home)
    private_home(mine)
    private_home(tmp_path / "new" / "home")

    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert set(modes(home).values()) == {0o600}
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755, "not a Nurture home: left as its owner set it"
    assert modes(mine) == {"notes.txt": 0o644}
    assert stat.S_IMODE((tmp_path / "new" / "home").stat().st_mode) == 0o700


BURST = 48


def sign_ups(api: str, key: str, calls: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """``calls`` posted at once, as many clients would; ``None`` for each call left unanswered."""

    limits = httpx.Limits(max_connections=len(calls) or 1)
    with httpx.Client(base_url=api, auth=httpx.BasicAuth(key, ""), timeout=30, limits=limits) as http:

        def post(call: dict[str, Any]) -> dict[str, Any] | None:
            try:
                answer = http.post("/v1/track", json=call)
            except httpx.HTTPError:
                return None
            return answer.json() if answer.status_code == 200 else None

        with ThreadPoolExecutor(len(calls) or 1) as pool:
            return list(pool.map(post, calls))


async def has_workflow(client: Client, wid: str) -> bool:
    try:
        await client.get_workflow_handle(wid).describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return False
    return True


async def test_a_kill_9_mid_burst_loses_no_trigger(stack: dict[str, Any]) -> None:
    """Events stored when ``nurture up`` is killed, before their runs start, are routed when it
    starts again, with no retry; the clients' retries then start what was never stored."""
    home: Path = stack["home"]
    api: str = stack["api"]
    calls: list[dict[str, Any]] = []
    answers: list[dict[str, Any] | None] = []
    lost: list[str] = []
    up: Up = stack["up"]()
    up.banner()
    key = (home / "write_key").read_text().strip()
    client = await Client.connect(f"127.0.0.1:{stack['ports']['temporal']}")
    for round_ in range(6):  # until a kill lands between storing an event and routing it
        burst = [
            {"userId": f"r{round_}-{i}", "event": "Signed Up", "messageId": f"m-r{round_}-{i}"} for i in range(BURST)
        ]
        with ThreadPoolExecutor(1) as pool:
            posted = pool.submit(sign_ups, api, key, burst)
            # Killed a moment into the burst, while calls are being stored and routed.
            floor = len(calls) + BURST // 4
            wait_until(lambda floor=floor: len(events(home)) > floor, 30, "the burst", up.log)
            up.process.send_signal(signal.SIGKILL)
            up.process.wait()
            answers += posted.result()
        calls += burst
        stored = {e.user_id for e in events(home) if e.message_id.startswith(f"m-r{round_}-")}
        lost += [u for u in sorted(stored) if not await has_workflow(client, f"nurture/welcome_series/{u}/")]
        up = stack["up"]()
        up.banner()
        if lost:
            break
    assert lost, "no kill landed between storing an event and routing it"

    # No retry yet: the restarted API routes what the killed one stored and left unrouted.
    async def all_routed() -> bool:
        return all([await has_workflow(client, f"nurture/welcome_series/{user}/") for user in lost])

    deadline = time.monotonic() + 60
    while not await all_routed():
        assert time.monotonic() < deadline, f"{lost} never routed\n{tail(up.log)}"
        await asyncio.sleep(0.5)
    assert all(e.routed_at is not None for e in events(home))

    # The clients retry what got no answer, with the same messageIds: nothing is lost or doubled.
    unanswered = [call for call, answer in zip(calls, answers, strict=True) if answer is None]
    retried = sign_ups(api, key, unanswered)
    assert None not in retried
    for call, answer in zip(unanswered, retried, strict=True):
        assert answer is not None
        wid = f"nurture/welcome_series/{call['userId']}/"
        assert answer["triggered"] == ([] if answer["duplicate"] else [wid]), answer
    wait_until(
        lambda: len(runs(home)) == len(calls), 60, "a welcome run for every sign-up", up.log
    )
    assert sorted(r.user_id for r in runs(home).values()) == sorted(c["userId"] for c in calls)
    assert up.stop(signal.SIGINT) == 0


def test_up_adopts_the_dev_server_a_killed_run_left_behind(stack: dict[str, Any]) -> None:
    home: Path = stack["home"]
    temporal_port: int = stack["ports"]["temporal"]
    first: Up = stack["up"]()
    first.banner()
    orphan = int((home / "temporal.pid").read_text())

    first.process.kill()  # no clean-up: the dev server, in its own session, keeps running
    first.process.wait()
    assert listening(temporal_port)

    second: Up = stack["up"]()
    banner = second.banner()
    assert "(dev server, state in" in banner
    assert f"adopting the dev server a killed nurture up left running (pid {orphan})" in tail(second.log)
    assert second.stop(signal.SIGINT) == 0
    assert not listening(temporal_port)
    assert not (home / "temporal.pid").exists()


async def test_outbox_shows_each_channel_newest_first_with_masked_addresses(tmp_path: Path) -> None:
    home = tmp_path / "home"
    runner = CliRunner(env={"DATABASE_URL": None, "NURTURE_HOME": None})
    assert runner.invoke(outbox, ["--home", str(home)]).output.startswith("The outbox is empty")
    db = Database(f"sqlite:///{home / 'nurture.db'}")
    db.migrate()
    ledger = DbLedger(db)
    sent = [
        (
            RenderedMessage(
                channel="email",
                template="welcome",
                locale=None,
                subject="Welcome, Ada!",
                text="Hi Ada. " * 60,
            ),
            "ada@example.com",
        ),
        (
            RenderedMessage(channel="sms", template="coupon", locale=None, text="Your code: ADA10"),
            "+8613800138000",
        ),
        (
            RenderedMessage(
                channel="wechat",
                template="vip",
                locale="zh-CN",
                template_id="T1",
                data={"first": "你好", "code": "ADA10"},
            ),
            "oAbCdEfGhIjK123",
        ),
    ]
    for index, (message, address) in enumerate(sent):
        request = send_request(
            run_id=f"run-{index}",
            step_id="step",
            user_id="ada",
            channels=(message.channel,),
            template=message.template,
        )
        await ledger.claim(request, message.channel, "outbox", address, message)
        await ledger.settle(request, message.channel, "sent", provider_id=f"outbox-{index}")
    db.dispose()

    text = runner.invoke(outbox, ["--home", str(home)]).output
    entries = json.loads(runner.invoke(outbox, ["--home", str(home), "--json", "-n", "2"]).output)

    wechat, sms, email = text.rstrip("\n").split("\n\n")  # newest first
    assert "wechat  oAb***123  vip" in wechat and "first: 你好" in wechat and "code: ADA10" in wechat
    assert "sms     +86*******8000  coupon" in sms and "Your code: ADA10" in sms
    assert "email   a***@example.com  welcome" in email and "Subject: Welcome, Ada!" in email
    assert email.count("\n") == 4 and email.endswith("…")  # subject plus a three-line excerpt
    assert "ada@example.com" not in text and "+8613800138000" not in text
    assert [(e["channel"], e["address"]) for e in entries] == [
        ("wechat", "oAb***123"),
        ("sms", "+86*******8000"),
    ]
    assert entries[0]["data"] == {"first": "你好", "code": "ADA10"}


def test_up_refuses_journeys_that_do_not_compile(stack: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "project" / "journeys" / "broken.yaml").write_text(
        "journey: broken\ntrigger: {event: Signed Up}\nsteps:\n  - wait: 1 day\n", encoding="utf-8"
    )

    process: Up = stack["up"]()

    assert process.process.wait(timeout=60) == 1
    assert "broken.yaml:4:" in tail(process.log)
    assert not listening(stack["ports"]["temporal"])  # refused before starting anything
    assert not stack["home"].exists()


def test_a_new_user_tries_real_providers_against_the_mocks(stack: dict[str, Any], tmp_path: Path) -> None:
    """README: start the mock providers, source their environment, run ``nurture up``, paste the
    curl: the welcome email goes out through the real SendGrid SDK and reaches the mock."""
    env_file = tmp_path / "mocks.env"
    with (tmp_path / "mocks.out").open("w") as out:
        mocks = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "provider_mocks.py"), "--env-file", str(env_file),
             "--public-url", stack["api"]],
            env=clean_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        wait_until(env_file.exists, 60, "the mocks' environment file", tmp_path / "mocks.out")
        env = clean_env()
        env.update(line.split("=", 1) for line in env_file.read_text().splitlines() if line)
        up = Up(stack["args"], env, tmp_path / "up.log")
        try:
            banner = up.banner()
            curl = subprocess.run(
                ["sh", "-c", curl_command(banner)], capture_output=True, text=True, timeout=60
            )
            assert curl.returncode == 0, curl.stderr
            wait_until(
                lambda: (
                    "sendgrid  a***@example.com  Welcome to Nurture Academy, Ada!"
                    in (tmp_path / "mocks.out").read_text()
                ),
                60,
                "the welcome email at the SendGrid mock",
                tmp_path / "up.log",
            )
            assert "REJECTED" not in (tmp_path / "mocks.out").read_text()
            assert "ada@example.com" not in (tmp_path / "mocks.out").read_text()
            assert up.stop(signal.SIGINT) == 0
        finally:
            up.kill()
    finally:
        mocks.send_signal(signal.SIGTERM)
        mocks.wait(timeout=30)
