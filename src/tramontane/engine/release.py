"""What a thread done loading a model hands back: its OpenMP workers (so that the engine thread's keep
spinning) and the heap memory the load freed.

torch and the packed kernels share one OpenMP runtime (GNU libgomp, loaded by torch). libgomp gives
every thread that opens a parallel region its own pool of workers, and when it manages more threads
than the machine has CPUs it stops spinning them between regions: each region's workers are woken
through the kernel instead. The server loads its model in a thread of its own, whose pool's worker
outlived it (the served process had one more thread), so the engine thread's step ran with sleeping
workers. Measured on 2 CPUs: a 1536 x 576 decode matmul took 28-29 us per call from a second thread
beside another thread's idle pool against 14 us, SmolLM2's blocks 2.9 ms per token against 2.3 ms,
and one served client got 171-188 tok/s against 209-214 after. `release_idle_workers()`, called by a
thread that is done computing, frees its pool (OpenMP 5's omp_pause_resource_all, soft: a later
region of that thread starts a new one). `AsyncEngine.start()` calls it for the thread that starts the
engine, which in a script is the one that loaded the model (one request there decoded 72 tok/s
against 291 once released).

Loading also frees much of what it allocated (file reads, conversions) without glibc giving it back
to the system: `return_freed_heap()` asks glibc's malloc_trim to (SmolLM2 Q4_0: 28 MB of a 431 MB
resident set).

Written here because neither torch nor the OpenMP runtime offers a thread-scoped release through Python,
nor Python a heap trim; ctypes reaches the OpenMP runtime torch already loaded (by its soname) and the C
library, and where either is missing (another runtime, an older libgomp, another libc) nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Protocol, cast

log = logging.getLogger("tramontane.engine")
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what a restart needs cheap


class _IntCall(Protocol):  # a C function of one integer, returning an int
    def __call__(self, kind: int, /) -> int: ...


@functools.cache
def _c_function(library: str, name: str, argtype: type) -> _IntCall | None:
    """`name` of the shared library `library` (the copy already loaded, found by its soname), taking one
    integer of `argtype` and returning an int; None where the library or the function is missing."""
    try:
        function = getattr(ctypes.CDLL(library), name, None)
    except OSError:
        return None
    if function is None:
        return None
    function.argtypes, function.restype = [argtype], ctypes.c_int
    return cast(_IntCall, function)


def release_idle_workers() -> bool:
    """Frees the calling thread's OpenMP worker pool (outside any parallel region); True if the runtime
    did, False where it cannot (no libgomp, or one without OpenMP 5's pause)."""
    pause = _c_function("libgomp.so.1", "omp_pause_resource_all", ctypes.c_int)  # torch's copy
    if pause is None:
        return False
    ok = pause(OMP_PAUSE_SOFT) == 0
    if not ok:
        log.debug("omp_pause_resource_all refused to free this thread's OpenMP workers")
    return ok


def return_freed_heap() -> bool:
    """Gives the heap's free pages back to the system (glibc's malloc_trim(0)); True if any were."""
    trim = _c_function("libc.so.6", "malloc_trim", ctypes.c_size_t)
    return trim is not None and trim(0) == 1
