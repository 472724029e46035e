"""The paged KV block pool: storage, allocation, reference counts and the prefix cache.

KV memory is `num_blocks` blocks of `block_size` token slots per layer. A request owns a block table
(list of block ids); the token at position p lives in slot `table[p // block_size] * block_size +
p % block_size`. Worked example, block_size 4, table [7, 2]: position 5 -> block 2, offset 1 -> slot 9.

Prefix caching: once a block is full its key is SHA-256 over (a random salt drawn once per process, model
name, previous block's key, the block's token ids): the salt keeps anyone from computing keys offline
and crafting prompts whose keys collide with another user's. A later request whose prompt starts with the same tokens finds the same keys and
shares those blocks (reference count + 1) instead of recomputing them. A block whose count drops to 0
keeps its key and stays findable until the space is needed (least recently freed goes first).

Partial reuse: a prompt rarely ends on a block boundary, and the block where it parts from a cached
request is only partly its own. So every cached block is also indexed by its place (namespace and the
key of the full block before it, or the start) with the tokens it holds, and a request whose next
tokens are not a whole cached block takes the longest start any block at that place shares with them:
a finished request's part-full last block (a tail: the request's own, claimed as is, since nobody
shares it) or the first slots of another block (copied into a fresh one, since full blocks are shared
and read-only). So the same prompt sent again, or a conversation's next turn, recomputes only what is
new, not up to a block of tokens (llama.cpp's server likewise keeps each slot's last prompt).
Worked example, block_size 4: a request of tokens [5 6 7 8 | 9 10] ends; its tail [9 10] stays at the
place after key(5 6 7 8); the prompt [5 6 7 8 9 10 11] shares the full block, claims the tail and runs
token 11 alone."""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..config import ModelConfig
from ..model.cache import mapped_zeros
from ..model.kv_types import KvType, kv_type

_SALT = secrets.token_bytes(32)  # per process; keys never leave it
Place = tuple[str, bytes | None]  # where a block starts: (namespace, key of the full block before it)


def block_key(model: str, previous: bytes | None, tokens: Sequence[int]) -> bytes:
    h = hashlib.sha256(_SALT)
    h.update(struct.pack("<Q", len(model.encode())))  # length-prefixed: ("ab", ...) never reads as ("a", "b...")
    h.update(model.encode())
    h.update(previous or b"\0" * 32)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype | str | KvType) -> int:
    """K and V for every layer: 2 x layers x block_size x kv_heads x the bytes of a row of head_dim
    (model/kv_types.py: 4 x head_dim for f32, 34 per 32 elements for q8_0)."""
    return 2 * config.n_layers * block_size * config.n_kv_heads * kv_type(dtype).row_bytes(config.head_dim)


def untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros that cost no resident memory until written, 4 KiB page by page (mapped_zeros, advised out of
    transparent huge pages). (torch.zeros writes every byte at once: a server's pool sized to 10% of RAM
    was resident before the first request. numpy's zeros ask for huge pages from 4 MB on: every layer's
    keys and values then became resident 2 MiB at a time, and SmolLM2's 360 MiB pool was 238 MiB
    resident after one 35-token prompt.)"""
    return mapped_zeros(shape, dtype, huge=False)


class BlockPool:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | str | KvType = torch.float32,
    ) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv = kv_type(dtype)  # how rows are stored (model/kv_types.py)
        # [blocks,Hkv,block_size,D] stored (model/cache.py's PagedCache: each block's rows head by head)
        shape = (num_blocks, config.n_kv_heads, block_size, self.kv.width(config.head_dim))
        layers = self._layers = untouched_zeros((2 * config.n_layers, *shape), self.kv.storage)  # [2L,blocks,...]
        self.k, self.v = list(layers[: config.n_layers]), list(layers[config.n_layers :])
        self.refs = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # never hashed; pop() = lowest id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refs 0 but hashed, oldest first
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._at: dict[Place, dict[int, tuple[int, ...]]] = {}  # place -> {cached block: tokens it holds}
        self._place_of: dict[int, Place] = {}
        self.copied: list[tuple[int, int, int]] = []  # (from, to, slots) since the last step: for other ranks
        self.hits = self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (reference count 1), or None when fewer than n are free."""
        if n > self.num_free:
            return None
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._forget(block)
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int | None]) -> None:
        for block in blocks:
            if block is None:
                continue
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self._place_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, key: bytes) -> int | None:
        """A cached block with this key, its reference taken; None on a miss."""
        self.queries += 1
        block = self._by_key.get(key)
        if block is None:
            return None
        self.hits += 1
        if self.refs[block] == 0:
            del self._evictable[block]
        self.refs[block] += 1
        return block

    def register(self, block: int, key: bytes, place: Place, tokens: Sequence[int]) -> None:
        """Make a full block findable by its key (the first block with a given key wins), and its start
        at its place."""
        if key not in self._by_key and block not in self._key_of:
            self._by_key[key] = block
            self._key_of[block] = key
            self._index(block, place, tokens)

    def register_tail(self, block: int, place: Place, tokens: Sequence[int]) -> None:
        """Make the part-full last block of a request that lets it go findable at its place, with the
        tokens its first slots hold. The caller then releases it as usual."""
        if tokens and self.refs[block] == 1 and block not in self._place_of:
            self._index(block, place, tokens)

    def reuse_start(self, place: Place, tokens: Sequence[int]) -> tuple[int, int] | None:
        """A block (reference count 1) whose first n slots hold `tokens[:n]`, n the longest start a cached
        block at `place` shares with them, and n; None when none shares a token (or none is free for a
        copy). A free tail is taken as is; another block's slots are copied into a fresh one."""
        best, n = None, 0
        for block, held in self._at.get(place, {}).items():
            shared = _common_start(held, tokens)
            if shared > n or (shared == n and best is not None and self._claimable(block)):
                best, n = block, shared
        if best is None:
            return None
        if self._claimable(best):
            del self._evictable[best]
            self._forget(best)
            self.refs[best] = 1
            return best, n
        if self.refs[best] == 0:
            del self._evictable[best]
        self.refs[best] += 1  # held while a fresh block is taken: it cannot be the one evicted
        fresh = self.allocate(1)
        if fresh is not None:
            self._copy(best, fresh[0], n)
        self.release([best])
        return None if fresh is None else (fresh[0], n)

    def _claimable(self, block: int) -> bool:
        return self.refs[block] == 0 and block not in self._key_of

    def _copy(self, source: int, target: int, n: int) -> None:
        """The first n slots of block `source` into block `target`, keys and values of every layer."""
        self.apply_copies([(source, target, n)])
        self.copied.append((source, target, n))

    def apply_copies(self, copies: Sequence[tuple[int, int, int]]) -> None:
        """Copy slots between blocks: this pool's own reuse, or another rank's (`copied`) in its order."""
        for source, target, n in copies:
            self._layers[:, target, :, :n] = self._layers[:, source, :, :n]

    def _index(self, block: int, place: Place, tokens: Sequence[int]) -> None:
        self._at.setdefault(place, {})[block] = tuple(tokens)
        self._place_of[block] = place

    def _forget(self, block: int) -> None:
        """Take a block out of the prefix cache's indexes."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._by_key[key]
        place = self._place_of.pop(block, None)
        if place is not None:
            blocks = self._at[place]
            del blocks[block]
            if not blocks:
                del self._at[place]


def _common_start(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
