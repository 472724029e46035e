"""What goes in and out of the serving engine. No HTTP here: `serve/` translates to and from these."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TramontaneError
from ..generate import TokenLogprob
from ..sampling import SamplingParams


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
