"""Engine outputs as API bodies: chat-shaped (chat completions and Mistral's FIM) and text completions,
whole or as server-sent event chunks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from ..engine.types import RequestOutput
from .common import chat_logprobs, completion_logprobs, now, usage
from .errors import APIError
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    Usage,
)
from .streaming import LINE_BREAKS, SSE_DONE, Choice, Run, sse

# Stands for a token's text in a chunk serialised once per choice (private-use characters: JSON leaves
# them as they are, and no tokenizer's text holds this sequence).
_MARK = "\ue000tramontane-text\ue001"


def total_usage(choices: list[Choice], n: int) -> Usage:
    """Prompt tokens count once per prompt (not per choice); completion tokens add up."""
    firsts = choices[::n]
    return usage(
        sum(c.prompt_tokens for c in firsts),
        sum(c.completion_tokens for c in choices),
        sum(c.cached_tokens for c in firsts),
    )


def check_errors(choices: list[Choice]) -> None:
    for c in choices:
        if c.finish_reason == "error":
            raise APIError(500, f"generation failed: {c.error or 'engine error'}", code="engine_error")


class Format:
    """How one API shapes answers. `id` and `model` are fixed for the whole response; a stream is
    `events` sent as `media_type`."""

    media_type = "text/event-stream"

    def __init__(self, response_id: str, model: str, n: int, logprobs: bool) -> None:
        self.id, self.model, self.n, self.logprobs = response_id, model, n, logprobs
        self.created = now()
        self._templates: dict[int, list[str]] = {}  # choice index -> its text chunk's event, split at _MARK

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return None

    def chunk(self, choice: Choice, out: RequestOutput, offset: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def chunks(self, choice: Choice, out: RequestOutput, offset: int) -> list[dict[str, Any]]:
        """The events for one engine output (after `choice.add(out)`): usually one chunk, or none."""
        chunk = self.chunk(choice, out, offset)
        return [] if chunk is None else [chunk]

    def sse_events(self, choice: Choice, out: RequestOutput, offset: int) -> list[str]:
        """`chunks` as server-sent events. An output of plain text (no finish, no logprobs) fills its
        text into the choice's text chunk, built and serialised once through `chunks` with a marker for
        the text: the same bytes, without a model validation and dump per token (a chat chunk: 17.7 us
        -> 2.4 us of the event loop's time, which the engine thread waits for when it needs the GIL).
        Formats that override `chunks` (tool calls hold text back) always take the full path."""
        plain = out.text and not out.finish_reason and not (self.logprobs and out.logprobs)
        if not plain or type(self).chunks is not Format.chunks:
            return [sse(chunk) for chunk in self.chunks(choice, out, offset)]
        parts = self._templates.get(choice.index)
        if parts is None:
            marked = self.chunks(choice, dataclasses.replace(out, text=_MARK), offset)
            parts = sse(marked[0]).split(_MARK) if len(marked) == 1 else []
            self._templates[choice.index] = parts
        if len(parts) != 2:  # the text is not one JSON string of the chunk: no shortcut
            return [sse(chunk) for chunk in self.chunks(choice, out, offset)]
        text = json.dumps(out.text, ensure_ascii=False)[1:-1].translate(LINE_BREAKS)
        return [parts[0] + text + parts[1]]

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        raise NotImplementedError

    async def events(self, run: Run, choices: list[Choice], include_usage: bool) -> AsyncIterator[str]:
        """The stream: chunks as outputs come (`sse_events`), an error event if the engine fails, the
        usage chunk when asked, then `last_event` (`data: [DONE]`)."""
        try:
            for c in choices:
                opening = self.opening(c)
                if opening is not None:
                    yield sse(opening)
            async with contextlib.aclosing(run.outputs()) as outputs:
                async for i, out in outputs:
                    c = choices[i]
                    offset = len(c.text)
                    c.add(out)
                    if out.finish_reason == "error":
                        check_errors([c])
                    for event in self.sse_events(c, out, offset):
                        yield event
            if include_usage:
                yield sse(self.usage_chunk(choices))
        except APIError as exc:
            yield self.error_event(exc)
        yield self.last_event

    last_event = SSE_DONE  # what ends a stream

    def error_event(self, exc: APIError) -> str:
        return sse(exc.body())


class ChatFormat(Format):
    """chat.completion / chat.completion.chunk (also Mistral's FIM answers)."""

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            usage=total_usage(choices, self.n),
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=chat_logprobs(c.logprobs) if self.logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
        ).model_dump(mode="json")

    def _chunk(self, choices: list[ChatChunkChoice], usage_: Usage | None = None) -> dict[str, Any]:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_
        ).model_dump(mode="json")

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        return self._chunk([ChatChunkChoice(index=choice.index, delta=DeltaMessage(role="assistant", content=""))])

    def chunk(self, choice: Choice, out: RequestOutput, offset: int) -> dict[str, Any] | None:
        if not out.text and not out.finish_reason and not (self.logprobs and out.logprobs):
            return None
        logprobs = chat_logprobs(out.logprobs) if self.logprobs and out.logprobs else None
        return self._chunk(
            [
                ChatChunkChoice(
                    index=choice.index,
                    delta=DeltaMessage(content=out.text),
                    logprobs=logprobs,
                    finish_reason=out.finish_reason,
                )
            ]
        )

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        return self._chunk([], total_usage(choices, self.n))


class CompletionFormat(Format):
    """text_completion, whole and streamed (the chunks have the same shape)."""

    def _body(self, choices: list[CompletionChoice], usage_: Usage | None) -> dict[str, Any]:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage_
        ).model_dump(mode="json")

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        return self._body(
            [
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    logprobs=completion_logprobs(c.logprobs, 0) if self.logprobs else None,
                )
                for c in choices
            ],
            total_usage(choices, self.n),
        )

    def chunk(self, choice: Choice, out: RequestOutput, offset: int) -> dict[str, Any] | None:
        if not out.text and not out.finish_reason and not (self.logprobs and out.logprobs):
            return None
        logprobs = completion_logprobs(out.logprobs, offset) if self.logprobs else None
        return self._body(
            [CompletionChoice(index=choice.index, text=out.text, logprobs=logprobs, finish_reason=out.finish_reason)],
            None,
        )

    def usage_chunk(self, choices: list[Choice]) -> dict[str, Any]:
        return self._body([], total_usage(choices, self.n))
