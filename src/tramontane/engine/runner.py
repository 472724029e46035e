"""The runner: one batched forward pass over the scheduled tokens of many requests, then sampling.

All scheduled tokens are laid out as one row [1,N] (no padding): a prefill chunk of 200 tokens and 15
decode tokens make N = 215. Each layer writes the new keys and values into their pool slots, then
gathers, for every request, the keys it may attend (its whole context, or the last W positions with a
sliding window); the mask keeps each query to its own request and to the causal / window rule. The
step hands back every token's final hidden state (embeddings use them) and the logits of the rows
the engine reads: each request's last token, and every token of a scored prompt."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from ..build.backend import select_backend
from ..model import Backend, Cache, Transformer
from ..parallel.dist import broadcast_object, is_parallel
from .blocks import BlockPool
from .scheduler import EngineSequence


class PagedStep(Cache):
    """The cache seen by the model for one step: the block pool through each request's block table."""

    def __init__(
        self,
        pool: BlockPool,
        slots: torch.Tensor,
        key_slots: torch.Tensor,
        key_pos: torch.Tensor,
        key_seq: torch.Tensor,
        query_seq: torch.Tensor,
    ) -> None:
        self.pool, self.slots = pool, slots  # [N] pool slot of each new token
        self.key_slots, self.key_pos, self.key_seq = key_slots, key_pos[None], key_seq  # [S], [1,S], [S]
        self.query_seq = query_seq  # [N]
        self._masks: dict[int | None, torch.Tensor] = {}

    def parts(self) -> tuple[torch.Tensor, ...]:
        """What rebuilds this step over another rank's pool (the same slots, its own heads)."""
        return self.slots, self.key_slots, self.key_pos[0], self.key_seq, self.query_seq

    def begin(self, positions: torch.Tensor) -> None:
        pass  # slots were laid out by the runner

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [1,N,Hkv,D] -> keys, values [1,Hkv,S,D] and their positions [1,S]."""
        pk, pv = self.pool.k[layer], self.pool.v[layer]  # [slots,Hkv,D]
        pk[self.slots] = k[0].to(pk.dtype)
        pv[self.slots] = v[0].to(pv.dtype)
        keys = pk[self.key_slots].transpose(0, 1)[None]  # [S,Hkv,D] -> [1,Hkv,S,D]
        values = pv[self.key_slots].transpose(0, 1)[None]
        return keys, values, self.key_pos

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """[1,1,N,S]: same request, key not after the query, and inside the window."""
        if window not in self._masks:
            qi, kj = q_pos[0][:, None], k_pos[0][None, :]  # [N,1], [1,S]
            allowed = (self.query_seq[:, None] == self.key_seq[None, :]) & (kj <= qi)
            if window is not None:
                allowed &= qi - kj < window
            self._masks[window] = allowed[None, None]
        return self._masks[window]


def _slots(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pool slot of each position: table[p // block_size] * block_size + p % block_size."""
    return table[positions // block_size] * block_size + positions % block_size


def layout(
    pool: BlockPool, batch: Sequence[tuple[EngineSequence, int]], window: int | None
) -> tuple[torch.Tensor, torch.Tensor, PagedStep, list[int]]:
    """tokens [1,N], positions [1,N], the step's cache view, and the row of each request's last token."""
    tokens, positions, slots, key_slots, key_pos, key_seq, query_seq, last = [], [], [], [], [], [], [], []
    offset = 0
    for i, (seq, n) in enumerate(batch):
        start = seq.num_computed
        table = torch.tensor([b if b is not None else -1 for b in seq.blocks])
        pos = torch.arange(start, start + n)
        tokens.append(torch.tensor(seq.tokens[start : start + n]))
        positions.append(pos)
        slots.append(_slots(table, pos, pool.block_size))
        lo = max(0, start - window + 1) if window is not None else 0
        kpos = torch.arange(lo, start + n)
        key_slots.append(_slots(table, kpos, pool.block_size))
        key_pos.append(kpos)
        key_seq.append(torch.full((len(kpos),), i))
        query_seq.append(torch.full((n,), i))
        offset += n
        last.append(offset - 1)
    step = PagedStep(
        pool, torch.cat(slots), torch.cat(key_slots), torch.cat(key_pos), torch.cat(key_seq), torch.cat(query_seq)
    )
    return torch.cat(tokens)[None], torch.cat(positions)[None], step, last


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


def logit_rows(batch: Sequence[tuple[EngineSequence, int]]) -> tuple[list[int], dict[int, slice]]:
    """Rows of the flattened step whose logits are computed: first each request's last scheduled token
    (in batch order), then every token of the scored prompts; and, per scored batch entry, its slice of
    the logits rows."""
    ends = list(itertools.accumulate(n for _, n in batch))
    rows = [end - 1 for end in ends]
    scored: dict[int, slice] = {}
    for i, ((seq, n), end) in enumerate(zip(batch, ends)):
        if seq.request.task == "score":
            scored[i] = slice(len(rows), len(rows) + n)
            rows.extend(range(end - n, end))
    return rows, scored


def run_step(
    backend: Backend, pool: BlockPool, batch: Sequence[tuple[EngineSequence, int]], window: int | None
) -> StepOutput:
    """Forward the batch: the hidden states of every token, and the logits of `logit_rows(batch)`.
    Requests with different LoRA adapters (and none) share the step: each token gets its request's
    adapter. Under torchrun the other ranks are told the step first (see `follow`)."""
    tokens, positions, step, _ = layout(pool, batch, window)
    rows, scored = logit_rows(batch)
    adapters = adapter_rows(batch)
    if is_parallel():
        broadcast_object(("step", tokens, positions, step.parts(), rows, adapters))
    hidden, logits = forward_step(backend, tokens, positions, step, rows, adapters)
    return StepOutput(hidden, logits, scored)


def forward_step(
    backend: Backend,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    step: PagedStep,
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
    backend = select_backend(model, PagedStep, pool.k[0].dtype)
    while True:
        message = broadcast_object(None)
        if message[0] == "step":
            _, tokens, positions, parts, rows, adapters = message
            forward_step(backend, tokens, positions, PagedStep(pool, *parts), rows, adapters)
        elif message[0] == "stop":
            return
