"""Offline generation: a batch of prompts in, text out (streamed or whole).

`LLM.generate` runs all prompts of a batch together: a chunked prefill over right-padded prompts,
then one decoding step per token for every unfinished sequence. Finished sequences leave the batch
(their cache rows are dropped); logits, penalties, sampling and logprobs are computed per row."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import RequestError
from .model import KVCache, Transformer
from .sampling import (
    SamplingParams,
    apply_penalties,
    compute_logprobs,
    make_generator,
    process_logits,
    sample,
)
from .stops import StopChecker
from .structured import FINISH_WITHIN, Guide, mask_logits
from .toolcalls import ToolCall

PREFILL_CHUNK = 512  # tokens per row per prefill step: bounds activation memory on long prompts
INITIAL_CAPACITY = 256  # KV slots allocated beyond the prompt before the cache has to grow


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

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, tokenizer: Any,
                 max_len: int, min_tokens: int = 0, context_reason: str = "length") -> None:
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


class Generator:
    """Runs batches of token-id prompts through a model with a tokenizer for output text."""

    def __init__(self, model: Transformer, tokenizer: Any, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.config = model.config

    def run(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Iterator[Delta]:
        seqs = [SequenceState(i, list(p), sp, self.tokenizer, self.config.max_seq_len)
                for i, (p, sp) in enumerate(zip(prompts, params))]
        for s in seqs:
            if not s.prompt:
                raise RequestError(f"prompt {s.index} is empty")
            if s.max_tokens < 1:
                raise RequestError(f"prompt {s.index} has {len(s.prompt)} tokens: no room left in the "
                                   f"model's context of {self.config.max_seq_len}")
        capacity = max(len(s.prompt) for s in seqs) + min(INITIAL_CAPACITY, max(s.max_tokens for s in seqs))
        cache = KVCache(self.config, len(seqs), capacity, self.dtype)
        with torch.inference_mode():
            logits = self._prefill(seqs, cache)
            yield from self._decode(seqs, cache, logits)

    def _prefill(self, seqs: list[SequenceState], cache: KVCache) -> torch.Tensor:
        """Run the prompts in chunks; return the logits after each prompt's last token [B,V]."""
        lengths = torch.tensor([len(s.prompt) for s in seqs])  # [B]
        width = int(lengths.max())
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s.prompt)] = torch.tensor(s.prompt)
        positions = torch.arange(width).expand(len(seqs), width).clone()  # [B,T]
        positions[positions >= lengths[:, None]] = -1  # right padding
        last = torch.empty(len(seqs), self.config.dim, dtype=self.dtype)  # [B,dim]
        for start in range(0, width, PREFILL_CHUNK):
            end = start + PREFILL_CHUNK
            h = self.model.hidden_states(tokens[:, start:end], positions[:, start:end], cache)
            rows = ((lengths > start) & (lengths <= end)).nonzero().flatten()
            last[rows] = h[rows, lengths[rows] - 1 - start]
        return self.model.logits(last)  # [B,V]

    def _decode(self, seqs: list[SequenceState], cache: KVCache, logits: torch.Tensor) -> Iterator[Delta]:
        active = list(seqs)
        while active:
            tokens, logprobs = pick_tokens(active, logits, self.tokenizer)
            for s, token, lp in zip(active, tokens.tolist(), logprobs):  # the one host sync per step
                yield s.append(token, lp)
            keep = [i for i, s in enumerate(active) if s.finish_reason is None]
            if not keep:
                return
            if len(keep) < len(active):
                cache.reorder(torch.tensor(keep))
                tokens, active = tokens[keep], [active[i] for i in keep]
            positions = torch.tensor([[s.length - 1] for s in active])  # [B,1]
            cache.ensure_capacity(int(positions.max()) + 1, limit=self.config.max_seq_len)
            logits = self.model(tokens[:, None], positions, cache)[:, -1]  # [B,V]

    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Log-probability of each token given the ones before it, in one pass: [len - 1] float32."""
        ids = torch.tensor([list(token_ids)])  # [1,T]
        with torch.inference_mode():
            logp = self.model(ids).log_softmax(dim=-1)  # [1,T,V]
        return logp[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)  # [T-1]


def pick_tokens(seqs: Sequence[SequenceState], logits: torch.Tensor, tokenizer: Any
                ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """Sample each sequence's next token from its logits row [B,V]; logprobs where asked."""
    params = [s.params for s in seqs]
    processed = logits
    if any(p.has_penalties for p in params):
        processed = apply_penalties(logits, [s.prompt for s in seqs], [s.output for s in seqs], params)
    if any(s.guide is not None for s in seqs):  # after the penalties, which would otherwise lift masked tokens
        finishing = [s.guide is not None and s.max_tokens - len(s.output) <= FINISH_WITHIN + s.params.grammar_reserve
                     for s in seqs]
        processed = mask_logits(processed, [s.guide for s in seqs], finishing)
    processed = process_logits(processed, params)
    tokens = sample(processed, params, [s.generator for s in seqs])  # [B]
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    if not wanted:
        return tokens, [None] * len(seqs)
    chosen, top_ids, top_lp = compute_logprobs(logits, tokens, max(wanted))
    return tokens, _logprobs(params, tokens, chosen, top_ids, top_lp, tokenizer)


def _logprobs(params: list[SamplingParams], tokens: torch.Tensor, chosen: torch.Tensor, top_ids: torch.Tensor,
              top_lp: torch.Tensor, tokenizer: Any) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = []
    for p, t, c, ids, lps in zip(params, tokens.tolist(), chosen.tolist(), top_ids.tolist(), top_lp.tolist()):
        if p.logprobs is None:
            out.append(None)
            continue
        top = [(i, tokenizer.decode([i], skip_special=False), lp)
               for i, lp in zip(ids[: p.logprobs], lps[: p.logprobs])]
        out.append(TokenLogprob(t, tokenizer.decode([t], skip_special=False), c, top))
    return out


def collect(deltas: Iterator[Delta], prompts: Sequence[Sequence[int]]) -> list[Completion]:
    """Gather streamed deltas into one Completion per prompt."""
    done = [Completion(i, "", [], list(p), "", None) for i, p in enumerate(prompts)]
    for d in deltas:
        c = done[d.index]
        c.text += d.text
        c.token_ids += d.token_ids
        if d.logprobs:
            c.logprobs = (c.logprobs or []) + d.logprobs
        if d.finish_reason:
            c.finish_reason = d.finish_reason
    return done
