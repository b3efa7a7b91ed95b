"""Engine, sessions and migrations.

SQLite under ``.nurture/`` by default; PostgreSQL (or any SQLAlchemy URL) through
``DATABASE_URL``. The schema is owned by Alembic migrations (``nurture/storage/migrations``);
:meth:`Database.migrate` brings any database to the latest revision.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

MIGRATIONS = Path(__file__).parent / "migrations"

IDLE_CHECK = 5.0
"""Seconds a pooled server connection may sit idle before its next checkout checks it first."""


def database_url(env: Mapping[str, str] | None = None, home: Path | None = None) -> str:
    """``DATABASE_URL`` (``postgresql://`` gets the psycopg 3 driver), else SQLite in ``home``."""
    env = os.environ if env is None else env
    url = env.get("DATABASE_URL", "").strip()
    if url:
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url
    home = home or Path(env.get("NURTURE_HOME", ".nurture"))
    return f"sqlite:///{home / 'nurture.db'}"


THREADS = min(32, ((getattr(os, "process_cpu_count", None) or os.cpu_count)() or 1) + 4)
"""The threads of a process's default executor (``asyncio.to_thread``; Python's own default: the
cores this process may use + 4, at most 32), on which the API and the worker run their database work."""


@dataclass(frozen=True)
class Pool:
    """How many connections one process holds to a server database (PostgreSQL).

    ``size`` stay open once made; up to ``overflow`` more are opened under a burst and closed when
    returned. A process uses at most ``size + overflow``: the server's ``max_connections`` must
    cover that times the number of processes (API processes and workers), plus what else connects.

    ``size`` is :data:`THREADS` by default, so that every thread doing database work at once keeps
    its connection. With a smaller pool, a loaded process opens and closes a connection for much
    of the work beyond its size, and each costs the server a new backend process.
    """

    size: int = THREADS
    overflow: int = 10

    @property
    def most(self) -> int:
        """The most connections one process opens."""
        return self.size + self.overflow


class Database:
    """One engine per process; short sessions per unit of work."""

    def __init__(self, url: str, *, pool: Pool | None = None, idle_check: float = IDLE_CHECK) -> None:
        """``idle_check``: see :func:`_check_idle_connections` (server databases only)."""
        self.url = url
        options: dict[str, Any] = {}
        if not url.startswith("sqlite"):
            if pool is not None:
                options.update(pool_size=pool.size, max_overflow=pool.overflow)
        else:
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                _private_sqlite_file(Path(path))
            options["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **options)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            _check_idle_connections(self.engine, idle_check)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with Session(self.engine, expire_on_commit=False) as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    @contextmanager
    def autocommit(self) -> Iterator[Session]:
        """A session whose every statement commits on its own, for work that needs no transaction:
        reads that need no snapshot shared between them (under READ COMMITTED each statement sees
        its own anyway), and writes of one statement each. It saves a transaction's ``BEGIN`` and
        ``COMMIT``, on PostgreSQL each a round trip to the server."""
        with (
            self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection,
            Session(bind=connection, expire_on_commit=False) as session,
        ):
            yield session
            session.commit()  # writes what the ORM holds (its flush); sends no COMMIT of its own

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A :meth:`session` for read-modify-write: it takes the write lock before it reads.

        PostgreSQL rows are locked by ``SELECT ... FOR UPDATE``; SQLite ignores that and only
        locks at the first write, so two read-modify-writes could both read the old value. There
        the transaction starts with ``BEGIN IMMEDIATE`` instead, which waits for other writers.
        """
        with self.session() as session:
            if self.engine.dialect.name == "sqlite":
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield session

    def migrate(self) -> None:
        """Apply every Alembic migration not yet applied."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["engine"] = self.engine
        command.upgrade(config, "head")

    def dispose(self) -> None:
        self.engine.dispose()


def _private_sqlite_file(path: Path) -> None:
    """Create the database file (and its directory) readable by its owner only, if missing.

    SQLite gives the ``-wal``, ``-shm`` and ``-journal`` files it creates later the database file's
    own permissions, so they are owner-only too; an existing file keeps its mode.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Never opened when it exists: closing any descriptor of a file drops this process's POSIX
    # locks on it, SQLite's included.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _check_idle_connections(engine: Engine, idle: float) -> None:
    """A server may have closed a pooled connection (a restart, an idle timeout, a proxy): a
    checkout of one that sat idle for more than ``idle`` seconds pings it first, and takes a new
    one if the ping fails. A connection returned moments ago is handed out as it is: under load
    that saves a round trip per checkout, several per event. One closed within ``idle`` seconds of
    its last use fails its next statement instead (a transient error, which the caller's retry
    rides out), and marks every older connection of the pool stale. A SQLite connection is a file
    handle, which nothing closes: it is never checked."""

    @event.listens_for(engine, "checkin")
    def returned(_dbapi_connection: Any, record: Any) -> None:
        record.info["returned"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def handed_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        returned = record.info.pop("returned", None)
        if returned is None or time.monotonic() - returned <= idle:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as failed:  # whatever the driver raises for a closed connection
            raise exc.DisconnectionError(f"a pooled connection idle for over {idle:g}s was closed") from failed


def upsert(session: Session) -> Callable[..., Any] | None:
    """The session's ``insert`` with ``on_conflict_do_update`` (PostgreSQL and SQLite), else
    ``None``: the caller falls back to a merge."""
    dialect = session.get_bind().dialect.name
    return {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)


_UPSERTS: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], Any] = {}


def upsert_statement(session: Session, table: Any, keys: Sequence[str], updates: Sequence[str]) -> Any | None:
    """``INSERT INTO table ... ON CONFLICT (keys) DO UPDATE SET updates`` (from the inserted row),
    or ``DO NOTHING`` when ``updates`` is empty, for the session's database, or ``None`` where
    :func:`upsert` is. Built once per database kind and run on the session's connection with each
    call's values: SQLAlchemy reuses its compiled form, and no ORM step or per-call construction
    is paid on a hot path."""
    found = (session.get_bind().dialect.name, table.name, tuple(keys), tuple(updates))
    statement = _UPSERTS.get(found)
    if statement is None:
        insert = upsert(session)
        if insert is None:
            return None
        plain = insert(table)
        statement = _UPSERTS[found] = (
            plain.on_conflict_do_update(index_elements=list(keys), set_={name: plain.excluded[name] for name in updates})
            if updates
            else plain.on_conflict_do_nothing(index_elements=list(keys))
        )
    return statement


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; the busy timeout rides out short locks.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
