"""engine/release.py: a thread done loading hands its OpenMP workers back (libgomp stops spinning its
workers between regions while it manages more threads than there are CPUs: the engine thread's step
ran 0.5 ms slower per SmolLM2 token beside the server's loader thread's idle pool), and the heap
memory the load freed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, threading, time
    import torch
    from tramontane.engine.release import release_idle_workers
    from tramontane.quant import kernels

    torch.set_num_threads(2)
    tasks = lambda: len(os.listdir("/proc/self/task"))
    a = torch.randn(512, 512)
    out = {}

    def work():
        first = a @ a  # opens this thread's OpenMP pool
        out["with_pool"] = tasks()
        out["released"] = release_idle_workers()
        deadline = time.monotonic() + 30
        while tasks() >= out["with_pool"] and time.monotonic() < deadline:
            time.sleep(0.01)
        out["after"] = tasks()
        out["same"] = torch.equal(a @ a, first)  # a later region starts a new pool

    t = threading.Thread(target=work)
    t.start()
    t.join()
    print(out["with_pool"], out["after"], out["released"], out["same"])
    """
)


def test_a_released_thread_frees_its_workers_and_still_computes():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # make test runs one thread per worker; this pool needs two
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    with_pool, after, released, same = done.stdout.split()
    assert released == "True" and same == "True"
    assert int(after) < int(with_pool)  # the pool's worker thread is gone


TRIM = textwrap.dedent(
    """
    import re
    from tramontane.engine.release import return_freed_heap

    anon = lambda: int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
    blocks = [bytes(4000) for _ in range(40_000)]  # 160 MB from malloc, below ...
    pin = bytes(4000)  # ... one block that keeps the heap's top in use
    before = anon()
    del blocks
    freed = anon()
    print(before, freed, return_freed_heap(), anon())
    """
)


def test_freed_heap_goes_back_to_the_system():
    """Memory a load freed below the heap's top stays resident until malloc_trim hands it back."""
    done = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    before, freed, trimmed, after = done.stdout.split()
    assert trimmed == "True" and int(freed) > int(before) - 40  # free() alone kept most of it
    assert int(after) < int(freed) - 100  # MB given back
