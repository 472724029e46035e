"""Offline generation: a batch of prompts in, text out (streamed or whole).

`LLM.generate` runs all prompts of a batch together: a chunked prefill over right-padded prompts,
then one decoding step per token for every unfinished sequence. Finished sequences leave the batch
(their cache rows are dropped); logits, penalties, sampling and logprobs are computed per row. The
forward steps run on the decode backend the builder picked (model/backend.py).

With a `Speculation` (speculative.py), each step feeds every row its last token and its draft, and
keeps what verification accepts: one pass over the weights for up to k + 1 tokens. A step where no row
has a draft is a plain decoding step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import RequestError
from ..model import Backend, KVCache, KvType, Transformer, kv_type
from ..model.kv_types import F32
from ..text.tokenizer import Tokenizer
from .sampling import SamplingParams
from .sequence import Completion, Delta, SequenceState, greedy_bias, pick_tokens
from .speculative import Speculation, SpeculationStats, accept

PREFILL_CHUNK = 512  # tokens per row per prefill step: bounds activation memory on long prompts
INITIAL_CAPACITY = 256  # KV slots allocated beyond the prompt before the cache has to grow


class Generator:
    """Runs batches of token-id prompts through a model with a tokenizer for output text."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        backend: Backend,
        dtype: torch.dtype = torch.float32,
        kv: KvType | None = None,
    ) -> None:
        self.model, self.tokenizer, self.backend, self.dtype = model, tokenizer, backend, dtype
        self.kv = kv if kv is not None else kv_type(dtype)  # how the cache stores keys (model/kv_types.py)
        self.config = model.config
        self.stats = SpeculationStats()  # over every speculative run of this generator

    def run(
        self,
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        speculation: Speculation | None = None,
    ) -> Iterator[Delta]:
        seqs = [
            SequenceState(i, list(p), sp, self.tokenizer, self.config.max_seq_len)
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        for s in seqs:
            if not s.prompt:
                raise RequestError(f"prompt {s.index} is empty")
            if s.max_tokens < 1:
                raise RequestError(
                    f"prompt {s.index} has {len(s.prompt)} tokens: no room left in the "
                    f"model's context of {self.config.max_seq_len}"
                )
        if speculation is not None:
            speculation.check_vocabulary(self.config.vocab_size)
        spare = speculation.num_tokens if speculation is not None else 0
        capacity = max(len(s.prompt) for s in seqs) + min(INITIAL_CAPACITY, max(s.max_tokens for s in seqs)) + spare
        cache = KVCache(self.config, len(seqs), capacity, self.kv, spare=spare)
        with torch.inference_mode():
            logits = self._prefill(seqs, cache)
            if speculation is None:
                yield from self._decode(seqs, cache, logits)
            else:
                yield from self._speculate(seqs, cache, logits, speculation)

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
        cache.prompts = lengths.to(torch.int32)  # every row of these chunks is its prompt's (model/cache.py)
        try:
            for start in range(0, width, PREFILL_CHUNK):
                end = start + PREFILL_CHUNK
                h = self.backend.prefill(tokens[:, start:end], positions[:, start:end], cache)
                rows = ((lengths > start) & (lengths <= end)).nonzero().flatten()
                last[rows] = h[rows, lengths[rows] - 1 - start]
        finally:
            cache.prompts = None
        return self.model.logits(last)  # [B,V]

    def _decode(self, seqs: list[SequenceState], cache: KVCache, logits: torch.Tensor) -> Iterator[Delta]:
        """Decoding steps; where every row is plain greedy, the backend may pick the tokens from the hidden
        states without every logit (`Backend.greedy`: the same tokens)."""
        active, picked = list(seqs), None
        while active:
            if picked is None:
                tokens, logprobs = pick_tokens(active, logits, self.tokenizer, self.backend.argmax)
            else:
                tokens, logprobs = picked, [None] * len(active)
            for s, token, lp in zip(active, tokens.tolist(), logprobs):  # the one host sync per step
                yield s.append(token, lp)
            keep = _drop_finished(active, cache)
            if not keep:
                return
            if len(keep) < len(active):
                tokens, active = tokens[keep], [active[i] for i in keep]
            positions = torch.tensor([[s.length - 1] for s in active])  # [B,1]
            cache.ensure_capacity(int(positions.max()) + 1, limit=self.config.max_seq_len)
            hidden = self.backend.decode(tokens[:, None], positions, cache)[:, -1]  # [B,dim]
            bias = greedy_bias(active)
            picked = self.backend.greedy(hidden, bias) if bias is not None else None
            if picked is None:
                logits = self.model.logits(hidden)  # [B,V]

    def _speculate(
        self, seqs: list[SequenceState], cache: KVCache, logits: torch.Tensor, spec: Speculation
    ) -> Iterator[Delta]:
        active = list(seqs)
        drafters = {s.index: spec.drafter() for s in seqs}
        tokens, logprobs = pick_tokens(active, logits, self.tokenizer, self.backend.argmax)
        for s, token, lp in zip(active, tokens.tolist(), logprobs):
            yield s.append(token, lp)
        while True:
            keep = _drop_finished(active, cache)
            if not keep:
                return
            active = [active[i] for i in keep]
            drafts = [drafters[s.index].propose(s.prompt + s.output, s.max_tokens - len(s.output) - 1) for s in active]
            width = 1 + max(len(d) for d in drafts)
            step = torch.zeros(len(active), width, dtype=torch.long)  # [B,W]: each row's last token, its draft
            positions = torch.full((len(active), width), -1, dtype=torch.long)  # [B,W], -1 = padding
            for i, (s, d) in enumerate(zip(active, drafts)):
                step[i, : 1 + len(d)] = torch.tensor([s.output[-1], *d])
                positions[i, : 1 + len(d)] = torch.arange(s.length - 1, s.length + len(d))
            cache.ensure_capacity(int(positions.max()) + 1, limit=self.config.max_seq_len)
            if width == 1:  # nothing drafted: a plain decoding step
                hidden = self.backend.decode(step, positions, cache)  # [B,1,dim]
            else:
                hidden = self.backend.prefill(step, positions, cache)  # [B,W,dim]
            logits = self.model.logits(hidden)  # [B,W,V]
            for i, (s, d) in enumerate(zip(active, drafts)):
                yield from accept(s, logits[i, : 1 + len(d)], d, drafters[s.index], self.tokenizer, self.stats)

    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Log-probability of each token given the ones before it, in one pass: [len - 1] float32. A cache
        storing keys rounded (bf16, f16, q8_0) takes the pass, so that every key is read as generation
        reads it (as llama.cpp's perplexity runs its batches through its cache)."""
        ids = torch.tensor([list(token_ids)])  # [1,T]
        cache = None if self.kv == F32 else KVCache(self.config, 1, ids.shape[1], self.kv)
        positions = None if cache is None else torch.arange(ids.shape[1])[None]  # [1,T]
        if cache is not None:
            cache.prompts = torch.tensor([ids.shape[1]], dtype=torch.int32)  # the text is one prompt
        with torch.inference_mode():
            logp = self.model.logits(self.backend.prefill(ids, positions, cache))
            logp = logp.log_softmax(dim=-1)  # [1,T,V]
        return logp[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)  # [T-1]


def _drop_finished(active: list[SequenceState], cache: KVCache) -> list[int]:
    """Indices of the sequences still running; the cache keeps only their rows."""
    keep = [i for i, s in enumerate(active) if s.finish_reason is None]
    if keep and len(keep) < len(active):
        cache.reorder(torch.tensor(keep))
    return keep


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
