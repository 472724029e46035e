"""Chat formatting: Jinja chat templates rendered in a budgeted sandbox, content location for safe
tokenization, and the conversion of OpenAI-style messages to a mistral-common request.

Templates are model files, which makes them untrusted code. They run in jinja2's
`ImmutableSandboxedEnvironment` (the environment transformers uses), with the globals transformers
provides (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text), and a budget
(template_budget.py): every `for` loop, attribute access and call checks a deadline, and every filter,
method and operator that builds a value sizes it first and is refused when it would not fit the
output or memory budget. The hooks below route each of those through the budget: calls, operators,
slices, `{{ }}` output (finalize), block and macro output (concat), and, rewritten into the parsed
template, `for` loops, `~` and list and dict displays.

Control tokens must never be parsed out of message text. `render_chat_parts` therefore renders the
template a second time with every message content replaced by a random sentinel; splitting at the
sentinels tells which characters of the prompt came from the template (where control tokens are
recognised) and which from the messages (plain text, always).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.visitor import NodeTransformer

from tramontane.errors import TemplateError
from tramontane.text import template_budget as budget
from tramontane.text.template_budget import MAX_OUTPUT_CHARS, MAX_SECONDS, BudgetExceeded

_FOLD_CHARS = 1 << 16  # compile-time constant folding gives up (and leaves it to the render) beyond this
_CONTEXT_KWARGS = ("_loop_vars", "_block_vars")  # jinja passes these to every call in a loop or block


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    """The date in `fmt`: '%c' writes 24 characters for 2, no directive writes more than 16 per character."""
    if isinstance(fmt, str):
        budget.reserve(budget.text_cost(16 * len(fmt) + 64), "strftime_now()")
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
    """The sandbox, plus budget checks on calls, attribute access, slices and the operators that build
    values, and an immediate SecurityError on unsafe attributes (instead of an Undefined)."""

    intercepted_binops = frozenset({"*", "**", "+", "-", "/", "//", "%"})
    intercepted_unops = frozenset({"-"})
    concat = staticmethod(budget.budget_concat)

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=budget.budget_output, **options)
        self._formatter = SandboxedFormatter(self)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget.tick()
        value = super().getattr(obj, attribute)
        budget.check_len(value)
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        """Indexing a string builds a character (`x[a:b]` is compiled without this, see _BudgetRewrite)."""
        budget.tick()
        value = super().getitem(obj, argument)
        if isinstance(obj, str):
            budget.settle(value, (obj,), "an index")
        return value

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget.tick()
        args = budget.drain_args(__obj, args)
        own = {k: v for k, v in kwargs.items() if k not in _CONTEXT_KWARGS}  # what the callee will get
        cost = budget.call_cost(__obj, args, own, __self._formatter.get_field)
        what = f"{getattr(__obj, '__name__', 'a call')}()"
        if cost is not None:
            budget.reserve(cost, what)
        result = super().call(__context, __obj, *args, **kwargs)
        if budget.counted_elsewhere(__obj):
            budget.check_len(result)
        else:
            inputs = (__obj, getattr(__obj, "__self__", None), *args, *kwargs.values())
            budget.settle(result, inputs, what, cost)
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget.tick()
        cost = budget.binop_cost(operator, left, right)
        if cost is not None:
            budget.reserve(cost, f"'{operator}'")
        result = super().call_binop(context, operator, left, right)
        if cost is not None or not budget.small_number(result):
            budget.settle(result, (left, right), f"'{operator}'", cost)
        return result

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        budget.tick()
        result = super().call_unop(context, operator, arg)
        if not budget.small_number(result):
            budget.settle(result, (arg,), f"'{operator}'")
        return result


class _BudgetRewrite(NodeTransformer):
    """Routes what the template builds without a call or operator through the budget: `for` iterables
    (a deadline check per 64 items), `~` (sized before it joins), slices (which jinja compiles to a
    plain subscript, not `getitem`) and list, tuple and dict displays."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)  # type: ignore[assignment]
        node.iter = _budget_filter(node.iter, "_tramontane_loop")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)  # type: ignore[assignment]
        return _budget_filter(nodes.List(node.nodes, lineno=node.lineno), "_tramontane_concat")

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        node = self.generic_visit(node)  # type: ignore[assignment]
        if not isinstance(node.arg, nodes.Slice):
            return node
        bounds = [part or nodes.Const(None) for part in (node.arg.start, node.arg.stop, node.arg.step)]
        return nodes.Filter(node.node, "_tramontane_slice", bounds, [], None, None, lineno=node.lineno)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return _budget_filter(self.generic_visit(node), "_tramontane_display")

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return _budget_filter(self.generic_visit(node), "_tramontane_display")

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        node = self.generic_visit(node)  # type: ignore[assignment]
        return _budget_filter(node, "_tramontane_display") if node.ctx == "load" else node


def _budget_filter(node: nodes.Node, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


def _make_environment() -> _ChatSandbox:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters = {name: budget.guard_filter(name, fn) for name, fn in env.filters.items()}
    env.filters["tojson"] = budget.guard_filter("tojson", _tojson)
    env.filters["_tramontane_loop"] = budget.BudgetLoop
    env.filters["_tramontane_concat"] = budget.budget_values
    env.filters["_tramontane_display"] = budget.budget_display
    env.filters["_tramontane_slice"] = budget.budget_slice
    env.tests = {name: budget.guard_test(name, fn) for name, fn in env.tests.items()}
    env.globals.pop("lipsum", None)  # unbounded Python loop, and no template needs it
    env.globals["range"] = budget.budget_range
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    """Parse, route loops, `~` and displays through the budget, compile. Constant folding runs under a
    small budget of its own: a constant that does not fit is left for the render (and its budget)."""
    try:
        tree = _BudgetRewrite().visit(_ENV.parse(template))
        tree.set_environment(_ENV)
        with budget.budget_scope(budget.new_budget(_FOLD_CHARS, MAX_SECONDS, max_bytes=64 * _FOLD_CHARS)):
            compiled = _ENV.from_string(tree)
        # The template module's own globals (its macros and blocks share them): its loops get the
        # budget's `loop` object.
        compiled.root_render_func.__globals__["LoopContext"] = budget.BudgetLoopContext
        return compiled
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
    render_budget = budget.new_budget(limit, max_seconds)
    try:
        with budget.budget_scope(render_budget):
            return _generate(compiled, context, limit)
    except BudgetExceeded as exc:
        limits = f"{limit:,} characters, {render_budget.max_bytes:,} bytes, {max_seconds} s"
        raise TemplateError(f"chat template {exc} (limits: {limits})") from None
    except SecurityError as exc:
        raise TemplateError(f"chat template blocked for security: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"chat template failed: {exc}") from None
    except (RecursionError, MemoryError) as exc:
        raise TemplateError(f"chat template exceeded its budget: {type(exc).__name__}") from None
    except Exception as exc:  # a template error surfacing as a Python exception (TypeError, ...)
        raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None


def _generate(compiled: jinja2.Template, context: dict[str, Any], limit: int) -> str:
    chunks: list[str] = []
    size = 0
    for chunk in compiled.generate(context):
        size += len(chunk)
        if size > limit:
            raise BudgetExceeded("output is larger than its budget")
        budget.tick()
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
    template: Any,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    tools: Sequence[dict[str, Any]] | None = None,
    render: Callable[..., str] = render_chat_template,
    **extra: Any,
) -> RenderedChat:
    """Render the prompt, and tell which characters of it are message content.

    The template is rendered once as is and once with each content replaced by a random sentinel.
    The sentinel rendering, with the contents put back (as is, or stripped for templates that
    `| trim`), must reproduce the real rendering exactly; otherwise `parts` is None. `render` is the
    template language's renderer: Jinja's (a Hugging Face chat template, `template` its text) or Go's
    (an Ollama TEMPLATE: go_chat.render_go_chat, `template` a parsed GoTemplate)."""
    kwargs: dict[str, Any] = dict(
        extra, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token, tools=tools
    )
    text = render(template, messages, **kwargs)
    nonce = str(secrets.randbits(64))
    contents: list[str] = []
    marked = [dict(m, content=_mark(m["content"], contents, nonce)) if "content" in m else m for m in messages]
    try:
        with_sentinels = render(template, marked, **kwargs)
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
