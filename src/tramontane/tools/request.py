"""Function calling: the tools a request offers, how they reach the prompt, the grammar of a required
call, and the calls read back from the model's output.

A request's `tools` / `tool_choice` / `parallel_tool_calls` become a `ToolUse` (`read_tools`, which
refuses bad names, duplicate or unknown functions and schemas that do not compile). How the tools reach
the model depends on the tokenizer's `tool_format` (see chat.template_tool_format):
- a Mistral tokenizer (v2 and later) or a template that reads `tools` encodes them itself;
- otherwise (SmolLM2's template, Mistral v1) `prepare_messages` describes them in a system message and
  asks for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks ("hermes"), and earlier
  assistant calls and tool results are written into the conversation as text in that format.
With tool_choice "required" ("any") or a named function, `call_grammar` constrains decoding to calls
of the offered functions whose arguments follow their JSON schemas, in the tokenizer's call format
(control tokens referenced by id). `read_calls` parses the output (toolcalls.py)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import RequestError
from ..text.grammar import COMPACT, MAX_SCHEMA_BYTES, check_grammar, json_grammar, smallest_instance
from .parser import ALPHANUMERIC, ParsedOutput, parse_tool_calls

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the function names both APIs accept
MAX_TOOLS = 128
MAX_TOOLS_BYTES = 4 * MAX_SCHEMA_BYTES  # all tool definitions of one request together
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
MAX_RESERVE = 1024  # tokens; see call_reserve
CHOICES = {"auto": "auto", "none": "none", "required": "required", "any": "required"}  # "any" is Mistral's word


class ToolError(RequestError):
    """A bad tools / tool_choice value; `field` names the request field at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    definition: dict[str, Any]  # the tool as the request gave it (templates render it as is)


@dataclass(frozen=True)
class ToolUse:
    """What a request allows: `mode` "auto" (the model decides), "none" (no calls) or "required" (at
    least one call; of `forced` only, when a function is named)."""

    functions: tuple[Function, ...]
    mode: str
    forced: str | None = None
    parallel: bool = True

    @property
    def callable(self) -> tuple[Function, ...]:
        return tuple(f for f in self.functions if self.forced in (None, f.name))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.callable]

    def definitions(self) -> list[dict[str, Any]]:
        """The tools in the API's shape, as chat templates and mistral-common take them."""
        return [f.definition for f in self.functions]


# ---- reading a request -------------------------------------------------------------------------------


def read_tools(
    tools: Any, tool_choice: Any, parallel_tool_calls: bool | None = None, tokenizer: Tokenizer | None = None
) -> ToolUse | None:
    """The request's ToolUse (None without tools); ToolError names the field at fault. With the
    tokenizer, every parameters schema is also compiled for it."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError(f"tool_choice {_short(tool_choice)} needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError('tools must be a list of {"type": "function", "function": {...}}', "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"{len(tools)} tools is more than the limit of {MAX_TOOLS}", "tools")
    size = len(json.dumps(tools, default=str))
    if size > MAX_TOOLS_BYTES:
        raise ToolError(f"the tool definitions are {size} bytes; the limit is {MAX_TOOLS_BYTES}", "tools")
    functions = tuple(_function(t, i, tokenizer) for i, t in enumerate(tools))
    names = [f.name for f in functions]
    for name in names:
        if names.count(name) > 1:
            raise ToolError(f"two tools are named {name!r}", "tools")
    mode, forced = _choice(tool_choice, names)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolError("parallel_tool_calls must be true or false", "parallel_tool_calls")
    return ToolUse(functions, mode, forced, parallel_tool_calls is not False)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _function(tool: Any, i: int, tokenizer: Tokenizer | None) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ToolError(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
    spec = tool.get("function")
    if not isinstance(spec, dict):
        raise ToolError(f"{where}.function must be an object with a name and parameters", f"{where}.function")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolError(
            f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {_short(name)}",
            f"{where}.function.name",
        )
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = EMPTY_PARAMETERS
        tool = {**tool, "function": {**spec, "parameters": parameters}}
    try:
        grammar = json_grammar(parameters)
        if tokenizer is not None:
            check_grammar(grammar, tokenizer)
    except RequestError as exc:
        raise ToolError(f"{where}.function.parameters: {exc}", f"{where}.function.parameters") from None
    return Function(name, parameters, {"type": "function", **tool})


def _choice(tool_choice: Any, names: list[str]) -> tuple[str, str | None]:
    """(mode, forced function) of a tool_choice: "auto", "none", "required"/"any", or a named function
    ({"type": "function", "function": {"name": ...}}, or the flat {"type": "function", "name": ...})."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ToolError(
                f"tool_choice must be auto, none, any, required or a function, got {tool_choice!r}", "tool_choice"
            )
        return CHOICES[tool_choice], None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if name is None and isinstance(tool_choice, dict):
        name = tool_choice.get("name")
    if not isinstance(name, str):
        raise ToolError(
            f"tool_choice {_short(tool_choice)} must name a function: "
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in names:
        raise ToolError(
            f"tool_choice names {name[:64]!r}, which is not one of the tools ({', '.join(names)})", "tool_choice"
        )
    return "required", name


# ---- the prompt --------------------------------------------------------------------------------------


HERMES_PROMPT = (
    "You can call functions to answer. The functions, one JSON definition per line:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with a <tool_call></tool_call> block holding a JSON object with its name "
    'and arguments, one block per call:\n<tool_call>\n{{"name": "function name", "arguments": '
    '{{"argument": "value"}}}}\n</tool_call>\nThe results come back in <tool_response></tool_response> '
    "blocks. When no function helps, answer normally."
)


def prepare_messages(
    messages: list[dict[str, Any]], use: ToolUse | None, tokenizer: Tokenizer
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools for encode_chat). A tokenizer with a `tool_format` takes the tools and the
    call/result messages as they are (arguments as objects for Jinja templates, the transformers
    convention); otherwise both are written as text (see the module docstring)."""
    fmt = getattr(tokenizer, "tool_format", None)
    offered = use.definitions() if use is not None and use.mode != "none" else None
    if fmt is not None and fmt.startswith("mistral"):
        messages = [_mistral_ids(m) for m in messages]
    if fmt is not None:
        return [_template_message(m) for m in messages], offered
    out = _as_text(messages)
    if offered:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in offered)
        system = HERMES_PROMPT.format(tools=lines)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, None


def mistral_id(call_id: str) -> str:
    """A call id as Mistral's tokenizers accept it (9 alphanumerics): kept when it is one, else derived
    from it (the same id always gives the same result, so a call and its result still match)."""
    if re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    return "".join(ALPHANUMERIC[(digest >> (6 * i)) % 62] for i in range(9))


def _mistral_ids(message: dict[str, Any]) -> dict[str, Any]:
    """Ids from other clients (OpenAI's "call_..."), made acceptable to Mistral's tokenizers."""
    if isinstance(message.get("tool_call_id"), str):
        message = {**message, "tool_call_id": mistral_id(message["tool_call_id"])}
    if message.get("tool_calls"):
        message = {
            **message,
            "tool_calls": [{**c, "id": mistral_id(str(c.get("id", "")))} for c in message["tool_calls"]],
        }
    return message


def _arguments(call: dict[str, Any]) -> Any:
    arguments = call.get("function", {}).get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": _arguments(c)}} for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls as <tool_call> blocks in the assistant's text, results as <tool_response> blocks in a user
    turn (consecutive results in one), for templates that know neither."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [
                json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}, ensure_ascii=False)
                for c in m["tool_calls"]
            ]
            text = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
            out.append({"role": "assistant", "content": f"{m['content']}\n{text}" if m.get("content") else text})
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_results"):
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{block}"}
            else:
                out.append({"role": "user", "content": block, "_results": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_results"} for m in out]


# ---- the grammar of a required call ------------------------------------------------------------------


def call_grammar(use: ToolUse, tokenizer: Tokenizer) -> str | None:
    """The llguidance grammar of the output when a call is required (None otherwise): one call (or,
    with parallel_tool_calls, several) of the callable functions, arguments following their schemas."""
    if use.mode != "required":
        return None
    fmt = getattr(tokenizer, "tool_format", None) or "hermes"
    if fmt == "mistral-v11":
        body = _mistral_v11(use, tokenizer)
    elif fmt == "mistral-v3":
        body = f'{_token(tokenizer, "[TOOL_CALLS]")} " "? %json {_schema(_call_list(use))}'
    elif fmt == "json":
        body = f"%json {_schema(_any_call(use, 'parameters'))}"
    else:
        call = (
            f'{_token(tokenizer, "<tool_call>")} "\\n" %json {_schema(_any_call(use, "arguments"))} "\\n" '
            f"{_token(tokenizer, '</tool_call>')}"
        )
        body = f'call ("\\n" call)*\ncall: {call}' if use.parallel else call
    return f"start: {body}\n"


def call_reserve(use: ToolUse, tokenizer: Tokenizer) -> int:
    """Tokens the longest of the callable functions' shortest calls takes: near the end of max_tokens, a
    guided answer is steered to its end this much earlier, so that a call begun there still closes."""
    longest = 0
    for f in use.callable:
        call = json.dumps({"name": f.name, "arguments": smallest_instance(f.parameters)}, ensure_ascii=False)
        longest = max(longest, len(tokenizer.encode(f"<tool_call>\n{call}\n</tool_call>")))
    return min(longest, MAX_RESERVE)


def _token(tokenizer: Tokenizer, text: str) -> str:
    """A control token by id (llguidance's <[id]>), or the text as a literal when it is plain text."""
    token_id = tokenizer.control_id(text) if hasattr(tokenizer, "control_id") else None
    if token_id is None:
        if text.startswith("["):
            raise RequestError(f"this tokenizer has no {text} control token for tool calls")
        return json.dumps(text)
    return f"<[{token_id}]>"


def _schema(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": COMPACT}, ensure_ascii=False)


def _call_object(f: Function, key: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": f.name}, key: f.parameters, **(extra or {})},
        "required": ["name", key],
        "additionalProperties": False,
    }


def _any_call(use: ToolUse, key: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    calls = [_call_object(f, key, extra) for f in use.callable]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _call_list(use: ToolUse) -> dict[str, Any]:
    """v2-v7's JSON list; mistral-common writes earlier calls with their "id" last, so it may follow."""
    call_id = {"id": {"type": "string", "pattern": "^[A-Za-z0-9]{9}$"}}
    items = {"type": "array", "items": _any_call(use, "arguments", call_id), "minItems": 1}
    return items if use.parallel else {**items, "maxItems": 1}


def _mistral_v11(use: ToolUse, tokenizer: Tokenizer) -> str:
    """name[ARGS]{...} after [TOOL_CALLS]; tokenizers with a [CALL_ID] token put the call's id between."""
    calls, args = _token(tokenizer, "[TOOL_CALLS]"), _token(tokenizer, "[ARGS]")
    has_id = tokenizer.control_id("[CALL_ID]") is not None
    call_id = f" ({_token(tokenizer, '[CALL_ID]')} /[A-Za-z0-9]{{9}}/)?" if has_id else ""
    one = " | ".join(
        f"({calls} {json.dumps(f.name)}{call_id} {args} %json {_schema(f.parameters)})" for f in use.callable
    )
    return f"({one})+" if use.parallel else f"({one})"


# ---- the output --------------------------------------------------------------------------------------


def call_text(tokenizer: Tokenizer, token_ids: Sequence[int]) -> str:
    """The output with control tokens kept (tool-call markers are control tokens for Mistral's
    tokenizers), without the stop token."""
    stops = tokenizer.stop_ids
    return tokenizer.decode([t for t in token_ids if t not in stops], skip_special=False)


def read_calls(text: str, use: ToolUse, tokenizer: Tokenizer) -> ParsedOutput:
    """The calls in `text` (see call_text); ids in Mistral's style (9 alphanumerics) for Mistral's
    formats, which its tokenizers check when the conversation comes back, OpenAI's otherwise."""
    fmt = getattr(tokenizer, "tool_format", None) or "hermes"
    kind = "mistral" if fmt.startswith("mistral") else fmt
    parsed = parse_tool_calls(text, kind, [f.name for f in use.functions], "mistral" if kind == "mistral" else "openai")
    if not use.parallel and len(parsed.calls) > 1:  # parallel_tool_calls false: at most one call
        parsed.calls = parsed.calls[:1]
    return parsed


def call_marker(tokenizer: Tokenizer) -> str:
    """The text a call starts with: output from there on is held back while streaming."""
    fmt = getattr(tokenizer, "tool_format", None) or "hermes"
    return {"mistral-v11": "[TOOL_CALLS]", "mistral-v3": "[TOOL_CALLS]", "json": "{"}.get(fmt, "<tool_call>")
