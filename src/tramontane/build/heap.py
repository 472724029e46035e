"""The C heap keeps what a forward frees for the next one (glibc's malloc, through `mallopt`).

A forward over many rows (a prompt, a batch on the module path) allocates its activations afresh at
every operation: torch asks malloc for each tensor and frees it a few operations later. glibc serves a
block of 128 KB or more (its starting threshold, which it raises as such blocks are freed) with a
mapping of its own, unmapped again at free, and hands the top of its heap back to the system past
128 KB free: the next forward's tensors are new pages, each faulted in and zeroed by the kernel. On a
bfloat16 model's 512-token prefill (1024 hidden, 16 layers, 2 CPUs) the kernel's page faults and
zeroing took 14% of the samples (perf), and the prefill ran at 566-675 tok/s against 752-779 with the
heap keeping its blocks (the settings below, alternating processes), the same peak RSS (0.81-0.83 GB);
the packed models' steps, which allocate little, ran alike.

`keep_freed_memory()` sets the two thresholds once per process: blocks up to 32 MiB (glibc's largest
mapping threshold on 64-bit) come from the heap, and up to 64 MiB of free heap top stays there.
`load_model` calls it once the model is built: called before, it had kept the load's own freed blocks
(a Mistral-7B-shaped Q4_0 file: 6.32 GB resident after the load against 4.31 GB). What a load frees is
still handed back on request (engine/release.py's malloc_trim). Written here because
neither Python nor torch sets malloc's parameters; ctypes reaches the C library already loaded, and
where there is none (another libc) nothing happens.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1  # malloc.h's parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more
TRIM_THRESHOLD = 64 << 20


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process: malloc keeps freed blocks up to MMAP_THRESHOLD in its heap and up to
    TRIM_THRESHOLD of free heap top; True where glibc took both settings."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trimmed = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mapped and trimmed)
