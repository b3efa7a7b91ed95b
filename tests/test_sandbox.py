"""The worker's sandbox passes Nurture's workflow modules through (``workflows/sandbox.py``): what
makes that safe (the modules hold constants only) and that the worker and the scenario runtime
run with it. tests/test_replay.py replays every recorded history under it and under the SDK's
default sandbox."""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions
from temporalio.worker.workflow_sandbox._importer import Importer
from temporalio.worker.workflow_sandbox._restrictions import RestrictionContext

from nurture.language.compiler import Project
from nurture.service.worker import build_worker
from nurture.storage.db import Database
from workflows.runtime import TemporalRuntime
from workflows.sandbox import WORKFLOW_MODULES, workflow_runner

CONSTANTS = (str, int, float, bool, type(None), timedelta, RetryPolicy, types.UnionType)
"""What a workflow module's globals may hold besides modules, functions and classes (and the
``annotations`` flag of ``from __future__ import annotations``). A ``RetryPolicy`` is a dataclass
the SDK only reads."""


@pytest.mark.parametrize("name", WORKFLOW_MODULES)
def test_a_workflow_module_holds_constants_only(name: str) -> None:
    """Passed through, a module is shared by every run in the worker: a dict, list or set at
    module or class level would be state one run could leave for the next."""
    module = importlib.import_module(name)
    shared = {
        key: type(value).__name__
        for key, value in vars(module).items()
        if not key.startswith("__")
        and key != "annotations"
        and not isinstance(value, (types.ModuleType, types.FunctionType, type))
        and not isinstance(value, CONSTANTS)
    }
    assert not shared, f"{name} holds more than constants: {shared}"
    classes = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == name]
    assert classes
    for cls in classes:
        attributes = {
            key: type(value).__name__
            for key, value in vars(cls).items()
            if not key.startswith(("__", "_abc_"))  # a Protocol's own ABC cache
            and not isinstance(value, (types.FunctionType, staticmethod, classmethod, property))
            and not isinstance(value, CONSTANTS)
        }
        assert not attributes, f"{name}.{cls.__name__} has class-level state: {attributes}"


@pytest.mark.parametrize("name", WORKFLOW_MODULES)
def test_the_runner_imports_a_workflow_module_once_and_the_default_sandbox_for_every_run(name: str) -> None:
    """What the SDK's sandbox importer gives a run that imports the module: the worker's own
    module under :func:`workflow_runner`, a fresh copy under the default restrictions."""
    host = importlib.import_module(name)

    def imported(restrictions: SandboxRestrictions) -> types.ModuleType:
        importer = Importer(restrictions, RestrictionContext(), workflow_module_name=name)
        with importer.applied():
            __import__(name)
            return sys.modules[name]

    assert imported(workflow_runner().restrictions) is host
    fresh = imported(SandboxRestrictions.default)
    assert fresh is not host
    assert fresh.__file__ == host.__file__


async def test_the_worker_and_the_scenario_runtime_run_workflows_with_it(
    dev_server: str, project: Project, tmp_path: Path, temporal: TemporalRuntime
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'nurture.db'}")
    db.migrate()
    client = await Client.connect(dev_server)
    assert temporal._worker is not None
    runners = [
        build_worker(client, project, db, "test-sandbox").config()["workflow_runner"],
        temporal._worker.config()["workflow_runner"],
    ]
    for runner in runners:
        assert isinstance(runner, SandboxedWorkflowRunner)
        assert set(WORKFLOW_MODULES) <= runner.restrictions.passthrough_modules
        assert runner.restrictions.invalid_module_members == SandboxRestrictions.default.invalid_module_members
    db.dispose()
