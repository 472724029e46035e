"""`adapter_config.json` read defensively: every field this package uses is checked before any tensor is read.

`rank_pattern` and `alpha_pattern` map regular expressions over module names to a rank or an alpha. PEFT
matches them with Python's backtracking `re` (peft.utils.other.get_pattern_key), so a pattern such as
`([a-z_.0-9]+)*y` takes exponential time on an ordinary module name and a hostile file hangs loading.
Here they are compiled and matched with RE2, whose matching time is linear in the name (no backtracking),
in the same form PEFT builds: `re.match(rf"(.*\\.)?({pattern})$", module)`, first matching key in file
order. A key must be a pattern both Python's `re` (what PEFT accepts; compiling is safe, only matching
backtracks) and RE2 compile: a syntax error, or a backreference, look-around or atomic group that only a
backtracking engine offers, is a LoadError naming the file and the key. Module names are plain ASCII
without newlines, so the two engines agree on what matches: Python's `$` also matches before a final
newline, and its `\\d`/`\\w` are Unicode-aware, neither of which an ASCII name without newlines can tell.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import re2

from ..errors import LoadError
from ..weights.sources import read_json_object

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # PEFT writes a few KB; a rank_pattern per module of a 70B is ~100 KB
UNSUPPORTED: dict[
    str, tuple[object, object]
] = {  # field -> the values that mean "off", which is all this package implements
    "use_dora": (False, None),
    "use_rslora": (False, None),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
}


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print each rejected pattern to stderr; the LoadError says it
    return options


OPTIONS = _re2_options()


@dataclass(frozen=True)
class Pattern:
    """One entry of rank_pattern / alpha_pattern: the field, the key as written, its compiled form, its value."""

    field: str
    key: str
    regex: Any  # re2._Regexp
    value: float

    @property
    def where(self) -> str:
        return _where(self.field, self.key)


@dataclass(frozen=True)
class PatternTable:
    """The entries of one pattern field, in file order (PEFT takes the first that matches)."""

    field: str
    patterns: tuple[Pattern, ...] = ()

    def lookup(self, module: str) -> Pattern | None:
        """The first entry whose pattern matches `module` ("model.layers.0.self_attn.q_proj") as PEFT's
        get_pattern_key matches it, or None."""
        return next((p for p in self.patterns if p.regex.match(module) is not None), None)


@dataclass(frozen=True)
class AdapterConfig:
    """The checked fields of one adapter_config.json."""

    path: Path
    r: int
    alpha: float
    dropout: float
    rank_pattern: PatternTable
    alpha_pattern: PatternTable

    def rank_of(self, module: str) -> tuple[int, str]:
        """(rank PEFT gives `module`, the config key it comes from: "r" or "rank_pattern['q_proj']")."""
        hit = self.rank_pattern.lookup(module)
        return (int(hit.value), hit.where) if hit else (self.r, "'r'")

    def alpha_of(self, module: str) -> float:
        """lora_alpha PEFT gives `module` (alpha_pattern first, then lora_alpha)."""
        hit = self.alpha_pattern.lookup(module)
        return float(hit.value) if hit else self.alpha


def read_adapter_config(path: Path) -> AdapterConfig:
    """Read and check adapter_config.json; every bad value is a LoadError naming the file and the key."""
    cfg = _read_object(path)
    if cfg.get("peft_type") != "LORA":
        raise LoadError(path, f"field 'peft_type' is {cfg.get('peft_type')!r}; only 'LORA' adapters are supported")
    for field, ok in UNSUPPORTED.items():
        if field in cfg and cfg[field] not in ok:
            raise LoadError(path, f"field {field!r} = {cfg[field]!r} is not supported (expected {ok[0]!r})")
    dropout = _finite(cfg.get("lora_dropout") or 0.0)
    if dropout is None or not 0 <= dropout < 1:
        raise LoadError(path, f"field 'lora_dropout' must be a number in [0, 1), got {cfg.get('lora_dropout')!r}")
    return AdapterConfig(
        path=path,
        r=_rank(path, "'r'", cfg.get("r")),
        alpha=_alpha(path, "'lora_alpha'", cfg.get("lora_alpha")),
        dropout=dropout,
        rank_pattern=_patterns(path, cfg, "rank_pattern", _rank),
        alpha_pattern=_patterns(path, cfg, "alpha_pattern", _alpha),
    )


def _read_object(path: Path) -> dict:
    """The file as a JSON object, refusing sizes and nesting depths no PEFT config has."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LoadError(path, f"cannot read: {e.strerror}") from None
    if size > MAX_CONFIG_BYTES:
        raise LoadError(path, f"{size} bytes; an adapter config is at most {MAX_CONFIG_BYTES}")
    try:
        return read_json_object(path)
    except RecursionError:
        raise LoadError(path, "JSON nested too deeply") from None


def _finite(value: object) -> float | None:
    """value as a float when it is a finite int or float (not a bool, nor JSON's NaN or Infinity, which
    Python's json reads), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _rank(path: Path, where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoadError(path, f"field {where} must be an integer >= 1, got {value!r}")
    return value


def _alpha(path: Path, where: str, value: object) -> float:
    alpha = _finite(value)
    if alpha is None or alpha <= 0:
        raise LoadError(path, f"field {where} must be a finite number > 0, got {value!r}")
    return alpha


def _patterns(path: Path, cfg: dict, field: str, check: Callable[[Path, str, object], float]) -> PatternTable:
    """rank_pattern / alpha_pattern: {regex: value}, each regex compiled by RE2 and each value checked."""
    raw = cfg.get(field) or {}
    if not isinstance(raw, dict):
        raise LoadError(path, f"field {field!r} must be an object {{pattern: value}}, got {type(raw).__name__}")
    patterns = []
    for key, value in raw.items():
        where = _where(field, key)
        patterns.append(Pattern(field, key, _compile(path, where, key), check(path, where, value)))
    return PatternTable(field, tuple(patterns))


def _where(field: str, key: str, limit: int = 80) -> str:
    """field['key'] for an error message, the key cut: a hostile file must not come back whole."""
    text = repr(key)
    return f"{field}[{text if len(text) <= limit else text[: limit - 3] + '...'}]"


def _compile(path: Path, where: str, key: str) -> Any:
    """`key` in PEFT's wrapping, compiled by RE2 (linear-time matching). It must also be a pattern PEFT's
    Python `re` accepts (compiling is linear; only its matching backtracks), so that both read it alike."""
    wrapped = rf"(.*\.)?({key})$"
    if "{," in key:  # Python reads a{,3} as a{0,3}, RE2 as the literal text "a{,3}": refuse, do not guess
        raise LoadError(path, f"field {where}: write the repetition {{,n}} as {{0,n}}")
    try:
        re.compile(wrapped)
    except (re.error, RecursionError, OverflowError) as e:
        raise LoadError(path, f"field {where}: not a valid regular expression ({e})") from None
    try:
        return re2.compile(wrapped, OPTIONS)
    except re2.error as e:
        why = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise LoadError(
            path,
            f"field {where}: not a regular expression this loader can match in linear time ({why}); "
            "backreferences, look-arounds and possessive or atomic groups are not supported",
        ) from None
    except UnicodeEncodeError:
        raise LoadError(path, f"field {where}: the pattern is not valid Unicode") from None
