"""Alembic environment: runs against the engine handed over by ``Database.migrate``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool, text
from sqlmodel import SQLModel

from nurture.storage import audit, console, models  # noqa: F401  (registers the tables)

config = context.config
target_metadata = SQLModel.metadata

MIGRATION_LOCK = 7_146_524_610_281_905
"""The PostgreSQL advisory lock migrations hold: processes that start together (API processes and
workers of one deployment) migrate one after the other, and those after the first find nothing
to do. Without it, all of them saw an empty database and all but one failed creating its tables."""


def run() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        engine = engine_from_config(
            config.get_section(config.config_ini_section) or {}, prefix="sqlalchemy.", poolclass=pool.NullPool
        )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":  # held until this transaction ends
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            context.run_migrations()
        connection.commit()


run()
