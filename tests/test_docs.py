"""The documentation a person who clones the repository gets: links resolve inside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_stay_inside_the_repository() -> None:
    broken = []
    for document in _documents():
        for target in LINK.findall(document.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (document.parent / target).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                broken.append(f"{document.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_readme_links_the_language_reference() -> None:
    assert "](docs/journeys.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert (ROOT / "docs" / "journeys.md").stat().st_size > 20_000


def test_the_deployment_guide_is_linked_from_the_readme_and_operations() -> None:
    assert "](docs/deployment.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](deployment.md)" in (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
