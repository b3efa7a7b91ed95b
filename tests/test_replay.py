"""Recorded histories replay on the current workflow code: in-flight runs survive upgrades.

A change to the interpreter or the workflow that would send different commands for an existing
history fails here; gate it with ``workflow.patched`` (see docs/architecture.md) and record new
histories with ``python tests/record_histories.py`` beside the old ones.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from nurture.language import ir
from workflows.dates import DateTriggerWorkflow
from workflows.journey import JourneyWorkflow
from workflows.sandbox import workflow_runner

HISTORIES = sorted((Path(__file__).parent / "histories").rglob("*.json"))


def test_histories_are_recorded() -> None:
    assert len(HISTORIES) >= 6
    assert {p.parent.name for p in HISTORIES} >= {"v1", "v2", "v3", "v4", "v5", "v6", "v7", "v8", "v9"}


def test_runs_given_the_traits_at_start_read_no_profile_before_their_first_wait() -> None:
    """v6: a first ``wait_until`` in the person's zone is answered by the traits in the input; the
    same scenario recorded on v5 read them with a ``nurture.read_profile`` local activity."""
    folder = Path(__file__).parent / "histories"

    def reads(release: str) -> tuple[bool, int]:
        events = json.loads((folder / release / "renewal_three_days_before_at_ten-1.json").read_text(encoding="utf-8"))[
            "events"
        ]
        started = events[0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"][0]["data"]
        activities = [
            json.loads(base64.b64decode(e["markerRecordedEventAttributes"]["details"]["data"]["payloads"][0]["data"]))
            for e in events
            if e.get("markerRecordedEventAttributes", {}).get("markerName") == "core_local_activity"
        ]
        reads = sum(a["activity_type"] == "nurture.read_profile" for a in activities)
        return "traits" in json.loads(base64.b64decode(started)), reads

    assert reads("v5") == (False, 1)
    assert reads("v6") == (True, 0)


RUNNERS = {"worker": workflow_runner, "default-sandbox": SandboxedWorkflowRunner}
"""The worker's runner (the workflow modules passed through), and the SDK's default sandbox, which
imports them again for every run under its restrictions."""


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("path", HISTORIES, ids=[f"{p.parent.name}/{p.stem}" for p in HISTORIES])
async def test_history_replays(path: Path, runner: str) -> None:
    text = path.read_text(encoding="utf-8")
    history = WorkflowHistory.from_json(f"replay-{path.stem}", text)
    sandbox: WorkflowRunner = RUNNERS[runner]()
    replayer = Replayer(workflows=[JourneyWorkflow, DateTriggerWorkflow], workflow_runner=sandbox)
    result = await replayer.replay_workflow(history)
    assert result.replay_failure is None
    assert json.loads(text)["events"][0]["eventType"] in ("EVENT_TYPE_WORKFLOW_EXECUTION_STARTED", "WorkflowExecutionStarted")


def test_histories_include_upgrades_while_runs_sleep() -> None:
    """A run moved to a new version mid-wait_for, and both histories of a run that continued as new."""
    folder = Path(__file__).parent / "histories" / "v4"

    def events(name: str) -> list[dict[str, object]]:
        found: list[dict[str, object]] = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))["events"]
        return found

    migrated = events("migrated-1")
    signals = [e["workflowExecutionSignaledEventAttributes"] for e in migrated if "workflowExecutionSignaledEventAttributes" in e]
    assert [s["signalName"] for s in signals] == ["migrate"]  # type: ignore[index]
    patches = [e for e in migrated if "core_patch" in json.dumps(e.get("markerRecordedEventAttributes", ""))]
    assert patches and migrated[-1]["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED"
    assert events("continued-1")[-1]["eventType"] == "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW"
    started = events("continued-2")[0]["workflowExecutionStartedEventAttributes"]
    assert started["continuedExecutionRunId"]  # type: ignore[index]


async def test_changed_workflow_code_fails_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard works: a run whose steps now issue different commands does not replay."""
    from nurture.engine import interpreter

    original = interpreter.Run._step

    def skip_waits(self: interpreter.Run, step: object):  # type: ignore[no-untyped-def]
        if type(step).__name__ == "Wait":
            return None
            yield  # pragma: no cover - keeps this a generator
        return (yield from original(self, step))  # type: ignore[arg-type]

    monkeypatch.setattr(interpreter.Run, "_step", skip_waits)
    path = next(p for p in HISTORIES if "welcome_full_series" in p.name)
    history = WorkflowHistory.from_json("replay-changed", path.read_text(encoding="utf-8"))
    replayer = Replayer(workflows=[JourneyWorkflow], workflow_runner=workflow_runner())
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None


def _activity_types(events: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The local activities a history's markers record, in order, and the activities' inputs."""
    local, remote = [], []
    for event in events:
        marker = event.get("markerRecordedEventAttributes")
        if marker and marker["markerName"] == "core_local_activity":
            data = json.loads(base64.b64decode(marker["details"]["data"]["payloads"][0]["data"]))
            local.append(data["activity_type"])
        scheduled = event.get("activityTaskScheduledEventAttributes")
        if scheduled:
            remote.append(json.loads(base64.b64decode(scheduled["input"]["payloads"][0]["data"])))
    return local, remote


def welcome_events(release: str) -> list[dict[str, Any]]:
    """The events of the welcome series scenario's run as recorded by ``release``."""
    text = (Path(__file__).parent / "histories" / release / "welcome_full_series-1.json").read_text(encoding="utf-8")
    found: list[dict[str, Any]] = json.loads(text)["events"]
    return found


def test_histories_include_the_start_record_riding_on_the_first_send() -> None:
    """v4 runs wrote their start with a local activity before the first send; v5 runs (started
    with ``start_rides``) have none: the first send's input carries the start record instead."""
    old_local, old_sends = _activity_types(welcome_events("v4"))
    assert old_local[0] == "nurture.record_start" and "start" not in old_sends[0]
    new_local, new_sends = _activity_types(welcome_events("v5"))
    assert "nurture.record_start" not in new_local
    assert new_sends[0]["start"]["journey"] == "welcome_series"
    assert all("start" not in send for send in new_sends[1:])
    assert len(welcome_events("v5")) < len(welcome_events("v4"))


def test_histories_include_the_records_riding_on_the_sends_before_them() -> None:
    """v6 runs wrote the record before each wait and their end record with local activities;
    v7 runs (started with ``records_ride``) give them to the send before: each send's input
    carries the record that follows it, and the run of the welcome series runs none."""
    old_local, old_sends = _activity_types(welcome_events("v6"))
    assert old_local.count("nurture.record_steps") == 3 and old_local[-1] == "nurture.record_end"
    assert all("after" not in send for send in old_sends)
    new_local, new_sends = _activity_types(welcome_events("v7"))
    assert new_local == []
    assert [send["after"]["kind"] for send in new_sends] == ["steps", "steps", "steps", "end"]
    assert len(welcome_events("v6")) - len(welcome_events("v7")) >= 4


def test_histories_include_runs_their_router_opened() -> None:
    """v7 runs that wait first wrote their start and the steps up to that wait with a local
    activity before their first timer; v8 runs (started with ``opened``: the router wrote those)
    start the timer in their first task, and their first send carries the start record and those
    steps again, for the database to keep where the router's write was lost."""
    folder = Path(__file__).parent / "histories"

    def events(release: str) -> list[dict[str, Any]]:
        text = (folder / release / "cart_reminder_then_last_call-1.json").read_text(encoding="utf-8")
        found: list[dict[str, Any]] = json.loads(text)["events"]
        return found

    def first_task(found: list[dict[str, Any]]) -> str:
        """What the run's first workflow task did first."""
        types = [e["eventType"].removeprefix("EVENT_TYPE_") for e in found]
        return types[types.index("WORKFLOW_TASK_COMPLETED") + 1]

    old_local, old_sends = _activity_types(events("v7"))
    assert old_local == ["nurture.record_steps"] and "start" not in old_sends[0]
    assert first_task(events("v7")) == "MARKER_RECORDED"
    started = events("v8")[0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"][0]["data"]
    assert json.loads(base64.b64decode(started))["opened"]["waiting"] == "wait_before_reminder"
    new_local, new_sends = _activity_types(events("v8"))
    assert new_local == []
    assert first_task(events("v8")) == "TIMER_STARTED"
    assert new_sends[0]["start"]["journey"] == "cart_abandonment"
    assert new_sends[0]["after"]["record"]["reached"][0]["step_id"] == "wait_before_reminder"


def test_histories_include_runs_whose_journey_leaves_out_its_defaults() -> None:
    """v9 runs carry the journey in their input, their continue-as-new and a migration's signal
    in the compact form (``journey_payload``): the same journey, without the fields at their
    defaults, which every v8 input spelled out."""
    folder = Path(__file__).parent / "histories"

    def journeys(release: str, name: str) -> list[dict[str, Any]]:
        """The journeys in the started event's input and the signals' inputs of a recorded run."""
        found = []
        for event in json.loads((folder / release / name).read_text(encoding="utf-8"))["events"]:
            attributes = event.get("workflowExecutionStartedEventAttributes") or event.get(
                "workflowExecutionSignaledEventAttributes"
            )
            for payload in (attributes or {}).get("input", {}).get("payloads", []):
                data = json.loads(base64.b64decode(payload["data"]))
                if isinstance(data, dict) and "journey" in data and isinstance(data["journey"], dict):
                    found.append(data["journey"])
        return found

    for name in ("welcome_full_series-1.json", "continued-2.json", "migrated-1.json"):
        old, new = journeys("v8", name), journeys("v9", name)
        assert len(old) == len(new) >= 1, name
        for before, after in zip(old, new, strict=True):
            assert ir.journey_from_dict(after) == ir.journey_from_dict(before)
            assert "date_trigger" in before and "date_trigger" not in after  # None: no date trigger
            assert len(json.dumps(after)) < len(json.dumps(before))
