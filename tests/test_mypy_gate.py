"""The mypy gate's counting and verdict (scripts/mypy_gate.py; `make test` runs the gate itself)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("mypy_gate", Path(__file__).parents[1] / "scripts" / "mypy_gate.py")
gate = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gate)

OUTPUT = """\
src/tramontane/lora/layers.py:12: error: Incompatible types  [assignment]
src/tramontane/lora/peft.py:3: error: Missing annotation  [var-annotated]
src/tramontane/api.py:40: error: Item "None" has no attribute "x"  [union-attr]
src/tramontane/api.py:41: note: See https://mypy.readthedocs.io
src/tramontane/model/cache.py:9: error: Unsupported operand  [operator]
Found 4 errors in 4 files (checked 93 source files)
"""


def test_errors_are_counted_per_package_and_top_level_module():
    assert gate.count_errors(OUTPUT) == Counter({"lora": 2, "api": 1, "model": 1})


def test_a_gated_package_fails_on_one_error_and_others_on_growth():
    counts = gate.count_errors(OUTPUT)
    assert gate.verdict(counts, {"lora": 2, "api": 1}) == ["model: 1 mypy errors; this package must have none"]
    assert gate.verdict(Counter({"lora": 2}), {"lora": 1}) == ["lora: 2 mypy errors, more than the baseline's 1"]
    assert gate.verdict(Counter({"lora": 1}), {"lora": 2}) == []
