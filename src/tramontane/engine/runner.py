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
    pool: BlockPool, tables: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor, window: int | None
) -> PagedCache:
    """The model's view of `pool` for one step (model/cache.py): block tables [R,T], each token's
    sequence [N] and position [N]."""
    return PagedCache(pool.k, pool.v, pool.block_size, tables, seq, positions, window, pool.kv)


def layout(
    pool: BlockPool, batch: Sequence[tuple[EngineSequence, int]], window: int | None
) -> tuple[torch.Tensor, torch.Tensor, PagedCache]:
    """tokens [1,N], positions [1,N] and the step's cache view: batch entry i's n tokens are its next
    uncomputed ones, at positions num_computed .. num_computed + n - 1, read through table row i.
    Two tensors hold everything (views of them: tokens and positions int64, tables and sequence ids
    int32): a step's layout is a per-token cost of the engine, kept to two list-to-tensor copies."""
    width = max(len(seq.blocks) for seq, _ in batch)
    tokens: list[int] = []
    positions: list[int] = []
    ids: list[int] = []  # the tables [R,T] row by row (-1: no block), then each token's sequence [N]
    for seq, n in batch:
        start = seq.num_computed
        tokens += seq.span(start, n)
        positions += range(start, start + n)
        ids += [-1 if b is None else b for b in seq.blocks]
        ids += [-1] * (width - len(seq.blocks))
    for i, (_, n) in enumerate(batch):
        ids += [i] * n
    N, cells = len(tokens), len(batch) * width
    flat = torch.tensor(tokens + positions)  # [2N] int64
    small = torch.tensor(ids, dtype=torch.int32)  # [R*T + N]
    tables, seq_ids = small[:cells].view(len(batch), width), small[cells:]  # [R,T], [N]
    pos = flat[N:]
    return flat[:N][None], pos[None], paged_cache(pool, tables, seq_ids, pos, window)


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
    backend: Backend, pool: BlockPool, batch: Sequence[tuple[EngineSequence, int]], window: int | None
) -> StepOutput:
    """Forward the batch: the hidden states of every token, and the logits of `logit_rows(batch)`.
    Requests with different LoRA adapters (and none) share the step: each token gets its request's
    adapter. Under torchrun the other ranks are told the step first (see `follow`)."""
    tokens, positions, step = layout(pool, batch, window)
    rows, scored, drafted = logit_rows(batch)
    adapters = adapter_rows(batch)
    copies, pool.copied = pool.copied, []  # the prefix cache's slot copies since the last step
    if is_parallel():
        broadcast_object(("step", tokens, positions, step.parts(), rows, adapters, copies))
    began = time.perf_counter()
    hidden, logits = forward_step(backend, tokens, positions, step, rows, adapters)
    return StepOutput(hidden, logits, scored, time.perf_counter() - began, drafted)


def forward_step(
    backend: Backend,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    step: PagedCache,
    rows: list[int],
    adapters: tuple[torch.Tensor, list[str]] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [N,dim] of every token and logits [R,V] of `rows`."""
    model = backend.model
    if adapters is not None:
        from ..lora.layers import set_rows

        set_rows(model, *adapters)
    try:
        with torch.inference_mode():
            h = backend.prefill(tokens, positions, step)[0]  # [N,dim]: prefill chunks and decode tokens together
            return h, model.logits(h[rows])  # [R,V]
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
            tables, seq, at = parts
            pool.apply_copies(copies)
            forward_step(backend, tokens, positions, paged_cache(pool, tables, seq, at, window), rows, adapters)
        elif message[0] == "stop":
            return
