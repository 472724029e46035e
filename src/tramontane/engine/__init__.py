"""The serving engine: continuous batching over a paged KV cache, with an asyncio front. No HTTP here."""

from .engine import AsyncEngine
from .types import ContextLengthError, EngineError, EngineRequest, EngineUnavailableError, QueueFullError, RequestOutput

__all__ = [
    "AsyncEngine",
    "ContextLengthError",
    "EngineError",
    "EngineRequest",
    "EngineUnavailableError",
    "QueueFullError",
    "RequestOutput",
]
