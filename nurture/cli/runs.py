"""``nurture runs``: a journey's runs by version, state and step, from the worker's database.

    nurture runs welcome --counts                  # per version: active, ended, where runs wait
    nurture runs welcome --state active --version 3f2a9c1b0d4e
    nurture runs welcome --step reminder_wait --after <cursor>
"""

from __future__ import annotations

from pathlib import Path

import click

from channels import mask_user_id
from nurture.engine.clock import format_instant
from nurture.reports.runs import PAGE_LIMIT, RunPage, VersionCount, list_runs, version_counts

from .privacy import home_option
from .report import worker_database


@click.command()
@click.argument("journey")
@click.option("--version", "version", default=None, help="Only runs at this journey version.")
@click.option("--state", type=click.Choice(["active", "ended"]), default=None, help="Only active or ended runs.")
@click.option("--step", default=None, help="Only runs waiting at this step id.")
@click.option(
    "--limit", type=click.IntRange(1, PAGE_LIMIT), default=50, show_default=True, help="Runs per page."
)
@click.option("--after", default=None, help="Continue after this cursor (printed under the previous page).")
@click.option("--counts", is_flag=True, help="Print the counts per version instead of runs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the body of GET /v1/runs or /v1/runs/counts).")
@home_option
def runs(
    journey: str,
    version: str | None,
    state: str | None,
    step: str | None,
    limit: int,
    after: str | None,
    counts: bool,
    as_json: bool,
    home: Path | None,
) -> None:
    """List the runs of JOURNEY: version, state, where active runs wait; or --counts per version.

    Reads the worker's database only (DATABASE_URL, else SQLite in --home); user ids are masked
    as in `nurture outbox`.
    """
    with worker_database(home) as db:
        if counts:
            found = version_counts(db, journey)
            if as_json:
                click.echo("[" + ",".join(c.model_dump_json() for c in found) + "]")
            else:
                click.echo(render_counts(journey, found), nl=False)
            return
        try:
            page = list_runs(
                db,
                journey,
                version=version,
                state="active" if state == "active" else "ended" if state == "ended" else None,
                step=step,
                limit=limit,
                after=after,
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--after") from None
    click.echo(page.model_dump_json(indent=2) if as_json else render_page(page))


def render_counts(journey: str, found: list[VersionCount]) -> str:
    """The per-version table ``--counts`` prints, oldest version first."""
    if not found:
        return f"no runs of {journey}\n"
    lines = [f"{'version':<14}{'active':>8}{'ended':>8}  waiting at"]
    for count in found:
        waiting = ", ".join(f"{step} {n}" for step, n in count.waiting.items()) or "-"
        lines.append(f"{count.version:<14}{count.active:>8}{count.ended:>8}  {waiting}")
    return "\n".join(lines) + "\n"


def render_page(page: RunPage) -> str:
    """One line per run, then the cursor of the next page."""
    if not page.runs:
        return "no runs"
    lines = []
    for run in page.runs:
        where = f"waiting at {run.step}" if run.status == "active" and run.step else run.status
        if run.status == "ended":
            where = f"ended {run.end_reason or ''}".rstrip()
        lines.append(
            f"{run.run_id}  {run.version}  {mask_user_id(run.user_id)}  "
            f"entered {format_instant(run.entered_at)}  {where}"
        )
    if page.next is not None:
        lines.append(f"more: --after {page.next}")
    return "\n".join(lines)
