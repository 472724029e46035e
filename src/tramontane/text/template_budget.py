"""The budget of one chat-template render: time, the size of each value, and memory, all checked
BEFORE a value is built.

jinja2's sandbox bounds what a template may reach, not how much it may build: `s | replace('a', big)`,
`range(1000) | join(big)`, `s | indent(big)` or `x | tojson(indent=big)` each allocate gigabytes in one
C call, long before a check of the result could see it. So every filter, method and operator that builds
a string or list first computes, from the lengths of its arguments, an upper bound on what it is about to
build (a `Cost`, from the cost functions below), and `Budget.reserve` refuses it when

- the value would hold more than `max_chars` characters or items (the output budget), or
- the render's memory would go past `max_bytes` (the memory budget).

Memory counts what a render has built and still holds, in bytes as CPython stores them (1, 2 or 4 per
character, 8 per list slot, a header per object). Values of `TRACKED_BYTES` or more are held in a list
and given back once the template has dropped them (CPython's reference count says so), which keeps the
usual `{% set ns.text = ns.text ~ part %}` loops cheap; smaller ones are counted once and never given
back. Values the template builds without an operator (list and dict displays, `~`, slices, block and
macro output, `loop.length` over a generator) are counted through the hooks `chat_template` installs.

Time: every loop, call, attribute access and operator checks the deadline; a single library call
cannot, so the filters that run Python code per item (sort, groupby...) take at most MAX_INT_ARG items.

Outside a render (compile-time constant folding runs under its own small budget) the checks still hold
values to MAX_OUTPUT_CHARS.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import json
import math
import re
import string
import sys
import time
from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, Sized, ValuesView
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from jinja2 import pass_context
from jinja2.filters import make_attrgetter
from jinja2.runtime import BlockReference, LoopContext, Macro
from jinja2.utils import Cycler, Namespace, missing
from markupsafe import Markup

MAX_OUTPUT_CHARS = 1_000_000  # plus twice the size of the messages, see `render_chat_template`
MAX_SECONDS = 1.0
BYTES_PER_CHAR = 32  # memory budget: bytes a render may hold, per character of its output budget (32 MB)
TRACKED_BYTES = 1 << 10  # values this large are given back to the budget once the template drops them
MAX_INT_ARG = 100_000  # widths, repeat counts and range lengths above this are refused
MAX_INT_BITS = 100_000  # no integer arithmetic beyond this size (repeated squaring would not end)

_SLOT = 8  # bytes of a list or tuple slot
_OBJECT = 64  # bytes of a new small object (a short str, a tuple, an int)
_ENTRY = 104  # bytes of a dict entry, its key and value not included
_CHUNK = 1 << 16  # long strings are measured (repr, JSON) this many characters at a time
_UNICODE_HEADER = sys.getsizeof("\xe9") - 2  # a non-ASCII str: this plus (length + 1) * kind bytes
_BIG_FORMAT_WIDTH = re.compile(r"[%{:][^%{}\s]{0,8}?\d{6,}")
_WIDTH_FROM_ARGS = re.compile(r"\*|\{[^{}]*\{")  # '%*d', '{:{w}}': the width is an argument
_PRINTF = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
_DIGIT_RUNS = re.compile(r"\d+")
_FIELD_HEAD = re.compile(r"[^.\[]*")
_FORMATTER = string.Formatter()
# Filters and str methods whose int arguments size their output (`'x'|center(10**9)`).
_WIDTH_FILTERS = frozenset({"center", "indent", "wordwrap", "slice", "batch"})
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "to_bytes"})
_FORMAT_METHODS = frozenset({"format", "format_map"})
# Filters that read their whole input: a generator or range there is drained into a list first
# (counted), so that its size is known before the filter builds anything from it.
_DRAINING_FILTERS = frozenset({"join", "list", "batch", "slice", "sort", "unique", "sum", "groupby", "urlencode"})
# Filters that run Python code per item, with no deadline check inside (a key function, a sort): their
# input is held to MAX_INT_ARG items, so that one call cannot outlast the time budget by much.
_PER_ITEM_FILTERS = frozenset({"sort", "groupby", "dictsort", "unique", "min", "max", "xmlattr", "urlencode"})
_LINE_BREAKS = ("\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


class BudgetExceeded(Exception):
    """A template went past its budget; `render_chat_template` turns this into a TemplateError."""


class _Over(Exception):
    """A measure went past its limit: it can stop counting."""


class Cost(NamedTuple):
    """What an operation is about to build: `length`, the characters or items of its largest value
    (held against the output budget), and `nbytes`, the bytes it allocates (held against memory)."""

    length: int
    nbytes: int


NOTHING = Cost(0, 0)


def text_cost(length: int, width: int = 4) -> Cost:
    """A string of `length` characters, `width` bytes each."""
    return Cost(length, length * width + _OBJECT)


def items_cost(count: int, per_item: int = _SLOT) -> Cost:
    """A list of `count` items, each taking `per_item` bytes (its slot, and the item when it is new)."""
    return Cost(count, count * per_item + _OBJECT)


# -- the budget -------------------------------------------------------------------------------------


def _refcounts(entries: list[tuple[Any, int]]) -> list[int]:
    return [sys.getrefcount(entry[0]) for entry in entries]


_HELD_ONLY_HERE = _refcounts([(bytearray(1), 0)])[0]  # the count of a value only the budget refers to


@dataclass
class Budget:
    """The limits of one render, and what it has spent of them so far."""

    deadline: float
    max_chars: int
    max_bytes: int
    small: int = 0  # bytes of small values built (counted once, never given back)
    large: int = 0  # bytes of the tracked values below
    tracked: list[tuple[Any, int]] = field(default_factory=list)
    kept: int = 0  # `large` after the last sweep

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded("took longer than its time budget")

    def reserve(self, cost: Cost, what: str) -> None:
        """Refuse an operation, before it runs, whose value or allocations would not fit."""
        if cost.length > self.max_chars:
            raise BudgetExceeded(f"builds a value larger than its output budget ({what}: {cost.length:,} characters)")
        self._fit(cost.nbytes, what)

    def spend(self, nbytes: int, what: str) -> None:
        """Count bytes for good."""
        self._fit(nbytes, what)
        self.small += nbytes

    def settle(self, value: Any, nbytes: int, what: str) -> None:
        """Count a value just built. Large strings and containers (which own what they were counted
        for) are tracked until the template drops them, and swept whenever they have doubled since the
        last sweep; anything else (a generator, whose products outlive it) is counted for good."""
        if nbytes < TRACKED_BYTES or not isinstance(value, (str, bytes, bytearray, list, tuple, dict)):
            self.spend(nbytes, what)
            return
        nbytes += _OBJECT + _SLOT  # the tracking entry
        self._fit(nbytes, what)
        self.tracked.append((value, nbytes))
        self.large += nbytes
        if self.large > 2 * self.kept + 4 * TRACKED_BYTES:
            self._sweep()

    def _fit(self, nbytes: int, what: str) -> None:
        if self.small + self.large + nbytes <= self.max_bytes:
            return
        self._sweep()
        if self.small + self.large + nbytes > self.max_bytes:
            raise BudgetExceeded(
                f"needs more than its memory budget ({what}: {self.small + self.large + nbytes:,} bytes)"
            )

    def _sweep(self) -> None:
        """Give back the tracked values that only this budget still refers to."""
        counts = _refcounts(self.tracked)
        self.tracked = [entry for entry, count in zip(self.tracked, counts) if count > _HELD_ONLY_HERE]
        self.large = self.kept = sum(nbytes for _, nbytes in self.tracked)


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("tramontane_template_budget", default=None)


def new_budget(max_chars: int, max_seconds: float, max_bytes: int | None = None) -> Budget:
    """A render's budget: `max_bytes` defaults to BYTES_PER_CHAR bytes per character, at least per
    character of MAX_OUTPUT_CHARS (a tiny output budget does not shrink the memory a template needs)."""
    memory = max_bytes if max_bytes is not None else BYTES_PER_CHAR * max(max_chars, MAX_OUTPUT_CHARS)
    return Budget(time.monotonic() + max_seconds, max_chars, memory)


@contextmanager
def budget_scope(budget: Budget) -> Iterator[Budget]:
    """Make `budget` the one every check in this context (thread, task) charges."""
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def current() -> Budget:
    """The render's budget; outside a render, a fresh one that only holds values to MAX_OUTPUT_CHARS."""
    return _BUDGET.get() or Budget(math.inf, MAX_OUTPUT_CHARS, sys.maxsize)


def tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.check()


def reserve(cost: Cost, what: str) -> None:
    current().reserve(cost, what)


def settle(value: Any, inputs: tuple[Any, ...], what: str, cost: Cost | None = None) -> None:
    """Count `value`, just built from `inputs`: nothing when it is one of them; else its size, or the
    reserved cost when that is larger (a list of new pieces, whose pieces getsizeof does not see).
    This runs after every operation: it is kept lean."""
    budget = _BUDGET.get()
    if isinstance(value, (str, list, tuple)) and len(value) > (budget.max_chars if budget else MAX_OUTPUT_CHARS):
        raise BudgetExceeded("builds a value larger than its output budget")
    if budget is None or value is None:
        return
    for given in inputs:
        if value is given:
            return
    nbytes = sys.getsizeof(value, _OBJECT)
    if cost is not None and nbytes < cost.nbytes and not isinstance(value, (str, bytes)):
        nbytes = cost.nbytes
    budget.settle(value, nbytes, what)


def check_len(value: Any) -> None:
    """Refuse a str/list value longer than the output budget."""
    if isinstance(value, (str, list, tuple)):
        budget = _BUDGET.get()
        if len(value) > (budget.max_chars if budget else MAX_OUTPUT_CHARS):
            raise BudgetExceeded("builds a value larger than its output budget")


def check_ints(values: Iterable[Any]) -> None:
    for value in values:
        if _is_int(value) and abs(value) > MAX_INT_ARG:
            raise BudgetExceeded(f"uses an oversized number ({value})")


def check_format(fmt: Any, args: Iterable[Any]) -> None:
    if not isinstance(fmt, (str, bytes)):
        return
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    if _BIG_FORMAT_WIDTH.search(text):
        raise BudgetExceeded("uses an oversized format width")
    if _WIDTH_FROM_ARGS.search(text):
        check_ints(args)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def small_number(value: Any) -> bool:
    """A float, or an int of at most 1024 bits: arithmetic results not worth counting one by one (a
    display that keeps them counts them)."""
    return type(value) is float or (type(value) is int and value.bit_length() <= 1024)


def _cap() -> int:
    return current().max_chars


def drain(values: Iterable[Any], what: str) -> list[Any]:
    """The items of a generator or range as a list, refused once they outnumber the output budget.
    The ints and tuples among them (a range's numbers, `items` pairs) are new objects that live on in
    whatever is built from them: they are counted for good."""
    cap = _cap()
    out: list[Any] = []
    new = 0
    for item in values:
        out.append(item)
        if type(item) is tuple or (type(item) is int and not -5 <= item <= 256):
            new += sys.getsizeof(item)
        if len(out) & 1023 == 0:
            tick()
            if len(out) > cap:
                break
    reserve(Cost(len(out), new + len(out) * _SLOT), what)
    current().spend(new, what)
    settle(out, (), what)
    return out


def _drains(value: Any) -> bool:
    return isinstance(value, (Iterator, range))


# -- measuring values without building them -----------------------------------------------------------


def kind(value: Any) -> int:
    """Bytes per character of `str(value)` as CPython stores it: 1, 2 or 4, in O(1) for a str."""
    if isinstance(value, (bytes, bytearray, int, float)) or value is None:
        return 1
    if not isinstance(value, str):
        return 4
    if value.isascii():
        return 1
    if type(value) is not str:
        return 4
    return max(1, min(4, (sys.getsizeof(value) - _UNICODE_HEADER) // (len(value) + 1)))


def _widest(*values: Any) -> int:
    return max((kind(v) for v in values), default=1)


def _digits(number: int) -> int:
    """An upper bound on len(str(number))."""
    return abs(number).bit_length() * 30103 // 100000 + 2


def _int_text(number: int) -> int:
    """An upper bound on the length of `number` in any format ('b' with '_' grouping is the longest)."""
    return abs(number).bit_length() * 5 // 4 + 4


def _scalar_size(value: Any) -> int:
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return _digits(value)
    return 24 if isinstance(value, float) else 52


def _chunked(text: str, encode: Callable[[str], str]) -> int:
    """len(encode(text)) minus its quotes, encoding 64k characters at a time (no copy of it all)."""
    size = 0
    for start in range(0, len(text), _CHUNK):
        size += len(encode(text[start : start + _CHUNK])) - 2
    return size


def _str_repr_size(text: str, encode: Callable[[str], str] = repr) -> int:
    """An upper bound on len(repr(text)) (or ascii): a chunk may quote differently than the whole
    string, which escaped single quotes bound."""
    plain = str.__str__(text)
    if len(plain) <= _CHUNK:
        return len(encode(plain)) + (0 if type(text) is str else 16)
    return _chunked(plain, encode) + plain.count("'") + 18


def _str_json_size(text: str, ensure_ascii: bool) -> int:
    """len(json.dumps(text)): JSON escapes each character on its own, so chunks add up exactly."""
    plain = str.__str__(text)

    def dump(chunk: str) -> str:
        return json.dumps(chunk, ensure_ascii=ensure_ascii)

    return len(dump(plain)) if len(plain) <= _CHUNK else _chunked(plain, dump) + 2


class _Measure:
    """Adds up the length of a value's repr (or its pprint) node by node, stopping past `limit`: each
    node adds at least one character, so a measure takes at most `limit` steps, shared values or not."""

    def __init__(self, limit: int, encode: Callable[[str], str] = repr, pretty: bool = False) -> None:
        self.limit, self.encode, self.pretty = limit, encode, pretty
        self.total = 0
        self.active: set[int] = set()

    def of(self, value: Any) -> int:
        try:
            self._add(value, 0)
        except _Over:
            pass
        return self.total

    def _count(self, n: int) -> None:
        self.total += n
        if self.total > self.limit:
            raise _Over

    def _add(self, value: Any, depth: int) -> None:
        if isinstance(value, str):
            self._count(_str_repr_size(value, self.encode))
        elif isinstance(value, (bytes, bytearray)):
            self._count(4 * len(value) + 14)
        elif value is None or isinstance(value, (bool, int, float, complex)):
            self._count(_scalar_size(value))
        elif isinstance(value, range):
            self._count(24 + sum(_digits(n) for n in (value.start, value.stop, value.step)))
        elif id(value) in self.active:
            self._count(5)  # repr shows a cycle as [...]
        elif isinstance(value, (Mapping, Namespace, list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
            self.active.add(id(value))
            self._container(value, depth)
            self.active.discard(id(value))
        else:
            self._count(len(repr(value)))

    def _container(self, value: Any, depth: int) -> None:
        if isinstance(value, Namespace):
            self._count(13)
            value = value._Namespace__attrs  # what its repr shows
        self._count(16)  # brackets, and a type name for views and sets: frozenset({...})
        pairs = isinstance(value, Mapping)
        for index, item in enumerate(value.items() if pairs else value):
            if index & 4095 == 4095:
                tick()
            if pairs:
                self._add(item[0], depth + 1)
                self._count(2)
                item = item[1]
            self._add(item, depth + 1)
            self._count(2 + (depth + 2 if self.pretty else 0))


def text_size(value: Any, limit: int | None = None) -> int:
    """An upper bound on len(str(value)), without building it; it stops counting once past `limit`."""
    if isinstance(value, str):
        return len(value)
    return _Measure(_cap() if limit is None else limit).of(value)


def repr_size(value: Any, limit: int, encode: Callable[[str], str] = repr) -> int:
    """An upper bound on len(repr(value)) (or len(ascii(value)) with encode=ascii)."""
    if isinstance(value, str):
        return _str_repr_size(value, encode)
    return _Measure(limit, encode).of(value)


class _JsonMeasure(_Measure):
    """The length of json.dumps(value) with these options (`indent`: the length of the indent string,
    None for none), node by node, stopping past `limit`."""

    def __init__(self, limit: int, ensure_ascii: bool, indent: int | None, separators: tuple[str, str]) -> None:
        super().__init__(limit)
        self.ensure_ascii, self.indent = ensure_ascii, indent
        self.item_sep, self.key_sep = separators

    def _add(self, value: Any, depth: int) -> None:
        if isinstance(value, str):
            self._count(_str_json_size(value, self.ensure_ascii))
        elif value is None or isinstance(value, (bool, int, float)):
            self._count(_scalar_size(value) + 4)  # 'Infinity', 'false'
        elif isinstance(value, (list, tuple, dict)) and id(value) not in self.active:
            self.active.add(id(value))
            self._json_container(value, depth)
            self.active.discard(id(value))
        # anything else, or a cycle: json.dumps raises before it builds more

    def _json_container(self, value: list[Any] | tuple[Any, ...] | dict[Any, Any], depth: int) -> None:
        n = len(value)
        self._count(2 + max(n - 1, 0) * len(self.item_sep))
        if n and self.indent is not None:  # a newline and the indent before each item and the closing bracket
            self._count(n * (1 + (depth + 1) * self.indent) + 1 + depth * self.indent)
        pairs = value.items() if isinstance(value, dict) else ((None, item) for item in value)
        for index, (key, item) in enumerate(pairs):
            if index & 4095 == 4095:
                tick()
            if isinstance(value, dict):
                key_size = _str_json_size(key, self.ensure_ascii) if isinstance(key, str) else _scalar_size(key) + 6
                self._count(len(self.key_sep) + key_size)
            self._add(item, depth + 1)


def _line_count(text: str | bytes | bytearray) -> int:
    """An upper bound on len(text.splitlines()) (each break counted alone, '\\r\\n' twice)."""
    if isinstance(text, (bytes, bytearray)):
        return text.count(b"\n") + text.count(b"\r") + 1
    breaks = _LINE_BREAKS[:7] if text.isascii() else _LINE_BREAKS
    return sum(text.count(b) for b in breaks) + 1


def _words(text: str | bytes | bytearray) -> int:
    """An upper bound on the words of `text`: each takes a character and a separator, but the last."""
    return len(text) // 2 + 1


# -- what operations build ------------------------------------------------------------------------------


def _as_text(value: Any, what: str) -> str:
    """str(value), refused before it is built when it would be oversized (str of a shared structure
    can be exponentially larger than the structure)."""
    if isinstance(value, str):
        return value
    reserve(text_cost(text_size(value)), what)
    return str(value)


def _same_kind(text: Any, other: Any) -> bool:
    """Whether `other` can be searched for in `text` (str in str, bytes-like in bytes-like)."""
    return isinstance(other, str) if isinstance(text, str) else isinstance(other, (bytes, bytearray))


def _replace(text: str | bytes, old: Any, new: Any, count: int) -> Cost:
    """`text.replace(old, new, count)`: grows by len(new) - len(old) per occurrence."""
    if not _same_kind(text, old) or not _same_kind(text, new) or not _is_int(count):
        return NOTHING  # replace raises TypeError
    grow = len(new) - len(old)
    if grow <= 0:
        return text_cost(len(text), kind(text))
    hits = text.count(old) if old else len(text) + 1
    if count >= 0:
        hits = min(hits, count)
    return text_cost(len(text) + hits * grow, _widest(text, new))


def _join(separator: str | bytes, values: Iterable[Any]) -> Cost:
    """`separator.join(map(str, values))`: the separators, then the values, stopping past the budget."""
    cap = _cap()
    count = len(values) if isinstance(values, Sized) else 0
    total = max(count - 1, 0) * len(separator)
    width = kind(separator)
    if total > cap:
        return text_cost(total, width)
    for index, value in enumerate(values):
        if index & 1023 == 1023:
            tick()
        total += len(value) if isinstance(value, (str, bytes)) else text_size(value, cap - total)
        width = max(width, kind(value))
        if total > cap:
            break
    return text_cost(total, width)


def _pad(text: str | bytes, width: Any, fill: Any = " ") -> Cost:
    """center, ljust, rjust, zfill: the larger of the text and the width."""
    size = max(len(text), width) if _is_int(width) else len(text)
    return text_cost(size, _widest(text, fill))


def _case(text: str) -> Cost:
    """upper, lower, title...: a character maps to up to three ('ß' -> 'SS', the same length in title
    case as in upper case), each on its own: measured a chunk at a time, the larger of upper and lower."""
    if text.isascii():
        return text_cost(len(text), 1)
    if len(text) > _cap():
        return text_cost(len(text), 4)
    size = sum(
        max(len(text[i : i + _CHUNK].upper()), len(text[i : i + _CHUNK].lower())) for i in range(0, len(text), _CHUNK)
    )
    return text_cost(size, 4)


def _pieces(text: str | bytes | bytearray, pieces: int) -> Cost:
    """split and friends: the text again, and an object and a slot per piece."""
    return Cost(pieces, len(text) * kind(text) + pieces * (_SLOT + _OBJECT))


def _printf(fmt: str | bytes, args: Any) -> Cost:
    """`fmt % args`: the format's text, and per conversion its width, precision and value."""
    positional = iter(args if isinstance(args, tuple) else (args,))
    cap, width, total = _cap(), kind(fmt), len(fmt)
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    for index, match in enumerate(_PRINTF.finditer(text)):
        if index & 1023 == 1023:
            tick()
        key, min_width, precision, conversion = match.groups()
        if conversion == "%":
            continue
        total += _spec_number(min_width, positional) + _spec_number(precision, positional)
        value = args.get(key) if key is not None and isinstance(args, Mapping) else next(positional, None)
        total += _value_size(value, conversion, cap)
        width = max(width, kind(value))
        if total > cap:
            break
    return text_cost(total * (5 if isinstance(fmt, Markup) else 1), width)


def _spec_number(token: str | None, positional: Iterator[Any]) -> int:
    if token is None:
        return 0
    if token == "*":
        value = next(positional, 0)
        return abs(value) if _is_int(value) else 0
    return int(token) if len(token) < 10 else 10**10


def _value_size(value: Any, conversion: str | None, cap: int) -> int:
    """An upper bound on one formatted value: its repr or ascii, a number in any base, or its str."""
    if conversion in ("r", "a"):
        return repr_size(value, cap, repr if conversion == "r" else ascii)
    if _is_int(value):
        return _int_text(value)
    if isinstance(value, float):
        return 450  # '{:,f}' of 1e308, without its precision
    return text_size(value, cap)


def str_format(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], get_field: Callable[..., Any]) -> Cost:
    """`fmt.format(*args, **kwargs)`: literal text, and per field its value and the numbers of its spec.
    Fields are looked up with the sandbox's own `get_field`, so `{0.x}` costs what it shows."""
    auto = itertools.count()
    cap, width, total = _cap(), kind(fmt), 0
    for index, (literal, name, spec, conversion) in enumerate(_FORMATTER.parse(fmt)):
        if index & 1023 == 1023:
            tick()
            if index > MAX_INT_ARG:  # the sandbox formats field by field in Python: as slow as this
                raise BudgetExceeded(f"formats an oversized number of fields (more than {MAX_INT_ARG:,})")
        total += len(literal)
        if name is None:
            continue
        value = _field(name, auto, args, kwargs, get_field)
        total += _value_size(value, conversion, cap) + _spec_numbers(spec or "", auto, args, kwargs, get_field)
        width = max(width, kind(value))
        if total > cap:
            break
    return text_cost(total * (5 if isinstance(fmt, Markup) else 1), width)


def _field(
    name: str, auto: Iterator[int], args: tuple[Any, ...], kwargs: Mapping[str, Any], get_field: Callable[..., Any]
) -> Any:
    if not _FIELD_HEAD.match(name).group():  # type: ignore[union-attr]  # '{}', '{.x}': the next argument
        name = f"{next(auto)}{name}"
    return get_field(name, args, kwargs)[0]


def _spec_numbers(
    spec: str, auto: Iterator[int], args: tuple[Any, ...], kwargs: Mapping[str, Any], get_field: Callable[..., Any]
) -> int:
    """The sum of the numbers (width, precision) of a format spec, nested fields ('{:{w}}') filled in."""
    text = ""
    for literal, name, _, _ in _FORMATTER.parse(spec):
        text += literal
        if name is not None:
            value = _field(name, auto, args, kwargs, get_field)
            text += str(value) if isinstance(value, (str, int)) and text_size(value) < 64 else ""
    runs = [run.lstrip("0") for run in _DIGIT_RUNS.findall(text)]
    return sum(int(run) if len(run) < 10 else 10**10 for run in runs if run)


def tojson_cost(value: Any, ensure_ascii: bool, indent: Any, separators: Any) -> Cost:
    """`json.dumps(...)` with these options; an int indent is first built as a string of spaces."""
    pad: int | None = None
    if isinstance(indent, str):
        pad = len(indent)
    elif _is_int(indent):
        pad = max(indent, 0)
    seps = tuple(separators) if separators is not None else ((",", ": ") if indent is not None else (", ", ": "))
    if len(seps) != 2 or not all(isinstance(s, str) for s in seps):
        return NOTHING  # json.dumps raises
    size = _JsonMeasure(_cap(), ensure_ascii, pad, (seps[0], seps[1])).of(value)
    return text_cost(max(size, pad or 0), 1 if ensure_ascii else 4)


def binop_cost(operator: str, left: Any, right: Any) -> Cost | None:
    """`*` (repetition), `+` (concatenation), `%` (printf); refuses oversized int arithmetic outright."""
    if operator == "+":
        return _concat(left, right)
    if operator in ("-", "/", "//"):
        return None  # numbers: counted once built
    if operator in ("*", "**") and _is_int(left) and _is_int(right):
        bits = abs(left).bit_length() * (abs(right) if operator == "**" else 1) + abs(right).bit_length()
        if bits > MAX_INT_BITS:
            raise BudgetExceeded("computes an oversized number")
    if operator == "*":
        return _repeat(left, right) or _repeat(right, left)
    if operator == "%" and isinstance(left, (str, bytes)):
        check_format(left, right if isinstance(right, tuple) else (right,))
        return _printf(left, right)
    return None


def _repeat(sequence: Any, times: Any) -> Cost | None:
    if not isinstance(sequence, (str, bytes, bytearray, list, tuple)) or not isinstance(times, int):
        return None
    length = len(sequence) * max(times, 0)
    return items_cost(length) if isinstance(sequence, (list, tuple)) else text_cost(length, kind(sequence))


def _concat(left: Any, right: Any) -> Cost | None:
    if type(left) is str and type(right) is str:  # the common case, first: the check only needs an upper bound
        length = len(left) + len(right)
        return Cost(length, length * (1 if left.isascii() and right.isascii() else 4) + _OBJECT)
    length = len(left) + len(right) if isinstance(left, Sized) and isinstance(right, Sized) else 0
    if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        return items_cost(length)
    if isinstance(left, (str, bytes, bytearray)) and isinstance(right, (str, bytes, bytearray)):
        escaped = isinstance(left, Markup) or isinstance(right, Markup)  # Markup + str escapes the str
        return text_cost(length * (5 if escaped else 1), max(kind(left), kind(right)))
    return None


def slice_cost(obj: Any, argument: Any) -> Cost | None:
    """`obj[a:b:c]` copies the items it selects."""
    if not isinstance(argument, slice) or not isinstance(obj, (str, bytes, list, tuple)):
        return None
    try:
        count = len(range(*argument.indices(len(obj))))
    except TypeError:
        return None  # the subscript raises TypeError itself
    return items_cost(count) if isinstance(obj, (list, tuple)) else text_cost(count, kind(obj))


def values_cost(values: Iterable[Any]) -> Cost:
    """`~` and block output: str() of each value, joined."""
    return _join("", values)


# -- filters ----------------------------------------------------------------------------------------------
# Each takes the filter's own arguments (eval context or environment first for those that get one) and
# returns what the filter would build. A filter that is not here builds at most a few times what it is
# given (trim, first, sort...): it runs, and what it built is counted after.

FILTER_COSTS: dict[str, Callable[..., Cost]] = {}


def _filter(*names: str) -> Callable[[Callable[..., Cost]], Callable[..., Cost]]:
    def register(fn: Callable[..., Cost]) -> Callable[..., Cost]:
        fn.__name__ = fn.__qualname__ = names[0]  # a call with bad arguments names the filter
        for name in names:
            FILTER_COSTS[name] = fn
        return fn

    return register


@_filter("replace")
def _replace_filter(eval_ctx: Any, s: Any, old: Any, new: Any, count: int | None = None) -> Cost:
    text, old_text, new_text = _as_text(s, "|replace"), _as_text(old, "|replace"), _as_text(new, "|replace")
    return _replace(text, old_text, new_text, -1 if count is None else count)


@_filter("join")
def _join_filter(eval_ctx: Any, value: Iterable[Any], d: Any = "", attribute: Any = None) -> Cost:
    if attribute is not None:
        value = list(map(make_attrgetter(eval_ctx.environment, attribute), value))
    return _join(_as_text(d, "|join"), value)


@_filter("center")
def _center_filter(value: Any, width: int = 80) -> Cost:
    return _pad(_as_text(value, "|center"), width)


@_filter("indent")
def _indent_filter(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> Cost:
    """Each line gets the indent and a newline; the lines are split out first."""
    if not isinstance(s, str):
        return NOTHING  # indent raises
    pad = len(width) if isinstance(width, str) else max(width, 0) if _is_int(width) else 0
    lines = _line_count(s) + 1
    size = len(s) + 1 + lines * (pad + 1)
    return Cost(size, size * _widest(s, width) + lines * (_SLOT + _OBJECT))


@_filter("wordwrap")
def _wordwrap_filter(
    environment: Any,
    s: Any,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: Any = None,
    break_on_hyphens: bool = True,
) -> Cost:
    """Lines joined by `wrapstring`: two lines in a row hold more than `width` characters (greedy
    wrapping moved the second's first chunk down for not fitting), so there are at most 2 * len / width
    of them, plus two per paragraph; textwrap holds a chunk per word or space on the way."""
    if not isinstance(s, str) or not _is_int(width) or width < 1:
        return NOTHING  # wordwrap raises
    separator = environment.newline_sequence if wrapstring is None else wrapstring
    paragraphs = _line_count(s)
    lines = 2 * len(s) // width + 2 * paragraphs + 2
    size = len(s) + lines * (len(separator) if isinstance(separator, str) else 0)
    return Cost(size, size * _widest(s, separator) + (_words(s) + lines) * (_SLOT + _OBJECT))


@_filter("format")
def _format_filter(value: Any, *args: Any, **kwargs: Any) -> Cost:
    text = _as_text(value, "|format")
    check_format(text, (*args, *kwargs.values()))
    return _printf(text, kwargs or args)


@_filter("list")
def _list_filter(eval_ctx: Any, value: Any) -> Cost:
    """A slot per item; items that are new objects (characters of a str, ints of a range) too."""
    count = len(value) if isinstance(value, Sized) else 0
    new_items = isinstance(value, (range, ItemsView)) or (isinstance(value, str) and not value.isascii())
    return items_cost(count, _SLOT + (_OBJECT if new_items else 0))


@_filter("dictsort")
def _dictsort_filter(value: Any, case_sensitive: bool = False, by: Any = "key", reverse: bool = False) -> Cost:
    """A new (key, value) pair per entry."""
    return items_cost(len(value) if isinstance(value, Sized) else 0, _SLOT + _OBJECT)


@_filter("groupby")
def _groupby_filter(
    environment: Any, value: Any, attribute: Any, default: Any = None, case_sensitive: bool = False
) -> Cost:
    """A (grouper, list) pair and a list per group, a slot per item in its group's list."""
    return items_cost(len(value) if isinstance(value, Sized) else 0, 2 * _SLOT + 3 * _OBJECT)


@_filter("batch")
def _batch_filter(value: Any, linecount: Any, fill_with: Any = None) -> Cost:
    count = len(value) if isinstance(value, Sized) else 0
    per = max(linecount, 1) if _is_int(linecount) else 1
    fill = per if fill_with is not None else 0
    return Cost(count + fill, (count + fill) * _SLOT + (count // per + 1) * _OBJECT)


@_filter("slice")
def _slice_filter(eval_ctx: Any, value: Any, slices: Any, fill_with: Any = None) -> Cost:
    count = len(value) if isinstance(value, Sized) else 0
    parts = max(slices, 0) if _is_int(slices) else 0
    return Cost(count + parts, (2 * count + parts) * _SLOT + parts * _OBJECT)


@_filter("sum")
def _sum_filter(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Cost:
    """Summing lists builds every partial list: the cost is the sum of the prefixes."""
    if attribute is not None or not isinstance(start, (list, tuple)) or not isinstance(iterable, Iterable):
        return NOTHING
    length, built = len(start), 0
    for item in iterable:
        length += len(item) if isinstance(item, Sized) else 0
        built += length
    return Cost(length, built * _SLOT)


@_filter("tojson")
def _tojson_filter(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> Cost:
    return tojson_cost(value, ensure_ascii, indent, separators)


@_filter("pprint")
def _pprint_filter(value: Any) -> Cost:
    cap = _cap()
    return text_cost(_Measure(cap, pretty=True).of(value), 4)


@_filter("string", "safe")
def _string_filter(value: Any) -> Cost:
    return text_cost(text_size(value), kind(value))


@_filter("e", "escape", "forceescape")
def _escape_filter(value: Any) -> Cost:
    """`&<>'"` become entities of up to five characters."""
    text = _as_text(value, "|escape")
    specials = sum(text.count(c) for c in "&<>'\"")
    return text_cost(len(text) + 4 * specials, kind(text))


@_filter("upper", "lower", "title", "capitalize")
def _case_filter(s: Any) -> Cost:
    text = _as_text(s, "|upper")
    cost = _case(text)
    return Cost(cost.length, cost.nbytes + _words(text) * _OBJECT)  # title: a match object per word


@_filter("trim")
def _trim_filter(value: Any, chars: Any = None) -> Cost:
    return text_cost(len(_as_text(value, "|trim")), kind(value))


@_filter("striptags", "wordcount")
def _words_filter(value: Any) -> Cost:
    """Both split the text into a list of words."""
    text = _as_text(value, "|striptags")
    return _pieces(text, _words(text))


@_filter("urlencode")
def _urlencode_filter(value: Any) -> Cost:
    """Up to twelve characters per character (four UTF-8 bytes, %XX each) of the text or the pairs."""
    return text_cost(12 * text_size(list(value.items()) if isinstance(value, Mapping) else value), 1)


@_filter("urlize")
def _urlize_filter(
    eval_ctx: Any,
    value: Any,
    trim_url_limit: Any = None,
    nofollow: bool = False,
    target: Any = None,
    rel: Any = None,
    extra_schemes: Any = None,
) -> Cost:
    """Every word may become a link: twice itself, escaped, and the markup of an <a> tag."""
    text = _as_text(value, "|urlize")
    markup = 64 + sum(text_size(v) for v in (target, rel) if v is not None)
    return text_cost(10 * len(text) + _words(text) * markup, 4)


@_filter("xmlattr")
def _xmlattr_filter(eval_ctx: Any, d: Any, autospace: bool = True) -> Cost:
    if not isinstance(d, Mapping):
        return NOTHING
    size = sum(text_size(k) + 5 * text_size(v) + 4 for k, v in d.items())
    return text_cost(size + 1, 4)


def _check_items(value: Any, what: str) -> None:
    count = len(value) if isinstance(value, Sized) else 0
    if count > MAX_INT_ARG:
        raise BudgetExceeded(f"runs {what} over an oversized sequence ({count:,} items, at most {MAX_INT_ARG:,})")


def guard_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The filter, checking the deadline, refusing oversized widths, and costing what it will build."""
    value_at = 1 if hasattr(fn, "jinja_pass_arg") else 0  # @pass_context & co. get the context first
    cost_of = FILTER_COSTS.get(name)
    what = f"|{name}"

    def guarded(*args: Any, **kwargs: Any) -> Any:
        tick()
        if name in _DRAINING_FILTERS and len(args) > value_at and _drains(args[value_at]):
            args = (*args[:value_at], drain(args[value_at], what), *args[value_at + 1 :])
        if name in _WIDTH_FILTERS:
            check_ints((*args[value_at + 1 :], *kwargs.values()))
        if name in _PER_ITEM_FILTERS and len(args) > value_at:
            _check_items(args[value_at], what)
        cost = cost_of(*args, **kwargs) if cost_of is not None else None
        if cost is not None:
            reserve(cost, what)
        result = fn(*args, **kwargs)
        settle(result, args, what, cost)
        return result

    if hasattr(fn, "jinja_pass_arg"):
        guarded.jinja_pass_arg = fn.jinja_pass_arg  # type: ignore[attr-defined]
    return guarded


_TEXT_TESTS = frozenset({"lower", "upper"})  # `x is lower` tests str(x)


def guard_test(name: str, fn: Any) -> Callable[..., Any]:
    """The test, checking the deadline, and sizing str(value) first for those that build it."""

    def guarded(*args: Any, **kwargs: Any) -> Any:
        tick()
        if name in _TEXT_TESTS and args and not isinstance(args[0], str):
            reserve(text_cost(text_size(args[0])), f"is {name}")
        return fn(*args, **kwargs)

    if hasattr(fn, "jinja_pass_arg"):
        guarded.jinja_pass_arg = fn.jinja_pass_arg  # type: ignore[attr-defined]
    return guarded


# -- methods and globals ------------------------------------------------------------------------------------
# Each takes the object the method is bound to, then the call's arguments.


def _split(text: Any, sep: Any = None, maxsplit: Any = -1) -> Cost:
    if not isinstance(text, (str, bytes, bytearray)):
        return NOTHING
    if sep is None:
        pieces = _words(text)
    elif _same_kind(text, sep) and sep:
        pieces = text.count(sep) + 1
    else:
        return NOTHING  # split raises
    if _is_int(maxsplit) and maxsplit >= 0:
        pieces = min(pieces, maxsplit + 1)
    return _pieces(text, pieces)


def _splitlines(text: Any, keepends: bool = False) -> Cost:
    return _pieces(text, _line_count(text))


def _expandtabs(text: Any, tabsize: Any = 8) -> Cost:
    tab = "\t" if isinstance(text, str) else b"\t"
    size = len(text) + text.count(tab) * (max(tabsize, 0) if _is_int(tabsize) else 0)
    return text_cost(size, kind(text))


def _translate(text: Any, table: Any, delete: Any = None) -> Cost:
    """Each character becomes its entry in the table: the longest entry bounds the result."""
    if isinstance(table, Mapping):
        entries: Iterable[Any] = table.values()
    elif isinstance(table, (str, bytes, list, tuple, range)):
        entries = table
    else:
        return text_cost(len(text), kind(text))  # bytes' None table, or translate raises
    longest = max((len(e) for e in entries if isinstance(e, (str, bytes))), default=1)
    return text_cost(len(text) * max(longest, 1), 4)


def _encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> Cost:
    """Bytes: 'namereplace' writes a character's name (under a hundred bytes), escapes take ten."""
    per_char = 1 if text.isascii() and errors == "strict" else 100 if errors == "namereplace" else 10
    return text_cost(len(text) * per_char + 4, 1)


def _decode(data: Any, encoding: Any = "utf-8", errors: Any = "strict") -> Cost:
    return text_cost(4 * len(data), 4)  # 'backslashreplace': four characters per byte


def _hex(data: Any, *args: Any) -> Cost:
    return text_cost(3 * len(data), 1)


def _join_method(separator: Any, iterable: Any) -> Cost:
    return _join(separator, iterable)


def _to_bytes(number: Any, length: Any = 1, *args: Any, **kwargs: Any) -> Cost:
    return text_cost(length if _is_int(length) else 0, 1)


def _entries(*args: Any, **kwargs: Any) -> Cost:
    """dict(...), namespace(...), d.copy(), dict.fromkeys(...): an entry per key, and what it holds."""
    count = len(kwargs) + sum(len(a) for a in args if isinstance(a, Sized))
    return Cost(count, count * _ENTRY + _OBJECT + _held(kwargs.values()))


def _held(members: Iterable[Any]) -> int:
    """The bytes of the objects a new display, dict or namespace holds that may have been built without
    being counted: anything but strings and lists (counted when built, or constants), so ints, a macro's
    `varargs` tuple or `kwargs` dict, loop objects, bound methods. Shallow: what those hold was counted."""
    return sum(sys.getsizeof(m, _OBJECT) for m in members if not isinstance(m, (str, list)))


def _copy(container: Any) -> Cost:
    return items_cost(len(container), _ENTRY if isinstance(container, dict) else _SLOT)


_TEXT_METHODS: dict[str, Callable[..., Cost]] = {
    "replace": lambda text, old, new, count=-1: _replace(text, old, new, count),
    "center": _pad,
    "ljust": _pad,
    "rjust": _pad,
    "zfill": _pad,
    "expandtabs": _expandtabs,
    "join": _join_method,
    "split": _split,
    "rsplit": _split,
    "splitlines": _splitlines,
    "translate": _translate,
    "encode": _encode,
    "decode": _decode,
    "hex": _hex,
    **{name: lambda text: _case(text) for name in ("upper", "lower", "title", "capitalize", "swapcase", "casefold")},
}
_CONTAINER_METHODS: dict[str, Callable[..., Cost]] = {
    "copy": _copy,
    "fromkeys": lambda _, keys, value=None: _entries(keys),
}
_DRAINING_METHODS = frozenset({"join", "fromkeys"})
_CONSTRUCTORS: dict[Any, Callable[..., Cost]] = {
    dict: _entries,
    Namespace: _entries,
    Cycler: lambda *items: Cost(len(items), len(items) * _SLOT + _OBJECT + _held(items)),
}
_COUNTED_ELSEWHERE = (Macro, LoopContext, BlockReference)  # their output is counted by `budget_concat`


def call_cost(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any], get_field: Callable[..., Any]) -> Cost | None:
    """What calling `obj` (a method of a str, bytes, int, dict or list; dict, namespace, cycler) builds."""
    target = getattr(obj, "__wrapped__", obj)  # str.format, as the sandbox wraps it
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if name in _WIDTH_METHODS:
        check_ints((*args, *kwargs.values()))
    if isinstance(owner, str) and name in _FORMAT_METHODS:
        check_format(owner, (*args, *kwargs.values(), *(v for a in args if isinstance(a, dict) for v in a.values())))
        positional, named = ((), args[0]) if name == "format_map" and args else (args, kwargs)
        return str_format(owner, positional, named if isinstance(named, Mapping) else {}, get_field)
    try:
        if isinstance(owner, (str, bytes, bytearray)) and name in _TEXT_METHODS:
            cost = _TEXT_METHODS[name](owner, *args, **kwargs)
            return Cost(cost.length * 5, cost.nbytes * 5) if isinstance(owner, Markup) else cost  # escapes
        if isinstance(owner, (dict, list)) and name in _CONTAINER_METHODS:
            return _CONTAINER_METHODS[name](owner, *args, **kwargs)
        if _is_int(owner) and name == "to_bytes":
            return _to_bytes(owner, *args, **kwargs)
        if isinstance(obj, type) and obj in _CONSTRUCTORS:
            return _CONSTRUCTORS[obj](*args, **kwargs)
    except TypeError:
        if _binds(target, args, kwargs):
            raise  # arguments the method takes, that its cost function does not: refused, not let through
        return None  # arguments the method does not take: the call raises its own TypeError, building nothing
    return None


def _binds(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the method's own signature takes these arguments (True when it cannot be read)."""
    try:
        inspect.signature(method).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def drain_args(obj: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The call's generator arguments as lists, for calls that read them whole (joins, dict(...))."""
    name = getattr(obj, "__name__", "")
    if name not in _DRAINING_METHODS and not (isinstance(obj, type) and obj in _CONSTRUCTORS):
        return args
    return tuple(drain(a, f".{name}()") if _drains(a) else a for a in args)


def counted_elsewhere(obj: Any) -> bool:
    return isinstance(obj, _COUNTED_ELSEWHERE)


# -- values the template builds without an operator ------------------------------------------------------------


def budget_concat(pieces: Iterable[str]) -> str:
    """`Environment.concat`: the output of a macro, a `{% set %}` block, a filter block or a call."""
    parts = pieces if isinstance(pieces, list) else drain(iter(pieces), "block output")
    cost = values_cost(parts)
    reserve(cost, "block output")
    result = "".join(parts)
    settle(result, (), "block output", cost)
    return result


def budget_values(parts: list[Any]) -> str:
    """The `~` operator (jinja's str_join): its parts are sized before str() and the join build them."""
    cost = values_cost(parts)
    reserve(cost, "~")
    result = "".join([str(part) for part in parts])
    settle(result, tuple(parts), "~", cost)
    return result


@pass_context  # never folded into a constant: a folded display would be built by plain Python code
def budget_display(context: Any, value: Any) -> Any:
    """A list, tuple or dict display (`[a, b]`, `{'k': v}`): its slots, and what it holds (`_held`)."""
    budget = _BUDGET.get()
    if budget is None:
        return value
    budget.check()
    members = itertools.chain(value.keys(), value.values()) if isinstance(value, dict) else value
    nbytes = sys.getsizeof(value) + _held(members)
    budget.reserve(Cost(len(value), nbytes), "a list or dict display")
    budget.settle(value, nbytes, "a list or dict display")
    return value


def budget_output(value: Any) -> Any:
    """`Environment.finalize`: str() of a `{{ value }}` that is not already a string, sized first."""
    if isinstance(value, str):
        return value
    text = _as_text(value, "{{ }}")
    settle(text, (), "{{ }}")
    return text


def budget_slice(obj: Any, start: Any, stop: Any, step: Any) -> Any:
    """`obj[start:stop:step]`, which copies what it selects."""
    selection = slice(start, stop, step)
    cost = slice_cost(obj, selection)
    if cost is not None:
        reserve(cost, "a slice")
    value = obj[selection]
    settle(value, (obj,), "a slice", cost)
    return value


class BudgetLoop:
    """Wraps the iterable of every `{% for %}`: loops that print nothing still meet the deadline. Its
    length is the source's, so that `loop.length` does not copy a list or range it can ask instead."""

    __slots__ = ("source",)

    def __init__(self, source: Iterable[Any]) -> None:
        self.source = source

    def __iter__(self) -> Iterator[Any]:
        for index, item in enumerate(self.source):
            if index & 63 == 0:
                tick()
            yield item

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]  # TypeError for a generator: BudgetLoopContext drains it


class BudgetLoopContext(LoopContext):
    """jinja's `loop`, whose `length` (and `revindex`...) over a generator copies the rest of it into a
    list: drained through the budget here. Compiled templates get this class in place of LoopContext.
    It mirrors LoopContext.length (jinja 3.1), private attributes included; the loop tests of
    tests/test_template_budget.py compare it with plain jinja."""

    @property
    def length(self) -> int:
        if self._length is None:
            try:
                self._length = len(self._iterable)  # type: ignore[arg-type]
            except TypeError:
                rest = drain(self._iterator, "loop.length")
                self._iterator = iter(rest)
                self._length = len(rest) + self.index + (self._after is not missing)
        return self._length


def budget_range(*args: int) -> range:
    """jinja's `range` (safe_range): more than MAX_INT_ARG items are refused, as the budget's error."""
    rng = range(*args)
    try:
        count = len(rng)
    except OverflowError:
        count = MAX_INT_ARG + 1
    if count > MAX_INT_ARG:
        raise BudgetExceeded(f"builds an oversized range ({count:,} items, at most {MAX_INT_ARG:,})")
    return rng
