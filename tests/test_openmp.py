"""engine/openmp.py: a thread done computing hands its OpenMP workers back (libgomp stops spinning its
workers between regions while it manages more threads than there are CPUs: the engine thread's step
ran 0.5 ms slower per SmolLM2 token beside the server's loader thread's idle pool)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, threading, time
    import torch
    from tramontane.engine.openmp import release_idle_workers
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
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with_pool, after, released, same = done.stdout.split()
    assert released == "True" and same == "True"
    assert int(after) < int(with_pool)  # the pool's worker thread is gone
