"""Handing back an idle thread's OpenMP workers, so that the engine thread's keep spinning.

torch and the packed kernels share one OpenMP runtime (GNU libgomp, loaded by torch). libgomp gives
every thread that opens a parallel region its own pool of workers, and when it manages more threads
than the machine has CPUs it stops spinning them between regions: each region's workers are woken
through the kernel instead. The server loads its model in a thread of its own, whose pool's worker
outlived it (the served process had one more thread), so the engine thread's step ran with sleeping
workers. Measured on 2 CPUs: a 1536 x 576 decode matmul took 28-29 us per call from a second thread
beside another thread's idle pool against 14 us, SmolLM2's blocks 2.9 ms per token against 2.3 ms,
and one served client got 171-188 tok/s against 209-214 after. `release_idle_workers()`, called by a
thread that is done computing, frees its pool (OpenMP 5's omp_pause_resource_all, soft: a later
region of that thread starts a new one).

Written here because neither torch nor the OpenMP runtime offers a thread-scoped release through Python;
ctypes reaches the runtime torch already loaded (by its soname), and where there is none (another
runtime, an older libgomp) nothing happens.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Protocol, cast

log = logging.getLogger("tramontane.engine")
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what a restart needs cheap


class _Pause(Protocol):
    def __call__(self, kind: int, /) -> int: ...


@functools.cache
def _pause() -> _Pause | None:
    try:
        runtime = ctypes.CDLL("libgomp.so.1")  # the copy already loaded (torch's), found by its soname
    except OSError:
        return None
    pause = getattr(runtime, "omp_pause_resource_all", None)
    if pause is None:
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return cast(_Pause, pause)


def release_idle_workers() -> bool:
    """Frees the calling thread's OpenMP worker pool (outside any parallel region); True if the runtime
    did, False where it cannot (no libgomp, or one without OpenMP 5's pause)."""
    pause = _pause()
    if pause is None:
        return False
    ok = pause(OMP_PAUSE_SOFT) == 0
    if not ok:
        log.debug("omp_pause_resource_all refused to free this thread's OpenMP workers")
    return ok
