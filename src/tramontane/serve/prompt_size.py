"""Cheap checks before a prompt is tokenized whole: a prompt that cannot fit the context is refused
after counting only about a context's worth of it.

Tokenizing a 15 MB prompt whole takes tens of seconds and gigabytes that the tokenizer keeps, only for
the context check to refuse it. So the text is counted first in pieces cut at whitespace (each piece
tokenized alone, less a slack for what a cut can change), stopping as soon as the count passes the
context. Only a text that may fit is then tokenized whole, exactly.

    count_past(tokenizer, ["some long text ..."], limit=8192)   # None: may fit; else a lower bound > 8192
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ..text.tokenizer import Tokenizer

PIECE_CHARS = 8 * 1024  # characters tokenized at a time while counting
CUT_SLACK = 2  # tokens a cut can add (a dummy prefix, a split whitespace run): subtracted per piece


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `size` characters, cut just before a whitespace where there is one
    in the piece's last quarter."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            space = max(text.rfind(" ", end - size // 4, end), text.rfind("\n", end - size // 4, end))
            end = space if space > start else end
        yield text[start:end]
        start = end


def count_past(tokenizer: Tokenizer, texts: Iterable[str], limit: int) -> int | None:
    """A lower bound of the tokens in `texts` as soon as it passes `limit`; None when they may fit."""
    texts = list(texts)
    if sum(len(t.encode("utf-8", "surrogatepass")) + CUT_SLACK for t in texts) <= limit:
        return None  # a token holds at least one UTF-8 byte (a dummy prefix none): these fit, no need to count
    count = 0
    for text in texts:
        for piece in pieces(text):
            count += max(0, len(tokenizer.encode(piece, add_bos=False)) - CUT_SLACK)
            if count > limit:
                return count
    return None


def message_texts(messages: list[dict[str, Any]]) -> Iterator[str]:
    """The strings of chat messages that a template copies into the prompt: contents (plain or text
    parts) and tool call arguments."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        for call in m.get("tool_calls") or []:
            arguments = call.get("function", {}).get("arguments") if isinstance(call, dict) else None
            if isinstance(arguments, str):
                yield arguments
