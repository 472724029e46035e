"""Speculative decoding: draft a few tokens cheaply, verify them all in one pass of the model.

Batch-1 decoding reads every weight once per token; a pass over k + 1 tokens reads them once too, so
each drafted token the model agrees with is a token for free. Drafts come from one of two places:
- prompt lookup (vLLM's "ngram" method, llama.cpp's lookup decoding): the last n tokens of the
  sequence (n from `ngram_max` down to `ngram_min`) are searched for earlier in the prompt and answer,
  and the tokens that followed their latest earlier occurrence are the draft. Copy-heavy work (editing
  or summarising a given text, refactoring given code) drafts well; free generation rarely finds a
  match and decodes as usual;
- a draft model sharing the tokenizer (`method="draft_model"`, `draft=` a loaded model): its greedy
  continuation, `num_tokens` long, each sequence with its own cache of the draft model's keys and
  values, rolled back to what verification kept.

    drafter = Speculation(num_tokens=8).drafter()     # one per sequence
    draft = drafter.propose(prompt + output, room=10)   # [] when nothing matches

A prompt-lookup draft's length adapts per sequence, as Hugging Face's assisted generation does: it grows by 2 after
a pass that kept every drafted token and shrinks by 1 after one that did not (between 1 and
`num_tokens`), so text the model copies drafts long and free text, where drafts rarely hold, costs
little: a drafted token the model rejects still costs its share of the pass. A rejected one-token
draft pauses drafting for PAUSE steps (plain decoding steps cost nothing extra).

Verification (`accept`) walks the k + 1 logits rows of the pass in order, each through the sequence's
own processing (bias, penalties, grammar, temperature, truncation), and keeps drafted tokens while they
are what decoding would emit:
- greedy: the drafted token is kept while it is the argmax, and the first that is not is replaced by
  the argmax: the output is the plain greedy output, token for token;
- sampled: a draft (either kind: both are deterministic) is a point mass q = 1 at d, so the standard
  rejection rule keeps d with probability
  min(1, p(d) / q(d)) = p(d), and on a rejection draws from the residual max(0, p - q), which is p
  without d, renormalised. Every emitted token is then distributed exactly as plain sampling's.
When every draft is kept, the last row gives one more token: k + 1 tokens for one pass at best."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import RequestError
from ..model import Backend, KVCache, KvType
from ..text.tokenizer import Tokenizer
from .sampling import compute_logprobs
from .sequence import Delta, SequenceState, TokenLogprob, logprob_entries, pick_tokens, processed_logits

METHODS = ("prompt_lookup", "draft_model")
PAUSE = 4  # steps without drafts after a one-token draft failed


class DraftSource(Protocol):
    """A loaded model that drafts (an `LLM`): what runs its steps, and how its cache stores keys."""

    backend: Backend
    kv: KvType


@dataclass(frozen=True)
class Speculation:
    """How to draft: up to `num_tokens` tokens per pass, from an n-gram of `ngram_max` down to
    `ngram_min` tokens found earlier in the sequence (prompt lookup), or `draft`'s greedy continuation."""

    method: str = "prompt_lookup"
    num_tokens: int = 8
    ngram_max: int = 4
    ngram_min: int = 2
    draft: DraftSource | None = None  # method "draft_model": the model that drafts

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RequestError(f"speculation method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.method == "draft_model") != (self.draft is not None):
            raise RequestError('a draft model goes with method "draft_model", and that method needs one')
        if not 1 <= self.num_tokens <= 16:
            raise RequestError(f"speculation num_tokens must be 1..16, got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise RequestError(
                f"speculation needs 1 <= ngram_min <= ngram_max <= 16, got {self.ngram_min} and {self.ngram_max}"
            )

    def drafter(self, capacity: int | None = None) -> Drafter:
        """One sequence's drafter; a draft model's cache holds at most `capacity` tokens (None: the
        draft model's context)."""
        return ModelDraft(self, capacity) if self.draft is not None else PromptLookup(self)

    def draft_bytes_per_token(self) -> int:
        """What one token takes in a draft model's cache (every layer's key and value); 0 by prompt lookup."""
        if self.draft is None:
            return 0
        config = self.draft.backend.model.config
        return 2 * config.n_layers * config.n_kv_heads * self.draft.kv.row_bytes(config.head_dim)

    def check_vocabulary(self, vocab_size: int) -> None:
        """A draft model must speak the verifying model's vocabulary."""
        if self.draft is not None and self.draft.backend.model.config.vocab_size != vocab_size:
            size = self.draft.backend.model.config.vocab_size
            raise RequestError(f"the draft model's vocabulary has {size} tokens, the model's {vocab_size}")


class Drafter(Protocol):
    """One sequence's source of drafts. `budget` bounds the tokens a draft model may read this call (a
    serving step's share): one with more of the sequence still to read reads that many and drafts
    nothing this time; `memory` bounds the tokens its cache may hold after the call. `spent` is what
    the last call read, `held` the tokens its cache holds room for (0: no cache)."""

    spent: int

    @property
    def held(self) -> int: ...

    def unread(self, tokens: Sequence[int]) -> int: ...

    def propose(
        self, tokens: Sequence[int], room: int, budget: int | None = None, memory: int | None = None
    ) -> list[int]: ...

    def update(self, drafted: int, accepted: int) -> None: ...


class PromptLookup:
    """One sequence's drafts, and their length as recent passes warrant."""

    def __init__(self, spec: Speculation) -> None:
        self.spec, self.spent, self.held = spec, 0, 0  # reads no model, keeps no cache
        self.length = max(1, spec.num_tokens // 2)
        self.paused = 0  # steps left without drafting
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence followed by a token
        self.indexed = 0  # tokens whose n-grams are in `latest`

    def unread(self, tokens: Sequence[int]) -> int:
        return 0

    def propose(
        self, tokens: Sequence[int], room: int, budget: int | None = None, memory: int | None = None
    ) -> list[int]:
        """The draft after `tokens` (prompt and answer so far, only ever grown at the end since the last
        call): at most min(its length, room) tokens."""
        self._index(tokens)
        limit, spec = min(self.length, room), self.spec
        if self.paused:
            self.paused -= 1
            return []
        if limit <= 0:
            return []
        for n in range(min(spec.ngram_max, len(tokens) - 1), spec.ngram_min - 1, -1):
            start = self.latest.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                return list(tokens[start + n : start + n + limit])
        return []

    def _index(self, tokens: Sequence[int]) -> None:
        """Record the n-grams that now have a token after them (those ending before the last token)."""
        lo, hi = self.spec.ngram_min, self.spec.ngram_max
        for end in range(max(self.indexed, 1), len(tokens)):  # n-grams ending at end - 1, followed by tokens[end]
            for n in range(lo, min(hi, end) + 1):
                self.latest[tuple(tokens[end - n : end])] = end - n
        self.indexed = max(self.indexed, len(tokens))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 1 and not accepted:
            self.paused = PAUSE
        if drafted:
            grown = self.length + 2 if accepted == drafted else self.length - 1
            self.length = min(self.spec.num_tokens, max(1, grown))


class ModelDraft:
    """One sequence's drafts from a draft model: its greedy continuation. The draft model's cache holds
    the keys and values of `history`; each proposal feeds what the sequence gained since (the tokens
    verification kept, then its own), rewriting whatever a rejected draft left. The cache is made at
    the first proposal and grows (doubling) up to `capacity` tokens, and up to what the caller's
    `memory` allows at each call (the serving engine's draft memory): short of it, no draft."""

    def __init__(self, spec: Speculation, capacity: int | None = None) -> None:
        assert spec.draft is not None
        self.spec, self.backend = spec, spec.draft.backend
        config = self.backend.model.config
        self.capacity = min(capacity or config.max_seq_len, config.max_seq_len)
        self.cache: KVCache | None = None
        self.history: list[int] = []  # the tokens whose keys and values the draft cache holds
        self.verified = 0  # a length of the sequence at an earlier call: history agrees with it that far
        self.spent = 0

    @property
    def held(self) -> int:
        """Tokens the cache holds room for now."""
        return 0 if self.cache is None else self.cache.size

    def unread(self, tokens: Sequence[int]) -> int:
        """About how many of `tokens` the draft model has yet to read (a prompt it is catching up on)."""
        return max(0, len(tokens) - len(self.history))

    def propose(
        self, tokens: Sequence[int], room: int, budget: int | None = None, memory: int | None = None
    ) -> list[int]:
        self.spent = 0
        cap = self.capacity if memory is None else min(self.capacity, memory)
        window = self.backend.model.config.sliding_window
        if cap < 1 or (window is None and cap <= len(tokens)):  # no room for the sequence and a draft
            return []
        if self.cache is None:
            config = self.backend.model.config
            self.cache = KVCache(config, 1, min(64, cap), self.spec.draft.kv, spare=self.spec.num_tokens)  # type: ignore[union-attr]
        cache = self.cache
        fits = self.spec.num_tokens if cache.rolling else cap - len(tokens)  # a window's buffer holds what it needs
        limit = min(self.spec.num_tokens, room, fits)
        if limit <= 0:
            return []
        kept = _common_start(self.history, tokens, self.verified)
        kept = min(kept, len(tokens) - 1)  # at least the last token runs: its logits give the first draft
        self.verified = len(tokens)  # the sequence only grows: these tokens stay its own
        new = len(tokens) - kept
        if budget is not None:
            if new > budget:  # reads as much of what is new as the budget allows, and drafts next time
                if budget > 0:
                    cache.ensure_capacity(kept + budget, limit=cap)
                    with torch.inference_mode():
                        self._feed(list(tokens[kept : kept + budget]), kept)
                    self.history, self.spent = list(tokens[: kept + budget]), budget
                return []
            limit = min(limit, budget - new + 1)
        cache.ensure_capacity(len(tokens) + limit, limit=cap)
        history = list(tokens)
        with torch.inference_mode():
            token = self._feed(history[kept:], kept)
            draft = [token]
            while len(draft) < limit:
                history.append(draft[-1])
                draft.append(self._feed([draft[-1]], len(history) - 1))
        self.history, self.spent = history, new + limit - 1
        return draft

    def _feed(self, tokens: list[int], start: int) -> int:
        """Run `tokens` at positions start.. through the draft model: its greedy next token."""
        model = self.backend.model
        for at in range(0, len(tokens), 512):  # long prompts in chunks, as offline prefill
            chunk = torch.tensor([tokens[at : at + 512]])
            positions = torch.arange(start + at, start + at + chunk.shape[1])[None]
            step = self.backend.decode if chunk.shape[1] == 1 else self.backend.prefill
            hidden = step(chunk, positions, self.cache)  # type: ignore[arg-type]  # made by propose
        logits = model.logits(hidden[:, -1])  # [1,V]
        return int(logits.float().numpy().argmax(axis=-1)[0])

    def update(self, drafted: int, accepted: int) -> None:
        pass


def _common_start(history: Sequence[int], tokens: Sequence[int], known: int) -> int:
    """How many first tokens `history` and `tokens` share, knowing the first `known` are shared."""
    i, end = min(known, len(history), len(tokens)), min(len(history), len(tokens))
    while i < end and history[i] == tokens[i]:
        i += 1
    return i


@dataclass
class SpeculationStats:
    """Counters of a run: verification passes, tokens drafted, drafted tokens kept, tokens emitted."""

    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.passes if self.passes else 0.0


def accept(
    s: SequenceState,
    logits: torch.Tensor,
    draft: Sequence[int],
    drafter: Drafter,
    tokenizer: Tokenizer,
    stats: SpeculationStats,
) -> Iterator[Delta]:
    """Emit the tokens one verification pass gives sequence `s`: logits [len(draft) + 1, V], row j the
    model's prediction after the draft's first j tokens. Stops at the first token decoding would not
    have drafted, or when the sequence finishes."""
    stats.passes += 1
    stats.drafted += len(draft)
    kept = 0
    for j in range(len(draft) + 1):
        row = logits[j : j + 1]  # [1,V]
        wanted = draft[j] if j < len(draft) else None
        token, logprob = _verify(s, row, wanted, tokenizer)
        stats.emitted += 1
        yield s.append(token, logprob)
        if token != wanted or s.finish_reason is not None:
            break
        kept += 1
    stats.accepted += kept
    drafter.update(len(draft), kept)


def _verify(
    s: SequenceState, row: torch.Tensor, drafted: int | None, tokenizer: Tokenizer
) -> tuple[int, TokenLogprob | None]:
    """The token this position emits: decoding's own pick where nothing was drafted or the row is
    greedy; the rejection rule where it samples."""
    if drafted is None or s.params.is_greedy:
        tokens, logprobs = pick_tokens([s], row, tokenizer)
        return int(tokens[0]), logprobs[0]
    probs = processed_logits([s], [s.params], row).float().softmax(dim=-1)[0]  # [V]
    assert s.generator is not None
    if float(torch.rand((), generator=s.generator)) < float(probs[drafted]):
        token = drafted
    else:
        probs[drafted] = 0.0
        token = int(torch.multinomial(probs, 1, generator=s.generator)[0])
    top_n = s.params.logprobs
    if top_n is None:
        return token, None
    chosen, top_ids, top_lp = compute_logprobs(row, torch.tensor([token]), top_n)
    return token, logprob_entries([s.params], torch.tensor([token]), chosen, top_ids, top_lp, tokenizer)[0]
