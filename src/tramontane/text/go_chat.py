"""Chats through an Ollama TEMPLATE (a Go template, go_template.py), as Ollama renders them.

    text = render_go_chat(GoTemplate.parse(source), messages, tools=tools)

The messages are collated first: consecutive messages of one role (tool results apart) become one,
their contents joined by a blank line, and every system message's content also goes, joined the same
way, into `.System`. A template that reads `.Messages` is rendered once with them all (and `.Tools`,
`.System`, an empty `.Response`). One that does not is rendered turn by turn from `.System`,
`.Prompt` and `.Response` (a turn ends when a user or system message follows what it holds; tool
results are not shown), the last turn cut after its `.Response` field (GoTemplate.cut_at), so the
prompt ends where the answer begins.

Messages are Go structs (`.Role`, `.Content`, `.ToolCalls`, `.ToolName`...) and tools too (`.Type`,
`.Function.Name`, `.Function.Parameters.Properties`...), with Ollama's fields: a tool's JSON has
Ollama's field order and leaves out the keys Ollama does not keep; JSON numbers are float64s, as in
Go; an empty list is Go's nil slice (`[]` printed, null in JSON). Printed, a tool, the tool list, its
properties and a call's `.Function.Arguments` are their JSON, as in Ollama; a message or a call prints
as a Go struct. A tool's `.Function` and `.Function.Parameters` print as JSON too, as they did in
Ollama before its template structs lost their String methods (where `{"function": {{ .Function }}}`
would now print Go's struct syntax into the prompt): templates written for them expect JSON.

`parse_ollama` parses a TEMPLATE as Ollama does, appending `{{ .Response }}` to one that reads
neither `.Messages` nor `.Response`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import TemplateError
from .go_template import GoTemplate
from .go_values import GoList, GoMap, GoStruct, GoValue, NilSlice

MESSAGE_FIELDS = ("Role", "Content", "Thinking", "Images", "ToolCalls", "ToolName", "ToolCallID")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: their texts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def _go_number(value: Any) -> Any:
    """A JSON value as Go decodes it into `any`: every number a float64."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _go_number(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_go_number(v) for v in value]
    return value


def _arguments(raw: Any) -> GoMap:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise TemplateError(f"tool call arguments are not JSON: {raw[:80]!r}") from None
    return GoMap(_go_number(raw) if isinstance(raw, dict) else {})


def _call(call: dict[str, Any]) -> GoValue:
    """Ollama's tool call as a template sees it: .ID, .Function.Index, .Function.Name, .Function.Arguments."""
    function = call.get("function") or {}
    given = function.get("index")  # Ollama's own clients number their calls; the OpenAI route leaves 0
    index = given if isinstance(given, int) and not isinstance(given, bool) else 0
    fields = {"Index": index, "Name": str(function.get("name", "")), "Arguments": _arguments(function.get("arguments"))}
    inner = GoValue(fields, GoStruct(fields), stringer=False)
    outer = {"ID": str(call.get("id") or ""), "Function": inner}
    return GoValue(outer, GoStruct(ID=outer["ID"], Function=inner.json), stringer=False)


def _message(message: dict[str, Any], content: str) -> GoValue:
    """Ollama's message as a template sees it (a pointer to a struct without JSON tags)."""
    calls = [_call(c) for c in message.get("tool_calls") or [] if isinstance(c, dict)]
    fields = {
        "Role": str(message.get("role", "")),
        "Content": content,
        "Thinking": str(message.get("thinking") or ""),
        "Images": NilSlice(),
        "ToolCalls": calls or NilSlice(),
        "ToolName": str(message.get("name") or message.get("tool_name") or ""),
        "ToolCallID": str(message.get("tool_call_id") or ""),
    }
    shown = GoStruct(fields, Images=None, ToolCalls=[c.json for c in calls] or None)
    return GoValue(fields, shown, stringer=False, pointer=True)


def collate(messages: Sequence[dict[str, Any]]) -> tuple[str, list[GoValue]]:
    """(.System, .Messages) as Ollama builds them from a chat."""
    system: list[str] = []
    merged: list[tuple[dict[str, Any], str]] = []
    for message in messages:
        role, content = message.get("role"), _text(message.get("content"))
        if role == "system":
            system.append(content)
        if merged and merged[-1][0].get("role") == role and role != "tool":
            merged[-1] = (merged[-1][0], merged[-1][1] + "\n\n" + content)
        else:
            merged.append((message, content))
    return "\n\n".join(system), [_message(m, c) for m, c in merged]


def _omit_empty(**fields: Any) -> GoStruct:
    """The JSON of `omitempty` struct fields: the empty ones left out."""
    return GoStruct((k, v) for k, v in fields.items() if v not in (None, "", [], {}))


def _property_type(spec: Any) -> Any:
    """Ollama's PropertyType: one type prints (and writes) as a string, several as a list."""
    types = spec if isinstance(spec, list) else [spec] if spec else []
    types = [str(t) for t in types]
    return types[0] if len(types) == 1 else types


def _property(spec: Any) -> GoValue:
    """A parameter's schema as Ollama keeps it (ToolProperty: other JSON-schema keys are dropped)."""
    spec = spec if isinstance(spec, dict) else {}
    nested = spec.get("properties")
    properties = {k: _property(v) for k, v in nested.items()} if isinstance(nested, dict) else None
    fields = {
        "AnyOf": [_property(s) for s in spec.get("anyOf") or [] if isinstance(s, dict)] or NilSlice(),
        "Type": _property_type(spec.get("type")),
        "Items": _go_number(spec.get("items")),
        "Description": str(spec.get("description") or ""),
        "Enum": _go_number(list(spec.get("enum") or [])) or NilSlice(),
        "Properties": properties,
        "Required": [str(r) for r in spec.get("required") or []] or NilSlice(),
    }
    shown = _omit_empty(
        anyOf=[p.json for p in fields["AnyOf"]],
        type=fields["Type"],
        items=fields["Items"],
        description=fields["Description"],
        enum=fields["Enum"],
        properties=GoStruct((k, p.json) for k, p in properties.items()) if properties else None,
        required=fields["Required"],
    )
    return GoValue(fields, shown, stringer=False)


def _parameters(parameters: dict[str, Any]) -> GoValue:
    given = parameters.get("properties")
    properties = GoMap({k: _property(v) for k, v in given.items()}) if isinstance(given, dict) else None
    fields = {
        "Type": str(parameters.get("type") or ""),
        "Defs": _go_number(parameters.get("$defs")),
        "Items": _go_number(parameters.get("items")),
        "Required": [str(r) for r in parameters.get("required") or []] or NilSlice(),
        "Properties": properties if properties is not None else GoMap(),
    }
    shown = GoStruct(type=fields["Type"])
    shown.update(_omit_empty(**{"$defs": fields["Defs"], "items": fields["Items"], "required": fields["Required"]}))
    shown["properties"] = properties
    return GoValue(fields, shown)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _tool(tool: dict[str, Any]) -> GoValue:
    """A tool as Ollama's template sees it: JSON in Ollama's field order, unknown keys dropped."""
    function = _dict(tool.get("function"))
    params = _parameters(_dict(function.get("parameters")))
    name, description = str(function.get("name") or ""), str(function.get("description") or "")
    inner = GoValue(
        {"Name": name, "Description": description, "Parameters": params},
        GoStruct(name=name, description=description, parameters=params.json),
    )
    items = _go_number(tool.get("items"))
    shown = GoStruct(type=str(tool.get("type") or ""), **_omit_empty(items=items), function=inner.json)
    return GoValue({"Type": shown["type"], "Items": items, "Function": inner}, shown)


def parse_ollama(source: str) -> GoTemplate:
    """An Ollama TEMPLATE parsed as Ollama parses it: one that reads neither .Messages nor .Response
    gets a `{{ .Response }}` at its end, so that turn-by-turn rendering shows the earlier answers."""
    template = GoTemplate.parse(source)
    if template.reads("Messages") or template.reads("Response"):
        return template
    return template.then(".Response")


def render_go_chat(
    template: GoTemplate,
    messages: Sequence[dict[str, Any]],
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    **_: Any,  # add_generation_prompt, bos and eos: a Go template writes the whole prompt itself
) -> str:
    system, collated = collate(messages)
    tool_list = GoList(_tool(t) for t in tools or [] if isinstance(t, dict))
    if template.reads("Messages"):
        values = {"System": system, "Messages": collated, "Tools": tool_list, "Response": "", **_THINKING}
        return template.render(values)
    return _by_turns(template, collated)


_THINKING = {"Think": False, "ThinkLevel": "", "IsThinkSet": False}  # these models do not think


def _by_turns(template: GoTemplate, collated: list[GoValue]) -> str:
    """Ollama's rendering of a template without .Messages: one render per turn, a turn ending when a
    user or system message follows an answer (tool results are not shown), the last cut at .Response."""
    out: list[str] = []
    turn = {"System": "", "Prompt": "", "Response": ""}
    for message in collated:
        role, content = message.fields["Role"], message.fields["Content"]
        pending = turn["Response"] if role == "user" else turn["Prompt"] or turn["Response"]
        if role in ("user", "system") and pending:
            out.append(template.render({**turn, **_THINKING}))
            turn = {"System": "", "Prompt": "", "Response": ""}
        key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(role)
        if key is not None:
            turn[key] = content
    out.append(template.cut_at("Response").render({**turn, **_THINKING}))
    return "".join(out)


def go_tool_format(template: GoTemplate) -> str | None:
    """How a Go template writes tool calls (see chat_template.template_tool_format), None without .Tools."""
    if not template.reads("Tools"):
        return None
    if "[TOOL_CALLS]" in template.source:
        return "mistral-v11" if "[ARGS]" in template.source else "mistral-v3"
    return "hermes" if "<tool_call>" in template.source else "json"
