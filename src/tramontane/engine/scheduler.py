"""The scheduler: pure Python bookkeeping that decides, each step, how many tokens of which requests run.

Every request has a list of tokens (prompt + output) of which `num_computed` already have KV in the
pool. A step runs tokens[num_computed : num_computed + n]: a prefill chunk, one decode token, or the
recomputation of a preempted request; when a request's last token has run, a new one is sampled.
Running requests go first, oldest first (decode steps and prefill chunks mix in one batch up to
`max_num_batched_tokens`); waiting requests join while the token budget and blocks last. When blocks run
out, the youngest running request is preempted: its blocks are released and it waits to be recomputed.
A request admitted from the prefix cache also takes the longest start of a cached block where its
tokens part from it (blocks.py: partial reuse), so the same prompt again recomputes its last token only.

Background requests (embeddings and prompt scoring: `EngineRequest.task`) wait in their own queue and
run in the budget generation leaves, capped per step by `schedule(background_budget)`; they never
start from the prefix cache, since their every position's output is wanted.

Speculative decoding: a decoding request with a `draft` (its next tokens as guessed, set before the
step) runs its last token and the draft in one step. The draft's keys and values are written but not
counted in `num_computed` until verification keeps them (`accepted`), so a block is published to the
prefix cache only once its tokens are the request's own; a rejected draft's slots are rewritten by the
next steps before any query sees them."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from ..decoding.sequence import SequenceState
from ..decoding.speculative import Drafter
from .blocks import BlockPool, Place, block_key
from .types import EngineRequest

_arrivals = itertools.count()


@dataclass(eq=False)
class EngineSequence:
    request: EngineRequest
    state: SequenceState
    arrival: int = field(default_factory=lambda: next(_arrivals))
    blocks: list[int | None] = field(default_factory=list)  # None: released, fell out of the window
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks so far
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False
    drafter: Drafter | None = None  # speculative decoding's drafts for this request, if it speculates
    draft: list[int] = field(default_factory=list)  # this step's guessed next tokens (not yet verified)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def background(self) -> bool:
        return self.request.task != "generate"

    @property
    def tokens(self) -> list[int]:
        return self.state.prompt + self.state.output

    @property
    def num_tokens(self) -> int:
        return len(self.state.prompt) + len(self.state.output)

    def span(self, start: int, n: int) -> list[int]:
        """(tokens + draft)[start : start + n], without joining prompt and output (a step's few tokens of a
        long request)."""
        prompt, output, end = self.state.prompt, self.state.output, start + n
        cut, total = len(prompt), self.num_tokens
        if start >= cut:
            head = output[start - cut : end - cut]
        else:
            head = prompt[start:end] + (output[: end - cut] if end > cut else [])
        return head + self.draft[max(0, start - total) : end - total] if end > total else head


class Scheduler:
    def __init__(
        self, pool: BlockPool, *, model_name: str, window: int | None, max_num_batched_tokens: int, max_running: int
    ) -> None:
        self.pool, self.model_name, self.window = pool, model_name, window
        self.max_batched, self.max_running = max_num_batched_tokens, max_running
        self.waiting: deque[EngineSequence] = deque()
        self.background: deque[EngineSequence] = deque()  # embeddings / scoring, admitted after `waiting`
        self.running: list[EngineSequence] = []
        self.preemptions = 0

    # ---- membership ----------------------------------------------------------------------------------
    def add(self, seq: EngineSequence) -> None:
        self._queue_of(seq).append(seq)

    def remove(self, seq: EngineSequence) -> None:
        """Take a request out (finished or aborted) and release its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self._queue_of(seq):
            self._queue_of(seq).remove(seq)
        self._keep_tail(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    def never_fits(self, seq: EngineSequence) -> bool:
        """True when even an empty pool cannot hold what this request needs for its next token."""
        return self._blocks_needed(seq, seq.num_tokens) > self.pool.num_blocks

    # ---- one step ------------------------------------------------------------------------------------
    def schedule(
        self, background_budget: int | None = None
    ) -> tuple[list[tuple[EngineSequence, int]], list[EngineSequence]]:
        """(sequence, n_tokens) pairs to run now, and requests that can never fit (to end with `length`).
        Background tokens are at most `background_budget` (None: whatever budget is left)."""
        budget = self.max_batched
        spare = budget if background_budget is None else max(0, min(background_budget, budget))
        chosen: list[tuple[EngineSequence, int]] = []
        hopeless: list[EngineSequence] = []
        for seq in sorted(self.running, key=lambda s: s.background):  # generation first, each in age order
            limit = min(budget, spare) if seq.background else budget
            if limit == 0:
                if budget == 0:
                    break
                continue
            if seq not in self.running:  # preempted by an older request this step
                continue
            n = self._chunk(seq, limit)
            del seq.draft[max(0, seq.num_computed + n - seq.num_tokens) :]  # what the budget leaves of it
            if seq.draft and not self._reserve(seq, seq.num_computed + n):  # a guess never preempts anyone
                n, seq.draft = n - len(seq.draft), []
            if self._make_room(seq, seq.num_computed + n, chosen):
                chosen.append((seq, n))
                budget -= n
                spare -= n if seq.background else 0
            elif seq in self.running:  # alone and still too big: it can never fit
                self.running.remove(seq)
                hopeless.append(seq)
        generating = sum(not s.background for s in self.running)
        while self.waiting and budget > 0 and generating < self.max_running:
            seq = self.waiting[0]
            if self.never_fits(seq):
                hopeless.append(self.waiting.popleft())
                continue
            if not seq.blocks:
                self._take_prefix(seq)
            n = self._chunk(seq, budget)
            if not self._admit(seq, n, self.waiting):
                self._drop_prefix(seq)
                break
            chosen.append((seq, n))
            budget -= n
            generating += 1
        while self.background and min(budget, spare) > 0:
            seq = self.background[0]
            if self.never_fits(seq):
                hopeless.append(self.background.popleft())
                continue
            n = self._chunk(seq, min(budget, spare))
            if not self._admit(seq, n, self.background):
                break
            chosen.append((seq, n))
            budget -= n
            spare -= n
        return chosen, hopeless

    def _admit(self, seq: EngineSequence, n: int, queue: deque[EngineSequence]) -> bool:
        """Move the head of `queue` to running with blocks for its next n tokens; False when short."""
        if not self._reserve(seq, seq.num_computed + n):
            return False
        queue.popleft()
        self.running.append(seq)
        seq.admitted = True
        return True

    def after_step(self, ran: list[tuple[EngineSequence, int]]) -> None:
        """Count the tokens that ran (a draft's once verified), publish newly full blocks, release blocks
        out of the window."""
        for seq, n in ran:
            seq.num_computed += n - len(seq.draft)
            self._publish(seq)

    def accepted(self, seq: EngineSequence, kept: int) -> None:
        """Verification kept the first `kept` tokens of the request's draft (now in its output): their keys
        and values count; the draft is done."""
        seq.num_computed += kept
        seq.draft = []
        self._publish(seq)

    def _publish(self, seq: EngineSequence) -> None:
        size = self.pool.block_size
        for i in range(len(seq.keys), seq.num_computed // size):
            place, tokens = self._place(seq, i), seq.span(i * size, size)
            key = block_key(*place, tokens)
            seq.keys.append(key)
            block = seq.blocks[i]
            if block is not None:
                self.pool.register(block, key, place, tokens)
        self._release_out_of_window(seq)

    # ---- helpers -------------------------------------------------------------------------------------
    def _namespace(self, seq: EngineSequence) -> str:
        """Prefix-cache keys of requests with a LoRA adapter differ from the base model's (and from
        other adapters'): adapters on wk/wv change the cached keys and values. A request's cache salt
        keeps its blocks apart from those of other salts, or none (one tenant's prompts cannot be
        probed through another's cache hits, now that hits count single tokens)."""
        adapter, salt = seq.request.adapter, seq.request.cache_salt
        name = self.model_name if adapter is None else f"{self.model_name}\0lora:{adapter}"
        return name if salt is None else f"{name}\0salt:{salt}"

    def _blocks_needed(self, seq: EngineSequence, upto: int) -> int:
        size = self.pool.block_size
        total = -(-upto // size)
        if self.window is None:
            return total
        return min(total, -(-self.window // size) + 1)

    def _chunk(self, seq: EngineSequence, budget: int) -> int:
        """Tokens to run now: what is left, within the step's budget and what the whole pool can hold
        (with a window, blocks before it are released, so long prompts still go through in pieces)."""
        size = self.pool.block_size
        released = sum(1 for b in seq.blocks if b is None)
        room = (self.pool.num_blocks + released) * size - seq.num_computed
        return max(1, min(seq.num_tokens + len(seq.draft) - seq.num_computed, budget, room))

    def _drop_prefix(self, seq: EngineSequence) -> None:
        """Give back what an admission attempt or a preempted request held, to try again later (its part-full
        last block stays findable: the retry finds it)."""
        self._keep_tail(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.keys, seq.num_computed, seq.draft = [], [], 0, []

    def _reserve(self, seq: EngineSequence, upto: int) -> bool:
        """Blocks for positions < upto; False (nothing taken) when the pool is short."""
        missing = -(-upto // self.pool.block_size) - len(seq.blocks)
        if missing <= 0:
            return True
        fresh = self.pool.allocate(missing)
        if fresh is None:
            return False
        seq.blocks.extend(fresh)
        return True

    def _make_room(self, seq: EngineSequence, upto: int, chosen: list[tuple[EngineSequence, int]]) -> bool:
        """Reserve for `seq`, preempting the youngest other running requests not yet scheduled, background
        ones first (and only those for a background request)."""
        scheduled = {s for s, _ in chosen}
        while not self._reserve(seq, upto):
            victims = [s for s in self.running if s is not seq and s not in scheduled]
            victims = [s for s in victims if s.background] if seq.background else victims
            if not victims:
                if len(self.running) > 1 or scheduled:
                    self._preempt(seq)  # others hold the blocks: wait for them
                return False
            self._preempt(max(victims, key=lambda s: (s.background, s.arrival)))
        return True

    def _queue_of(self, seq: EngineSequence) -> deque[EngineSequence]:
        return self.background if seq.background else self.waiting

    def _preempt(self, seq: EngineSequence) -> None:
        self.running.remove(seq)
        self._drop_prefix(seq)
        self._queue_of(seq).appendleft(seq)
        self.preemptions += 1

    def _take_prefix(self, seq: EngineSequence) -> None:
        """Share the cached blocks that start this request's tokens, then the longest start of a cached
        block where they part; at least one token is left to run."""
        size, tokens = self.pool.block_size, seq.tokens
        for i in range(len(tokens) // size):
            key = block_key(*self._place(seq, i), tokens[i * size : (i + 1) * size])
            block = self.pool.lookup(key)
            if block is None:
                break
            seq.blocks.append(block)
            seq.keys.append(key)
        if seq.blocks and len(seq.blocks) * size >= len(tokens):
            self.pool.release([seq.blocks.pop()])
            seq.keys.pop()
        start = seq.num_computed = len(seq.blocks) * size
        reused = self.pool.reuse_start(self._place(seq, len(seq.blocks)), tokens[start : len(tokens) - 1])
        if reused is not None:  # part of a block (the last token always runs: its logits are wanted)
            seq.blocks.append(reused[0])
            seq.num_computed += reused[1]
        if not seq.admitted:
            seq.num_cached = min(seq.num_computed, len(seq.state.prompt))

    def _place(self, seq: EngineSequence, i: int) -> Place:
        """Where block i of the request starts, for the prefix cache: its namespace and block i - 1's key."""
        return self._namespace(seq), seq.keys[i - 1] if i else None

    def _keep_tail(self, seq: EngineSequence) -> None:
        """Index the part-full last block of a request about to let its blocks go, with its computed tokens."""
        i, held = divmod(seq.num_computed, self.pool.block_size)
        block = seq.blocks[i] if held and i < len(seq.blocks) and len(seq.keys) >= i else None
        if block is not None:
            self.pool.register_tail(block, self._place(seq, i), seq.span(i * self.pool.block_size, held))

    def _release_out_of_window(self, seq: EngineSequence) -> None:
        """Blocks whose every position is outside the window of the next query can go."""
        if self.window is None:
            return
        first_needed = seq.num_computed - self.window + 1  # oldest key the next query attends
        for i in range(min(len(seq.blocks), max(0, first_needed) // self.pool.block_size)):
            if seq.blocks[i] is not None:
                self.pool.release([seq.blocks[i]])
                seq.blocks[i] = None
