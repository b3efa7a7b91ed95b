"""The package layering: imports point one way, and every module belongs to a layer.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``); ``lint-imports`` checks them
against the real import graph, including imports inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def _layered_packages() -> set[str]:
    (layers,) = [contract["layers"] for contract in _contracts() if contract["type"] == "layers"]
    assert isinstance(layers, list)
    return {name.strip() for layer in layers for name in str(layer).split("|")}


def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_module_of_the_package_is_in_a_layer() -> None:
    layered = _layered_packages()
    loose = []
    for path in sorted((ROOT / "nurture").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts in {("nurture", "__init__"), ("nurture", "__main__")}:
            continue
        if not any(".".join(parts[: len(name.split("."))]) == name for name in layered):
            loose.append("/".join(parts) + ".py")
    assert loose == [], f"modules outside every layer (add them to a layer in pyproject.toml): {loose}"


def test_the_top_level_packages_are_layered_too() -> None:
    layered = _layered_packages()
    assert {"channels", "workflows"} <= layered
    # worker.py is only the operator's entry point: the worker itself lives in a layer.
    source = (ROOT / "worker.py").read_text(encoding="utf-8")
    assert "from nurture.service.worker import main" in source
