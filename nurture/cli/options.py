"""Options shared by the CLI's commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def project_options(func: F) -> F:
    """``--journeys``, ``--templates`` and ``--config`` on every command that reads them."""
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
