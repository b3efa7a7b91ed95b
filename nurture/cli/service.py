"""Service commands: ``nurture up``, ``nurture worker`` and ``nurture outbox``.

Module-level click commands, registered on the ``nurture`` group by ``nurture.cli.main``; also
runnable on their own as ``python -m nurture.cli.service up|worker|outbox``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import click
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import col, select

from channels import mask_address
from nurture.language.diagnostics import CompileError
from nurture.service.observability import configure_logging, mask_text
from nurture.service.settings import Settings, SettingsError
from nurture.storage.db import Database
from nurture.storage.models import MessageRecord


@click.command()
@click.option("--port", default=8000, show_default=True, help="Port of the event API.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface the event API listens on (a warning is printed when it is not loopback).",
)
@click.option(
    "--temporal-host",
    default="127.0.0.1",
    show_default=True,
    help="Interface the Temporal dev server's gRPC and UI listen on (the UI has no login).",
)
@click.option(
    "--temporal-port",
    default=7233,
    show_default=True,
    help="Temporal gRPC port; a Temporal server already listening there is reused.",
)
@click.option("--ui-port", type=int, default=None, help="Temporal UI port [default: temporal port + 1000].")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local state directory [default: NURTURE_HOME or .nurture].",
)
@click.option(
    "--journeys",
    type=click.Path(path_type=Path),
    default=None,
    help="Journeys directory [default: NURTURE_JOURNEYS or ./journeys].",
)
@click.option(
    "--templates",
    type=click.Path(path_type=Path),
    default=None,
    help="Templates directory [default: NURTURE_TEMPLATES or ./templates].",
)
def up(
    port: int,
    host: str,
    temporal_host: str,
    temporal_port: int,
    ui_port: int | None,
    home: Path | None,
    journeys: Path | None,
    templates: Path | None,
) -> None:
    """Run the whole stack locally: Temporal dev server, worker and event API.

    State persists in the home directory, so the next `nurture up` resumes in-flight journeys.
    Every message goes to the outbox (`nurture outbox`). Ctrl-C stops everything.
    """
    from nurture.service.worker import StartupError, exit_now

    from .up import UpError, UpOptions
    from .up import up as run_up

    configure_logging()
    options = UpOptions(
        home=home or Path(os.environ.get("NURTURE_HOME") or ".nurture"),
        host=host,
        temporal_host=temporal_host,
        port=port,
        temporal_port=temporal_port,
        ui_port=ui_port,
        journeys=journeys,
        templates=templates,
    )
    try:
        asyncio.run(run_up(options, out=sys.stdout))
    except CompileError as exc:
        click.echo(f"nurture up: the journeys do not compile; not starting.\n{exc}", err=True)
        exit_now(1)
    except (UpError, StartupError) as exc:
        click.echo(f"nurture up: {exc}", err=True)
        exit_now(1)
    except SettingsError as exc:
        click.echo(f"nurture up: {exc.code}", err=True)
        exit_now(1)
    exit_now(0)


@click.command()
def worker() -> None:
    """Run the journey worker (configured by the environment; see `worker.py`)."""
    from nurture.service import worker as worker_module

    worker_module.main()


@click.command()
@click.option(
    "--limit", "-n", default=10, show_default=True, type=click.IntRange(min=1), help="How many messages."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one array) instead of text.")
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Local state directory [default: NURTURE_HOME or .nurture]; DATABASE_URL wins.",
)
def outbox(limit: int, as_json: bool, home: Path | None) -> None:
    """Show the latest messages delivered to the outbox, newest first (addresses masked)."""
    env = dict(os.environ)
    if home is not None:
        env["NURTURE_HOME"] = str(home)
    settings = Settings.from_env(env)
    rows = latest_outbox(settings.database, limit)
    if as_json:
        click.echo(json.dumps([outbox_entry(row) for row in rows], ensure_ascii=False, indent=2))
        return
    if not rows:
        click.echo(f"The outbox is empty ({settings.database}).")
        return
    for index, row in enumerate(rows):
        if index:
            click.echo()
        click.echo(format_message(row))


def latest_outbox(url: str, limit: int) -> list[MessageRecord]:
    """The newest ``limit`` outbox messages; none when the database does not exist yet."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return []
    db = Database(url)
    try:
        with db.session() as session:
            query = (
                select(MessageRecord)
                .where(col(MessageRecord.provider) == "outbox")
                .order_by(col(MessageRecord.created_at).desc(), col(MessageRecord.id).desc())
                .limit(limit)
            )
            return list(session.execute(query).scalars())
    except (OperationalError, ProgrammingError):  # no tables yet: nothing was ever sent
        return []
    finally:
        db.dispose()


def outbox_entry(row: MessageRecord) -> dict[str, Any]:
    """One message as JSON: what was sent, to a masked address; no HTML."""
    content = row.content or {}
    return {
        "id": row.id,
        "sent_at": row.created_at.isoformat(),
        "channel": row.channel,
        "address": mask_address(row.address or ""),
        "journey": row.journey or None,
        "step_id": row.step_id,
        "run_id": row.run_id,
        "user_id": mask_text(row.user_id) if row.user_id else None,
        "template": row.template,
        "locale": row.locale,
        "subject": row.subject,
        "preheader": content.get("preheader"),
        "text": content.get("text"),
        "data": content.get("data"),
        "url": content.get("url"),
        "provider_id": row.provider_id,
    }


def format_message(row: MessageRecord, width: int = 100) -> str:
    """Time, channel, masked address, then the subject and an excerpt, the text or the fields."""
    content = row.content or {}
    where = " / ".join(part for part in (row.journey, row.step_id) if part)
    head = (
        f"{row.created_at:%Y-%m-%d %H:%M:%S}Z  {row.channel:<6}  "
        f"{mask_address(row.address or '')}  {row.template}  ({where})"
    )
    lines = [head]
    if row.channel == "email":
        lines.append(f"    Subject: {row.subject or ''}")
        lines += _excerpt(content.get("text") or "", width, max_lines=3)
    elif row.channel == "sms":
        lines += _excerpt(content.get("text") or row.preview or "", width, max_lines=6)
    else:
        for name, value in (content.get("data") or {}).items():
            lines += _excerpt(f"{name}: {value}", width, max_lines=2)
        if content.get("url"):
            lines.append(f"    url: {content['url']}")
    return "\n".join(lines)


def _excerpt(text: str, width: int, *, max_lines: int) -> list[str]:
    flat = " ".join(text.split())
    if not flat:
        return []
    wrapped = textwrap.wrap(flat, width=width - 4)
    if len(wrapped) > max_lines:
        wrapped = wrapped[:max_lines]
        wrapped[-1] = wrapped[-1][: width - 5].rstrip() + "…"
    return ["    " + line for line in wrapped]



@click.group()
def service() -> None:
    """Nurture's service commands (also available as `nurture up|worker|outbox`)."""


service.add_command(up)
service.add_command(worker)
service.add_command(outbox)

if __name__ == "__main__":
    service()
