"""Grammars for structured output: what a request's response_format or tools ask for, over a vocabulary.

A JSON schema becomes llguidance's JSON grammar (`json_grammar`, `response_format_grammar`) and is
compiled for the model's vocabulary before anything is scheduled (`check_grammar`): an invalid or
unsupported schema, or one larger than MAX_SCHEMA_BYTES, is a RequestError naming the problem (HTTP 400).
Enforcing a grammar token by token is decoding/structured.py's job."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import RequestError

if TYPE_CHECKING:  # llguidance is imported where grammars are compiled, not with this module
    from llguidance import LLTokenizer
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the stub only

    from .tokenizer import Tokenizer

MAX_SCHEMA_BYTES = 64 * 1024  # size budget for a schema (compilation also runs under llguidance's limits)
# JSON laid out as json.dumps does ("a": 1, "b": 2), no free whitespace: fewer tokens, no runaway blanks.
COMPACT: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The attribute a tokenizer caches its llguidance vocabulary under (not part of the Tokenizer protocol).
_GUIDANCE_CACHE = "_guidance"


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar an API `response_format` asks for: {"type": "text"} (None), {"type": "json_object"},
    or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}} (OpenAI and
    Mistral share this shape). RequestError for anything else."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError('response_format must be an object such as {"type": "json_object"}')
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return json_grammar(spec["schema"])
    raise RequestError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of a JSON value following `schema`; None = any JSON object (json_object mode)."""
    import llguidance

    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise RequestError(f"a JSON schema must be an object, got {type(schema).__name__}")
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise RequestError(f"the JSON schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT)
    except Exception as exc:  # llguidance reports schema errors as ValueError/RuntimeError
        raise RequestError(f"invalid JSON schema: {str(exc)[:300]}") from None


def smallest_instance(schema: Any, depth: int = 0) -> Any:
    """A short value that follows `schema` (required keys only, shortest enum value, minimal lengths):
    an estimate of how long the shortest valid answer is, for the finishing window of tool calls."""
    if not isinstance(schema, dict) or depth > 16:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return min(schema["enum"], key=lambda v: len(json.dumps(v)))
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            options = [smallest_instance(s, depth + 1) for s in schema[key]]
            return min(options, key=lambda v: len(json.dumps(v)))
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object":
        properties = schema.get("properties", {})
        return {k: smallest_instance(properties.get(k), depth + 1) for k in schema.get("required", [])}
    if kind == "array":
        return [smallest_instance(schema.get("items"), depth + 1)] * int(schema.get("minItems", 0))
    if kind == "string":
        return "x" * int(schema.get("minLength", 0))
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    return False if kind == "boolean" else None


def check_grammar(grammar: str, tokenizer: Tokenizer) -> None:
    """Compile `grammar` for this tokenizer now (under llguidance's resource limits); RequestError when
    it is invalid or uses what llguidance does not support."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar, guidance_tokenizer(tokenizer))
    if error:
        raise RequestError(f"unsupported or invalid JSON schema: {error[:300]}")


def guidance_tokenizer(tokenizer: Tokenizer) -> LLTokenizer:
    """The model's vocabulary as llguidance sees it (built once per tokenizer, then cached on it)."""
    cached = getattr(tokenizer, _GUIDANCE_CACHE, None)
    if cached is None:
        make = getattr(tokenizer, "guidance_tokenizer", None)  # not part of the Tokenizer protocol
        if make is None:
            raise RequestError(f"structured output is not available for this tokenizer ({tokenizer.chat_format})")
        cached = make()
        setattr(tokenizer, _GUIDANCE_CACHE, cached)
    return cached
