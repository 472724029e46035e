"""Chat formatting: Jinja chat templates rendered in a budgeted sandbox, content location for safe
tokenization, and the conversion of OpenAI-style messages to a mistral-common request.

Templates are model files, which makes them untrusted code. They run in jinja2's
`ImmutableSandboxedEnvironment` (the environment transformers uses), with the globals transformers
provides (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text), and a budget:
every `for` loop, attribute access and call checks a deadline, and the output is capped in size.

Control tokens must never be parsed out of message text. `render_chat_parts` therefore renders the
template a second time with every message content replaced by a random sentinel; splitting at the
sentinels tells which characters of the prompt came from the template (where control tokens are
recognised) and which from the messages (plain text, always).
"""

from __future__ import annotations

import contextvars
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tramontane.errors import TemplateError

MAX_OUTPUT_CHARS = 1_000_000  # plus twice the size of the messages, see `render_chat_template`
MAX_SECONDS = 1.0
_MAX_INT_ARG = 100_000  # widths and repeat counts above this are refused
_MAX_INT_BITS = 100_000  # no integer arithmetic beyond this size (repeated squaring would not end)
_BIG_FORMAT_WIDTH = re.compile(r"[%{:][^%{}\s]{0,8}?\d{6,}")
# Filters and str methods whose int arguments size their output (`'x'|center(10**9)`).
_WIDTH_FILTERS = frozenset({"center", "indent", "wordwrap", "slice", "batch"})
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_FORMAT_METHODS = frozenset({"format", "format_map"})
_WIDTH_FROM_ARGS = re.compile(r"\*|\{[^{}]*\{")  # '%*d', '{:{w}}': the width is an argument


class _BudgetExceeded(Exception):
    pass


@dataclass
class _Budget:
    deadline: float
    max_chars: int

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise _BudgetExceeded("took longer than its time budget")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("tramontane_template_budget", default=None)


def _tick() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.check()


def _check_len(value: Any) -> None:
    """Refuse a str/list value longer than the output budget."""
    budget = _BUDGET.get()
    if isinstance(value, (str, list, tuple)) and len(value) > (budget.max_chars if budget else MAX_OUTPUT_CHARS):
        raise _BudgetExceeded("builds a value larger than its output budget")


def _check_ints(values: Iterable[Any]) -> None:
    for value in values:
        if _is_int(value) and abs(value) > _MAX_INT_ARG:
            raise _BudgetExceeded(f"uses an oversized number ({value})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_format(fmt: Any, args: Iterable[Any]) -> None:
    if not isinstance(fmt, str):
        return
    if _BIG_FORMAT_WIDTH.search(fmt):
        raise _BudgetExceeded("uses an oversized format width")
    if _WIDTH_FROM_ARGS.search(fmt):
        _check_ints(args)


def _budget_loop(iterable: Iterable[Any]) -> Iterator[Any]:
    """Wraps the iterable of every `{% for %}`: loops that print nothing still meet the deadline."""
    for index, item in enumerate(iterable):
        if index & 63 == 0:
            _tick()
        yield item


def _guard_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that checks the deadline, refuses oversized widths and results."""
    value_at = 1 if hasattr(fn, "jinja_pass_arg") else 0  # @pass_context & co. get the context first

    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if name in _WIDTH_FILTERS:
            _check_ints((*args[value_at + 1 :], *kwargs.values()))
        if name == "format" and len(args) > value_at:
            _check_format(args[value_at], (*args[value_at + 1 :], *kwargs.values()))
        result = fn(*args, **kwargs)
        _check_len(result)
        return result

    if hasattr(fn, "jinja_pass_arg"):
        guarded.jinja_pass_arg = fn.jinja_pass_arg  # type: ignore[attr-defined]
    return guarded


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Sequence[str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: unlike Jinja's own it keeps non-ASCII text and does not HTML-escape."""
    seps: tuple[str, str] | None = None
    if separators is not None:
        item, key = separators  # json.dumps unpacks them the same way (ValueError unless two)
        seps = (item, key)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=seps, sort_keys=sort_keys)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus budget checks on calls, attribute access and the operators that build
    large values, and an immediate SecurityError on unsafe attributes (instead of an Undefined)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        value = super().getattr(obj, attribute)
        _check_len(value)
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _tick()
        name = getattr(__obj, "__name__", "")
        if name in _WIDTH_METHODS:
            _check_ints((*args, *kwargs.values()))
        if name in _FORMAT_METHODS:  # str.format, which jinja wraps
            fmt = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            _check_format(fmt, (*args, *kwargs.values(), *(v for a in args if isinstance(a, dict) for v in a.values())))
        result = super().call(__context, __obj, *args, **kwargs)
        _check_len(result)
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        _check_binop(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        _check_len(result)
        return result


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `'x' * 10**9`, `9 ** 10**6`, repeated squaring and `'%0999999999d' % 1` before they run."""
    if operator == "*":  # sequence repetition
        sizes = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
        counts = [v for v in (left, right) if _is_int(v)]
        if sizes and counts and sizes[0] * counts[0] > _MAX_INT_ARG * 10:
            raise _BudgetExceeded(f"repeats a value to an oversized length ({sizes[0]} x {counts[0]})")
    if operator in ("*", "**") and _is_int(left) and _is_int(right):
        bits = abs(left).bit_length() * (abs(right) if operator == "**" else 1) + abs(right).bit_length()
        if bits > _MAX_INT_BITS:
            raise _BudgetExceeded("computes an oversized number")
    if operator == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, tuple) else (right,))


def _make_environment() -> _ChatSandbox:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters = {name: _guard_filter(name, fn) for name, fn in env.filters.items()}
    env.filters["tojson"] = _guard_filter("tojson", _tojson)
    env.filters["_tramontane_budget"] = _budget_loop
    env.globals.pop("lipsum", None)  # unbounded Python loop, and no template needs it
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Parse, wrap every `for` iterable in the budget filter, compile."""
    try:
        tree = _ENV.parse(template)
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, "_tramontane_budget", [], [], None, None)
        tree.set_environment(_ENV)
        return _ENV.from_string(tree)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from exc


def template_tool_format(template: str | None) -> str | None:
    """How a chat template writes tool calls, read from its text: None when it never looks at `tools`
    (tramontane then describes the tools in a system prompt itself, see tools.py), else "mistral-v11"
    (`[TOOL_CALLS]name[ARGS]{...}`), "mistral-v3" (`[TOOL_CALLS][{...}]`), "hermes"
    (`<tool_call>{...}</tool_call>`) or "json" (a bare `{"name": ..., "parameters": ...}` object)."""
    if not template:
        return None
    try:
        if "tools" not in meta.find_undeclared_variables(_ENV.parse(template)):
            return None
    except jinja2.exceptions.TemplateSyntaxError:
        return None
    if "[TOOL_CALLS]" in template:
        return "mistral-v11" if "[ARGS]" in template else "mistral-v3"
    if "<tool_call>" in template:
        return "hermes"
    return "json"


def _content_size(messages: Sequence[dict[str, Any]]) -> int:
    return sum(len(json.dumps(message, ensure_ascii=False, default=str)) for message in messages)


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    tools: Sequence[dict[str, Any]] | None = None,
    max_chars: int | None = None,
    max_seconds: float = MAX_SECONDS,
    **extra: Any,
) -> str:
    """Render a chat template the way transformers' `apply_chat_template(tokenize=False)` does.

    The output may hold at most `max_chars` characters (default 1 MB plus twice the JSON size of the
    messages) and take at most `max_seconds`; a template that exceeds either, reaches for Python
    internals, raises through `raise_exception`, or fails in any other way raises TemplateError."""
    limit = max_chars if max_chars is not None else MAX_OUTPUT_CHARS + 2 * _content_size(messages)
    compiled = _compile(template)
    context = dict(
        extra,
        messages=list(messages),
        tools=list(tools) if tools is not None else None,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token or "",
        eos_token=eos_token or "",
    )
    token = _BUDGET.set(_Budget(time.monotonic() + max_seconds, limit))
    try:
        return _generate(compiled, context, limit)
    except _BudgetExceeded as exc:
        raise TemplateError(f"chat template {exc} (limits: {limit} characters, {max_seconds} s)") from None
    except SecurityError as exc:
        raise TemplateError(f"chat template blocked for security: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"chat template failed: {exc}") from None
    except (RecursionError, MemoryError) as exc:
        raise TemplateError(f"chat template exceeded its budget: {type(exc).__name__}") from None
    except Exception as exc:  # a template error surfacing as a Python exception (TypeError, ...)
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        _BUDGET.reset(token)


def _generate(compiled: jinja2.Template, context: dict[str, Any], limit: int) -> str:
    chunks: list[str] = []
    size = 0
    for chunk in compiled.generate(context):
        size += len(chunk)
        if size > limit:
            raise _BudgetExceeded("output is larger than its budget")
        _tick()
        chunks.append(chunk)
    return "".join(chunks)


# -- locating message content in the rendered prompt ------------------------------------------------


@dataclass(frozen=True)
class RenderedChat:
    """A rendered prompt. `parts` are `(text, is_content)` pieces that join to `text`, or None when
    the template transforms message content beyond recognition (then `contents` lists the raw
    message texts, so the caller can decide whether the whole prompt is safe to tokenize)."""

    text: str
    parts: list[tuple[str, bool]] | None
    contents: list[str]


def _mark(value: Any, contents: list[str], nonce: str) -> Any:
    """Replace a message's text (a string, or the text of `{"type": "text"}` chunks) by sentinels."""
    if isinstance(value, str):
        contents.append(value)
        return f"\ue000{nonce}.{len(contents) - 1}\ue001"
    if isinstance(value, list):
        return [
            dict(chunk, text=_mark(chunk["text"], contents, nonce))
            if isinstance(chunk, dict) and isinstance(chunk.get("text"), str)
            else chunk
            for chunk in value
        ]
    return value


def _assemble(pieces: list[str], contents: Sequence[str]) -> list[tuple[str, bool]]:
    """`pieces` alternates template text and sentinel indices (as re.split returns them)."""
    parts: list[tuple[str, bool]] = []
    for index, piece in enumerate(pieces):
        if index % 2 == 0:
            if piece:
                parts.append((piece, False))
        elif contents[int(piece)]:
            parts.append((contents[int(piece)], True))
    return parts


def render_chat_parts(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    tools: Sequence[dict[str, Any]] | None = None,
    **extra: Any,
) -> RenderedChat:
    """Render the prompt, and tell which characters of it are message content.

    The template is rendered once as is and once with each content replaced by a random sentinel.
    The sentinel rendering, with the contents put back (as is, or stripped for templates that
    `| trim`), must reproduce the real rendering exactly; otherwise `parts` is None."""
    kwargs: dict[str, Any] = dict(
        extra, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token, tools=tools
    )
    text = render_chat_template(template, messages, **kwargs)
    nonce = str(secrets.randbits(64))
    contents: list[str] = []
    marked = [dict(m, content=_mark(m["content"], contents, nonce)) if "content" in m else m for m in messages]
    try:
        with_sentinels = render_chat_template(template, marked, **kwargs)
    except TemplateError:
        return RenderedChat(text, None, contents)
    pieces = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", with_sentinels)
    for candidate in (contents, [c.strip() for c in contents]):
        parts = _assemble(pieces, candidate)
        if "".join(p for p, _ in parts) == text:
            return RenderedChat(text, parts, contents)
    return RenderedChat(text, None, contents)


def field_strings(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None) -> Iterator[str]:
    """Every string in the messages and tools that is not message content (tool-call names and
    arguments, tool definitions...): template-rendered text the sentinels do not cover."""

    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from walk(item)

    for message in messages:
        yield from walk({k: v for k, v in message.items() if k != "content"})
    yield from walk(list(tools or ()))


# -- mistral-common ---------------------------------------------------------------------------------


def mistral_request(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> Any:
    """OpenAI-style message dicts (system/user/assistant with tool_calls/tool) to a mistral-common
    `ChatCompletionRequest`; bad messages raise TemplateError."""
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from pydantic import ValidationError

    try:
        return ChatCompletionRequest.from_openai(list(messages), tools=list(tools) if tools else None)
    except (MistralCommonException, ValidationError, ValueError, KeyError, TypeError) as exc:
        raise TemplateError(f"messages do not fit the mistral-common chat format: {exc}") from exc
