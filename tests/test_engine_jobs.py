"""Embeddings and prompt scoring as engine work (engine/prompt_jobs.py): chunked through the scheduler
next to generating requests, equal to transformers, paced, counted in the queue, dropped when the
caller leaves."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch
from chartok import CharTokenizer
from models import hf_model, save_hf

import tramontane.engine.engine as engine_module
from tramontane.api import LLM
from tramontane.build.load import load_model
from tramontane.decoding.sampling import SamplingParams
from tramontane.engine import AsyncEngine, EngineRequest
from tramontane.engine.blocks import bytes_per_block
from tramontane.engine.pacing import Pace
from tramontane.engine.types import EngineUnavailableError, QueueFullError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=["mistral", "llama"])
def models(request, tmp_path_factory):
    """(the transformers model, the same weights loaded by tramontane); mistral has a sliding window."""
    hf = hf_model(request.param, seed=3)
    return hf, LLM(load_model(save_hf(hf, tmp_path_factory.mktemp("j"), shard=None)), CharTokenizer())


def prompts(n: int, seed: int, low: int = 1, high: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 96) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def new_engine(llm: LLM, blocks: int = 64, **kw) -> AsyncEngine:
    size = bytes_per_block(llm.config, 4, torch.float32)
    kw.setdefault("max_num_batched_tokens", 16)  # long prompts run in several chunks
    return AsyncEngine(llm, model_name="tiny", kv_cache_memory=blocks * size, block_size=4, **kw)


def run(engine: AsyncEngine, work):
    async def main():
        engine.start()
        try:
            return await work()
        finally:
            await engine.shutdown(1.0)

    return asyncio.run(main())


async def generate(engine: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
    return [t async for out in engine.generate(EngineRequest(rid, prompt, GREEDY)) for t in out.token_ids]


def hf_hidden(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf.model(torch.tensor([ids])).last_hidden_state[0]  # [T,dim], after the final norm


def test_embeddings_equal_transformers_while_requests_generate(models):
    hf, llm = models
    inputs = prompts(20, seed=1)
    chats = prompts(3, seed=2, low=5, high=20)
    solo = new_engine(llm)
    alone = run(solo, lambda: asyncio.gather(*(generate(solo, f"c{i}", p) for i, p in enumerate(chats))))

    engine = new_engine(llm, blocks=40)  # tight: the job's sequences get preempted and start again

    async def both():
        return await asyncio.gather(engine.embed(inputs), *(generate(engine, f"c{i}", p) for i, p in enumerate(chats)))

    vectors, *answers = run(engine, both)
    assert answers == alone  # generation is untouched by the background work beside it
    for ids, vector in zip(inputs, vectors):
        expected = torch.nn.functional.normalize(hf_hidden(hf, ids).mean(0), dim=0)
        torch.testing.assert_close(torch.tensor(vector), expected, atol=2e-5, rtol=1e-4)
    assert not engine._jobs and not engine._job_seqs and not engine.scheduler.running


def test_scores_equal_transformers_log_softmax(models):
    hf, llm = models
    inputs = prompts(6, seed=3, low=1, high=50) + [[7]]  # a one-token prompt has nothing to score
    engine = new_engine(llm)
    scores = run(engine, lambda: engine.prompt_logprobs(inputs, 3))
    for ids, (chosen, top_ids, top_lp) in zip(inputs, scores):
        with torch.no_grad():
            logp = hf(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)  # [T-1,V]
        following = torch.tensor(ids[1:])
        torch.testing.assert_close(chosen, logp.gather(-1, following[:, None]).squeeze(-1), atol=1e-4, rtol=1e-4)
        values, _ = logp.topk(3, dim=-1)
        torch.testing.assert_close(top_lp, values, atol=1e-4, rtol=1e-4)
        assert top_ids.shape == (len(ids) - 1, 3)
        torch.testing.assert_close(logp.gather(-1, top_ids), top_lp, atol=1e-4, rtol=1e-4)


def steps_recorded(monkeypatch) -> list[tuple[int, int]]:
    """(generating tokens, background tokens) of every engine step from now on."""
    seen: list[tuple[int, int]] = []
    real = engine_module.run_step

    def recording(backend, pool, batch, *rest):
        seen.append((sum(n for s, n in batch if not s.background), sum(n for s, n in batch if s.background)))
        return real(backend, pool, batch, *rest)

    monkeypatch.setattr(engine_module, "run_step", recording)
    return seen


def test_background_tokens_are_paced_beside_generation(models, monkeypatch):
    _, llm = models
    engine = new_engine(llm, max_num_batched_tokens=64)
    engine._pace = Pace(floor=3, ceiling=5)  # a fixed allowance, whatever the machine's timings
    monkeypatch.setattr(engine_module, "GENERATION_GRACE", 0.0)  # paced only while requests generate
    seen = steps_recorded(monkeypatch)
    chats = prompts(2, seed=4, low=5, high=10)

    async def both():
        job = asyncio.ensure_future(engine.embed(prompts(30, seed=5, low=30, high=60)))
        await asyncio.gather(*(generate(engine, f"c{i}", p) for i, p in enumerate(chats)))
        return await job

    run(engine, both)
    beside = [bg for gen, bg in seen if gen and bg]
    assert beside and max(beside) <= 5  # the pace's ceiling while requests generate
    assert max(bg for gen, bg in seen if not gen) > 5  # alone, the job takes the whole budget


def test_a_departed_callers_job_stops_within_a_step(models, monkeypatch):
    _, llm = models
    engine = new_engine(llm, max_num_batched_tokens=8)
    seen = steps_recorded(monkeypatch)
    cancelled_at: list[int] = []

    async def leave():
        task = asyncio.ensure_future(engine.embed(prompts(40, seed=6, low=40, high=60)))
        for _ in range(6000):  # some of the work has run (a generous minute: a failing step fails here)
            if sum(bg for _, bg in seen) >= 40:
                break
            await asyncio.sleep(0.01)
        assert sum(bg for _, bg in seen) >= 40, "the job's steps did not run"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_at.append(len(seen))
        for _ in range(500):  # the engine drops the job at its next loop turn
            if not engine._jobs:
                break
            await asyncio.sleep(0.01)
        after = len(seen)
        await generate(engine, "after", [5, 6, 7])  # the engine goes on serving
        return after

    after = run(engine, leave)
    assert not engine._jobs and not engine._job_seqs
    assert after - cancelled_at[0] <= 1  # at most the step already running when the caller left
    assert all(bg == 0 for _, bg in seen[after:])
    assert not engine.scheduler.running and not engine.scheduler.background


def test_jobs_count_in_the_queue_limit(models):
    _, llm = models
    engine = new_engine(llm, max_queued=1)

    async def two():
        first = asyncio.ensure_future(engine.embed(prompts(4, seed=7)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await engine.embed(prompts(1, seed=8))
        return await first

    assert len(run(engine, two)) == 4


def test_shutdown_fails_an_unfinished_job(models):
    _, llm = models
    engine = new_engine(llm, max_num_batched_tokens=4)
    release = threading.Event()
    real = engine_module.run_step

    def slow(*args):
        release.wait(10)
        return real(*args)

    async def main():
        engine.start()
        job = asyncio.ensure_future(engine.embed(prompts(8, seed=9, low=40, high=60)))
        await asyncio.sleep(0.05)
        stopping = asyncio.ensure_future(engine.shutdown(0.0))
        release.set()
        await stopping
        with pytest.raises(EngineUnavailableError):
            await job

    engine_module.run_step = slow
    try:
        asyncio.run(main())
    finally:
        engine_module.run_step = real


def test_pace_grows_within_the_target_shrinks_past_it_and_probes_the_base():
    pace = Pace(floor=4, ceiling=40, target=2.0, weight=0.5, probe_every=4)
    assert pace.tokens() == 0  # no base yet: a step without background work measures it
    pace.observe(0.050, 0)  # base 50 ms
    assert [pace.tokens() for _ in range(3)] == [4, 4, 0]  # the 4th step of each 4 is a probe
    pace.observe(0.090, 4)  # within 2 x 50 ms: +1 (10% of 4 is less)
    assert pace.allowance == 5
    for _ in range(30):
        pace.observe(0.099, 10)
    assert pace.allowance == 40  # the ceiling
    pace.observe(0.101, 40)  # past the target: x0.7
    assert pace.allowance == 28
    pace.observe(0.030, 0)  # base moves halfway: 40 ms
    assert pace.base == 0.040


def test_a_slow_step_turns_the_allowance_into_a_duty_cycle():
    pace = Pace(floor=4, ceiling=64, probe_every=1000)
    pace.observe(0.010, 0)
    for _ in range(10):
        pace.observe(1.0, 4)  # every background chunk far past 2 x 10 ms
    assert pace.allowance < 1
    given = [pace.tokens() for _ in range(400)]
    assert set(given) == {0, 4}  # whole chunks now and then, never a step's worth every step
    assert sum(given) == pytest.approx(400 * pace.allowance, abs=4)
