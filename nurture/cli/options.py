"""Options shared by the CLI's commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
AUDIENCES = "nurture.audiences_dir"
"""Where ``--audiences`` is kept in the command's context (read by :func:`audiences_dir`)."""


def _keep_audiences(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    ctx.meta[AUDIENCES] = value


def audiences_dir() -> Path | None:
    """The running command's ``--audiences`` (``None``: beside the journeys directory)."""
    ctx = click.get_current_context(silent=True)
    found = None if ctx is None else ctx.meta.get(AUDIENCES)
    return found if isinstance(found, Path) else None


def project_options(func: F) -> F:
    """``--journeys``, ``--templates``, ``--audiences`` and ``--config`` on every command that
    reads them (``--audiences`` is read through :func:`audiences_dir`)."""
    func = click.option(
        "--audiences",
        type=click.Path(path_type=Path),
        default=None,
        expose_value=False,
        callback=_keep_audiences,
        help="Audiences directory [default: audiences beside the journeys directory].",
    )(func)
    func = click.option(
        "--config",
        type=click.Path(path_type=Path),
        default=None,
        help="Project defaults file [default: nurture.yaml beside the journeys directory].",
    )(func)
    func = click.option(
        "--templates",
        "templates_dir",
        type=click.Path(path_type=Path),
        default=Path("templates"),
        show_default=True,
        help="Templates directory.",
    )(func)
    func = click.option(
        "--journeys",
        "journeys_dir",
        type=click.Path(path_type=Path),
        default=Path("journeys"),
        show_default=True,
        help="Journeys directory.",
    )(func)
    return func
