"""Smoke test of ``benchmarks/console.py`` on 300 runs: the pages it times answer through a
signed-in session on both databases, and each timing is the console's own ``Server-Timing``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nurture.language.compiler import load_project
from nurture.storage.db import Database

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import console as bench  # noqa: E402  (benchmarks/ is a script directory, not a package)


def test_the_console_benchmark_times_every_page(database: Database) -> None:
    journey = load_project(bench.JOURNEYS, ROOT / "templates").journeys[bench.JOURNEY]
    args = argparse.Namespace(runs=300, repeat=2, people=3, seed=3)
    times = bench.measure(database.url, database.engine.dialect.name, journey, args)
    assert set(times) == {
        "report query alone",
        "journey page, counting (cold)",
        "journeys list, counting (cold)",
        "journeys list, as viewed (warm)",
        "journey page, as viewed (warm)",
        "journey page, a step selected",
        "person page",
    }
    assert len(times["person page"]) == 3 and len(times["journey page, as viewed (warm)"]) == 2
    assert all(sample > 0 for samples in times.values() for sample in samples)
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0 and bench.percentile([5.0], 0.5) == 5.0
