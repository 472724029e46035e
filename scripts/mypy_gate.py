"""The type-checking gate `make test` runs: mypy over src/tramontane, counted per package.

Packages in GATED must have no error at all. Every other package may have at most the count recorded
in mypy_baseline.json: the count only goes down (lower the baseline when you fix some; the gate says so).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).with_name("mypy_baseline.json")
GATED = {"model", "engine", "decoding", "quant", "weights", "build", "text", "tools", "hub"}
ERROR = re.compile(r"^src/tramontane/([A-Za-z_]+)(?:/|\.py)[^:]*:\d+: error:")


def count_errors(output: str) -> Counter[str]:
    """mypy output -> errors per unit (first package under tramontane, or the top-level module)."""
    return Counter(m.group(1) for line in output.splitlines() if (m := ERROR.match(line)))


def verdict(counts: Counter[str], baseline: dict[str, int]) -> list[str]:
    """What fails the gate (empty: it passes)."""
    problems = [f"{unit}: {n} mypy errors; this package must have none" for unit, n in counts.items() if unit in GATED]
    problems += [
        f"{unit}: {n} mypy errors, more than the baseline's {baseline.get(unit, 0)}"
        for unit, n in counts.items()
        if unit not in GATED and n > baseline.get(unit, 0)
    ]
    return sorted(problems)


def main() -> int:
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    if run.returncode not in (0, 1):
        print(run.stdout + run.stderr, file=sys.stderr)
        return run.returncode
    counts = count_errors(run.stdout)
    baseline = json.loads(BASELINE.read_text())
    problems = verdict(counts, baseline)
    if problems:
        print(run.stdout, "\n".join(["mypy gate failed:", *problems]), sep="\n", file=sys.stderr)
        return 1
    lower = {u: counts.get(u, 0) for u, n in baseline.items() if counts.get(u, 0) < n}
    note = f"; lower {BASELINE.name} to {lower}" if lower else ""
    print(f"mypy gate: 0 errors in {', '.join(sorted(GATED))}; {sum(counts.values())} elsewhere{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
