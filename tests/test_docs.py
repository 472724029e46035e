"""The README and the docs point at files that exist (links and repository paths in backticks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "architecture.md", ROOT / "fuzz" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# `benchmarks/x.py`, `tests/test_y.py`, `src/...`, `docs/...`, `scripts/...`: paths from the repository root
REPO_PATH = re.compile(r"`((?:benchmarks|tests|src|docs|scripts|fuzz)/[A-Za-z0-9_./-]+)`")


def targets(page: Path) -> list[str]:
    text = page.read_text()
    links = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]
    return [t for t in links if t] + REPO_PATH.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    missing = [t for t in targets(page) if not (page.parent / t).exists() and not (ROOT / t).exists()]
    assert not missing, missing


def test_the_checker_reads_links():
    assert LINK.findall("see [map](docs/architecture.md) and [x](https://e.org)") == [
        "docs/architecture.md",
        "https://e.org",
    ]
