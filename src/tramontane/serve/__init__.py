"""The OpenAI- and Mistral-compatible HTTP server (FastAPI) in front of the serving engine."""

from .app import attach_engine, create_app, drain

__all__ = ["attach_engine", "create_app", "drain"]
