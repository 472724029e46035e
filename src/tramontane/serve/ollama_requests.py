"""Ollama's request bodies (`/api/chat`, `/api/generate`, `/api/embed`...) and their translation into
the OpenAI-shaped requests the rest of the server already checks and runs.

Ollama's API differs from OpenAI's in its shapes, not its meaning, so each Ollama request becomes a
`ChatCompletionRequest` (or the settings of one) and goes through the same validation, chat
formatting, tool calling and structured decoding; only the answer's shape is Ollama's
(ollama_format.py). The differences handled here:

- `options` hold the sampling settings, translated by hub/modelfile.py (`sampling_fields`, which
  Modelfile PARAMETERs share): unknown keys and samplers this engine lacks are refused, options that
  tell Ollama's runner how to load a model (`num_ctx`, `num_gpu`...) are ignored.
- Without an option, Ollama's defaults hold (temperature 0.8, top_k 40, top_p 0.9), unless the served
  model's Modelfile set its own (`tramontane create`).
- `format` is "json" or a JSON schema: response_format json_object or json_schema.
- Messages name a tool result by `tool_name`, not by a call id, and give call arguments as objects:
  calls get ids (`call00000`, nine characters as Mistral's format needs, numbered in order so the same
  conversation gets the same ids and hits the prefix cache), and each tool message answers the
  earliest unanswered call of its tool (or, without `tool_name`, the earliest unanswered call).
- `stream` defaults to true (Ollama's default), `think` is refused for these models (none reasons in
  a separate channel), `images` too (text models only)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..hub.modelfile import OptionError, check_options, sampling_fields
from .errors import APIError, bad_request

OLLAMA_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OllamaFunctionCall(_Request):
    name: str
    arguments: dict[str, Any] | str = {}


class OllamaToolCall(_Request):
    id: str | None = None
    function: OllamaFunctionCall


class OllamaMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None  # an earlier answer's reasoning: not sent back to the model, as Ollama


class _Generating(_Request):
    model: str
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class OllamaChatRequest(_Generating):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_Generating):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaEmbedRequest(_Request):
    model: str
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsRequest(_Request):
    """The older single-text route, /api/embeddings."""

    model: str
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class OllamaModelRequest(_Request):
    """/api/show and /api/pull: `model`, or `name` as older clients send it."""

    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool = False
    verbose: bool = False

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise bad_request("model is required", "model")
        return name


def sampling(options: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """`options` (over `defaults`) as OpenAI sampling fields; a 400 naming `options.KEY` for one that
    cannot be honoured."""
    try:
        return sampling_fields({**defaults, **check_options(options or {})})
    except OptionError as exc:
        raise bad_request(str(exc), f"options.{exc.key[:60]}") from None


def response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's `format`: "json", a JSON schema, or nothing ("" or absent)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt, "strict": True}}
    raise bad_request(f'format must be "json" or a JSON schema object, got {fmt[:60]!r}', "format")


def check_think(think: bool | str | None, model: str) -> None:
    if think not in (None, False):
        raise APIError(400, f'"{model}" does not support thinking', param="think", code="thinking_not_supported")


def _call_id(k: int) -> str:
    return f"call{k:05d}"


def chat_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's (tool calls with ids, tool results naming them; see the docstring)."""
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (call id, tool name), oldest first
    calls = 0
    for i, m in enumerate(messages):
        if m.images:
            raise bad_request("this model reads text only: messages cannot hold images", f"messages[{i}].images")
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.tool_calls:
            d["tool_calls"] = []
            for call in m.tool_calls:
                args = call.function.arguments
                text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                d["tool_calls"].append(
                    {
                        "id": _call_id(calls),
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": text},
                    }
                )
                unanswered.append((_call_id(calls), call.function.name))
                calls += 1
        elif m.role == "tool":
            d["tool_call_id"] = _answered(unanswered, m.tool_name, i)
        elif m.content is None:
            d["content"] = ""
        out.append(d)
    return out


def _answered(unanswered: list[tuple[str, str]], tool: str | None, i: int) -> str:
    """The id of the call a tool message answers (removed from `unanswered`)."""
    for k, (call_id, name) in enumerate(unanswered):
        if tool is None or name == tool:
            del unanswered[k]
            return call_id
    what = f"a call of {tool!r}" if tool else "a call"
    raise bad_request(f"message {i} (tool) answers {what}, but no earlier assistant message made one", f"messages[{i}]")
