"""Running the engine requests of one HTTP request: submit, merge, watch the client, stream events.

A request with n choices (and, for completions, several prompts) becomes several `EngineRequest`s.
`Run` submits them together and waits for each one's first output before anything is sent, so that an
engine refusal (queue full, draining, context too long) is still a proper HTTP error; then it merges
their outputs into one stream of (choice index, output). Closing a `Run` closes every engine stream,
which aborts what is still running: that is how a client that goes away stops its work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..decoding.sequence import TokenLogprob
from ..engine.types import (
    ContextLengthError,
    Engine,
    EngineRequest,
    EngineUnavailableError,
    QueueFullError,
    RequestOutput,
    UnknownAdapterError,
)
from ..errors import RequestError, TramontaneError
from .errors import APIError

T = TypeVar("T")
_DONE = object()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def engine_error(exc: BaseException) -> APIError:
    """The HTTP error for an engine refusal."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is busy: {exc}", code="queue_full")
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, f"the engine is not accepting requests: {exc}", code="engine_unavailable")
    if isinstance(exc, UnknownAdapterError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (RequestError, TramontaneError)):
        return APIError(400, str(exc))
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", code="engine_error")


@dataclass
class Choice:
    """One choice's output, gathered from the engine's outputs."""

    index: int
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    first_token_ns: int = 0  # time.monotonic_ns() when its first token came (Ollama reports durations)

    def add(self, out: RequestOutput) -> None:
        if not self.first_token_ns and out.token_ids:
            self.first_token_ns = time.monotonic_ns()
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs
        self.completion_tokens = max(out.completion_tokens, len(self.token_ids))
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
        if out.finish_reason:
            self.finish_reason, self.error = out.finish_reason, out.error


class Run:
    """The engine requests of one HTTP request, merged (see the module docstring)."""

    def __init__(self, engine: Engine, requests: list[EngineRequest]) -> None:
        self.requests = requests
        self._gens = [engine.generate(r) for r in requests]
        self._firsts: list[RequestOutput | None] = []
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Submit every request and wait for each one's first output; an engine refusal of any of them
        closes the others and raises as an APIError."""

        async def first(gen: AsyncIterator[RequestOutput]) -> RequestOutput | None:
            return await anext(gen, None)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(first(g)) for g in self._gens]
        except BaseExceptionGroup as eg:
            await self.aclose()
            raise engine_error(eg.exceptions[0]) from None
        except BaseException:
            await self.aclose()
            raise
        self._firsts = [t.result() for t in tasks]

    async def outputs(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """(choice index, output) in the order the engine produced them; closes the run at the end."""
        try:
            for i, out in enumerate(self._firsts):
                if out is not None:
                    yield i, out
            self._pumps = [
                asyncio.ensure_future(self._pump(i, g)) for i, g in enumerate(self._gens) if self._firsts[i] is not None
            ]
            remaining = len(self._pumps)
            while remaining:
                i, item = await self._queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise engine_error(item)
                else:
                    yield i, item
        finally:
            await self.aclose()

    async def _pump(self, i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await self._queue.put((i, out))
        except Exception as exc:  # handed to the consumer, which turns it into an HTTP error
            await self._queue.put((i, exc))
        await self._queue.put((i, _DONE))

    async def aclose(self) -> None:
        """Stop everything: cancelled pumps close their engine streams, which aborts the requests."""
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for gen in self._gens:
            with contextlib.suppress(Exception):
                await gen.aclose()  # type: ignore[attr-defined]

    async def collect(self, choices: list[Choice]) -> list[Choice]:
        async with contextlib.aclosing(self.outputs()) as outputs:
            async for i, out in outputs:
                choices[i].add(out)
        return choices


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client disconnects.

    Call only once the body has been read: the watch consumes the ASGI receive channel."""
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not job.done():
            job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
    if not job.done() or job.cancelled():
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await job
        raise ClientGone()
    return job.result()


# Characters JSON leaves raw that line-splitting readers (Python's str.splitlines, used by httpx's
# iter_lines) treat as line ends: escaped, so that a streamed token holding one never cuts an event.
LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(LINE_BREAKS)
    return f"data: {text}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """Server-sent events (or, with another `media_type`, Ollama's JSON lines). Unlike Starlette's StreamingResponse it always watches for the client
    going away (whatever the ASGI spec version), and then closes the event source at once, which
    aborts its engine requests."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[str],
        on_close: Callable[[], Awaitable[None]] | None = None,
        media_type: str = "text/event-stream",
    ) -> None:
        super().__init__(
            events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, media_type=media_type
        )
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self._stream(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watch):
                task.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                await self.on_close()

    async def _stream(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        except OSError:  # the client went away while we wrote
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
