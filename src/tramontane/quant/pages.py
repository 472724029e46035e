"""Packed weights' memory on transparent huge pages.

Decoding streams every weight once per token, and on 4 KiB pages each 4 KiB of it takes its own page
walk (a 7B model is a million pages: far past any TLB) while the hardware prefetchers' streams stop at
each page's end. The matrices the loader makes anew (interleaved by `regroup`, stacked by
`PackedLinear.concat`) are carved from anonymous mappings advised into huge pages (`huge_empty`),
CHUNK bytes at a time, so that SmolLM2's 0.2-1 MiB matrices share them too (torch's own allocations
get 4 KiB pages where the system grants huge ones only on request, as most do: THP "madvise"). Measured
on a Zen 4 whose memory other guests share (2 threads, 5 pairs of alternating processes): a
Mistral-7B-shaped Q4_0 file's decode 6.3-8.3 -> 7.7-12.2 tok/s, faster in each pair (4 GB a token: up to
48 GB/s), peak RSS 4.31 -> 4.41 GB, the load alike (9.2-17.8 against 11.3-12.7 s, Q4_K_M); SmolLM2 Q4_0
decode medians 211 -> 247 tok/s in a noisy hour; the decoding matmuls of its 30 blocks alone, back to
back from DRAM, 2.51 -> 2.22 ms (median). A mapping is unmapped when the last matrix carved from it
goes: the allocator keeps only a weak reference to the one it carves from. Written here because neither
torch nor Python offers a huge-page allocator (torch's THP_MEM_ALLOC_ENABLE, an environment switch read
once per process, advises only allocations of 2 MiB and more: SmolLM2's block matrices stay on 4 KiB
pages under it)."""

from __future__ import annotations

import mmap
import weakref

import torch

from ..model.cache import HUGE_PAGE, anonymous_mapping

CHUNK = 64 << 20  # bytes a mapping carves matrices from (a larger matrix gets one of its own)
ALIGN = 4096  # each matrix starts on a page of its own


class _Carver:
    """Hands out consecutive slices of one mapping at a time (a weak reference: the slices keep it)."""

    def __init__(self) -> None:
        self._area: weakref.ref[mmap.mmap] | None = None
        self._at = self._end = 0

    def take(self, nbytes: int) -> torch.Tensor:
        size = -(-nbytes // ALIGN) * ALIGN
        area = self._area() if self._area is not None else None
        if area is None or self._at + size > self._end:
            area = self._map(max(CHUNK, size))
        out = (
            torch.frombuffer(area, dtype=torch.uint8, count=nbytes, offset=self._at)
            if nbytes
            else torch.empty(0, dtype=torch.uint8)
        )
        self._at += size
        return out

    def _map(self, size: int) -> mmap.mmap:
        """A new mapping of `size` usable bytes (whole huge pages) from a 2 MiB boundary, advised into them."""
        size = -(-size // HUGE_PAGE) * HUGE_PAGE
        area, skip = anonymous_mapping(size, huge=True)
        self._area, self._at, self._end = weakref.ref(area), skip, skip + size
        return area


_carver = _Carver()


def huge_empty(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes], uninitialized (fresh pages read as zero), on transparent huge pages where the system
    grants them; its own 4 KiB-aligned part of a mapping that lives as long as any tensor carved from it."""
    return _carver.take(nbytes)
