"""The project's own exception types. Every error a user can cause is one of these, with a message
that names the file, field or value at fault."""

from __future__ import annotations


class TramontaneError(Exception):
    """Base class of every error tramontane raises on purpose."""


class ConfigError(TramontaneError):
    """A model configuration (params.json, config.json, GGUF metadata) is missing or inconsistent."""


class LoadError(TramontaneError):
    """A weight or tokenizer file cannot be loaded: corrupt, truncated, hostile or unsupported.

    The message always starts with the file's path."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class TokenizerError(TramontaneError):
    """Tokenizer files are missing, malformed, or a text cannot be encoded."""


class TemplateError(TramontaneError):
    """A chat template failed to render, exceeded its budget, or reached outside the sandbox."""


class RequestError(TramontaneError):
    """Bad parameters for a generation request (sampling values, stop strings, lengths)."""
