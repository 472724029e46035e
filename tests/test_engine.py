"""The serving engine against the offline generator: batching, paging, preemption, prefix cache, abort."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from chartok import CharTokenizer
from models import hf_model, save_gguf, save_hf

from tramontane.api import LLM
from tramontane.build.load import load_model
from tramontane.decoding.sampling import SamplingParams
from tramontane.engine import AsyncEngine, EngineRequest
from tramontane.engine.blocks import bytes_per_block

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module", params=["mistral-q8_0", "mixtral", "llama-q4_1", "mixtral-q8_0"])
def llm(request, tmp_path_factory):
    """Float checkpoints run the module path; packed GGUF ones the compiled step, offline and on the
    engine's paged pool (steps of more rows than the packed kernels' M take the module path there)."""
    kind, _, qtype = request.param.partition("-")
    if qtype:
        path = save_gguf(hf_model(kind, seed=8), tmp_path_factory.mktemp("e") / "m.gguf", qtype.upper())
        llm = LLM(load_model(path, packed=True), CharTokenizer())
        assert llm.backend.name == "compiled"
        return llm
    hf = hf_model(request.param, seed=8)
    return LLM(load_model(save_hf(hf, tmp_path_factory.mktemp("e"), shard=None)), CharTokenizer())


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 96) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def engine_for(llm: LLM, blocks: int, block_size: int = 4, **kw) -> AsyncEngine:
    size = bytes_per_block(llm.config, block_size, __import__("torch").float32)
    return AsyncEngine(llm, model_name="tiny", kv_cache_memory=blocks * size, block_size=block_size, **kw)


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], params=GREEDY, salt: str | None = None):
    text, tokens, last = "", [], None
    async for out in engine.generate(EngineRequest(rid, prompt, params, cache_salt=salt)):
        text += out.text
        tokens += out.token_ids
        last = out
    return tokens, last


def run_all(engine: AsyncEngine, ps: list[list[int]], params=GREEDY):
    async def main():
        engine.start()
        try:
            return await asyncio.gather(*(collect(engine, f"r{i}", p, params) for i, p in enumerate(ps)))
        finally:
            await engine.shutdown(1.0)

    return asyncio.run(main())


def metric(engine: AsyncEngine, name: str) -> float:
    """A sample's value from the Prometheus text the engine renders."""
    for line in engine.metrics.render().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def sequential(llm: LLM, ps: list[list[int]], params=GREEDY) -> list[list[int]]:
    return [llm.generate([p], params)[0].token_ids for p in ps]


@pytest.mark.parametrize("batched_tokens", [512, 7])
def test_sixteen_concurrent_greedy_requests_equal_sequential(llm, batched_tokens):
    """Small token budgets split prompts into prefill chunks mixed with other requests' decoding."""
    ps = prompts(16)
    engine = engine_for(llm, blocks=400, max_num_batched_tokens=batched_tokens)
    results = run_all(engine, ps)
    assert [r[0] for r in results] == sequential(llm, ps)
    assert all(r[1].finish_reason == "length" and r[1].completion_tokens == 20 for r in results)
    assert engine.pool.num_used == 0  # every block came back
    assert metric(engine, "tramontane_step_requests_sum") > metric(engine, "tramontane_step_requests_count")


def test_small_kv_budget_preempts_and_stays_exact(llm):
    ps = prompts(6, seed=1)
    # A window model keeps only ~3 blocks per request (window 8, blocks of 4): squeeze it harder.
    engine = engine_for(llm, blocks=4 if llm.config.sliding_window else 24)
    results = run_all(engine, ps)
    assert engine.scheduler.preemptions > 0 and metric(engine, "tramontane_preemptions") > 0
    assert [r[0] for r in results] == sequential(llm, ps)


def test_request_that_can_never_fit_ends_with_length(llm):
    engine = engine_for(llm, blocks=3)  # 12 token slots
    if llm.config.sliding_window:  # a window model needs only the window's blocks: make the prompt huge
        engine = engine_for(llm, blocks=2, block_size=2)
    ((tokens, last),) = run_all(engine, [list(range(3, 60))])
    assert last.finish_reason == "length" and tokens == []


def test_abort_frees_blocks_within_a_step(llm):
    async def main():
        engine = engine_for(llm, blocks=200)
        engine.start()
        before = engine.pool.num_used
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        stream = engine.generate(EngineRequest("gone", prompts(1)[0], params))
        await stream.__anext__()
        assert engine.pool.num_used > before
        await stream.aclose()  # the client went away
        for _ in range(100):
            if engine.pool.num_used == before and not engine._seqs:
                break
            await asyncio.sleep(0.01)
        used = engine.pool.num_used
        await engine.shutdown(1.0)
        return before, used

    before, after = asyncio.run(main())
    assert after == before


def test_prefix_cache_shares_a_common_prompt(llm):
    system = prompts(1, seed=5)[0] * 3  # 3x a random prompt: several full blocks
    first, second = system + [10, 11, 12], system + [20, 21]

    async def main():
        engine = engine_for(llm, blocks=200)
        engine.start()
        a = await collect(engine, "a", first)
        b = await collect(engine, "b", second)
        await engine.shutdown(1.0)
        return engine, a, b

    engine, a, b = asyncio.run(main())
    assert a[1].cached_tokens == 0
    assert b[1].cached_tokens == len(system)  # whole blocks, then the start of the block where they part
    assert engine.pool.hits > 0 and metric(engine, "tramontane_prefix_cache_hit_rate") > 0
    assert [a[0], b[0]] == sequential(llm, [first, second])


def test_partial_blocks_are_reused_by_hand():
    """blocks.py's worked example, block_size 4: a request of tokens [5 6 7 8 | 9 10] ends; [5 .. 10, 11]
    then shares the full block, claims the tail and runs token 11 alone. A prompt that parts inside the
    tail keeps the shared start; one that parts inside a full block gets its first slots copied (keys and
    values of every layer, logged for the other ranks); one that parts at once reuses nothing; a claimed
    tail is findable no more; evicted blocks are forgotten."""
    from tramontane.config import ModelConfig
    from tramontane.decoding.sequence import SequenceState
    from tramontane.engine.blocks import BlockPool
    from tramontane.engine.scheduler import EngineSequence, Scheduler

    pool = BlockPool(ModelConfig(32, 64, 4, 4, 2, 16, 128, norm_eps=1e-5, rope_theta=1e4), 5, 4)
    scheduler = Scheduler(pool, model_name="m", window=None, max_num_batched_tokens=64, max_running=8)

    def ran(prompt: list[int], output: tuple[int, ...] = ()) -> EngineSequence:
        """Admit, run the prompt (and the output tokens as decode steps), end."""
        seq = EngineSequence(EngineRequest("r", prompt, GREEDY), SequenceState(0, prompt, GREEDY, CharTokenizer(), 64))
        scheduler.add(seq)
        ((first, n),), _ = scheduler.schedule()
        seq.reused = (seq.num_computed, n, list(seq.blocks))  # what admission found, and the first chunk
        scheduler.after_step([(first, n)])
        for token in output:
            seq.state.output.append(token)
            scheduler.after_step([(seq, 1)])
        scheduler.remove(seq)
        return seq

    first = ran([5, 6, 7, 8, 9, 10])
    tail = first.reused[2][1]
    assert first.reused[:2] == (0, 6) and pool.num_free == 5  # every block free again, two findable
    again = ran([5, 6, 7, 8, 9, 10, 11])
    assert again.reused == (6, 1, [first.reused[2][0], tail]) and again.num_cached == 6
    other = ran([5, 6, 7, 8, 9, 12, 13], output=(14,))  # 9 shared; 12 13 written over 10 11
    assert other.reused == (5, 2, [first.reused[2][0], tail])
    full = tail  # now full, findable by key: 9 12 13 14; its first 2 slots copied for a prompt parting after them
    assert pool._at[("m", other.keys[0])] == {full: (9, 12, 13, 14)}
    for layer in (*pool.k, *pool.v):  # [blocks,Hkv,bs,D]: slot i of the block holds i + 1
        layer[full] = torch.arange(4.0)[:, None] + 1
    copied = ran([5, 6, 7, 8, 9, 12, 30])
    block = copied.reused[2][1]
    assert copied.reused[:2] == (6, 1) and block != full and pool.copied[-1] == (full, block, 2)
    for layer in (*pool.k, *pool.v):
        assert layer[block, :, :2].unique().tolist() == [1.0, 2.0] and not layer[block, :, 2:].any()
    fresh = ran([5, 6, 7, 8, 1, 2])
    assert fresh.reused[:2] == (4, 2) and fresh.reused[2][1] not in (full, block)
    assert pool.allocate(5) is not None and not pool._at and not pool._place_of  # evicted: forgotten


def test_a_repeated_prompt_runs_only_its_last_token_and_answers_the_same(llm):
    """A finished request's blocks stay findable down to its last computed token: the same prompt again
    (a benchmark's client, a retried request) and a conversation's next turn (prompt + answer + more)
    recompute only what is new (a block's shared start copied or claimed), and answer as the offline
    engine does."""
    prompt = prompts(1, seed=7)[0] * 2 + [40, 41, 42]  # not whole blocks of 4
    assert len(prompt) % 4

    async def main():
        engine = engine_for(llm, blocks=200)
        engine.start()
        a = await collect(engine, "a", prompt)
        b = await collect(engine, "b", prompt)
        turn = prompt + a[0] + [50, 51]
        c = await collect(engine, "c", turn)
        await engine.shutdown(1.0)
        return a, b, c, turn

    a, b, c, turn = asyncio.run(main())
    assert b[1].cached_tokens == len(prompt) - 1
    assert c[1].cached_tokens == len(prompt) + len(a[0]) - 1  # all but the answer's last token, never computed
    assert [a[0], b[0], c[0]] == sequential(llm, [prompt, prompt, turn])


def test_a_cache_salt_keeps_tenants_apart(llm):
    """vLLM's cache_salt: requests share prefix-cache blocks only with requests of the same salt."""
    prompt = prompts(1, seed=9)[0] * 2 + [40, 41]

    async def main():
        engine = engine_for(llm, blocks=200)
        engine.start()
        out = [await collect(engine, f"r{i}", prompt, salt=salt) for i, salt in enumerate(("x", "y", "x", None))]
        await engine.shutdown(1.0)
        return out

    x, y, x_again, plain = asyncio.run(main())
    assert [r[1].cached_tokens for r in (x, y, x_again, plain)] == [0, 0, len(prompt) - 1, 0]
    assert [r[0] for r in (x, y, x_again, plain)] == sequential(llm, [prompt]) * 4


def test_an_idle_pool_is_not_resident():
    """The pool's memory becomes resident as blocks are written, not when the engine starts (a server's
    default pool is 10% of RAM): 1 GiB of blocks adds under 64 MiB of RSS until used, and reads as zeros;
    a first prompt's slots in every layer make a few pages resident, not a huge page per layer."""
    from tramontane.config import ModelConfig
    from tramontane.engine.blocks import BlockPool

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    config = ModelConfig(32, 64, 4, 4, 2, 16, 128, norm_eps=1e-5, rope_theta=1e4)
    per_block = bytes_per_block(config, 16, torch.float32)
    before = rss()
    pool = BlockPool(config, (1 << 30) // per_block, 16)
    assert rss() - before < 64 << 20
    assert pool.k[3].shape == (pool.num_blocks, 2, 16, 16) and pool.v[0].is_contiguous()  # [blocks,Hkv,bs,D]
    assert not pool.k[3][-5:].any() and not pool.v[0][:5].any()
    written = rss()
    for t in (*pool.k, *pool.v):  # a first prompt's 3 blocks (35 slots) in every layer: pages, not huge pages
        t[:3] = 1.0
    assert rss() - written < 4 << 20, f"{(rss() - written) / 2**20:.1f} MiB for 3 blocks of {len(pool.k)} layers"
    pool.k[1].fill_(1.0)  # written: resident
    assert rss() - before > 100 << 20
    assert not pool.k[0][3:].any() and not pool.v[1][3:].any()  # the layers do not overlap


def test_layout_of_a_mixed_step_by_hand():
    """One step: a recomputed request's chunk that crosses from its prompt into its output, and another
    request's decode token whose first block fell out of the window. Hand-written tokens, positions,
    block tables (-1: none) and sequence ids."""
    from tramontane.config import ModelConfig
    from tramontane.decoding.sequence import SequenceState
    from tramontane.engine.blocks import BlockPool
    from tramontane.engine.runner import layout
    from tramontane.engine.scheduler import EngineSequence

    def sequence(prompt: list[int], output: list[int], blocks: list[int | None], computed: int) -> EngineSequence:
        state = SequenceState(0, prompt, GREEDY, CharTokenizer(), 64)
        state.output += output
        seq = EngineSequence(EngineRequest("r", prompt, GREEDY), state, blocks=blocks, num_computed=computed)
        assert seq.num_tokens == len(seq.tokens) and seq.span(computed, 3) == seq.tokens[computed : computed + 3]
        return seq

    pool = BlockPool(ModelConfig(32, 64, 4, 4, 2, 16, 128, norm_eps=1e-5, rope_theta=1e4), 8, 4)
    a = sequence([10, 11, 12, 13, 14], [20, 21], [3, 5], computed=3)  # runs tokens 3..6: 13, 14, 20, 21
    b = sequence([30, 31, 32, 33], [40, 41], [None, 7], computed=5)  # runs token 5: 41
    tokens, positions, cache = layout(pool, [(a, 4), (b, 1)], window=4)
    assert tokens.tolist() == [[13, 14, 20, 21, 41]] and positions.tolist() == [[3, 4, 5, 6, 5]]
    assert cache.tables.tolist() == [[3, 5], [-1, 7]] and cache.seq.tolist() == [0, 0, 0, 0, 1]
    assert cache.tables.dtype == cache.seq.dtype == torch.int32 and cache.positions.tolist() == [3, 4, 5, 6, 5]
    assert [a.span(s, n) for s, n in ((0, 7), (5, 2), (4, 9), (7, 1))] == [a.tokens, [20, 21], [14, 20, 21], []]
    assert cache.span == 7  # position 6 is the step's last


def test_layouts_through_one_engines_buffers_by_hand():
    """An engine lays its steps out in buffers of its own (views made once per shape): each step reads
    its own tokens, positions, tables and ids, whether its shape is new, seen before or larger than the
    buffers were (they grow)."""
    from tramontane.config import ModelConfig
    from tramontane.decoding.sequence import SequenceState
    from tramontane.engine.blocks import BlockPool
    from tramontane.engine.runner import StepBuffers, layout
    from tramontane.engine.scheduler import EngineSequence

    def sequence(prompt: list[int], blocks: list[int], computed: int) -> EngineSequence:
        state = SequenceState(0, prompt, GREEDY, CharTokenizer(), 200)
        return EngineSequence(EngineRequest("r", prompt, GREEDY), state, blocks=blocks, num_computed=computed)

    pool = BlockPool(ModelConfig(32, 64, 4, 4, 2, 16, 128, norm_eps=1e-5, rope_theta=1e4), 40, 4)
    buffers = StepBuffers()
    steps = [
        [(sequence([5, 6, 7], [0], 2), 1)],  # one decode token: 7 at position 2
        [(sequence([8, 9, 10, 11], [3, 4], 1), 3), (sequence([12, 13], [1], 1), 1)],  # a new shape
        [(sequence([14, 15, 16], [2], 2), 1)],  # the first shape again, other values
        [(sequence(list(range(100, 180)), list(range(20)), 0), 80)],  # more than the buffers held
    ]
    expected = [
        ([7], [2], [[0]], [0]),
        ([9, 10, 11, 13], [1, 2, 3, 1], [[3, 4], [1, -1]], [0, 0, 0, 1]),
        ([16], [2], [[2]], [0]),
        (list(range(100, 180)), list(range(80)), [list(range(20))], [0] * 80),
    ]
    for batch, (tokens, positions, tables, ids) in zip(steps, expected):
        t, p, cache = layout(pool, batch, None, buffers)
        assert t.tolist() == [tokens] and p.tolist() == [positions] and cache.positions.tolist() == positions
        assert cache.tables.tolist() == tables and cache.seq.tolist() == ids and cache.span == max(positions) + 1
        assert cache.tables.dtype == cache.seq.dtype == torch.int32 and t.dtype == p.dtype == torch.int64
