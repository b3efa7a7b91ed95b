"""``nurture report``: what a journey achieved, from the worker's database."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import click
from sqlalchemy.exc import OperationalError, ProgrammingError

from nurture.language import ir
from nurture.language.compiler import Project
from nurture.language.diagnostics import CompileError, format_all
from nurture.reports.forecast import play_into, scratch_database
from nurture.reports.report import journey_report, parse_bound, render_text, report_to_dict
from nurture.service.settings import Settings
from nurture.simulation.scenarios import load_scenario
from nurture.storage.db import Database

from .options import project_options
from .privacy import home_option


def show_report(
    db: Database,
    journey: ir.Journey,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    version: str | None = None,
    as_json: bool = False,
) -> str:
    """The report of ``journey`` in ``db`` as the command prints it: text, or the v1 JSON."""
    report = journey_report(db, journey, since=since, until=until, version=version)
    if as_json:
        return json.dumps(report_to_dict(report), ensure_ascii=False, indent=2) + "\n"
    return render_text(report)


class _Bound(click.ParamType[datetime]):
    """A date or date-time bound of the range (see :func:`parse_bound`)."""

    name = "date"

    def __init__(self, *, end: bool) -> None:
        self.end = end

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_bound(str(value), end=self.end)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@contextmanager
def worker_database(home: Path | None) -> Iterator[Database]:
    """The worker's database (DATABASE_URL, else SQLite in ``home``), for commands that read it."""
    env = dict(os.environ)
    if home is not None:
        env["NURTURE_HOME"] = str(home)
    url = Settings.from_env(env).database
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise click.ClickException(
            f"no database at {url}: run the worker (nurture up) first, or set DATABASE_URL"
        )
    db = Database(url)
    try:
        yield db
    except (OperationalError, ProgrammingError) as exc:
        raise click.ClickException(
            f"the database at {url} has no run records yet ({type(exc).__name__})"
        ) from None
    finally:
        db.dispose()


@click.command()
@click.argument("journey")
@click.option(
    "--since",
    type=_Bound(end=False),
    default=None,
    help="Runs that entered from this date (UTC) or date-time on.",
)
@click.option(
    "--until",
    type=_Bound(end=True),
    default=None,
    help="Runs that entered before this date-time, or up to the end of this date (UTC).",
)
@click.option(
    "--version", "version", default=None, help="Only runs of this journey version [default: every version]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document (schema nurture.report/v1).")
@click.option(
    "--scenario",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Forecast: play this scenario file in the simulator and report it, instead of the database.",
)
@home_option
@project_options
def report(
    journey: str,
    since: datetime | None,
    until: datetime | None,
    version: str | None,
    as_json: bool,
    scenario: Path | None,
    home: Path | None,
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None,
) -> None:
    """Report what JOURNEY achieved: entries, steps, messages, conversions and experiments.

    Counts the runs that entered in [--since, --until) in the worker's database (DATABASE_URL,
    else SQLite in --home); each run counts everything it did, whenever it happened. With
    --scenario, the runs of that scenario played in the simulator (a forecast before launch).
    """
    from .main import _compile

    project = _compile(journeys_dir, templates_dir, config)
    try:
        (selected,) = project.select([journey])
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    if scenario is not None:
        click.echo(
            _forecast(scenario, project, selected, since=since, until=until, version=version, as_json=as_json),
            nl=False,
        )
        return
    with worker_database(home) as db:
        click.echo(
            show_report(db, selected, since=since, until=until, version=version, as_json=as_json), nl=False
        )


def _forecast(
    path: Path,
    project: Project,
    journey: ir.Journey,
    *,
    since: datetime | None,
    until: datetime | None,
    version: str | None,
    as_json: bool,
) -> str:
    """The report of ``journey`` over the runs of a scenario played into a scratch database."""
    try:
        scenario = load_scenario(path, project)
    except CompileError as exc:
        raise click.ClickException("the scenario cannot be loaded:\n" + format_all(exc.diagnostics)) from None
    if journey.id not in scenario.journeys:
        raise click.ClickException(
            f"the scenario does not play journey '{journey.id}' (its journeys: {', '.join(scenario.journeys)})"
        )
    with scratch_database() as db:
        asyncio.run(play_into(scenario, project, db))
        return show_report(db, journey, since=since, until=until, version=version, as_json=as_json)
