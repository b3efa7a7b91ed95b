"""The ``nurture`` command."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from nurture.language.compiler import Project, compile_project
from nurture.language.diagnostics import CompileError, format_all
from nurture.language.document import journey_schema
from nurture.language.graph import mermaid
from nurture.simulation.scenarios import (
    Runtime,
    SimRuntime,
    build_simulator,
    compare,
    load_scenario,
    scenario_files,
)

from . import audiences, broadcast, console, events, preview, privacy, report, runs, service
from .options import audiences_dir, project_options


def _compile(
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None,
    *,
    report_undeclared: bool = False,
    broadcasts_dir: Path | None = None,
) -> Project:
    result = compile_project(
        journeys_dir,
        templates_dir,
        config,
        report_undeclared=report_undeclared,
        audiences_dir=audiences_dir(),
        broadcasts_dir=broadcasts_dir,
    )
    if result.diagnostics:
        click.echo(format_all(result.diagnostics), err=True)
    if result.project is None:
        count = len(result.errors)
        click.secho(f"{count} error{'s' if count != 1 else ''}; nothing was compiled.", fg="red", err=True)
        sys.exit(1)
    return result.project


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nurture")
def main() -> None:
    """Nurture: declarative marketing journeys, run durably on Temporal."""


@main.command()
@project_options
@click.option(
    "--broadcasts",
    "broadcasts_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Broadcasts directory [default: broadcasts beside the journeys directory].",
)
def validate(journeys_dir: Path, templates_dir: Path, config: Path | None, broadcasts_dir: Path | None) -> None:
    """Compile every journey and broadcast and check every template they use."""
    project = _compile(journeys_dir, templates_dir, config, report_undeclared=True, broadcasts_dir=broadcasts_dir)
    from nurture.language import ir

    for journey in project.journeys.values():
        steps = sum(1 for _ in ir.walk(journey.steps))
        click.echo(
            f"ok  {journey.id:<20} version {journey.version}  {steps} steps  "
            f"trigger: {journey.starts_on}  ({journey.source})"
        )
    click.echo(f"{len(project.journeys)} journeys valid.")
    for audience in project.audiences.values():
        click.echo(f"ok  {audience.id:<20} version {audience.version}  {audience.name}  ({audience.source})")
    if project.audiences:
        click.echo(f"{len(project.audiences)} audiences valid.")
    for item in project.broadcasts.values():
        steps = sum(1 for _ in ir.walk(item.journey.steps))
        when = "by command" if item.schedule is None else item.schedule.written
        click.echo(f"ok  {item.journey.id:<20} version {item.journey.version}  {steps} steps  to: {item.audience}  when: {when}  ({item.source})")
    if project.broadcasts:
        click.echo(f"{len(project.broadcasts)} broadcasts valid.")


@main.command()
def schema() -> None:
    """Print the JSON Schema of journey files (for editors' YAML language servers)."""
    click.echo(json.dumps(journey_schema(), indent=2))


@main.command()
@click.argument("journey")
@project_options
def graph(journey: str, journeys_dir: Path, templates_dir: Path, config: Path | None) -> None:
    """Print a Mermaid flowchart of JOURNEY."""
    project = _compile(journeys_dir, templates_dir, config)
    try:
        (selected,) = project.select([journey])
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from None
    click.echo(mermaid(selected), nl=False)


@main.command()
@click.argument("scenario", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@project_options
def simulate(scenario: Path, journeys_dir: Path, templates_dir: Path, config: Path | None) -> None:
    """Print the simulated timeline of one SCENARIO file."""
    project = _compile(journeys_dir, templates_dir, config)
    click.echo(asyncio.run(_timeline(scenario, project)), nl=False)


async def _timeline(path: Path, project: Project) -> str:
    from channels.outbox import Outbox
    from nurture.delivery.deliverer import Deliverer, for_every_channel

    try:
        scenario = load_scenario(path, project)
    except CompileError as exc:
        raise click.ClickException(format_all(exc.diagnostics)) from None
    outbox = Outbox()
    sim = build_simulator(scenario, project, Deliverer(project.templates, for_every_channel(outbox)))
    await sim.run()
    lines = [f"scenario: {scenario.name}  ({path})", f"start:    {scenario.start.isoformat()}", ""]
    width = max((len(entry.user) for entry in sim.entries), default=8)
    for entry in sim.entries:
        offset = entry.at - scenario.start
        stamp = entry.at.astimezone(scenario.start.tzinfo).strftime("%a %m-%d %H:%M")
        hours, rest = divmod(int(offset.total_seconds()), 3600)
        where = f"{entry.journey}/{entry.step}" if entry.step else entry.journey
        lines.append(f"{stamp}  +{hours:>3}h{rest // 60:02d}  {entry.user:<{width}} {where:<34} {entry.what:<12} {entry.detail}")
    verdict = compare(scenario, sim.outcomes)
    lines.append("")
    lines.append("matches the expectations" if verdict.passed else verdict.report())
    return "\n".join(lines) + "\n"


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--runtime",
    type=click.Choice(["sim", "temporal"]),
    default="sim",
    show_default=True,
    help="sim: in-process virtual clock; temporal: the durable workflow on Temporal's time-skipping test server.",
)
@click.option("-q", "--quiet", is_flag=True, help="Only print failures and the summary.")
@project_options
def test(
    paths: tuple[Path, ...],
    runtime: str,
    quiet: bool,
    journeys_dir: Path,
    templates_dir: Path,
    config: Path | None,
) -> None:
    """Run scenario files (default: journeys/tests) and report N passed, N failed."""
    project = _compile(journeys_dir, templates_dir, config)
    files = scenario_files(list(paths) or [journeys_dir / "tests"])
    if runtime == "temporal":
        from workflows.runtime import TemporalRuntime

        failed = asyncio.run(_run_scenarios(files, project, TemporalRuntime(), quiet))
    else:
        failed = asyncio.run(_run_scenarios(files, project, SimRuntime(), quiet))
    sys.exit(1 if failed else 0)


async def _run_scenarios(files: list[Path], project: Project, runtime: Runtime, quiet: bool) -> int:
    passed = failed = 0
    async with _maybe_context(runtime):
        for path in files:
            try:
                scenario = load_scenario(path, project)
            except CompileError as exc:
                failed += 1
                click.secho(f"ERROR {path}", fg="red")
                click.echo(format_all(exc.diagnostics))
                continue
            if scenario.population is not None:
                failed += 1
                click.secho(f"ERROR {path}", fg="red")
                click.echo(
                    "  a scenario with a population is a forecast, not a test: keep it out of the tests "
                    "folder and run it with nurture report JOURNEY --scenario FILE"
                )
                continue
            outcomes = await runtime.play(scenario, project)
            verdict = compare(scenario, outcomes)
            if verdict.passed:
                passed += 1
                if not quiet:
                    click.echo(f"PASS  {path}  {scenario.name}")
            else:
                failed += 1
                click.secho(f"FAIL  {path}  {scenario.name}", fg="red")
                click.echo(verdict.report())
    click.echo(f"{passed} passed, {failed} failed")
    return failed


class _maybe_context:
    """Enter the runtime's async context when it has one (the Temporal test server)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __aenter__(self) -> None:
        enter = getattr(self.runtime, "__aenter__", None)
        if enter is not None:
            await enter()

    async def __aexit__(self, *exc: object) -> None:
        leave = getattr(self.runtime, "__aexit__", None)
        if leave is not None:
            await leave(*exc)


@main.command()
@project_options
@click.option(
    "--scenario",
    type=click.Path(path_type=Path),
    default=Path("journeys/tests/cart_reminder_then_last_call.yaml"),
    show_default=True,
)
def demo(journeys_dir: Path, templates_dir: Path, config: Path | None, scenario: Path) -> None:
    """Validate the journeys, then print the simulated timeline of a mission scenario."""
    project = _compile(journeys_dir, templates_dir, config)
    for journey in project.journeys.values():
        click.echo(f"ok  {journey.id:<20} version {journey.version}")
    click.echo("")
    click.echo(asyncio.run(_timeline(scenario, project)), nl=False)


for command in (
    events.track,
    events.identify,
    service.up,
    service.worker,
    service.outbox,
    preview.preview,
    privacy.forget,
    privacy.export,
    report.report,
    runs.runs,
    runs.migrate,
    console.console,
    broadcast.broadcast,
    audiences.audience,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
