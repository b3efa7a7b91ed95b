"""``nurture console``: console accounts and one-time sign-in links.

    nurture console add-user ana@example.com --role operator     # asks for a password
    nurture console link ana@example.com                          # a one-time sign-in link
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from nurture.console import accounts
from nurture.console.app import PREFIX
from nurture.service.settings import Settings
from nurture.storage.console import ROLES
from nurture.storage.db import Database

_HOME = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local state directory [default: NURTURE_HOME or .nurture]; DATABASE_URL wins.",
)


def _database(home: Path | None) -> Database:
    env = dict(os.environ)
    if home is not None:
        env["NURTURE_HOME"] = str(home)
    db = Database(Settings.from_env(env).database)
    db.migrate()
    return db


@click.group()
def console() -> None:
    """Console accounts: add one, or print a one-time sign-in link."""


@console.command("add-user")
@click.argument("email")
@click.option("--role", type=click.Choice(ROLES), required=True, help="viewer reads; operator also acts; admin also reveals addresses.")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from standard input (one line) instead of asking for it.",
)
@click.option("--no-password", is_flag=True, help="No password: the account signs in with `nurture console link`.")
@_HOME
def add_user(email: str, role: str, password_stdin: bool, no_password: bool, home: Path | None) -> None:
    """Add a console account (or change its role and password)."""
    password: str | None
    if no_password:
        password = None
    elif password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    db = _database(home)
    try:
        user = accounts.add_user(db, email, role, password)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.dispose()
    click.echo(f"{user.email} is a console {user.role}.")


@console.command()
@click.argument("email")
@click.option("--url", default=None, help="The console's base URL [default: NURTURE_PUBLIC_URL or http://127.0.0.1:8000].")
@_HOME
def link(email: str, url: str | None, home: Path | None) -> None:
    """Print a one-time sign-in link for an account (valid 30 minutes)."""
    db = _database(home)
    try:
        token = accounts.make_link(db, email)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        db.dispose()
    base = (url or os.environ.get("NURTURE_PUBLIC_URL") or "http://127.0.0.1:8000").rstrip("/")
    click.echo(f"{base}{PREFIX}/link/{token}")
