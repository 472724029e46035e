"""The package layers (docs/architecture.md): every import of every module goes the allowed way.

The import table of docs/architecture.md is the rule, read from the page itself. A module's unit is its first package under
`tramontane` (`model`, `engine`, ...) or its top-level module name (`api`, `config`, ...). Imports inside
functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tramontane

ROOT = Path(tramontane.__file__).parent
MAP = Path(__file__).parents[1] / "docs" / "architecture.md"


def read_table(text: str) -> dict[str, set[str]]:
    """The import table of docs/architecture.md: unit -> units it may import."""
    section = text.split("## Import table", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip().replace("\\_", "_") for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("unit", "---") or not line.startswith("|"):
            continue
        table[cells[0]] = {u.strip() for u in cells[1].split(",") if u.strip()}
    return table


ALLOWED = read_table(MAP.read_text())

# Modules that a package must not import even though the package may import the unit.
FORBIDDEN = {
    "engine": {"tramontane.decoding.offline"},
    "serve": {"tramontane.decoding.offline"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str]]:
    module = module_name(path)
    return imports_in(path.read_text(), module if path.name == "__init__.py" else module.rpartition(".")[0])


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every tramontane import in a module of `package`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tramontane"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "tramontane":
                found.append((node.lineno, target))
    return found


MODULES = sorted(ROOT.rglob("*.py"))


def test_the_table_was_read():
    assert ALLOWED["weights"] == {"errors", "config", "progress"} and ALLOWED["errors"] == set()
    assert len(ALLOWED) >= 20


def test_every_unit_has_a_row():
    units = {unit_of(module_name(p)) for p in MODULES}
    assert units <= set(ALLOWED), f"add a row for {sorted(units - set(ALLOWED))} to docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    unit = unit_of(module_name(path))
    bad = []
    for line, target in imports_of(path):
        other = unit_of(target)
        if other != unit and other not in ALLOWED[unit]:
            bad.append(f"line {line}: {unit} -> {target}")
        if any(target == f or target.startswith(f + ".") for f in FORBIDDEN.get(unit, ())):
            bad.append(f"line {line}: {unit} must not import {target}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation():
    """The rule can fail: a weights module importing model/ is caught, function-level imports too."""
    source = "import os\nfrom . import names\ndef f():\n    from ..model.cache import KVCache\n"
    found = imports_in(source, "tramontane.weights")
    assert found == [(2, "tramontane.weights"), (4, "tramontane.model.cache")]
    assert unit_of(found[1][1]) not in ALLOWED["weights"]


def test_no_package_grafts_a_step_onto_the_model():
    """The decode backend is chosen by build.select_backend, never attached to the model."""
    offenders = [str(p.relative_to(ROOT)) for p in MODULES if "step_kernel" in p.read_text()]
    assert not offenders


def test_no_source_file_is_ignored_by_git():
    """A package whose folder name matches an ignore rule (`build/` once hid src/tramontane/build/) would
    work here and be missing from every clone."""
    import shutil
    import subprocess

    repo = ROOT.parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(repo)) for p in ROOT.rglob("*") if p.suffix in (".py", ".pyi", ".c", ".h", ".inc")]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=repo, capture_output=True, text=True)
    assert ignored.stdout.split() == [], ignored.stdout
