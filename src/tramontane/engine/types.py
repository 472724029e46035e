"""What goes in and out of the serving engine. No HTTP here: `serve/` translates to and from these."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from ..config import ModelConfig
from ..decoding.sampling import SamplingParams
from ..decoding.sequence import TokenLogprob
from ..errors import TramontaneError
from ..model.transformer import Transformer
from ..text.tokenizer import Tokenizer


class EngineError(TramontaneError):
    """Base class of engine-side refusals."""


class QueueFullError(EngineError):
    """The waiting queue holds `max_queued` requests already (HTTP 429)."""


class EngineUnavailableError(EngineError):
    """The engine is loading, draining or has stopped (HTTP 503)."""


class ContextLengthError(EngineError):
    """Prompt + max_tokens exceed the model's context (HTTP 400, code context_length_exceeded)."""


class UnknownAdapterError(EngineError):
    """The request names a LoRA adapter the engine does not hold (HTTP 404, code model_not_found)."""


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    min_tokens: int = 0  # stop tokens and stop strings are ignored until this many tokens exist
    adapter: str | None = None  # LoRA adapter applied to this request (None: the base model)
    cache_salt: str | None = None  # shares prefix-cache blocks only with requests of the same salt
    # "embed" / "score": one prompt of an embeddings or scoring job (engine/prompt_jobs.py), no sampling
    task: Literal["generate", "embed", "score"] = "generate"
    # speculative decoding for this request: None = the engine's default (serve --speculative-config)
    speculate: bool | None = None


@dataclass
class RequestOutput:
    """One step's news for one request. Streamed in order; the last one has a finish_reason.

    finish_reason: "stop" (stop token or string), "length" (max_tokens, or the request can never fit
    the KV budget), "model_length" (the model's context is full), "abort" (client gone / aborted),
    "error" (this request failed; `error` says why; other requests are unaffected)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None


class ModelShape(Protocol):
    """What the routes read of the served model's config."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_seq_len(self) -> int | None: ...


class HttpMetrics(Protocol):
    def record_http(self, status: int) -> None: ...

    def render(self) -> str: ...


@runtime_checkable
class Engine(Protocol):
    """What serve/ calls on an engine: `AsyncEngine`, or the tests' fake (tests/fake_engine.py)."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer
    config: ModelShape
    metrics: HttpMetrics

    @property
    def adapters(self) -> set[str]: ...  # LoRA adapters requests may name

    def start(self) -> None: ...

    def is_healthy(self) -> bool: ...

    def queued(self) -> int: ...  # requests waiting for their turn (batch jobs yield to them)

    def abort(self, request_id: str) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]: ...

    async def embed(self, token_ids: list[list[int]]) -> list[list[float]]: ...

    async def prompt_logprobs(
        self, token_ids: list[list[int]], top: int, adapter: str | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...

    async def load_adapter(self, name: str, folder: str) -> None: ...  # a LoRA adapter, while serving

    async def shutdown(self, drain_timeout: float = 30.0) -> None: ...


class ServedModel(Protocol):
    """What the engine is built from (an `api.LLM`): the model, its tokenizer and config."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
