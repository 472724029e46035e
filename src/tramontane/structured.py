"""Constrained decoding: answers that follow a JSON schema (response_format), enforced token by token.

A request's grammar (llguidance's JSON form, compiled from the schema) travels in `SamplingParams.grammar`.
Each sequence gets a `Guide` (an llguidance matcher over the model's vocabulary): before sampling, the
tokens that cannot continue a valid answer are masked to -inf in that sequence's logits row; after, the
chosen token advances the matcher. End-of-sequence is allowed only once the answer is complete, so a
finished answer always parses. Rows of a batch are guided independently (rows without a grammar are left
alone). Near the end of its token budget (FINISH_WITHIN tokens left) a guided sequence stops following
the model and takes the allowed token that closes the answer fastest (end of sequence when the answer is
complete, then closing quotes and brackets, then the longest allowed token): a small model sampling at
temperature 1 can otherwise wander inside a string until max_tokens cuts a half-written object. Schemas
are checked before anything is scheduled: an invalid or unsupported one, or one larger
than MAX_SCHEMA_BYTES, is a RequestError naming the problem (HTTP 400)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from .errors import RequestError

MAX_SCHEMA_BYTES = 64 * 1024  # size budget for a schema (compilation also runs under llguidance's limits)
FINISH_WITHIN = 48  # tokens before max_tokens at which a guided answer is steered to its end
# JSON laid out as json.dumps does ("a": 1, "b": 2), no free whitespace: fewer tokens, no runaway blanks.
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar an API `response_format` asks for: {"type": "text"} (None), {"type": "json_object"},
    or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}} (OpenAI and
    Mistral share this shape). RequestError for anything else."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError("response_format must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(None)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise RequestError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": "
                               "{...}}}")
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


def check_grammar(grammar: str, tokenizer: Any) -> None:
    """Compile `grammar` for this tokenizer now (under llguidance's resource limits); RequestError when
    it is invalid or uses what llguidance does not support."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar, guidance_tokenizer(tokenizer))
    if error:
        raise RequestError(f"unsupported or invalid JSON schema: {error[:300]}")


def guidance_tokenizer(tokenizer: Any) -> Any:
    """The model's vocabulary as llguidance sees it (built once per tokenizer, then cached on it)."""
    cached = getattr(tokenizer, "_guidance", None)
    if cached is None:
        make = getattr(tokenizer, "guidance_tokenizer", None)
        if make is None:
            raise RequestError(f"structured output is not available for this tokenizer ({tokenizer.chat_format})")
        cached = make()
        tokenizer._guidance = cached
    return cached


class Guide:
    """One sequence's matcher: which tokens may come next, and the tokens taken so far.

    The mask is filled in the sampling thread when asked for: llguidance fills one in about 10 us for a
    JSON schema over SmolLM2's 49k tokens, less than a hand-off to a background thread costs (with the
    model's threads on every core, such a thread measured 0.3 ms per token in GIL and scheduling waits)."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        import llguidance
        import llguidance.torch as lt

        vocabulary = guidance_tokenizer(tokenizer)
        self.vocab_size = vocabulary.vocab_size
        self.rank = closing_rank(tokenizer)
        self.matcher = llguidance.LLMatcher(vocabulary, grammar)
        if self.matcher.is_error():
            raise RequestError(f"the grammar does not compile: {self.matcher.get_error()[:300]}")
        self.bitmask = lt.allocate_token_bitmask(1, self.vocab_size)  # [1, ceil(V/32)] int32
        self._filled = False

    def next_mask(self) -> torch.Tensor:
        """The allowed next tokens as a bitmask [1, ceil(V/32)]."""
        if not self._filled:
            import llguidance.torch as lt

            lt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
            self._filled = True
        return self.bitmask

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._filled = False


def closing_rank(tokenizer: Any) -> torch.Tensor:
    """Per token id, how directly it ends a JSON answer: the end-of-sequence ids first (taken once the
    answer is complete), then tokens made only of closing quotes and brackets (longer first, those
    starting with a quote before the others), then the rest, longer first: where the grammar leaves no
    choice (a required key, an enum value, a tool call's closing tag) the longest allowed token is the
    fastest way through. Built once per tokenizer (decodes the vocabulary) and cached on it."""
    cached = getattr(tokenizer, "_closing_rank", None)
    if cached is None:
        n = guidance_tokenizer(tokenizer).vocab_size
        rank = torch.zeros(n)
        for i in range(n):
            text = tokenizer.decode([i], skip_special=False)
            if text and set(text) <= set('"]}'):
                # a quote first: inside a string brackets are mere text, the quote is what ends it
                rank[i] = 3 + len(text) + (10 if text[0] == '"' else 0)
            elif text:
                rank[i] = 1 + min(len(text), 64) / 65  # in (1, 2): below every closing token
        for i in tokenizer.stop_ids:
            if i < n:
                rank[i] = 100  # when the answer is complete, ending it beats anything
        cached = tokenizer._closing_rank = rank
    return cached


def allowed_tokens(guides: list[Guide], width: int) -> torch.Tensor:
    """The guides' next-token bitmasks as booleans [R, width]: bit j of 32-bit word w is token 32w + j
    (llguidance's layout), which numpy's little-endian bit order unpacks directly from the bytes. (Not
    llguidance.torch's apply function: it is torch.compile'd, and compiling took seconds on the first
    guided step and again for each new number of guided rows.)"""
    bits = torch.cat([g.next_mask() for g in guides])  # [R, ceil(n/32)] int32
    unpacked = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")  # [R, 32*ceil(n/32)] 0/1
    return torch.from_numpy(unpacked[:, :width].view(np.bool_))


def mask_logits(logits: torch.Tensor, guides: list[Guide | None], finishing: list[bool] | None = None
                ) -> torch.Tensor:
    """logits [B,V] with the tokens each guided row may not take set to -inf (a copy when any row is
    guided; unguided rows unchanged). Ids past the grammar's vocabulary are never allowed. Rows marked
    `finishing` keep only their best-ranked allowed token (see closing_rank)."""
    if not any(guides):
        return logits
    rows = [i for i, g in enumerate(guides) if g is not None]
    n = guides[rows[0]].vocab_size  # one tokenizer per model: every guide has the same vocabulary
    width = min(n, logits.shape[1])
    sub = logits[rows]  # [R,V], a copy of the guided rows
    sub[:, :width].masked_fill_(~allowed_tokens([guides[i] for i in rows], width), float("-inf"))
    sub[:, n:] = float("-inf")  # ids the grammar's vocabulary does not have
    for j, i in enumerate(rows):
        if finishing and finishing[i]:
            width = min(n, sub.shape[1])
            best = torch.where(sub[j, :width] > float("-inf"), guides[i].rank[:width], -1.0).argmax()
            sub[j] = float("-inf")
            sub[j, best] = 0.0
    masked = logits.clone()
    masked[rows] = sub
    return masked
