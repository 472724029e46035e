"""Answers in Ollama's shape: one JSON object, or JSON lines (`application/x-ndjson`) when streaming.

An `OllamaFormat` wraps the OpenAI-shaped format the request would get on /v1/chat/completions
(`ChatFormat`, or `ToolChatFormat` when tools are offered) and reshapes what it makes, so tool calls
are read, held back and parsed by the same code on both APIs:

    {"model": M, "created_at": T, "message": {"role": "assistant", "content": "Par"}, "done": false}
    ...
    {"model": M, "created_at": T, "message": {"role": "assistant", "content": ""}, "done": true,
     "done_reason": "stop", "total_duration": ns, "load_duration": ns, "prompt_eval_count": n,
     "prompt_eval_duration": ns, "eval_count": n, "eval_duration": ns}

/api/generate's answers carry `response` (the text) instead of `message`, and their last line the
`context`: the prompt's and the answer's token ids, which the client sends back to continue. Call
arguments are objects (JSON text on the OpenAI side). An engine failure mid-stream is a last line
`{"error": "..."}`, as Ollama sends it."""

from __future__ import annotations

import contextlib
import json
import time
from datetime import UTC, datetime
from typing import Any

from ..engine.types import RequestOutput
from .errors import APIError
from .formats import ChatFormat, Format
from .streaming import LINE_BREAKS, Choice

DONE_REASONS = {"tool_calls": "stop", "model_length": "length"}  # Ollama ends a turn of calls with "stop"


def created_at() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def json_line(data: dict[str, Any]) -> str:
    """One line of the stream; the characters a line splitter breaks on are escaped, as in sse()."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(LINE_BREAKS) + "\n"


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for call in calls:
        arguments = call["function"]["arguments"]
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
        out.append(
            {
                "id": call["id"],
                "function": {
                    "index": call.get("index", len(out)),
                    "name": call["function"]["name"],
                    "arguments": arguments,
                },
            }
        )
    return out


def _logprobs(block: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    if not block or not block.get("content"):
        return None
    return [
        {
            "token": lp["token"],
            "logprob": lp["logprob"],
            "bytes": lp.get("bytes"),
            "top_logprobs": [
                {"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes")} for t in lp["top_logprobs"]
            ],
        }
        for lp in block["content"]
    ]


class OllamaFormat(Format):
    """/api/chat (`generate` False) or /api/generate (`generate` True, `prompt_ids` for `context`)."""

    def __init__(self, inner: ChatFormat, model: str, *, generate: bool = False, prompt_ids: list[int] | None = None):
        super().__init__(inner.id, model, 1, inner.logprobs)
        self.inner, self.generate, self.prompt_ids = inner, generate, prompt_ids or []
        self.started = time.monotonic_ns()

    def _line(self, content: str, *, tool_calls: Any = None, logprobs: Any = None) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.generate:
            line["response"] = content
        else:
            line["message"] = {"role": "assistant", "content": content}
            if tool_calls:
                line["message"]["tool_calls"] = _tool_calls(tool_calls)
        line["done"] = False
        if logprobs:
            line["logprobs"] = logprobs
        return line

    def _done(self, line: dict[str, Any], choice: Choice, reason: str | None) -> dict[str, Any]:
        end = time.monotonic_ns()
        first = choice.first_token_ns or end
        line["done"] = True
        line["done_reason"] = DONE_REASONS.get(reason or "stop", reason or "stop")
        if self.generate:
            line["context"] = self.prompt_ids + choice.token_ids
        line |= {
            "total_duration": end - self.started,
            "load_duration": 0,  # the model is loaded once, when the server starts
            "prompt_eval_count": choice.prompt_tokens,
            "prompt_eval_duration": first - self.started,
            "eval_count": choice.completion_tokens,
            "eval_duration": end - first,
        }
        return line

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        answer = self.inner.response(choices)["choices"][0]
        message = answer["message"]
        line = self._line(
            message.get("content") or "",
            tool_calls=message.get("tool_calls"),
            logprobs=_logprobs(answer.get("logprobs")),
        )
        return self._done(line, choices[0], answer["finish_reason"])

    def _from_chunk(self, chunk: dict[str, Any], choice: Choice) -> dict[str, Any] | None:
        part = chunk["choices"][0]
        delta = part["delta"]
        line = self._line(
            delta.get("content") or "", tool_calls=delta.get("tool_calls"), logprobs=_logprobs(part.get("logprobs"))
        )
        if part.get("finish_reason"):
            return self._done(line, choice, part["finish_reason"])
        if not (delta.get("content") or delta.get("tool_calls") or "logprobs" in line):
            return None
        return line

    media_type = "application/x-ndjson"
    last_event = ""  # Ollama's stream ends with its done line

    def sse_events(self, choice: Choice, out: RequestOutput, offset: int) -> list[str]:
        """The inner format's chunks for this output, as JSON lines (Format.events drives the stream)."""
        lines = (self._from_chunk(chunk, choice) for chunk in self.inner.chunks(choice, out, offset))
        return [json_line(line) for line in lines if line is not None]

    def error_event(self, exc: APIError) -> str:
        return json_line(exc.ollama_body())
