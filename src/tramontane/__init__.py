"""tramontane: run, serve, quantize and fine-tune Mistral-family open-weight models.

`LLM`, `load`, `SamplingParams` and `Speculation` are imported on first use (PEP 562): they bring torch, and the
commands that need no model (`tramontane list`, `rm`, `--help`, a mistyped flag) answer without it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ModelConfig, MoeConfig
from .errors import ConfigError, LoadError, RequestError, TemplateError, TokenizerError, TramontaneError

if TYPE_CHECKING:
    from .api import LLM, load
    from .decoding.sampling import SamplingParams
    from .decoding.speculative import Speculation

_LAZY = {"LLM": "api", "load": "api", "SamplingParams": "decoding.sampling", "Speculation": "decoding.speculative"}

__all__ = [
    "LLM",
    "ConfigError",
    "LoadError",
    "ModelConfig",
    "MoeConfig",
    "RequestError",
    "SamplingParams",
    "Speculation",
    "TemplateError",
    "TokenizerError",
    "TramontaneError",
    "load",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tramontane' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value
