"""Pick a model's decode backend, once, when a runner is built (model/backend.py has the protocol).

The compiled step (quant/step.py) where the model and the cache fit it, the module path otherwise.
The offline generator asks for the rolling `KVCache`, the serving engine for its paged view; both go
through this one function, so `tramontane show` and the server's start-up log can say which runs."""

from __future__ import annotations

import torch

from ..model.backend import Backend, ModuleBackend
from ..model.cache import Cache
from ..model.kv_types import KvType, kv_type
from ..model.transformer import Transformer
from ..quant.step import CompiledStep


def select_backend(model: Transformer, cache_kind: type[Cache], dtype: torch.dtype | str | KvType) -> Backend:
    """The fastest backend that runs `model` on caches of `cache_kind` storing keys as `dtype` (a float
    dtype or a KV type, model/kv_types.py)."""
    if CompiledStep.fits(model):
        compiled = CompiledStep(model)
        if compiled.supports(cache_kind, kv_type(dtype)):
            return compiled
    return ModuleBackend(model)
