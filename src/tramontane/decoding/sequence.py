"""One sequence's decoding state, and picking the next token of many sequences at once.

Shared by both front ends: the offline generator (offline.py) and the serving engine (engine/) keep a
`SequenceState` per prompt and call `pick_tokens` on a step's logits rows; what they stream out is a
`Delta` (offline) or the engine's output records, built from the same fields."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from ..model.backend import rows_argmax
from ..text.tokenizer import Tokenizer
from ..tools.parser import ToolCall
from .sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    compute_logprobs,
    make_generator,
    process_logits,
    sample,
)
from .stops import StopChecker
from .structured import FINISH_WITHIN, Guide, mask_logits


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class Delta:
    """A piece of one sequence's output, as streamed."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)  # LLM.chat with tools: the calls made


class SequenceState:
    """One prompt's generation state: output tokens, sampler, detokenizer, stop rules.

    Shared by the offline loop and the serving engine. The sequence ends with "stop" (stop token or
    string, honoured once `min_tokens` exist), "length" (max_tokens reached) or, when the model's
    context is what ran out, `context_reason` ("length" offline, "model_length" when serving)."""

    def __init__(
        self,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_len: int,
        min_tokens: int = 0,
        context_reason: str = "length",
    ) -> None:
        self.index, self.prompt, self.params = index, prompt, params
        self.output: list[int] = []
        self.generator = None if params.is_greedy else make_generator(params.seed)
        self.decoder = tokenizer.incremental_decoder()
        self.stops = StopChecker(params.stop)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.stop_ids))
        room = max_len - len(prompt)
        self.max_tokens = min(params.max_tokens or room, room)
        self.length_reason = context_reason if params.max_tokens is None or params.max_tokens > room else "length"
        self.min_tokens = min_tokens
        self.finish_reason: str | None = None
        # structured output: a matcher constrains every token
        self.guide = Guide(tokenizer, params.grammar) if params.grammar is not None else None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def append(self, token: int, logprob: TokenLogprob | None) -> Delta:
        """Take one sampled token; returns the text it releases and, at the end, the finish reason."""
        self.output.append(token)
        if self.guide is not None:
            self.guide.advance(token)
        may_stop = len(self.output) > self.min_tokens
        if token in self.stop_ids and may_stop:
            self.finish_reason = "stop"
            return Delta(self.index, self._drain(), [token], [logprob] if logprob else [], self.finish_reason)
        text, hit = self.stops.push(self.decoder.push(token))
        if hit and may_stop:
            self.finish_reason = "stop"
        elif len(self.output) >= self.max_tokens:
            self.finish_reason = self.length_reason
            text += self._drain()
        return Delta(self.index, text, [token], [logprob] if logprob else [], self.finish_reason)

    def _drain(self) -> str:
        """Text still held by the detokenizer and the stop checker, at the end of the sequence."""
        text, hit = self.stops.push(self.decoder.flush())
        return text if hit else text + self.stops.flush()


def pick_tokens(
    seqs: Sequence[SequenceState],
    logits: torch.Tensor,
    tokenizer: Tokenizer,
    argmax: Callable[[torch.Tensor], torch.Tensor] = rows_argmax,
) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """Sample each sequence's next token from its logits row [B,V]; logprobs where asked. argmax: the
    runner's backend's (`Backend.argmax`: the first of equal maxima, a NaN first)."""
    params = [s.params for s in seqs]
    if all(map(_plain_greedy, seqs)):  # the common served case: what the general path computes, less its copies
        tokens = argmax(logits)  # [B] int64
        if any(p.logit_bias for p in params):
            tokens = _biased_argmax(_as_numpy(logits), params, tokens.numpy())
    else:
        tokens = _processed_and_sampled(seqs, params, logits)
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    if not wanted:
        return tokens, [None] * len(seqs)
    chosen, top_ids, top_lp = compute_logprobs(logits, tokens, max(wanted))
    return tokens, logprob_entries(params, tokens, chosen, top_ids, top_lp, tokenizer)


def _as_numpy(logits: torch.Tensor) -> np.ndarray:
    """logits [B,V] as a float32 numpy array: the same memory where it can be (a step's own logits; each
    torch call costs tens of microseconds after a decoding step has flushed the CPU's caches)."""
    if logits.dtype is torch.float32 and not logits.requires_grad and logits.is_contiguous():
        return logits.numpy()
    return logits.detach().float().contiguous().numpy()


def _biased_argmax(rows: np.ndarray, params: list[SamplingParams], plain: np.ndarray) -> torch.Tensor:
    """Each row's argmax after apply_logit_bias's float32 sums: [B] int64, from `plain`, the rows' argmax
    before them (biased_argmax, for the rows sharing one logit_bias at once: a served benchmark's 16
    requests ban the same 17 tokens). A served request banning a few tokens (-100) took the general
    path's seven torch calls, ~5% of SmolLM2's step, then a copy of its row and a second reading of it."""
    tokens = plain.astype(np.int64, copy=True)
    groups: dict[tuple[tuple[int, float], ...], list[int]] = {}
    for i, p in enumerate(params):
        if p.logit_bias:
            groups.setdefault(p.logit_bias, []).append(i)
    for bias, members in groups.items():
        at = np.array(members)
        tokens[at] = biased_argmax(rows, at, bias, tokens[at])
    return torch.from_numpy(tokens)


def biased_argmax(
    rows: np.ndarray, at: np.ndarray, bias: tuple[tuple[int, float], ...], plain: np.ndarray
) -> np.ndarray:
    """The argmax of rows[at] with each (token, bias) added in float32, given their own argmax `plain`.
    Where a row's plain winner is not a biased token and nothing is NaN, no other unbiased entry can win
    (plain is the first of the row's maxima), so the biased entries' sums are its only rivals: the largest
    wins, the lower token on a tie. Other rows (and any bias naming a token twice or past the row, which
    numpy's add.at sums or rejects) are copied and their sums made, as the general path makes them."""
    given, values, ids, ordered, distinct = _bias_arrays(bias)
    out = np.empty(len(at), dtype=np.int64)
    slow = np.ones(len(at), dtype=bool)
    if distinct and ids[0] >= 0 and ids[-1] < rows.shape[1]:
        sums = rows[np.ix_(at, ids)] + ordered  # [g, k] float32
        top = rows[at, plain]
        best = sums.argmax(axis=1)
        rival, token = sums[np.arange(len(at)), best], ids[best]
        slow = np.isnan(top) | (plain[:, None] == ids).any(axis=1) | np.isnan(sums).any(axis=1)
        out[:] = np.where(rival > top, token, np.where(rival == top, np.minimum(token, plain), plain))
    for j in np.flatnonzero(slow):
        row = rows[at[j]].copy()
        np.add.at(row, given, values)
        out[j] = row.argmax()
    return out


@lru_cache(maxsize=256)
def _bias_arrays(
    bias: tuple[tuple[int, float], ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """A logit_bias as biased_argmax reads it, made once per bias, not once a step (a served request's
    bias meets every one of its steps: 58 -> 19 us a call for one row banning 17 tokens, where the whole
    biased path had been ~5% of a served step of one request): its tokens and values as given, both in
    ascending token order (argmax's first of equal sums is the lowest token) and whether no token is
    named twice. Read-only: every step shares them."""
    given = np.array([t for t, _ in bias], dtype=np.int64)
    values = np.array([b for _, b in bias], np.float32)
    order = np.argsort(given, kind="stable")
    arrays = given, values, given[order], values[order]
    for a in arrays:
        a.setflags(write=False)
    return *arrays, len(set(given.tolist())) == len(given)


def greedy_bias(seqs: Sequence[SequenceState]) -> tuple[tuple[int, float], ...] | None:
    """The logit_bias every row shares (() for none) where each row's token is the plain argmax of its
    logits plus it and nothing else reads them (no logprobs): then a backend's `greedy` may pick the
    tokens from the hidden states; else None."""
    if not seqs or not all(_plain_greedy(s) and s.params.logprobs is None for s in seqs):
        return None
    bias = seqs[0].params.logit_bias
    return bias if all(s.params.logit_bias == bias for s in seqs) else None


def _plain_greedy(s: SequenceState) -> bool:
    """The argmax of the logits plus the row's logit_bias is this row's token: greedy, and nothing else
    that changes the logits (penalties, a grammar) or masks them (top-k, top-p, min-p: ties at the top
    could move)."""
    p = s.params
    return (
        p.is_greedy and not p.has_penalties and s.guide is None and p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0
    )


def _processed_and_sampled(
    seqs: Sequence[SequenceState], params: list[SamplingParams], logits: torch.Tensor
) -> torch.Tensor:
    """Bias, penalties, grammar masks, temperature and truncation, then a draw per row: tokens [B]."""
    return sample(processed_logits(seqs, params, logits), params, [s.generator for s in seqs])  # [B]


def processed_logits(seqs: Sequence[SequenceState], params: list[SamplingParams], logits: torch.Tensor) -> torch.Tensor:
    """Logits [B,V] after bias, penalties, grammar masks, temperature and truncation: softmax of a row
    is the distribution its next token is drawn from."""
    processed = apply_logit_bias(logits, params)
    if any(p.has_penalties for p in params):
        processed = apply_penalties(processed, [s.prompt for s in seqs], [s.output for s in seqs], params)
    if any(s.guide is not None for s in seqs):  # after the penalties, which would otherwise lift masked tokens
        finishing = [
            s.guide is not None and s.max_tokens - len(s.output) <= FINISH_WITHIN + s.params.grammar_reserve
            for s in seqs
        ]
        processed = mask_logits(processed, [s.guide for s in seqs], finishing)
    return process_logits(processed, params)


def logprob_entries(
    params: list[SamplingParams],
    tokens: torch.Tensor,
    chosen: torch.Tensor,
    top_ids: torch.Tensor,
    top_lp: torch.Tensor,
    tokenizer: Tokenizer,
) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = []
    for p, t, c, ids, lps in zip(params, tokens.tolist(), chosen.tolist(), top_ids.tolist(), top_lp.tolist()):
        if p.logprobs is None:
            out.append(None)
            continue
        top = [
            (i, tokenizer.decode([i], skip_special=False), lp) for i, lp in zip(ids[: p.logprobs], lps[: p.logprobs])
        ]
        out.append(TokenLogprob(t, tokenizer.decode([t], skip_special=False), c, top))
    return out
