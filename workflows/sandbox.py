"""How the worker's sandbox runs Nurture's workflows.

Temporal's Python sandbox imports a workflow's module afresh for every run it starts or brings
back into its cache, so that module-level state cannot leak from one run to another. For
Nurture's workflows that fresh import (the module, its class, and the definitions the SDK builds
from each signal, query and run method's type hints) was most of the worker's CPU per start
beyond what a hand-written workflow pays (docs/performance.md, "Sleeping runs").

Nurture's workflow modules hold no state to isolate: every global in them is a constant, every
run's state lives on its instance, and everything the runs call (the interpreter, the model,
the intermediate form) is passed through already. So :func:`workflow_runner` passes them through
too, keeping every other rule of the SDK's default sandbox: any other module imported from
workflow code is still imported per run, and the sandbox's restrictions still apply to it.
``tests/test_sandbox.py`` holds the modules to that (constants only), and ``tests/test_replay.py``
replays every recorded history both ways, under this runner and under the SDK's default sandbox,
whose per-run import would catch a non-deterministic call at import time.
"""

from __future__ import annotations

from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

WORKFLOW_MODULES = ("workflows.journey", "workflows.dates")
"""The modules defining Nurture's workflows, imported once per worker."""


def workflow_runner() -> SandboxedWorkflowRunner:
    """The SDK's default sandbox, with :data:`WORKFLOW_MODULES` passed through."""
    return SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*WORKFLOW_MODULES))
