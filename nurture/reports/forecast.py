"""Forecasts: a scenario played on the simulator into a fresh database, so the live report reads it.

The runs are recorded as the worker records them (the same rows, through
:class:`~nurture.storage.stores.BatchRecorder`), in outcome-only mode: nothing is rendered or
delivered, and every number the report shows comes from the simulated outcomes.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nurture.delivery.deliverer import Deliverer
from nurture.language.compiler import Project
from nurture.simulation.scenarios import Scenario, build_simulator
from nurture.simulation.simulator import Simulator
from nurture.storage.db import Database
from nurture.storage.stores import BatchRecorder


async def play_into(scenario: Scenario, project: Project, db: Database) -> Simulator:
    """Play ``scenario`` and record its runs, steps, messages and conversions into ``db``."""
    # The simulation keeps every run, event and row of a large population alive to the end: the
    # cyclic collector would scan them again and again (a third of the time at 100,000 users)
    # for garbage there is none of.
    collecting = gc.isenabled()
    gc.disable()
    try:
        recorder = BatchRecorder(db)
        deliverer = Deliverer(project.templates, {}, render=False)
        sim = build_simulator(scenario, project, deliverer, timeline=False, recorder=recorder)
        await sim.run()
        recorder.flush()
    finally:
        if collecting:
            gc.enable()
    return sim


@contextmanager
def scratch_database() -> Iterator[Database]:
    """A migrated SQLite database in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="nurture-forecast-") as folder:
        db = Database(f"sqlite:///{Path(folder) / 'forecast.db'}")
        try:
            db.migrate()
            yield db
        finally:
            db.dispose()
