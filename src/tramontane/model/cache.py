"""KV cache for offline generation: one buffer per layer, owned by the caller.

Every slot remembers the absolute position of the token it holds (-1 = empty), and attention masks
are computed from positions, never from slot indices. That makes padding, chunked prefill and the
rolling buffer one mechanism.

Rolling buffer (sliding window W smaller than the capacity): the buffer has W slots and the token at
position p lives in slot p mod W. Worked example, W = 4, after decoding position 9:

    slot        0  1  2  3
    position    8  9  6  7      (9 mod 4 = 1 overwrote position 5)

The query at position 9 attends positions 6..9: exactly i - W < j <= i (DESIGN.md). With `spare`
slots (speculative decoding: a pass writes k drafted tokens that may be rejected) the buffer has
W + spare slots, so a rejected draft overwrites only positions no later query attends. When a chunk of
T > 1 tokens arrives, the early queries of the chunk may still need slots the chunk's own later tokens
would overwrite, so such chunks attend the old buffer concatenated with the new keys and only then
write their last W tokens. A single decoding token may write first: the slot it overwrites holds
position p - W, which it must not see anyway.
"""

from __future__ import annotations

import abc
import math
import mmap

import numpy as np
import torch

from ..config import ModelConfig
from .kv_types import KvType, kv_type
from .layers import attention_mask

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page


def anonymous_mapping(nbytes: int, huge: bool) -> tuple[mmap.mmap, int]:
    """An anonymous private mapping holding `nbytes` from the offset returned with it: fresh pages read as
    zero and become resident as they are written. `huge`: that offset is a 2 MiB boundary and the whole
    2 MiB pages from it are advised into transparent huge pages; else the mapping is advised out of
    them, so that residency grows 4 KiB at a time."""
    area = mmap.mmap(-1, max(1, nbytes + HUGE_PAGE * huge), flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0))
    skip = -torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE if huge else 0
    try:
        if huge and nbytes >= HUGE_PAGE:
            area.madvise(mmap.MADV_HUGEPAGE, skip, nbytes // HUGE_PAGE * HUGE_PAGE)
        elif not huge:
            area.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):  # no such advice here (another system, a kernel without THP)
        pass
    return area, skip


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype, huge: bool) -> torch.Tensor:
    """Zeros in an anonymous mapping of their own (anonymous_mapping): `huge`, the tensor starts on a
    2 MiB boundary on transparent huge pages (its tail past the last whole one stays on 4 KiB pages)."""
    nbytes = math.prod(shape) * dtype.itemsize
    area, skip = anonymous_mapping(nbytes, huge)
    raw = torch.frombuffer(area, dtype=torch.uint8)  # holds `area` mapped
    return raw[skip : skip + nbytes].view(dtype).view(shape)


def layer_zeros(
    n_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Zeros for every layer's keys and values of the offline cache (`shape` each): views of one mapping
    on transparent huge pages where together they span several (mapped_zeros). The attention reads its
    keys and values row after row, and on 4 KiB pages each 4 KiB took its own page walk: an attention
    over 4M keys of Mistral-7B's shapes from memory ran 12% slower on them, and a decoding token's 136
    keys of one SmolLM2 head (3 queries, a 200 KB layer) 7.0 against 8.4 us, float16 3.3 against 4.1
    (torch.zeros gets 4 KiB pages where the system grants huge ones only on request, as this host does).
    One mapping for all the layers, so that a short context's small layers share huge pages too."""
    per = math.prod(shape)
    if torch.device(device).type != "cpu" or 2 * n_layers * per * dtype.itemsize < 2 * HUGE_PAGE:
        zeros = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * n_layers)]
    else:
        zeros = list(mapped_zeros((2 * n_layers, *shape), dtype, huge=True).unbind(0))
    return zeros[:n_layers], zeros[n_layers:]


class Cache(abc.ABC):
    """What attention reads and writes through, whatever the layout (rolling offline buffer, paged pool).

    A step calls `begin(positions)` once, then, in every layer, `update(layer, k, v)` (store this step's
    keys and values; get back every key the step's queries may look at, with their positions) and
    `mask(q_pos, k_pos, window)` (which of those keys each query sees). Implementations declare
    themselves by subclassing, so a backend can ask `issubclass(kind, KVCache)` and know the layout."""

    @abc.abstractmethod
    def begin(self, positions: torch.Tensor) -> None:
        """Prepare to store the tokens at `positions` [B,T] (-1 = padding)."""

    @abc.abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [B,T,Hkv,D] -> keys, values [B,Hkv,S,D] and their positions [B,S]."""

    @abc.abstractmethod
    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """Boolean [B,1,T,S]: which keys each query may attend."""


class KVCache(Cache):
    """The offline cache: one [B,Hkv,S,D] buffer per layer, rolling when a window is smaller than S. Rows
    are stored as `dtype` (model/kv_types.py: a float dtype or a KV type name such as "q8_0"; a Q8_0
    buffer is uint8 [B,Hkv,S,D/32*34]) and read back as floats."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype | str | KvType = torch.float32,
        device: torch.device | str = "cpu",
        spare: int = 0,
    ) -> None:
        self.kv = kind = kv_type(dtype)
        window = config.sliding_window
        self._window = None if window is None else window + spare  # the slots a rolling buffer keeps
        self.size = capacity if window is None else min(window + spare, capacity)  # W (+ spare) when smaller
        self.rolling = self.size < capacity
        shape = (batch_size, config.n_kv_heads, self.size, kind.width(config.head_dim))  # [B,Hkv,S,D] stored
        self.k, self.v = layer_zeros(config.n_layers, shape, kind.storage, device)
        self.pos = torch.full((batch_size, self.size), -1, dtype=torch.long, device=device)  # [B,S]
        self.layout = 0  # counts the times k, v and pos were replaced (new tensors): compiled steps key on it
        # int32 [B]: each row's prompt length while its prompt is being computed (the offline generator's
        # prefill, score()), else None: a row at a position below it is a prompt row (quant/step.py)
        self.prompts: torch.Tensor | None = None
        self._step: tuple | None = None
        self._one: torch.Tensor | None = None  # a one-token step's positions, until update() asks for _step
        self._span: int | None = None
        self._masks: dict[int | None, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def begin(self, positions: torch.Tensor) -> None:
        """Prepare to store the tokens at `positions` [B,T] (-1 = padding, not stored)."""
        size = self.size
        valid = None
        self._one = None
        if positions.shape[1] == 1 and positions.device.type == "cpu" and self.pos.device.type == "cpu":
            self._begin_one(positions)
            return
        if positions.shape[1] == 1:
            rows, cols, valid = self._one_token(positions)
        else:
            newest = positions.max(dim=1, keepdim=True).values  # [B,1]
            keep = (positions >= 0) & (positions > newest - size)  # only the last S positions stay
            rows, cols = keep.nonzero(as_tuple=True)  # [N] each
        slots = positions[rows, cols].clamp(min=0) % size  # [N]
        concat = self.rolling and positions.shape[1] > 1
        old_pos = self._superseded(positions) if concat else None
        self.pos[rows, slots] = self._keep_old(valid, positions[rows, cols], self.pos[rows, slots])
        # a chunk of a full-size buffer attends only the slots up to its newest position (slot = position):
        # a 512-token chunk early in a 32k-slot buffer reads its prefix, not every empty slot
        self._span = None if self.rolling or positions.shape[1] == 1 else int(positions.max()) + 1
        self._step = (rows, cols, slots, concat, old_pos, positions, valid)
        self._masks = {}  # one mask per step, shared by every layer

    def _begin_one(self, positions: torch.Tensor) -> None:
        """begin() for one token per row (the decoding loop) on the CPU: each row's slot takes its position,
        a padding row (-1) leaves its slot as it was. Written through numpy: once a step's weights have
        streamed through the CPU's caches, every torch call costs tens of microseconds (SmolLM2: 0.3 ms a
        token in the torch form of this, 3% of its decoding step). The indices update() needs are made
        only if a module-path step asks for them (`_step_of_one`)."""
        p = positions.numpy()[:, 0]  # [B]
        pos = self.pos.numpy()  # [B,S], the same memory
        rows = np.arange(p.shape[0])
        slots = np.maximum(p, 0) % self.size
        pos[rows, slots] = np.where(p >= 0, p, pos[rows, slots])
        self._span, self._step, self._one, self._masks = None, None, positions, {}

    @staticmethod
    def _one_token(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows, columns and validity [B] each of a one-token step: every row writes, a padding row (-1)
        rewrites what its slot already holds. No nonzero(), so no host sync."""
        rows = torch.arange(positions.shape[0], device=positions.device)  # [B]
        return rows, torch.zeros_like(rows), positions[:, 0] >= 0

    def _step_of_one(self, positions: torch.Tensor) -> tuple:
        """update()'s view of a step that `_begin_one` began."""
        rows, cols, valid = self._one_token(positions)
        return rows, cols, positions[rows, cols].clamp(min=0) % self.size, False, None, positions, valid

    def _superseded(self, positions: torch.Tensor) -> torch.Tensor:
        """The buffer's positions [B,S] as a chunk at `positions` [B,T] sees them: a slot holding a position
        the chunk stores again (a rejected speculative draft) is hidden (-1), so no query sees two keys
        for one position."""
        first = torch.where(positions >= 0, positions, torch.iinfo(torch.long).max).min(dim=1, keepdim=True).values
        return self.pos.masked_fill(self.pos >= first, -1)  # [B,S]

    @staticmethod
    def _keep_old(valid: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """`new` where the row is valid, else what the slot held ([N] or [N,Hkv,D])."""
        if valid is None:
            return new
        return torch.where(valid.view(-1, *([1] * (new.dim() - 1))), new, old)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v [B,T,Hkv,D] for `layer`; return keys, values [B,Hkv,S',D] and their positions [B,S']."""
        if self._step is None and self._one is not None:
            self._step = self._step_of_one(self._one)
        if self._step is None:
            raise RuntimeError("KVCache.update called before KVCache.begin")
        rows, cols, slots, concat, old_pos, positions, valid = self._step
        kind = self.kv
        if concat:  # the chunk's own keys as the cache gives them back, so every key reads as stored
            keys = torch.cat((kind.decode(self.k[layer]), kind.round_trip(k).transpose(1, 2)), dim=2)  # [B,Hkv,S+T,D]
            values = torch.cat((kind.decode(self.v[layer]), kind.round_trip(v).transpose(1, 2)), dim=2)
            key_pos = torch.cat((old_pos, positions), dim=1)  # [B,S+T]
        ck, cv = self.k[layer], self.v[layer]
        ck[rows, :, slots] = self._keep_old(valid, kind.encode(k[rows, cols]), ck[rows, :, slots])  # [N,Hkv,D]
        cv[rows, :, slots] = self._keep_old(valid, kind.encode(v[rows, cols]), cv[rows, :, slots])
        if concat:
            return keys, values, key_pos
        if self._span is not None:
            n = self._span
            return kind.decode(self.k[layer][:, :, :n]), kind.decode(self.v[layer][:, :, :n]), self.pos[:, :n]
        return kind.decode(self.k[layer]), kind.decode(self.v[layer]), self.pos

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """Which keys each query may see: [B,1,T,S] (the cache decides, as it knows the layout)."""
        if window not in self._masks:
            self._masks[window] = attention_mask(q_pos, k_pos, window)
        return self._masks[window]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (finished sequences leave the batch)."""
        self.k = [t[index] for t in self.k]
        self.v = [t[index] for t in self.v]
        self.pos = self.pos[index]
        self.layout += 1

    def ensure_capacity(self, n_positions: int, limit: int) -> None:
        """Make room for positions 0..n_positions-1 (doubling, at most `limit` slots).

        A rolling buffer never grows. A full-size buffer that grows past the sliding window becomes
        a rolling buffer of W (+ spare) slots, keeping the last of them at slot p mod their number."""
        if self.rolling or n_positions <= self.size:
            return
        target = min(max(n_positions, 2 * self.size), max(limit, n_positions))
        window = self._window
        if window is not None and window < target:
            self._resize(window, rolling=True)
        else:
            self._resize(target, rolling=False)

    def _resize(self, size: int, rolling: bool) -> None:
        old_k, old_v, old_pos = self.k, self.v, self.pos
        b, hkv, _, d = old_k[0].shape
        self.k, self.v = layer_zeros(len(old_k), (b, hkv, size, d), old_k[0].dtype, old_k[0].device)
        self.pos = torch.full((b, size), -1, dtype=torch.long, device=old_pos.device)
        newest = old_pos.max(dim=1, keepdim=True).values  # [B,1]
        keep = (old_pos >= 0) & (old_pos > newest - size)
        rows, cols = keep.nonzero(as_tuple=True)  # [N]
        slots = old_pos[rows, cols] % size
        self.pos[rows, slots] = old_pos[rows, cols]
        for new, old in zip(self.k + self.v, old_k + old_v):
            new[rows, :, slots] = old[rows, :, cols]  # [N,Hkv,D]
        self.size, self.rolling = size, rolling
        self.layout += 1


class PagedCache(Cache):
    """One serving step's view of the paged KV pool: the tokens of many sequences in one row [1,N].

    The pool holds, per layer, keys and values [blocks,Hkv,block_size,D], stored as `kv`
    (model/kv_types.py; a Q8_0 pool's rows are uint8 [...,D/32*34]). Each of the step's R sequences has a
    block table (a row of `tables` [R,T] int32, -1 = no block): its token at position p lives in slot
    tables[r, p // block_size] * block_size + p % block_size, that is offset p % block_size of the block.
    Worked example, block_size 4, table [7, 2, -1]: position 5 -> block 2, offset 1 -> slot 9, kv head h's
    row [2, h, 1]. A -1 is a block not yet needed, or released because it fell out of the sliding window.
    Within a block the rows go head by head, so that a kv head's keys of a block lie together as the
    compiled step's attention reads them (one head of one row at a time): with each slot's heads side by
    side ([slots,Hkv,D], a head's rows 128 of every 384 bytes) the attention of SmolLM2's 16-request
    decoding steps (~80 keys a row) took 1.22-1.56x the time of the same steps' q/k/v projection, head by
    head 1.03-1.11x (builds alternating, 6 runs each).

    Token i of the step belongs to sequence seq[i] and sits at positions[i]; it is a prompt token where
    positions[i] < prompts[seq[i]] (each sequence's prompt length [R], where the runner gives them: a
    recomputed answer's tokens are not). Every token's key and value are stored before any token
    attends; token i then sees its own sequence's positions max(0, p - W + 1) .. p (W the window),
    nothing of the others'. The module path (`update`, `mask`)
    gathers each sequence's keys from the first its tokens may see into one [1,Hkv,S,D] tensor and masks
    across sequences; the compiled step (quant/step.py) reads the pool through the tables instead."""

    def __init__(
        self,
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        block_size: int,
        tables: torch.Tensor,
        seq: torch.Tensor,
        positions: torch.Tensor,
        window: int | None,
        kv: KvType | None = None,
        span: int | None = None,
        prompts: torch.Tensor | None = None,
    ) -> None:
        self.k, self.v, self.block_size, self.window = k, v, block_size, window  # [blocks,Hkv,bs,D] per layer
        self.kv = kv if kv is not None else kv_type(k[0].dtype)
        self.tables, self.seq, self.positions = tables, seq, positions  # [R,T] int32, [N] int32, [N] int64
        self.span = span  # the largest position + 1, where the caller knows it (else read from positions)
        self.prompts = prompts  # [R] int32 or None (no token is a prompt's)
        self._gathered: tuple[torch.Tensor, ...] | None = None
        self._masks: dict[int | None, torch.Tensor] = {}

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What rebuilds this step over another pool with the same blocks (a rank's own heads)."""
        return self.tables, self.seq, self.positions, self.prompts

    def slots(self, seq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pool slot of each (sequence, position) pair: [M] -> [M] int64."""
        size = self.block_size
        return self.tables[seq.long(), positions // size].long() * size + positions % size

    def begin(self, positions: torch.Tensor) -> None:
        pass  # the tables say where every token goes

    def _keys(self) -> tuple[torch.Tensor, ...]:
        """(new slots [N], key slots [S], key positions [S], key sequence [S]): per sequence, the keys
        from the first any of its tokens may see to its newest."""
        if self._gathered is None:
            seq, pos, r = self.seq.long(), self.positions, self.tables.shape[0]
            first = torch.full((r,), torch.iinfo(torch.long).max).scatter_reduce(0, seq, pos, "amin")
            last = torch.full((r,), -1).scatter_reduce(0, seq, pos, "amax")
            lo = (first - self.window + 1).clamp(min=0) if self.window is not None else torch.zeros_like(first)
            counts = (last - lo + 1).clamp(min=0)  # a table with no token here keeps no key
            key_seq = torch.repeat_interleave(torch.arange(r), counts)  # [S]
            starts = torch.cumsum(counts, 0) - counts
            key_pos = torch.arange(len(key_seq)) - starts[key_seq] + lo[key_seq]
            self._gathered = (self.slots(seq, pos), self.slots(key_seq, key_pos), key_pos, key_seq)
        return self._gathered

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [1,N,Hkv,D] -> keys, values [1,Hkv,S,D] and their positions [1,S]."""
        slots, key_slots, key_pos, _ = self._keys()
        pk, pv = self.k[layer], self.v[layer]  # [blocks,Hkv,bs,D]
        size = self.block_size
        new, held = (slots // size, slice(None), slots % size), (key_slots // size, slice(None), key_slots % size)
        pk[new] = self.kv.encode(k[0])  # [N,Hkv,D] into each slot's rows
        pv[new] = self.kv.encode(v[0])
        keys = self.kv.decode(pk[held]).transpose(0, 1)[None]  # [S,Hkv,D] -> [1,Hkv,S,D]
        values = self.kv.decode(pv[held]).transpose(0, 1)[None]
        return keys, values, key_pos[None]

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
        """[1,1,N,S]: same sequence, key not after the query, and inside the window."""
        if window not in self._masks:
            key_seq = self._keys()[3]
            qi, kj = q_pos[0][:, None], k_pos[0][None, :]  # [N,1], [1,S]
            allowed = (self.seq.long()[:, None] == key_seq[None, :]) & (kj <= qi)
            if window is not None:
                allowed &= qi - kj < window
            self._masks[window] = allowed[None, None]
        return self._masks[window]
