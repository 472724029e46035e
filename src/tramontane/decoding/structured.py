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
are turned into grammars and checked before anything is scheduled (text/grammar.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import RequestError
from ..text.grammar import guidance_tokenizer

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer

FINISH_WITHIN = 48  # tokens before max_tokens at which a guided answer is steered to its end
# The attribute a tokenizer caches its closing ranks under (not part of the Tokenizer protocol).
_RANK_CACHE = "_closing_rank"


class Guide:
    """One sequence's matcher: which tokens may come next, and the tokens taken so far.

    The mask is filled in the sampling thread when asked for: llguidance fills one in about 10 us for a
    JSON schema over SmolLM2's 49k tokens, less than a hand-off to a background thread costs (with the
    model's threads on every core, such a thread measured 0.3 ms per token in GIL and scheduling waits)."""

    def __init__(self, tokenizer: Tokenizer, grammar: str) -> None:
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


def closing_rank(tokenizer: Tokenizer) -> torch.Tensor:
    """Per token id, how directly it ends a JSON answer: the end-of-sequence ids first (taken once the
    answer is complete), then tokens made only of closing quotes and brackets (longer first, those
    starting with a quote before the others), then the rest, longer first: where the grammar leaves no
    choice (a required key, an enum value, a tool call's closing tag) the longest allowed token is the
    fastest way through. Built once per tokenizer (decodes the vocabulary) and cached on it."""
    cached = getattr(tokenizer, _RANK_CACHE, None)
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
        setattr(tokenizer, _RANK_CACHE, rank)
        cached = rank
    return cached


def allowed_tokens(guides: list[Guide], width: int) -> torch.Tensor:
    """The guides' next-token bitmasks as booleans [R, width]: bit j of 32-bit word w is token 32w + j
    (llguidance's layout), which numpy's little-endian bit order unpacks directly from the bytes. (Not
    llguidance.torch's apply function: it is torch.compile'd, and compiling took seconds on the first
    guided step and again for each new number of guided rows.)"""
    bits = torch.cat([g.next_mask() for g in guides])  # [R, ceil(n/32)] int32
    unpacked = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")  # [R, 32*ceil(n/32)] 0/1
    return torch.from_numpy(unpacked[:, :width].view(np.bool_))


def mask_logits(logits: torch.Tensor, guides: list[Guide | None], finishing: list[bool] | None = None) -> torch.Tensor:
    """logits [B,V] with the tokens each guided row may not take set to -inf (a copy when any row is
    guided; unguided rows unchanged). Ids past the grammar's vocabulary are never allowed. Rows marked
    `finishing` keep only their best-ranked allowed token (see closing_rank)."""
    if not any(guides):
        return logits
    rows = [i for i, g in enumerate(guides) if g is not None]
    guided = [g for g in guides if g is not None]  # guided[j] is row rows[j]'s guide
    n = guided[0].vocab_size  # one tokenizer per model: every guide has the same vocabulary
    width = min(n, logits.shape[1])
    sub = logits[rows]  # [R,V], a copy of the guided rows
    sub[:, :width].masked_fill_(~allowed_tokens(guided, width), float("-inf"))
    sub[:, n:] = float("-inf")  # ids the grammar's vocabulary does not have
    for j, (i, guide) in enumerate(zip(rows, guided)):
        if finishing and finishing[i]:
            width = min(n, sub.shape[1])
            best = torch.where(sub[j, :width] > float("-inf"), guide.rank[:width], -1.0).argmax()
            sub[j] = float("-inf")
            sub[j, best] = 0.0
    masked = logits.clone()
    masked[rows] = sub
    return masked
