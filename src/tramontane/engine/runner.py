"""The runner: one batched forward pass over the scheduled tokens of many requests, then sampling.

All scheduled tokens are laid out as one row [1,N] (no padding): a prefill chunk of 200 tokens and 15
decode tokens make N = 215. Each layer writes the new keys and values into their pool slots, then
gathers, for every request, the keys it may attend (its whole context, or the last W positions with a
sliding window); the mask keeps each query to its own request and to the causal / window rule."""

from __future__ import annotations

from collections.abc import Sequence

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


def run_step(
    backend: Backend, pool: BlockPool, batch: Sequence[tuple[EngineSequence, int]], window: int | None
) -> torch.Tensor:
    """Forward the batch; return the logits [B,V] after each request's last scheduled token. Requests
    with different LoRA adapters (and none) share the step: each token gets its request's adapter.
    Under torchrun the other ranks are told the step first (see `follow`)."""
    tokens, positions, step, last = layout(pool, batch, window)
    adapters = adapter_rows(batch)
    if is_parallel():
        broadcast_object(("step", tokens, positions, step.parts(), last, adapters))
    return forward_step(backend, tokens, positions, step, last, adapters)


def forward_step(
    backend: Backend,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    step: PagedStep,
    last: list[int],
    adapters: tuple[torch.Tensor, list[str]] | None,
) -> torch.Tensor:
    model = backend.model
    if adapters is not None:
        from ..lora.layers import set_rows

        set_rows(model, *adapters)
    try:
        with torch.inference_mode():
            h = backend.prefill(tokens, positions, step)  # [1,N,dim]: prefill chunks and decode tokens together
            return model.logits(h[0, last])  # [B,V]
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
            _, tokens, positions, parts, last, adapters = message
            forward_step(backend, tokens, positions, PagedStep(pool, *parts), last, adapters)
        elif message[0] == "embed":
            _embed(backend, message[1])
        elif message[0] == "score":
            _prompt_logprobs(backend, message[1], message[2])
        elif message[0] == "stop":
            return


def embed(backend: Backend, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
    """Mean of the final (normed) hidden states over each input's tokens, L2-normalised."""
    if is_parallel():
        broadcast_object(("embed", [list(ids) for ids in token_ids]))
    return _embed(backend, token_ids)


def prompt_logprobs(
    backend: Backend, token_ids: Sequence[Sequence[int]], top: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per prompt, log p(token k | tokens before k) for k = 1..T-1 [T-1], and the `top` most likely ids
    and their log-probabilities at each of those positions [T-1, top] (echo with logprobs, lm-eval)."""
    if is_parallel():
        broadcast_object(("score", [list(ids) for ids in token_ids], top))
    return _prompt_logprobs(backend, token_ids, top)


SCORE_CHUNK = 256  # positions whose vocabulary-wide log-softmax is held at once


def _prompt_logprobs(
    backend: Backend, token_ids: Sequence[Sequence[int]], top: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    model, out = backend.model, []
    with torch.inference_mode():
        for ids in token_ids:
            tokens = torch.tensor([list(ids)])  # [1,T]
            h = backend.prefill(tokens, None, None)[0, :-1]  # [T-1,dim]: k predicts token k+1
            chosen, top_ids, top_lp = [], [], []
            for start in range(0, h.shape[0], SCORE_CHUNK):
                logp = model.logits(h[start : start + SCORE_CHUNK]).log_softmax(-1)  # [C,V]
                nxt = tokens[0, start + 1 : start + 1 + logp.shape[0], None]  # [C,1]
                chosen.append(logp.gather(-1, nxt).squeeze(-1))
                values, indices = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
                top_lp.append(values)
                top_ids.append(indices)
            out.append((torch.cat(chosen), torch.cat(top_ids), torch.cat(top_lp)))
    return out


def _embed(backend: Backend, token_ids: Sequence[Sequence[int]]) -> list[list[float]]:
    out = []
    with torch.inference_mode():
        for ids in token_ids:
            tokens = torch.tensor([list(ids)])  # [1,T]
            h = backend.prefill(tokens, None, None)[0].float()  # [T,dim]
            out.append(torch.nn.functional.normalize(h.mean(dim=0), dim=0).tolist())
    return out
