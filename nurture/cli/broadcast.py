"""``nurture broadcast start|cancel|status``: send a broadcast to its audience, stop it, watch it.

    nurture broadcast start python_launch          # streams the audience, starts each run, shows progress
    nurture broadcast status python_launch         # selected, started, sent, skipped by reason
    nurture broadcast cancel python_launch         # no more starts; runs in flight end broadcast_cancelled

Like ``nurture migrate``, these read the service's database (``DATABASE_URL``, else SQLite in
``--home``) and reach Temporal at ``TEMPORAL_ADDRESS``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from nurture.language.compiler import Project
from nurture.service.broadcasts import Broadcaster, BroadcastError, Started
from nurture.storage.broadcasts import Progress
from nurture.storage.db import Database
from nurture.storage.models import BroadcastOccurrence

from .options import project_options
from .privacy import _connect, _open, _settings, home_option

F = TypeVar("F", bound=Callable[..., Any])
BAR = 30


def broadcast_options(func: F) -> F:
    """The project (``--broadcasts`` besides the usual), ``--home`` and ``--occurrence``."""
    func = click.option(
        "--occurrence",
        default=None,
        help="Which occurrence [default: start: the one due now; cancel, status: the latest started].",
    )(func)
    func = click.option(
        "--broadcasts",
        "broadcasts_dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Broadcasts directory [default: broadcasts beside the journeys directory].",
    )(func)
    return home_option(project_options(func))


@click.group()
def broadcast() -> None:
    """Start, cancel and watch broadcasts (broadcasts/<id>.yaml)."""


def _project(journeys_dir: Path, templates_dir: Path, config: Path | None, broadcasts_dir: Path | None) -> Project:
    from .main import _compile

    return _compile(journeys_dir, templates_dir, config, broadcasts_dir=broadcasts_dir)


async def _with_broadcaster(
    project: Project, db: Database, home: Path | None, work: Callable[[Broadcaster], Any], *, temporal: bool = True
) -> Any:
    settings = _settings(home)
    client = None
    if temporal:
        client = await _connect(settings)
        if client is None:
            raise click.ClickException(
                f"Temporal at {settings.temporal_address} is unreachable: start it or set TEMPORAL_ADDRESS; "
                "nothing was changed"
            )
    broadcaster = Broadcaster(project, db, client, settings.task_queue)
    try:
        return await work(broadcaster)
    except BroadcastError as exc:
        raise click.ClickException(str(exc)) from None


def _run(
    project: Project, home: Path | None, work: Callable[[Broadcaster], Any], *, temporal: bool = True
) -> Any:
    """``work`` done with a broadcaster on the service's database (closed after)."""
    db = _open(_settings(home))
    try:
        return asyncio.run(_with_broadcaster(project, db, home, work, temporal=temporal))
    finally:
        db.dispose()


@broadcast.command()
@click.argument("broadcast_id", metavar="ID")
@broadcast_options
def start(
    broadcast_id: str,
    occurrence: str | None,
    broadcasts_dir: Path | None,
    home: Path | None,
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None,
) -> None:
    """Start broadcast ID: one run per member of its audience, paced by its rate.

    Idempotent: a second start of the same occurrence goes on where the first stopped (a crash)
    or does nothing (it is done, or cancelled); while another process is starting it, it is refused.
    """
    project = _project(journeys_dir, templates_dir, config, broadcasts_dir)

    async def work(broadcaster: Broadcaster) -> Started:
        chosen = None
        if occurrence is not None:
            found = broadcaster.broadcast(broadcast_id)
            chosen = broadcaster.occurrence(found)
            if chosen.key != occurrence:
                raise BroadcastError(
                    f"occurrence {occurrence} is not the one due now ({chosen.key}); only that one can be started"
                )

        def shown(row: BroadcastOccurrence) -> None:  # the row only: no count per page
            click.echo(f"\r{bar(row.started + row.existing, row.selected)}  started {row.started} of {row.selected}", nl=False)

        done = await broadcaster.start(broadcast_id, occurrence=chosen, on_page=shown)
        click.echo("")
        click.echo(render(broadcaster.status(broadcast_id, done.occurrence)), nl=False)
        return done

    done = _run(project, home, work)
    if done.status in ("done", "cancelled") and done.started == 0 and done.existing == 0:
        click.echo(f"occurrence {done.occurrence} was already {done.status}: nothing was started")


@broadcast.command()
@click.argument("broadcast_id", metavar="ID")
@broadcast_options
def cancel(
    broadcast_id: str,
    occurrence: str | None,
    broadcasts_dir: Path | None,
    home: Path | None,
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None,
) -> None:
    """Cancel broadcast ID: no more runs start, and runs in flight end with reason broadcast_cancelled."""
    project = _project(journeys_dir, templates_dir, config, broadcasts_dir)

    async def work(broadcaster: Broadcaster) -> tuple[BroadcastOccurrence, int]:
        return await broadcaster.cancel(broadcast_id, occurrence)

    row, stopped = _run(project, home, work)
    click.echo(f"{broadcast_id} ({row.occurrence}) is {row.status}: {stopped} run(s) in flight stopped")


@broadcast.command()
@click.argument("broadcast_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the body of GET /v1/broadcasts/{id}).")
@broadcast_options
def status(
    broadcast_id: str,
    as_json: bool,
    occurrence: str | None,
    broadcasts_dir: Path | None,
    home: Path | None,
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None,
) -> None:
    """Progress of broadcast ID: selected, started, sent, and skipped by reason."""
    project = _project(journeys_dir, templates_dir, config, broadcasts_dir)

    async def work(broadcaster: Broadcaster) -> Progress:
        return broadcaster.status(broadcast_id, occurrence)

    found = _run(project, home, work, temporal=False)
    click.echo(json.dumps(found.to_dict(), indent=2) if as_json else render(found), nl=not as_json)


def bar(done: int, total: int, width: int = BAR) -> str:
    """``[#####.....]  50%``."""
    share = 1.0 if total <= 0 else min(done / total, 1.0)
    filled = round(share * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {share:>4.0%}"


def progress_line(found: Progress) -> str:
    """One line, rewritten in place while a start runs."""
    return f"{bar(found.started, found.selected)}  started {found.started} of {found.selected}  sent {found.sent}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in counts.items()) or "none"


def render(found: Progress) -> str:
    """The status block: a bar of starts against the audience, then runs and messages."""
    lines = [
        f"{found.broadcast} ({found.occurrence}): {found.status}" + (", being started" if found.driving else ""),
        progress_line(found),
        f"runs: {found.runs} ({found.active} active; ended: {_counts(found.ended)})",
        f"messages: sent {found.sent}, sending {found.sending}",
        f"skipped: {_counts(found.skipped)}",
        f"failed: {_counts(found.failed)}",
        f"held back (quiet hours, caps, rate): {_counts(found.deferred)}",
    ]
    return "\n".join(lines) + "\n"
