"""Chats through an Ollama TEMPLATE (a Go template, go_template.py), as Ollama renders them.

    text = render_go_chat(GoTemplate.parse(source), messages, tools=tools)

The messages are collated first: consecutive messages of one role (tool results apart) become one,
their contents joined by a blank line, and every system message's content also goes, joined the same
way, into `.System`. A template that reads `.Messages` is rendered once with them all (and `.Tools`,
`.System`, an empty `.Response`). One that does not is rendered turn by turn from `.System`,
`.Prompt` and `.Response`, and the last turn only up to the top-level node that reads `.Response`, so
the prompt ends where the answer begins.

Messages are Go structs (`.Role`, `.Content`, `.ToolCalls`, `.ToolName`...) and tools too (`.Type`,
`.Function.Name`, `.Function.Parameters.Properties`...); printed, a tool, the tool list and a call's
`.Function.Arguments` are their JSON, as in Ollama."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import TemplateError
from .go_template import GoList, GoMap, GoTemplate, GoValue

MESSAGE_FIELDS = ("Role", "Content", "Thinking", "Images", "ToolCalls", "ToolName", "ToolCallID")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: their texts
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


def _arguments(raw: Any) -> GoMap:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise TemplateError(f"tool call arguments are not JSON: {raw[:80]!r}") from None
    return GoMap(raw if isinstance(raw, dict) else {})


def _call(index: int, call: dict[str, Any]) -> GoValue:
    function = call.get("function") or {}
    arguments = _arguments(function.get("arguments"))
    shown = {"function": {"index": index, "name": function.get("name", ""), "arguments": dict(arguments)}}
    fields = {"Index": index, "Name": function.get("name", ""), "Arguments": arguments}
    return GoValue({"Function": GoValue(fields, shown["function"]), "ID": call.get("id", "")}, shown)


def _message(message: dict[str, Any], content: str) -> GoValue:
    calls = [_call(i, c) for i, c in enumerate(message.get("tool_calls") or []) if isinstance(c, dict)]
    fields = {
        "Role": message.get("role", ""),
        "Content": content,
        "Thinking": message.get("thinking") or "",
        "Images": [],
        "ToolCalls": calls,
        "ToolName": message.get("name") or message.get("tool_name") or "",
        "ToolCallID": message.get("tool_call_id") or "",
    }
    return GoValue(fields, {k.lower(): v for k, v in fields.items() if k not in ("ToolCalls", "Images")})


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


def _property(spec: Any) -> Any:
    if not isinstance(spec, dict):
        return spec
    fields = {
        "Type": spec.get("type", ""),
        "Items": spec.get("items"),
        "Description": spec.get("description", ""),
        "Enum": spec.get("enum", []),
        "AnyOf": spec.get("anyOf", []),
    }
    return GoValue(fields, spec)


def _tool(tool: dict[str, Any]) -> GoValue:
    function = tool.get("function") or {}
    parameters = function.get("parameters") or {}
    properties = GoMap({k: _property(v) for k, v in (parameters.get("properties") or {}).items()})
    params = GoValue(
        {
            "Type": parameters.get("type", "object"),
            "Defs": parameters.get("$defs"),
            "Items": parameters.get("items"),
            "Required": parameters.get("required", []),
            "Properties": properties,
        },
        parameters,
    )
    fields = {"Name": function.get("name", ""), "Description": function.get("description", ""), "Parameters": params}
    return GoValue({"Type": tool.get("type", "function"), "Items": None, "Function": GoValue(fields, function)}, tool)


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
        values = {"System": system, "Messages": collated, "Tools": tool_list, "Response": "", "Think": False}
        return template.render(values)
    return _by_turns(template, collated)


def _by_turns(template: GoTemplate, collated: list[GoValue]) -> str:
    out, system, prompt, response = [], "", "", ""
    for message in collated:
        role, content = message.fields["Role"], message.fields["Content"]
        if role == "system":
            system = content
        elif role == "assistant":
            response = content
        else:  # user (or a tool result): a new turn once the last one has its answer
            if response:
                out.append(template.render({"System": system, "Prompt": prompt, "Response": response}))
                system = prompt = response = ""
            prompt = content
    last = {"System": system, "Prompt": prompt, "Response": response}
    out.append(template.cut_at("Response").render(last))
    return "".join(out)


def go_tool_format(template: GoTemplate) -> str | None:
    """How a Go template writes tool calls (see chat_template.template_tool_format), None without .Tools."""
    if not template.reads("Tools"):
        return None
    if "[TOOL_CALLS]" in template.source:
        return "mistral-v11" if "[ARGS]" in template.source else "mistral-v3"
    return "hermes" if "<tool_call>" in template.source else "json"
