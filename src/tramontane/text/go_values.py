"""Go values for go_template.py: structs, how Go's fmt prints a value (`%v`) and how encoding/json writes
it, so an Ollama TEMPLATE prints what it prints under Ollama.

    show(1e6)                              # "1e+06"       (fmt's %v: shortest digits, exponent from 1e6)
    go_json({"b": 1.0, "a": "<x>"})        # '{"a":"\\u003cx\\u003e","b":1}'   (keys sorted, HTML escaped)
    go_json(GoStruct(type="function", name="f"))   # '{"type":"function","name":"f"}'  (declared order)

Python values stand for Go's: str, int, float (float64), bool, None (nil), lists (slices), dicts (maps:
printed and ranged in key order), GoStruct (a struct's JSON form: its fields in declaration order,
omitempty fields already left out) and GoValue (a struct a template reads `.Field`s of)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

NO_VALUE = "<no value>"


class _Missing:
    """A missing map key (Go's invalid reflect.Value): prints `<no value>`, is false, reads as nil."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class GoStruct(dict[str, Any]):
    """A struct's JSON form: its fields in declaration order (a map's keys are sorted, a struct's are not)."""


@dataclass(frozen=True)
class GoValue:
    """A Go struct: `fields` by their Go names, in declaration order (what `.Name` reads), and `json`, its
    JSON form. `stringer`: the type has a String method writing that JSON (Ollama's tools do); without
    one, %v prints Go's `{v1 v2 ...}` (`&{...}` for a `pointer`)."""

    fields: Mapping[str, Any]
    json: GoStruct
    stringer: bool = True
    pointer: bool = False

    def __str__(self) -> str:
        if self.stringer:
            return go_json(self.json)
        return ("&" if self.pointer else "") + "{" + " ".join(show(v, top=False) for v in self.fields.values()) + "}"


class GoList(list[Any]):
    """A Go slice type with a String method writing its JSON (Ollama's tool list; nil when empty)."""

    def __str__(self) -> str:
        return go_json(self)


class NilSlice(list[Any]):
    """A nil slice (always empty): %v prints `[]`, JSON writes null."""


class GoMap(dict[str, Any]):
    """A Go map type with a String method writing its JSON (Ollama's tool-call arguments, properties)."""

    def __str__(self) -> str:
        return go_json(self)


def show(value: Any, top: bool = True) -> str:
    """`value` printed as a template prints it: fmt's %v, where nil is `<no value>` at the top (a template
    unwraps an empty interface) and `<nil>` inside a slice, map or struct."""
    if value is MISSING or value is None:
        return NO_VALUE if top else "<nil>"
    if isinstance(value, GoValue | GoList | GoMap):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, list | tuple):
        return "[" + " ".join(show(v, top=False) for v in value) + "]"
    if isinstance(value, GoStruct):
        return "{" + " ".join(show(v, top=False) for v in value.values()) + "}"
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{show(k, False)}:{show(value[k], False)}" for k in sorted(value)) + "]"
    return str(value)


def _digits(value: float) -> tuple[str, int]:
    """The shortest decimal digits that read back as abs(value), and where the point goes (0.0123 is
    ("123", -1): 0.[0]123)."""
    sign, digits, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    text = "".join(map(str, digits))
    return text, len(text) + int(exponent)


def _fixed(digits: str, point: int) -> str:
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return digits[:point] + "." + digits[point:]


def _exponent(digits: str, point: int, min_width: int) -> str:
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    exp = point - 1
    return f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):0{min_width}d}"


def go_float(value: float) -> str:
    """fmt's %v of a float64 (%g, shortest): exponent form below 1e-4 and from 1e+06."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    digits, point = _digits(value)
    exp = point - 1
    return sign + (_exponent(digits, point, 2) if exp < -4 or exp >= 6 else _fixed(digits, point))


def _json_float(value: float) -> str:
    """encoding/json's float64: plain digits, exponent form below 1e-6 and from 1e21 ("1e-7", "1e+21")."""
    if not math.isfinite(value):
        raise ValueError(f"json: unsupported value: {go_float(value)}")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign = "-" if value < 0 else ""
    digits, point = _digits(value)
    small_or_large = abs(value) < 1e-6 or abs(value) >= 1e21
    return sign + (_exponent(digits, point, 1 if point - 1 < 0 else 2) if small_or_large else _fixed(digits, point))


_HTML = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _json_string(text: str) -> str:
    out = json.dumps(text, ensure_ascii=False)
    if any(c in out for c in _HTML):
        out = "".join(_HTML.get(c, c) for c in out)
    return out


def go_json(value: Any) -> str:
    """`value` as Go's json.Marshal writes it: compact, map keys sorted, struct fields in order, <, > and &
    escaped, float64s in Go's shortest form. ValueError for NaN and infinities, as in Go."""
    if value is None or value is MISSING or (isinstance(value, NilSlice | GoList) and not value):
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, GoValue):
        return go_json(value.json)
    if isinstance(value, GoStruct):
        return "{" + ",".join(f"{_json_string(k)}:{go_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_json_string(str(k))}:{go_json(value[k])}" for k in sorted(value, key=str)) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(go_json(v) for v in value) + "]"
    return _json_string(str(value))
