"""Upgrades while runs sleep, on Temporal: `nurture migrate` moving sleeping runs (one asleep at a
wait, two mid-`wait_for`) to a new version and ending others, and a long run continuing as new
with its state and a bounded set of seen message ids. The real worker and database recorder run
on Temporal's time-skipping test server, so days pass in moments."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from support import eventually, rows
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle, WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from test_interpreter import templates
from test_migration import V1, V2, user_in

from nurture.cli.main import main
from nurture.engine.interpreter import workflow_id
from nurture.engine.model import Event
from nurture.language import ir
from nurture.language.compiler import Project, Settings
from nurture.language.templates import TemplateStore
from nurture.service.devserver import free_port
from nurture.service.worker import build_worker
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord, RunRecord, StepReach
from nurture.storage.stores import DbProfiles, store_versions
from workflows.journey import CONTINUE_AFTER, OPENED, RECORD_STEPS, WORKFLOW_NAME, new_run
from workflows.runtime import binary, quiet_runtime

__all__ = ["templates"]

DAY = timedelta(days=1)


@pytest.fixture(scope="module")
async def skipping() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping test server of this module's own."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server"), runtime=quiet_runtime()
    )
    yield env
    await env.shutdown()


@dataclass
class Stage:
    env: WorkflowEnvironment
    client: Client
    db: Database
    old: ir.Journey
    new: ir.Journey
    queue: str
    prefix: str

    async def enter(self, user: str, **options: Any) -> WorkflowHandle[Any, Any]:
        """Start a run of the old version for ``user``, as the event API does."""
        now = await self.env.get_current_time()
        event = Event(name="Signed Up", timestamp=now, message_id=f"signup-{user}")
        DbProfiles(self.db).merge(user, {"email": f"{user}@example.com", "phone": "+8613800138000"})
        return await self.client.start_workflow(
            WORKFLOW_NAME,
            {
                "journey": ir.journey_to_dict(self.old),
                "user_id": user,
                "key": "",
                "event": event.to_dict(),
                RECORD_STEPS: True,
                **options,
            },
            id=workflow_id(self.old.id, user, "", prefix=self.prefix),
            task_queue=self.queue,
        )

    async def event(self, handle: WorkflowHandle[Any, Any], name: str, message_id: str) -> None:
        now = await self.env.get_current_time()
        payload = Event(name=name, timestamp=now, message_id=message_id).to_dict()
        for _ in range(50):
            try:
                await handle.signal("event", payload)
                return
            except RPCError as exc:
                # The test server answers "Completed workflow" for a moment while a run continues
                # as new (a real server hands the signal to the new run).
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                await _pause()
        raise AssertionError(f"{handle.id} took no signal")

    async def settled(self, handle: WorkflowHandle[Any, Any], state: str) -> dict[str, Any]:
        """Wait until the run has handled every signal and waits (or ended) in ``state``."""

        async def query() -> dict[str, Any] | None:
            try:
                progress: dict[str, Any] = await handle.query("progress")
            except RPCError as exc:
                # A query the test server gave up on ("Timeout expired": the run's task waited
                # for a busy worker, or the run was continuing as new) is asked again.
                if exc.status not in (RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED):
                    raise
                return None
            return progress

        progress: dict[str, Any] | None = None
        for _ in range(400):
            progress = await query()
            if progress is None:
                await _pause()
                continue
            if progress["handled"] >= progress["signals"] and progress["state"] == state:
                return progress
            await _pause()
        raise AssertionError(f"{handle.id} never reached {state}: {progress}")

    def run_of(self, user: str) -> RunRecord:
        [row] = rows(self.db, RunRecord, user_id=user)
        return row

    def sends(self, user: str) -> list[str]:
        return sorted(m.step_id for m in rows(self.db, MessageRecord, user_id=user) if m.status == "sent")


async def _pause() -> None:
    await asyncio.sleep(0.05)


@pytest.fixture
async def stage(
    skipping: WorkflowEnvironment, templates: TemplateStore, database: Database
) -> AsyncIterator[Stage]:
    from test_interpreter import compile_journey

    old, new = compile_journey(templates, V1), compile_journey(templates, V2)
    project = Project(journeys={old.id: old}, templates=templates, settings=Settings())
    queue = f"test-upgrade-{uuid.uuid4().hex[:8]}"
    store_versions(database, [old, new])
    async with build_worker(skipping.client, project, database, queue):
        yield Stage(skipping, skipping.client, database, old, new, queue, f"upgrade-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def project_dir(tmp_path: Any, templates: TemplateStore) -> Iterator[tuple[str, str]]:
    """The new version as the journey files hold it, beside the templates."""
    journeys = tmp_path / "journeys"
    journeys.mkdir()
    (journeys / "onboarding.yaml").write_text(V2.lstrip(), encoding="utf-8")
    yield str(journeys), str(templates.root)


async def cli(stage: Stage, project_dir: tuple[str, str], *argv: str, temporal: str | None = None) -> Any:
    """The command, in a thread: it runs its own event loop. ``temporal``: another address."""
    target = temporal or stage.client.service_client.config.target_host
    return await asyncio.to_thread(
        CliRunner().invoke,
        main,
        [*argv, "--journeys", project_dir[0], "--templates", project_dir[1]],
        env={"DATABASE_URL": stage.db.url, "TEMPORAL_ADDRESS": target},
        catch_exceptions=False,
    )


async def test_migrate_moves_sleeping_runs_mid_wait_and_mid_wait_for(
    stage: Stage, project_dir: tuple[str, str]
) -> None:
    old, new = stage.old, stage.new
    a, b, d = user_in(old, "a", 2), user_in(old, "b", 2), user_in(old, "b", 3)
    run_a, run_b = await stage.enter(a), await stage.enter(b)
    await stage.env.sleep(DAY + timedelta(hours=1))
    run_d = await stage.enter(d)
    await stage.env.sleep(DAY)  # 2d1h: a and b wait for a click, d sleeps at first_wait until 3d
    await stage.settled(run_a, "waiting:await_click")
    await stage.settled(run_b, "waiting:await_click_b")
    await stage.settled(run_d, "waiting:first_wait")

    refused = await cli(stage, project_dir, "migrate", old.id, "--from", old.version, "--to", new.version)
    assert refused.exit_code == 1
    assert f"step first_wait (wait) of version {old.version} is not in version {new.version}" in refused.output
    plan = ["--map", "first_wait=first_pause", "--map", "thanks=thanks_v2", "--map", "nudge=last_note"]
    dry = await cli(stage, project_dir, "migrate", old.id, "--from", old.version, "--to", new.version, "--dry-run", *plan)
    assert dry.exit_code == 0, dry.output
    assert f"3 active run(s) of onboarding at version {old.version} move to version {new.version}" in dry.output
    assert "waiting at first_wait -> continues at first_pause" in dry.output
    assert "1 waiting at await_click\n1 waiting at await_click_b\n1 waiting at first_wait" in dry.output
    assert {stage.run_of(u).version for u in (a, b, d)} == {old.version}  # a dry run changes nothing

    moved = await cli(stage, project_dir, "migrate", old.id, "--from", old.version, "--to", new.version, *plan)

    assert moved.exit_code == 0, moved.output
    assert "signalled 3 run(s) to move at their next wait" in moved.output
    await stage.settled(run_d, "waiting:first_pause")
    await eventually(lambda: {stage.run_of(u).version for u in (a, b, d)} == {new.version}, what="new versions", timeout=20)
    assert stage.run_of(d).step == "first_pause"
    await stage.event(run_a, "Clicked", "click-a")  # mid-wait_for: the new version's branch (an SMS)
    await eventually(lambda: "thanks_v2" in stage.sends(a), what="the new version's thank-you", timeout=20)
    for handle in (run_a, run_b, run_d):
        assert (await handle.result())["reason"] == "completed"
    assert stage.sends(a) == ["hello", "last_note", "thanks_v2"]
    assert stage.sends(b) == ["hello", "last_note"]  # timed out at 5d, as it would have
    assert stage.sends(d) == ["hello", "last_note"]
    [sms] = [m for m in rows(stage.db, MessageRecord, user_id=a) if m.step_id == "thanks_v2"]
    assert sms.channel == "sms"
    reaches = {r.step_id: r.version for r in rows(stage.db, StepReach, run_id=stage.run_of(d).run_id)}
    assert reaches["hello"] == old.version and reaches["tag"] == new.version
    counts = CliRunner().invoke(main, ["runs", old.id, "--counts"], env={"DATABASE_URL": stage.db.url})
    assert counts.output.splitlines()[1:] == [f"{new.version:<14}       0       3  -"], counts.output


async def test_migrate_end_ends_only_runs_of_that_version(stage: Stage, project_dir: tuple[str, str]) -> None:
    old, new = stage.old, stage.new
    user = user_in(old, "a", 4)
    handle = await stage.enter(user)
    await stage.settled(handle, "waiting:first_wait")

    ended = await cli(stage, project_dir, "migrate", old.id, "--from", new.version, "--end")
    assert ended.exit_code == 0 and "0 active run(s)" in ended.output
    # Temporal out of reach: the error, and no plan printed as if it were carried out.
    outage = await cli(stage, project_dir, "migrate", old.id, "--from", old.version, "--end", temporal=f"127.0.0.1:{free_port()}")
    assert outage.exit_code == 1 and "unreachable" in outage.output and "nothing was changed" in outage.output
    assert "active run(s)" not in outage.output
    assert stage.run_of(user).status == "active"
    typo = await cli(stage, project_dir, "migrate", "onbording", "--from", old.version, "--end")
    assert typo.exit_code == 2 and "no run or stored version of a journey onbording (did you mean 'onboarding'?)" in typo.output
    ended = await cli(stage, project_dir, "migrate", old.id, "--from", old.version, "--end", "--reason", "replaced")

    assert ended.exit_code == 0, ended.output
    assert (await handle.result())["reason"] == "replaced"
    row = stage.run_of(user)
    assert (row.status, row.end_reason) == ("ended", "replaced")
    unknown = await cli(stage, project_dir, "migrate", old.id, "--from", "000000000000", "--end")
    assert unknown.exit_code == 2 and "no stored version 000000000000" in unknown.output
    both = await cli(stage, project_dir, "migrate", old.id, "--from", old.version)
    assert both.exit_code == 2 and "either --to VERSION" in both.output


CLOSING_EVENTS = frozenset({
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TIMED_OUT,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_TERMINATED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW,
})


async def closed_history(handle: WorkflowHandle[Any, Any], timeout: float = 30.0) -> WorkflowHistory:
    """The history of a run that has closed, read once it ends with its closing event. The test
    server can start a continued run, and even report the old one closed, a moment before the old
    run's history holds its last workflow task's completion and closing event."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status = (await handle.describe()).status
        history = await handle.fetch_history()
        if status != WorkflowExecutionStatus.RUNNING and history.events[-1].event_type in CLOSING_EVENTS:
            return history
        if asyncio.get_running_loop().time() > deadline:
            last = [EventType.Name(e.event_type) for e in history.events[-3:]]
            raise AssertionError(f"run {handle.run_id} is {status} and its history ends {last} after {timeout}s")
        await asyncio.sleep(0.05)


async def test_a_long_run_continues_as_new_with_its_state_and_a_bounded_seen_set(stage: Stage) -> None:
    old = stage.old
    user = user_in(old, "a", 5)
    started = await stage.enter(user, **{CONTINUE_AFTER: 60, "seen_limit": 20})
    first_run = (await started.describe()).run_id
    handle = stage.client.get_workflow_handle(started.id)  # whichever run is the latest
    await stage.env.sleep(2 * DAY + timedelta(hours=1))
    await stage.settled(handle, "waiting:await_click")

    for number in range(40):  # events the run does not wait for: each grows its history
        await stage.event(handle, "Browsed", f"m-{number}")
    await stage.settled(handle, "waiting:await_click")

    assert (await handle.describe()).run_id != first_run  # continued as new, same workflow id
    history = await closed_history(stage.client.get_workflow_handle(handle.id, run_id=first_run))
    assert history.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    current = handle
    await stage.event(current, "Clicked", "m-35")  # seen lately: a retried call, ignored
    await stage.settled(current, "waiting:await_click")
    assert stage.sends(user) == ["hello"]
    await stage.event(current, "Clicked", "m-2")  # past the latest 20 ids: no longer a duplicate

    assert (await current.result())["reason"] == "completed"
    assert stage.sends(user) == ["hello", "last_note", "thanks"]
    row = stage.run_of(user)  # one run, one row, whatever the number of histories
    assert row.run_id == first_run and row.status == "ended" and row.variants == {"copy": "a"}
    assert {r.step_id for r in rows(stage.db, StepReach, run_id=first_run)} >= {"hello", "await_click", "thanks"}


OPENS_FIRST = """\
journey: opens_first
trigger: {event: Joined}
steps:
  - {id: await_click, wait_for: Clicked, timeout: 2d}
  - {id: hi, send: email, template: note}
"""


async def test_an_opened_run_carries_its_start_record_across_a_continue_as_new(
    stage: Stage, templates: TemplateStore
) -> None:
    """A run its router opened (``opened``) whose router never wrote the opening keeps its start
    record until an activity carries it, across a continue-as-new too: here its first wait
    outlasts one history (many events), and the new history's first record writes the run's row."""
    from test_interpreter import compile_journey

    journey = compile_journey(templates, OPENS_FIRST)
    user = f"u-{uuid.uuid4().hex[:10]}"
    DbProfiles(stage.db).merge(user, {"email": f"{user}@example.com"})
    now = await stage.env.get_current_time()
    trigger = Event(name="Joined", timestamp=now, message_id=f"joined-{user}").to_dict()
    params, opens = new_run(journey, ir.journey_to_dict(journey), user, "", trigger, None, now)
    assert opens is not None and params[OPENED]["waiting"] == "await_click"
    wid = workflow_id(journey.id, user, "", prefix=stage.prefix)
    started = await stage.client.start_workflow(
        WORKFLOW_NAME, {**params, CONTINUE_AFTER: 40}, id=wid, task_queue=stage.queue
    )
    first_run = (await started.describe()).run_id
    handle = stage.client.get_workflow_handle(wid)  # whichever run is the latest
    await stage.settled(handle, "waiting:await_click")
    for number in range(30):
        await stage.event(handle, "Browsed", f"m-{number}")
    await stage.settled(handle, "waiting:await_click")
    assert (await handle.describe()).run_id != first_run  # continued as new at its first wait
    # The new history records where it waits, and its first record carries the start with it.
    [row] = await eventually(
        lambda: rows(stage.db, RunRecord, user_id=user, step="await_click"), what="the run's row, where it waits"
    )
    assert (row.run_id, row.status) == (first_run, "active")

    await stage.event(handle, "Clicked", "m-click")

    assert (await handle.result())["reason"] == "completed"
    row = stage.run_of(user)
    assert (row.run_id, row.status, row.end_reason) == (first_run, "ended", "completed")
    assert {r.step_id for r in rows(stage.db, StepReach, run_id=first_run)} == {"await_click", "hi"}
    assert stage.sends(user) == ["hi"]
