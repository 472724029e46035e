"""The runner: one batched forward pass over the scheduled tokens of many requests, then sampling.

All scheduled tokens are laid out as one row [1,N] (no padding): a prefill chunk of 200 tokens and 15
decode tokens make N = 215, read and written through the requests' block tables (model/cache.py's
`PagedCache`: the module path gathers each request's keys, the compiled step reads the pool). The
step hands back every token's final hidden state (embeddings use them) and the logits of the rows
the engine reads: each request's last token, every token of a scored prompt, and the tokens before
the last of a request verifying a speculative draft."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..build.backend import select_backend
from ..model import Backend, PagedCache, Transformer
from ..parallel.dist import broadcast_object, is_parallel
from .blocks import BlockPool
from .scheduler import EngineSequence


def paged_cache(
    pool: BlockPool,
    tables: torch.Tensor,
    seq: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    span: int | None = None,
    prompts: torch.Tensor | None = None,
) -> PagedCache:
    """The model's view of `pool` for one step (model/cache.py): block tables [R,T], each token's
    sequence [N] and position [N]; `span`, the largest position + 1, where known; each sequence's
    prompt length [R]."""
    return PagedCache(pool.k, pool.v, pool.block_size, tables, seq, positions, window, pool.kv, span, prompts)


_Views = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class StepBuffers:
    """Where an engine writes its steps' layouts: an int64 buffer (tokens, then positions) and an int32
    one (block tables row by row, each token's sequence, then each sequence's prompt length), made once
    and grown when a step needs more, with the torch views a step of N tokens over R tables of width T
    hands out made once per (N, R, T). A step then fills them through numpy and calls no torch function:
    each costs 20-60 us once the step's weights have flushed the CPU's caches (SmolLM2 served: the 9 the
    layout called took ~0.25 ms of a 9.5 ms token). A step's tensors hold its layout until the next step
    is laid out."""

    def __init__(self) -> None:
        self._longs = torch.empty(0, dtype=torch.int64)
        self._ints = torch.empty(0, dtype=torch.int32)
        self._arrays = (self._longs.numpy(), self._ints.numpy())  # the same memory, written through numpy
        self._views: dict[tuple[int, int, int], _Views] = {}

    def fill(self, longs: list[int], ints: list[int], n: int, rows: int, width: int) -> _Views:
        """tokens [1,N], positions [1,N] and [N] (int64), tables [R,T], sequence ids [N] and prompt
        lengths [R] (int32), holding `longs` (N tokens, N positions) and `ints` (R*T cells, N ids, R lengths)."""
        if len(longs) > self._longs.numel() or len(ints) > self._ints.numel():
            self._longs = torch.empty(max(len(longs), 2 * self._longs.numel(), 64), dtype=torch.int64)
            self._ints = torch.empty(max(len(ints), 2 * self._ints.numel(), 64), dtype=torch.int32)
            self._arrays = (self._longs.numpy(), self._ints.numpy())
            self._views.clear()
        self._arrays[0][: len(longs)] = longs
        self._arrays[1][: len(ints)] = ints
        views = self._views.get((n, rows, width))
        if views is None:
            if len(self._views) >= 256:  # many shapes seen: start over rather than grow without end
                self._views.clear()
            flat, small, cells = self._longs, self._ints, rows * width
            pos = flat[n : 2 * n]
            tables, ids, prompts = small[:cells].view(rows, width), small[cells : cells + n], small[cells + n :][:rows]
            views = (flat[:n][None], pos[None], pos, tables, ids, prompts)
            self._views[(n, rows, width)] = views
        return views


def layout(
    pool: BlockPool,
    batch: Sequence[tuple[EngineSequence, int]],
    window: int | None,
    buffers: StepBuffers | None = None,
) -> tuple[torch.Tensor, torch.Tensor, PagedCache]:
    """tokens [1,N], positions [1,N] and the step's cache view: batch entry i's n tokens are its next
    uncomputed ones, at positions num_computed .. num_computed + n - 1, read through table row i.
    The tensors are views of `buffers` (an engine's own: they stay valid until its next step; None: new
    ones): tokens and positions int64, tables, sequence ids and each request's prompt length int32."""
    width = max(len(seq.blocks) for seq, _ in batch)
    tokens: list[int] = []
    positions: list[int] = []
    ids: list[int] = []  # the tables [R,T] row by row (-1: no block), each token's sequence [N], prompts [R]
    for seq, n in batch:
        start = seq.num_computed
        tokens += seq.span(start, n)
        positions += range(start, start + n)
        ids += [-1 if b is None else b for b in seq.blocks]
        ids += [-1] * (width - len(seq.blocks))
    for i, (_, n) in enumerate(batch):
        ids += [i] * n
    ids += [len(seq.state.prompt) for seq, _ in batch]
    span = max(seq.num_computed + n for seq, n in batch)
    views = (buffers or StepBuffers()).fill(tokens + positions, ids, len(tokens), len(batch), width)
    tokens_t, positions_t, pos, tables, seq_ids, prompts = views
    return tokens_t, positions_t, paged_cache(pool, tables, seq_ids, pos, window, span, prompts)


def adapter_rows(batch: Sequence[tuple[EngineSequence, int]]) -> tuple[torch.Tensor, list[str]] | None:
    """Per token of the flattened step, the slot of its request's LoRA adapter in `names` (-1 = none);
    None when no request of the step has one."""
    names = sorted({seq.request.adapter for seq, _ in batch if seq.request.adapter is not None})
    if not names:
        return None
    slot = {name: i for i, name in enumerate(names)}
    rows = [slot[seq.request.adapter] if seq.request.adapter is not None else -1 for seq, _ in batch]
    counts = torch.tensor([n for _, n in batch])
    return torch.tensor(rows).repeat_interleave(counts), names  # [N]


class StepOutput(NamedTuple):
    hidden: torch.Tensor  # [N,dim] final normed hidden states of every scheduled token
    logits: torch.Tensor  # [R,V] of the rows `logit_rows` named
    scored: dict[int, slice]  # per scored batch entry, its slice of `logits` (logit_rows)
    seconds: float  # the forward's wall time (model and logits)
    drafted: dict[int, slice] = {}  # per batch entry verifying a draft, its rows before its last (logit_rows)
    tokens: torch.Tensor | None = None  # [R] each row's greedy token, where a `greedy` step's backend picked
    # them from the hidden states (Backend.greedy); `logits` is then empty

    def verify_logits(self, i: int) -> torch.Tensor:
        """Batch entry i's logits for verifying its draft of k tokens: [k + 1, V], in order."""
        return torch.cat((self.logits[self.drafted[i]], self.logits[i : i + 1]))


def logit_rows(batch: Sequence[tuple[EngineSequence, int]]) -> tuple[list[int], dict[int, slice], dict[int, slice]]:
    """Rows of the flattened step whose logits are computed: first each request's last scheduled token
    (in batch order), then every token of the scored prompts, then the tokens before the last of the
    requests verifying a draft; and, per scored and per drafted batch entry, its slice of the rows."""
    ends = list(itertools.accumulate(n for _, n in batch))
    rows = [end - 1 for end in ends]
    scored: dict[int, slice] = {}
    drafted: dict[int, slice] = {}
    for i, ((seq, n), end) in enumerate(zip(batch, ends)):
        if seq.request.task == "score":
            scored[i] = slice(len(rows), len(rows) + n)
            rows.extend(range(end - n, end))
    for i, ((seq, _), end) in enumerate(zip(batch, ends)):
        if seq.draft:
            k = len(seq.draft)
            drafted[i] = slice(len(rows), len(rows) + k)
            rows.extend(range(end - k - 1, end - 1))
    return rows, scored, drafted


def run_step(
    backend: Backend,
    pool: BlockPool,
    batch: Sequence[tuple[EngineSequence, int]],
    window: int | None,
    buffers: StepBuffers | None = None,
    greedy: tuple[tuple[int, float], ...] | None = None,
) -> StepOutput:
    """Forward the batch: the hidden states of every token, and the logits of `logit_rows(batch)`.
    Requests with different LoRA adapters (and none) share the step: each token gets its request's
    adapter. Under torchrun the other ranks are told the step first (see `follow`). `buffers`: where
    the engine's steps are laid out (`StepBuffers`). greedy: where each row's token is the plain argmax of
    its logits plus this logit_bias (all rows share it) and nothing else reads them
    (decoding.sequence.greedy_bias); in a decoding step where the backend picks them without every
    logit, the output holds the tokens instead of the logits."""
    tokens, positions, step = layout(pool, batch, window, buffers)
    rows, scored, drafted = logit_rows(batch)
    adapters = adapter_rows(batch)
    copies, pool.copied = pool.copied, []  # the prefix cache's slot copies since the last step
    if is_parallel():
        broadcast_object(("step", tokens, positions, step.parts(), rows, adapters, copies))
    began = time.perf_counter()
    greedy = None if scored or drafted or is_parallel() else greedy
    hidden, logits, picked = forward_step(backend, tokens, positions, step, rows, adapters, greedy)
    return StepOutput(hidden, logits, scored, time.perf_counter() - began, drafted, picked)


def forward_step(
    backend: Backend,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    step: PagedCache,
    rows: list[int],
    adapters: tuple[torch.Tensor, list[str]] | None,
    greedy: tuple[tuple[int, float], ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hidden states [N,dim] of every token and logits [R,V] of `rows`; with `greedy` (a logit_bias every
    row shares) in a decoding step (one row a token), where the backend picks each row's token without
    every logit (Backend.greedy), those tokens [R] and empty logits instead."""
    model = backend.model
    if adapters is not None:
        from ..lora.layers import set_rows

        set_rows(model, *adapters)
    try:
        with torch.inference_mode():
            h = backend.prefill(tokens, positions, step)[0]  # [N,dim]: prefill chunks and decode tokens together
            every = len(rows) == h.shape[0] and rows == list(range(len(rows)))  # a decoding step: no copy
            picked = backend.greedy(h, greedy) if greedy is not None and every else None
            if picked is not None:
                return h, h.new_empty(0, 0), picked
            return h, model.logits(h if every else h[rows]), None  # [R,V]
    finally:
        if adapters is not None:
            set_rows(model, None, [])


def follow(model: Transformer, pool: BlockPool) -> None:
    """A rank > 0 of a sharded server: run every step rank 0 announces, on this rank's part of the model
    and its own KV pool (same slots, its own heads), until rank 0 stops. The backend is chosen as rank
    0's engine chooses it."""
    backend = select_backend(model, PagedCache, pool.kv)
    window = model.config.sliding_window
    while True:
        message = broadcast_object(None)
        if message[0] == "step":
            _, tokens, positions, parts, rows, adapters, copies = message
            tables, seq, at, prompts = parts
            pool.apply_copies(copies)
            step = paged_cache(pool, tables, seq, at, window, prompts=prompts)
            forward_step(backend, tokens, positions, step, rows, adapters)
        elif message[0] == "stop":
            return
