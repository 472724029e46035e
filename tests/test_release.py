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


ENGINE = textwrap.dedent(
    """
    import asyncio, os, sys, tempfile, time
    sys.path.insert(0, sys.argv[1])
    import torch
    from chartok import CharTokenizer
    from models import hf_model, save_hf
    from tramontane.api import LLM
    from tramontane.build import load_model
    from tramontane.engine import AsyncEngine
    from tramontane.engine.blocks import bytes_per_block

    torch.set_num_threads(2)
    tasks = lambda: len(os.listdir("/proc/self/task"))
    llm = LLM(load_model(save_hf(hf_model("llama", seed=1), tempfile.mkdtemp(), shard=None)), CharTokenizer())
    a = torch.randn(512, 512)
    a @ a  # this thread's OpenMP pool, as a program that loaded and ran a model here keeps
    with_pool = tasks()

    async def main():
        memory = 8 * bytes_per_block(llm.config, 4, torch.float32)
        engine = AsyncEngine(llm, model_name="tiny", kv_cache_memory=memory, block_size=4)
        engine.start()  # one more thread, the engine's; this one's idle worker handed back
        deadline = time.monotonic() + 30
        while tasks() > with_pool and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        print(with_pool, tasks())
        await engine.shutdown()

    asyncio.run(main())
    """
)


def test_starting_an_engine_hands_back_the_caller_s_workers():
    """A program that ran torch on the thread that then starts an engine (as a script does: load, then
    serve) kept that thread's OpenMP pool, whose idle worker stopped the engine thread's from spinning:
    one request decoded 72 against 291 tok/s (SmolLM2 on 2 CPUs). start() hands the pool back: the
    process gains the engine's thread and loses the idle worker."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", ENGINE, tests], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    with_pool, after = map(int, done.stdout.split()[-2:])
    assert after <= with_pool, (with_pool, after)


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
