"""``nurture audience``: who is in an audience now, and who entered and left it.

    nurture audience size lapsed_customers
    nurture audience list lapsed_customers --limit 20
    nurture audience history lapsed_customers

Reads the database the event API keeps membership in (DATABASE_URL, else SQLite in --home); the
audiences it knows are those an API process has started with. Person ids that are addresses are
masked as in `nurture outbox`.
"""

from __future__ import annotations

import base64
from pathlib import Path

import click
from sqlmodel import Session, col, select

from channels import mask_user_id
from nurture.engine.clock import format_instant
from nurture.language.diagnostics import did_you_mean
from nurture.reports.runs import PAGE_LIMIT
from nurture.storage import audiences as stored
from nurture.storage.models import AudienceVersion

from .privacy import home_option
from .report import worker_database


@click.group()
def audience() -> None:
    """Audiences: their size, their members and their history of entries and exits."""


def _known(session: Session, audience_id: str) -> None:
    """A ClickException naming the known audiences when ``audience_id`` is none of them."""
    known = sorted(set(session.execute(select(col(AudienceVersion.audience))).scalars()))
    if audience_id in known:
        return
    hint = did_you_mean(audience_id, known) if known else " (no audience has been deployed: start the API)"
    raise click.ClickException(f"no audience {audience_id!r}{hint}")


@audience.command()
@click.argument("audience_id", metavar="ID")
@home_option
def size(audience_id: str, home: Path | None) -> None:
    """How many people are in audience ID now."""
    with worker_database(home) as db, db.session() as session:
        _known(session, audience_id)
        count = stored.sizes(session, [audience_id])[audience_id]
    click.echo(f"{audience_id}: {count} member{'' if count == 1 else 's'}")


@audience.command(name="list")
@click.argument("audience_id", metavar="ID")
@click.option("--limit", type=click.IntRange(1, PAGE_LIMIT), default=50, show_default=True, help="Members to show.")
@click.option("--after", default=None, help="Continue after this cursor (printed under the previous page).")
@home_option
def list_members(audience_id: str, limit: int, after: str | None, home: Path | None) -> None:
    """The members of audience ID, by person id, with when each entered."""
    with worker_database(home) as db, db.session() as session:
        _known(session, audience_id)
        found = stored.members(session, audience_id, after=_person(after), limit=limit)
    for person, entered in found:
        click.echo(f"{format_instant(entered)}  {mask_user_id(person)}")
    if not found:
        click.echo("no members" if after is None else "no more members")
    elif len(found) == limit:
        click.echo(f"more: --after {_cursor(found[-1][0])}")


def _cursor(person: str) -> str:
    """The next page's cursor: the last person id, encoded (an id may be an address)."""
    return base64.urlsafe_b64encode(person.encode()).decode().rstrip("=")


def _person(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        return base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise click.BadParameter("not a cursor printed by this command", param_hint="--after") from None


@audience.command()
@click.argument("audience_id", metavar="ID")
@click.option("--limit", type=click.IntRange(1, PAGE_LIMIT), default=50, show_default=True, help="Changes to show.")
@home_option
def history(audience_id: str, limit: int, home: Path | None) -> None:
    """The latest entries and exits of audience ID, newest first."""
    with worker_database(home) as db, db.session() as session:
        _known(session, audience_id)
        changes = stored.history(session, audience_id, limit=limit)
    for change in changes:
        click.echo(f"{format_instant(change.at)}  {change.change:<7}  {mask_user_id(change.person)}")
    if not changes:
        click.echo("no entries or exits yet")
