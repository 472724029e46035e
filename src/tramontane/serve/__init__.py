"""The OpenAI- and Mistral-compatible HTTP server (FastAPI) in front of the serving engine.

The app is imported on first use (PEP 562): the CLI reads connection defaults from
`serve.connections` while building its parser, without FastAPI and the routes."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import attach_engine, create_app, drain

__all__ = ["attach_engine", "create_app", "drain"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'tramontane.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(".app", __name__), name)
    globals()[name] = value
    return value
