"""``nurture up``: the whole stack from one command, stopped by a signal, resumed by the next run.

Each test runs ``nurture up`` as a real process (``python -m nurture.cli.service up``) with a
temporary home and free ports, and talks to it the way a user would: the printed curl, the HTTP
API, ``nurture outbox``. The journeys are the repo's, with a ``nurture.yaml`` that sets no quiet
hours, so the welcome email goes out whatever the wall-clock hour.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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

from nurture.cli.service import outbox
from nurture.language.templates import RenderedMessage
from nurture.service.devserver import free_port
from nurture.storage.db import Database
from nurture.storage.models import RunRecord
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

    def up() -> Up:
        process = Up(args, clean_env(), tmp_path / "up.log")
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
