"""A stand-in for `tramontane.engine.AsyncEngine` with the same interface, for fast HTTP tests.

It answers every prompt with the same scripted words (one token per word), records what it was asked
and which requests were aborted, and can be told to refuse work (queue full, unavailable, context)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import mistral_common
import torch

from tramontane.decoding.sequence import TokenLogprob
from tramontane.engine.types import (
    ContextLengthError,
    EngineRequest,
    EngineUnavailableError,
    RequestOutput,
)
from tramontane.text.tokenizer import MistralCommonTokenizer

DATA = Path(mistral_common.__file__).parent / "data"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
V1 = DATA / "tokenizer.model.v1"
SCRIPT = ["Hello", " from", " the", " fake", " engine", "."]


@dataclass
class FakeMetrics:
    http: Counter = field(default_factory=Counter)

    def record_http(self, status: int) -> None:
        self.http[status] += 1

    def render(self) -> str:
        lines = ["# TYPE tramontane_http_requests_total counter"]
        lines += [f'tramontane_http_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.http.items())]
        return "\n".join(lines) + "\n"


class FakeEngine:
    def __init__(
        self, *, tokenizer_file: Path = V3, model_name: str = "fake-model", max_model_len: int = 256, delay: float = 0.0
    ) -> None:
        self.model_name = model_name
        self.tokenizer = MistralCommonTokenizer(tokenizer_file)
        self.config = SimpleNamespace(vocab_size=self.tokenizer.vocab_size, dim=8, max_seq_len=max_model_len)
        self.max_model_len = max_model_len
        self.metrics = FakeMetrics()
        self.delay = delay
        self.refuse: type[Exception] | None = None  # raise this on the next generate calls
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.produced: dict[str, int] = {}  # request id -> tokens yielded so far
        self.running = 0
        self.healthy = True
        self.closed = False
        self.started = False
        self.embedded: list[list[int]] = []
        self.fail_seed: int | None = None  # a request with this seed fails at its third token (finish "error")
        self.adapters: set[str] = set()

    def start(self) -> None:
        self.started = True

    def is_healthy(self) -> bool:
        return self.healthy

    def queued(self) -> int:
        return 0

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if self.closed:
            raise EngineUnavailableError("the engine is draining")
        if self.refuse is not None:
            raise self.refuse("refused by the fake engine")
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ContextLengthError("prompt too long")
        self.requests.append(request)
        self.running += 1
        done = False
        try:
            limit = request.params.max_tokens or len(SCRIPT)
            for i in range(limit):
                if self.delay:
                    await asyncio.sleep(self.delay)
                word = SCRIPT[i % len(SCRIPT)]
                last = i == limit - 1 or (request.params.max_tokens is None and i == len(SCRIPT) - 1)
                reason = None if not last else ("length" if request.params.max_tokens else "stop")
                logprobs = []
                if request.params.logprobs is not None:
                    top = [(100 + j, f"t{j}", -0.5 - j) for j in range(request.params.logprobs)]
                    logprobs = [TokenLogprob(100 + i, word, -0.25 if i else -math.inf, top)]
                if i == 2 and self.fail_seed is not None and request.params.seed == self.fail_seed:
                    done = True
                    yield RequestOutput(
                        request.request_id,
                        finish_reason="error",
                        error="injected step failure",
                        prompt_tokens=len(request.prompt_token_ids),
                        completion_tokens=i,
                    )
                    return
                self.produced[request.request_id] = i + 1
                yield RequestOutput(
                    request.request_id,
                    text=word,
                    token_ids=[100 + i],
                    logprobs=logprobs,
                    finish_reason=reason,
                    prompt_tokens=len(request.prompt_token_ids),
                    completion_tokens=i + 1,
                )
                if last:
                    done = True
                    return
        finally:
            self.running -= 1
            (self.finished if done else self.aborted).append(request.request_id)

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        self.embedded += token_ids
        out = []
        for ids in token_ids:
            raw = [float((sum(ids) + k) % 7 + 1) for k in range(self.config.dim)]
            norm = math.sqrt(sum(v * v for v in raw))
            out.append([v / norm for v in raw])
        return out

    async def prompt_logprobs(self, token_ids: list[list[int]], top: int, adapter: str | None = None):
        """Every prompt token at log-probability -1, with `top` made-up alternatives."""
        return [
            (
                torch.full((len(ids) - 1,), -1.0),
                torch.arange(top).repeat(len(ids) - 1, 1),
                torch.full((len(ids) - 1, top), -2.0),
            )
            for ids in token_ids
        ]

    async def load_adapter(self, name: str, folder: str) -> None:
        self.adapters.add(name)

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        self.closed = True
        for _ in range(int(drain_timeout * 100)):
            if not self.running:
                break
            await asyncio.sleep(0.01)
