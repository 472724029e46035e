"""Chat answers of requests that offer tools: calls read from the output become `tool_calls` with
finish_reason "tool_calls", whole or streamed.

Streaming: text before a call streams as content; from the first character that may start a call
(`[TOOL_CALLS]`, `<tool_call>`, or a `{` opening a bare-JSON answer) the output is held back. When the
choice ends, held text is parsed: its calls go out as one `tool_calls` delta (each call whole, with its
index, as both APIs allow), or, when it holds no valid call, it goes out as content."""

from __future__ import annotations

from typing import Any

from ..engine.types import RequestOutput
from ..text.tokenizer import Tokenizer
from ..tools.parser import ParsedOutput
from ..tools.request import ToolUse, call_marker, call_text, read_calls
from .common import chat_logprobs
from .formats import ChatFormat, total_usage
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionResponse,
    DeltaMessage,
    FunctionCall,
    ToolCallDelta,
    ToolCallOut,
)
from .streaming import Choice


class ToolChatFormat(ChatFormat):
    def __init__(
        self, response_id: str, model: str, n: int, logprobs: bool, use: ToolUse, tokenizer: Tokenizer
    ) -> None:
        super().__init__(response_id, model, n, logprobs)
        self.use, self.tokenizer = use, tokenizer
        self.marker = call_marker(tokenizer)
        self._sent: dict[int, str] = {}  # choice index -> content already streamed

    def _parsed(self, choice: Choice) -> tuple[str, ParsedOutput]:
        text = call_text(self.tokenizer, choice.token_ids)
        return text, read_calls(text, self.use, self.tokenizer)

    def _message(self, choice: Choice) -> tuple[AssistantMessage, str | None]:
        _, parsed = self._parsed(choice)
        if not parsed.calls:
            return AssistantMessage(content=choice.text), choice.finish_reason
        calls = [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parsed.calls]
        return AssistantMessage(content=parsed.content or None, tool_calls=calls), "tool_calls"

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for c in choices:
            message, finish = self._message(c)
            out.append(
                ChatChoice(
                    index=c.index,
                    message=message,
                    finish_reason=finish,
                    logprobs=chat_logprobs(c.logprobs) if self.logprobs else None,
                )
            )
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=out, usage=total_usage(choices, self.n)
        ).model_dump(mode="json")

    def _safe(self, text: str) -> str:
        """The part of the output so far that cannot belong to a call."""
        if self.marker == "{":  # a bare-JSON call is the whole answer
            return "" if not text.strip() or text.lstrip().startswith("{") else text
        found = text.find(self.marker)
        if found >= 0:
            return text[:found]
        for k in range(min(len(self.marker) - 1, len(text)), 0, -1):  # a marker may be starting
            if self.marker.startswith(text[-k:]):
                return text[:-k]
        return text.rstrip("\ufffd")  # an unfinished UTF-8 character waits for its next bytes

    def chunks(self, choice: Choice, out: RequestOutput, offset: int) -> list[dict[str, Any]]:
        sent = self._sent.get(choice.index, "")
        logprobs = chat_logprobs(out.logprobs) if self.logprobs and out.logprobs else None
        if not out.finish_reason:
            safe = self._safe(call_text(self.tokenizer, choice.token_ids))
            delta = safe[len(sent) :] if safe.startswith(sent) else ""
            if not delta and logprobs is None:
                return []
            self._sent[choice.index] = sent + delta
            return [self._delta(choice, DeltaMessage(content=delta), logprobs)]
        text, parsed = self._parsed(choice)
        if not parsed.calls:
            rest = text[len(sent) :] if text.startswith(sent) else ""
            return [self._delta(choice, DeltaMessage(content=rest), logprobs, out.finish_reason)]
        events = []
        if parsed.content.startswith(sent) and parsed.content != sent:
            events.append(self._delta(choice, DeltaMessage(content=parsed.content[len(sent) :]), None))
        calls = [
            ToolCallDelta(index=i, id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
            for i, c in enumerate(parsed.calls)
        ]
        events.append(self._delta(choice, DeltaMessage(tool_calls=calls), logprobs))
        events.append(self._delta(choice, DeltaMessage(), None, "tool_calls"))
        return events

    def _delta(self, choice: Choice, delta: DeltaMessage, logprobs: Any, finish: str | None = None) -> dict[str, Any]:
        return self._chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs, finish_reason=finish)])
