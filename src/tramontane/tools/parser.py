"""Tool calls in model output: find them, check them against the offered tools, give them API ids.

Two call formats are read:
- "mistral": Mistral's tokenizers (v3 and later) write `[TOOL_CALLS]` and then either a JSON list
  `[{"name": ..., "arguments": {...}}, ...]` (v3) or one or more `name[ARGS]{...}` (v11 and later, the
  control tokens appearing as text once decoded with special tokens kept);
  (v11 may put `[CALL_ID]id` after the name);
- "hermes": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (or a JSON list of such
  objects in one block), the format of ChatML-style templates (and the one tramontane asks for when a
  model's template has no tool support);
- "json": the whole answer is one `{"name": ..., "parameters": {...}}` object (Llama 3.1-style templates).
Anything malformed (truncated JSON, a name not offered, arguments that are not an object, a block never
closed) never raises: the result keeps the whole text as content and says what was wrong in `problem`.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

MISTRAL_PREFIX = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
MISTRAL_CALL_ID = "[CALL_ID]"
HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments object as JSON text, as the APIs return it


@dataclass
class ParsedOutput:
    content: str  # text that is not a tool call ("" when the output is only calls)
    calls: list[ToolCall] = field(default_factory=list)
    problem: str | None = None  # why text that looked like a call was kept as content


def call_id(style: str = "mistral") -> str:
    """A new tool call id: 9 alphanumerics for Mistral's API (its tokenizers check the length),
    "call_" and 24 alphanumerics in OpenAI's style."""
    if style == "mistral":
        return "".join(secrets.choice(ALPHANUMERIC) for _ in range(9))
    return "call_" + "".join(secrets.choice(ALPHANUMERIC) for _ in range(24))


def parse_tool_calls(text: str, fmt: str, tools: list[str], id_style: str = "mistral") -> ParsedOutput:
    """Split `text` into content and calls of the functions named in `tools` (format "mistral" or
    "hermes")."""
    if fmt == "mistral":
        return _parse_mistral(text, tools, id_style)
    if fmt == "hermes":
        return _parse_hermes(text, tools, id_style)
    if fmt == "json":
        return _parse_json(text, tools, id_style)
    raise ValueError(f"unknown tool call format {fmt!r}")


def _call(obj: Any, tools: list[str], id_style: str) -> ToolCall | str:
    """A ToolCall from {"name": ..., "arguments": {...}}, or the reason it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return "a tool call must be an object with a string 'name'"
    name, arguments = obj["name"], obj.get("arguments", obj.get("parameters", {}))
    return _named(name, arguments, tools, id_style)


def _named(name: str, arguments: Any, tools: list[str], id_style: str) -> ToolCall | str:
    if name not in tools:
        return f"the model called {name[:64]!r}, which is not one of the tools offered ({', '.join(tools)})"
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return f"the arguments of {name!r} are not JSON"
    if not isinstance(arguments, dict):
        return f"the arguments of {name!r} must be a JSON object"
    return ToolCall(call_id(id_style), name, json.dumps(arguments, ensure_ascii=False))


def _collect(items: list[ToolCall | str], text: str, content: str) -> ParsedOutput:
    problems = [i for i in items if isinstance(i, str)]
    if problems or not items:
        return ParsedOutput(text, [], problems[0] if problems else "no tool call found")
    return ParsedOutput(content, [i for i in items if isinstance(i, ToolCall)])


def _parse_mistral(text: str, tools: list[str], id_style: str) -> ParsedOutput:
    start = text.find(MISTRAL_PREFIX)
    if start < 0:
        return ParsedOutput(text)
    content, body = text[:start].strip(), text[start + len(MISTRAL_PREFIX) :].strip()
    if MISTRAL_ARGS in body:  # v11+: name[ARGS]{...}, possibly several, each after its own [TOOL_CALLS]
        items: list[ToolCall | str] = []
        for part in body.split(MISTRAL_PREFIX):
            name, sep, args = part.strip().partition(MISTRAL_ARGS)
            name = name.partition(MISTRAL_CALL_ID)[0].strip()
            items.append(
                _decoded(args, lambda a, n=name: _named(n, a, tools, id_style))
                if sep
                else "a [TOOL_CALLS] without [ARGS]"
            )
        return _collect(items, text, content)
    try:
        value, end = json.JSONDecoder().raw_decode(body)
    except ValueError:
        return ParsedOutput(text, [], "the tool call JSON is truncated or malformed")
    if body[end:].strip():
        content = (content + " " + body[end:].strip()).strip()
    value = value if isinstance(value, list) else [value]
    return _collect([_call(v, tools, id_style) for v in value], text, content)


def _decoded(raw: str, make: Any) -> Any:
    try:
        value, end = json.JSONDecoder().raw_decode(raw.strip())
    except ValueError:
        return "the tool call arguments are truncated or malformed JSON"
    return make(value)


def _parse_hermes(text: str, tools: list[str], id_style: str) -> ParsedOutput:
    blocks = list(HERMES.finditer(text))
    if not blocks:
        if "<tool_call>" in text:
            return ParsedOutput(text, [], "a <tool_call> block is never closed")
        return ParsedOutput(text)
    items: list[ToolCall | str] = []
    for block in blocks:
        found = _decoded(block.group(1), lambda v: v if isinstance(v, list) else [v])  # a list of calls, or a reason
        items += [found] if isinstance(found, str) else [_call(v, tools, id_style) for v in found]
    content = HERMES.sub("", text).strip()
    return _collect(items, text, content)


def _parse_json(text: str, tools: list[str], id_style: str) -> ParsedOutput:
    body = text.strip()
    if not body.startswith("{"):
        return ParsedOutput(text)
    try:
        value, end = json.JSONDecoder().raw_decode(body)
    except ValueError:
        return ParsedOutput(text, [], "the tool call JSON is truncated or malformed")
    if not isinstance(value, dict) or "name" not in value:
        return ParsedOutput(text)  # a JSON answer, not a call
    return _collect([_call(value, tools, id_style)], text, body[end:].strip())
