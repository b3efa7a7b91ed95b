"""``nurture runs`` and ``nurture migrate``: runs in flight by version, and moving them on.

    nurture runs welcome --counts                  # per version: active, ended, where runs wait
    nurture runs welcome --state active --version 3f2a9c1b0d4e
    nurture migrate welcome --from 3f2a9c1b0d4e --to 9d0e4411c2a7 --dry-run
    nurture migrate welcome --from 3f2a9c1b0d4e --end --reason retired
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import click
from click.core import ParameterSource
from temporalio.service import RPCError, RPCStatusCode

from channels import mask_user_id
from nurture.engine.clock import format_instant
from nurture.language import ir
from nurture.language.migration import Migration, MigrationError, parse_map, plan_end, plan_move
from nurture.reports.runs import (
    PAGE_LIMIT,
    RunPage,
    RunRow,
    UnknownFilter,
    VersionCount,
    active_runs,
    check_filters,
    list_runs,
    version_counts,
)
from nurture.service.settings import Settings
from nurture.storage.db import Database
from nurture.storage.stores import Routes, store_versions, stored_version, stored_versions

from .options import project_options
from .privacy import _connect, _open, _settings, home_option
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
@click.option(
    "--counts", is_flag=True, help="Print the counts per version instead of runs (no other filter applies)."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON: the body of GET /v1/runs or /v1/runs/counts, with user ids masked.",
)
@home_option
@click.pass_context
def runs(
    ctx: click.Context,
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
    as in `nurture outbox`, in the JSON too. A journey, version or step that no run or stored
    version has is an error, not an empty list.
    """
    if counts:
        listing = [f"--{name}" for name, value in (("version", version), ("state", state), ("step", step), ("after", after)) if value]
        if ctx.get_parameter_source("limit") is not ParameterSource.DEFAULT:
            listing.append("--limit")
        if listing:
            raise click.UsageError(f"--counts counts every version, state and step; {', '.join(listing)} apply to the listing")
    with worker_database(home) as db:
        try:
            check_filters(db, journey, version=version, step=step)
        except UnknownFilter as exc:
            raise click.BadParameter(str(exc), param_hint="JOURNEY" if exc.field == "journey" else f"--{exc.field}") from None
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
    if as_json:
        page = page.model_copy(update={"runs": [masked(run) for run in page.runs]})
    click.echo(page.model_dump_json(indent=2) if as_json else render_page(page))


def masked(run: RunRow) -> RunRow:
    """``run`` with its user id masked, in its workflow id too (``nurture/<journey>/<user>/<key>``)."""
    user = mask_user_id(run.user_id)
    if user == run.user_id:
        return run
    parts = run.workflow_id.split("/")
    workflow = "/".join([*parts[:2], quote(user, safe=""), parts[3]]) if len(parts) == 4 else "***"
    return run.model_copy(update={"user_id": user, "workflow_id": workflow})


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


@click.command()
@click.argument("journey")
@click.option("--from", "from_version", required=True, help="The version whose runs in flight move or end.")
@click.option("--to", "to_version", default=None, help="Move them to this version at their next wait.")
@click.option("--end", "end", is_flag=True, help="End them instead, with --reason.")
@click.option("--reason", default="retired", show_default=True, help="The end reason --end records.")
@click.option(
    "--map",
    "pairs",
    multiple=True,
    metavar="OLD=NEW",
    help="Where runs waiting at OLD (a step of --from) continue in --to; repeat for each step.",
)
@click.option("--dry-run", is_flag=True, help="Print what would happen to each run; change nothing.")
@home_option
@project_options
def migrate(
    journey: str,
    from_version: str,
    to_version: str | None,
    end: bool,
    reason: str,
    pairs: tuple[str, ...],
    dry_run: bool,
    home: Path | None,
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None,
) -> None:
    """Move the runs in flight of JOURNEY at version --from to version --to, or --end them.

    A moved run changes version at its next wait (at once if it is waiting): it waits at the step
    of --to with the same id, or the one --map names, until the instant it was due, keeping its
    variants, goal window and last event, and goes on with --to's steps. Every step of --from
    where runs wait must have a place in --to of a kind that can take the wait, or no run is
    touched. Versions come from the journey files (the current one) and from the database,
    which keeps every version a worker or the API started with. Runs not named by a plan finish
    on the version they entered with.
    """
    if end == (to_version is not None):
        raise click.UsageError("give either --to VERSION (move the runs) or --end (end them)")
    if end and pairs:
        raise click.UsageError("--map applies to --to, not --end")
    try:
        mapping = parse_map(list(pairs))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--map") from None
    from .main import _compile

    project = _compile(journeys_dir, templates_dir, config)
    settings = _settings(home)
    db = _open(settings)
    try:
        current = project.journeys.get(journey)
        store_versions(db, [current] if current is not None else [])
        try:
            check_filters(db, journey)
        except UnknownFilter as exc:
            raise click.BadParameter(str(exc), param_hint="JOURNEY") from None
        old = _version(db, journey, from_version, "--from")
        target = None if to_version is None else _version(db, journey, to_version, "--to")
        try:
            plan = plan_end(old, reason) if target is None else plan_move(old, target, mapping)
        except MigrationError as exc:
            lines = [f"the plan for {journey} {from_version} has {len(exc.problems)} problem(s):"]
            raise click.ClickException("\n".join([*lines, *(f"  {p}" for p in exc.problems)])) from None
        runs = active_runs(db, journey, from_version)
        if dry_run or not runs:
            click.echo(render_plan(plan, runs), nl=False)
            return
        sent, gone = asyncio.run(_signal(settings, plan, target, runs))
        if target is not None:
            Routes(db).listen_also([r.workflow_id for r in runs], sorted(target.listens_for()))
    finally:
        db.dispose()
    what = "move at their next wait" if target is not None else "end"
    click.echo(f"signalled {sent} run(s) to {what}" + (f"; {gone} had already ended" if gone else ""))


def _version(db: Database, journey: str, version: str, option: str) -> ir.Journey:
    found = stored_version(db, journey, version)
    if found is None:
        known = ", ".join(stored_versions(db, journey)) or "none"
        raise click.BadParameter(
            f"{journey} has no stored version {version} (stored: {known}); versions are stored when a "
            "worker or the API starts with them",
            param_hint=option,
        )
    return found


def render_plan(plan: Migration, runs: Sequence[RunRow]) -> str:
    """What happens to each run, by the step it waits at, and then in total."""
    if plan.end_reason is not None:
        head = f"{len(runs)} active run(s) of {plan.journey} at version {plan.from_version} end ({plan.end_reason})"
    else:
        head = (
            f"{len(runs)} active run(s) of {plan.journey} at version {plan.from_version} move to "
            f"version {plan.to_version} at their next wait"
        )
    lines = [head]
    by_step: dict[str, int] = {}
    for run in runs:
        if plan.end_reason is not None:
            fate = f"ends {plan.end_reason}"
        elif run.step is None:
            fate = "moves at its first wait"
        else:
            fate = f"continues at {plan.steps.get(run.step, run.step)}"
        where = f"waiting at {run.step}" if run.step else "not waiting yet"
        lines.append(f"  {run.run_id}  {mask_user_id(run.user_id)}  {where} -> {fate}")
        by_step[where] = by_step.get(where, 0) + 1
    lines.extend(f"{count} {where}" for where, count in sorted(by_step.items()))
    return "\n".join(lines) + "\n"


async def _signal(
    settings: Settings, plan: Migration, target: ir.Journey | None, runs: Sequence[RunRow]
) -> tuple[int, int]:
    """Send each run the plan, printed once Temporal is reached; (signalled, already ended)."""
    client = await _connect(settings)
    if client is None:
        raise click.ClickException(
            f"Temporal at {settings.temporal_address} is unreachable: start it or set TEMPORAL_ADDRESS; "
            "nothing was changed"
        )
    click.echo(render_plan(plan, runs), nl=False)
    payload = plan.signal(target)
    sent = gone = 0
    for run in runs:
        try:
            await client.get_workflow_handle(run.workflow_id).signal("migrate", payload)
            sent += 1
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            gone += 1
    return sent, gone
