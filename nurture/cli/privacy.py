"""``nurture forget`` and ``nurture export``: erasure and access requests from the command line.

    nurture forget u_1024                 # shows what it holds, asks, then forgets
    nurture forget u_1024 --yes           # no question (scripts)
    nurture export u_1024 --out u_1024.json
    nurture export --email li@example.com # any identifier finds the person

A user is named by a userId (else a person id) or by one identifier option (``--email``,
``--phone``, ``--anonymous-id``, ``--wechat-openid``, ``--person``); either way the person it
belongs to is exported or forgotten, with every person merged into it (docs/identity.md).

Both work on the database directly (``DATABASE_URL``, else SQLite in ``--home`` or
``NURTURE_HOME``), exactly as ``DELETE /v1/users/{id}`` and ``GET /v1/users/{id}/export`` do
(:mod:`nurture.service.privacy`), and both are written to the audit log with actor ``cli``. ``forget``
needs Temporal (``TEMPORAL_ADDRESS``) only when the user has active runs; when Temporal is
reachable it also deletes the user's run histories there.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import click
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from temporalio.client import Client
from temporalio.service import RPCError

from channels import mask_user_id
from nurture.service import privacy
from nurture.service.settings import Settings, SettingsError
from nurture.storage.db import Database
from nurture.storage.identities import DbIdentities

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for Temporal once its port answers."""

home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local state directory [default: NURTURE_HOME or .nurture]; DATABASE_URL wins.",
)

IDENTIFIER_OPTIONS = {
    "email": "an email address of the person",
    "phone": "a phone number of the person (E.164, any punctuation)",
    "anonymous_id": "an anonymousId the person was seen with",
    "wechat_openid": "the person's WeChat openid",
    "person": "a person id (a merged-away one finds the survivor)",
}


def who_options(func: Any) -> Any:
    """USER (optional) and one ``--email`` / ``--phone`` / ... option instead of it."""
    for kind, text in reversed(IDENTIFIER_OPTIONS.items()):
        func = click.option(f"--{kind.replace('_', '-')}", kind, default=None, help=f"Find USER by {text}.")(func)
    return click.argument("user", required=False)(func)


def _person(db: Database, user: str | None, named: dict[str, str | None]) -> str:
    """The person USER or the one identifier option names; a name no one has is kept as given."""
    given = [(kind, value) for kind, value in named.items() if value is not None]
    if user is not None:
        given.insert(0, ("user", user))
    if len(given) != 1:
        options = ", ".join(f"--{k.replace('_', '-')}" for k in IDENTIFIER_OPTIONS)
        raise click.UsageError(f"name the user with USER or exactly one of {options}")
    [(kind, value)] = given
    store = DbIdentities(db)
    if kind == "user":
        return store.lookup(value) or value
    found = store.resolve(kind, value)
    return found if found is not None else (value if kind == "person" else f"{kind}:{value}")


@click.command()
@who_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@home_option
def forget(user: str | None, yes: bool, home: Path | None, **named: str | None) -> None:
    """Forget USER: end their runs, delete their profile, events and message bodies.

    Messages and runs stay as anonymous counts (no user id, address or content). Active runs get
    the journey's stop signal (end reason `forgotten`); a worker should be running, or they are
    terminated after 10 s. Prints what was done as JSON; forgetting twice is harmless.
    """
    settings = _settings(home)
    db = _open(settings)
    try:
        user = _person(db, user, named)
        held = privacy.holdings(db, user)
        if not yes:
            click.echo(_summary(user, held), err=True)
            click.confirm("Forget this user? This cannot be undone", abort=True, err=True)
        report = asyncio.run(_forget(settings, db, user, held))
    finally:
        db.dispose()
    click.echo(report.model_dump_json(indent=2))
    if report.temporal.histories_kept:
        click.echo(
            f"note: Temporal at {settings.temporal_address} was not reachable or would not delete "
            f"{report.temporal.histories_kept} run history(ies) of ended runs; it drops them after "
            "the namespace's retention period.",
            err=True,
        )


@click.command()
@who_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the JSON to FILE (readable by you only) instead of printing it.",
)
@home_option
def export(user: str | None, out: Path | None, home: Path | None, **named: str | None) -> None:
    """Print everything held about USER as JSON: profile, identifiers, events, runs, messages,
    feedback, audit."""
    settings = _settings(home)
    db = _open(settings)
    try:
        user = _person(db, user, named)
        text = privacy.export_user(db, user, actor=privacy.CLI_ACTOR, secret=settings.secret).model_dump_json(
            indent=2
        )
    finally:
        db.dispose()
    if out is None:
        click.echo(text)
        return
    # The export is personal data: created private, not with the umask's usual 0644.
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text + "\n")
    click.echo(f"wrote the export of {mask_user_id(user)} to {out}", err=True)


def _settings(home: Path | None) -> Settings:
    env = dict(os.environ)
    if home is not None:
        env["NURTURE_HOME"] = str(home)
    try:
        return Settings.from_env(env)
    except SettingsError as exc:
        raise click.ClickException(str(exc.code)) from None


def _open(settings: Settings) -> Database:
    """The service's database, migrated (the audit log may be newer than it); never a new one."""
    url = settings.database
    shown = make_url(url).render_as_string(hide_password=True)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise click.ClickException(
            f"no database at {shown}: pass --home, or set NURTURE_HOME or DATABASE_URL"
        )
    db = Database(url)
    try:
        db.migrate()
    except OperationalError as exc:
        db.dispose()
        raise click.ClickException(f"cannot open the database at {shown}: {exc.orig}") from None
    return db


def _summary(user: str, held: privacy.Holdings) -> str:
    runs = f"{held.runs} run(s)" + (f", {len(held.active)} active" if held.active else "")
    return (
        f"{mask_user_id(user)}: {'a profile' if held.profile else 'no profile'}, {held.events} event(s), "
        f"{runs}, {held.messages} message(s).\n"
        "Forgetting ends the active runs and deletes the profile, events and routes; messages and "
        "runs stay as anonymous counts."
    )


async def _forget(
    settings: Settings, db: Database, user: str, held: privacy.Holdings
) -> privacy.ForgetReport:
    client = await _connect(settings) if held.active or held.executions or held.routes else None
    if client is None and held.active:
        raise click.ClickException(
            f"{mask_user_id(user)} has {len(held.active)} active run(s) to end, and Temporal at "
            f"{settings.temporal_address} is unreachable: start it (nurture up) or set TEMPORAL_ADDRESS, "
            "then retry. Nothing was forgotten."
        )
    try:
        return await privacy.forget(
            db, user, temporal=client, actor=privacy.CLI_ACTOR, secret=settings.secret
        )
    except privacy.TemporalUnavailable as exc:
        raise click.ClickException(f"{exc}. Nothing was forgotten: retry.") from None


async def _connect(settings: Settings) -> Client | None:
    """A Temporal client, or None when Temporal is not reachable."""
    # A plain TCP probe first: a failed SDK connect can leave native threads behind that abort
    # the interpreter at exit (temporalio/sdk-python#300), turning a clear error into SIGABRT.
    if not _listening(settings.temporal_address):
        return None
    try:
        return await asyncio.wait_for(settings.connect(), CONNECT_TIMEOUT)
    except (RuntimeError, RPCError, OSError, TimeoutError):
        return None


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "localhost", int(port)), timeout=2.0):
            return True
    except (OSError, ValueError):
        return False
