"""Issue 21: speculative decoding by prompt lookup. Greedy output equals plain decoding token for token
(tiny Mistral with a window smaller than the context, so the rolling cache takes its spare slots;
Llama; Mixtral; SmolLM2 on the compiled step, with structured output, stop strings, penalties and
logprobs), and sampling keeps plain sampling's distribution: the rejection rule on a fixed row
against the exact probabilities, and 10,000 speculative samples against the model's own distribution,
by chi-square (seeded, so the test cannot flake). Served: the engine verifies drafts inside its
batched steps (paged pool, module path and compiled step, drafts cut by the step budget, preemption,
the prefix cache never holding a rejected draft), `--speculative-config`, and a request's
`speculation` through the official SDK with /metrics counting."""

from __future__ import annotations

import asyncio
import copy
import math
from collections import Counter

import pytest
import torch
from chartok import CharTokenizer
from models import hf_model, save_gguf, save_hf

import tramontane
import tramontane.decoding.offline as gen_mod
from tramontane import Speculation
from tramontane.api import LLM
from tramontane.build.load import load_model
from tramontane.decoding.sampling import SamplingParams
from tramontane.decoding.sequence import SequenceState
from tramontane.decoding.speculative import ModelDraft, SpeculationStats, accept
from tramontane.engine import AsyncEngine, EngineRequest
from tramontane.engine.blocks import bytes_per_block

# prompts that repeat themselves, so that lookup finds drafts from the first step
PROMPTS = [[5, 9, 14, 3, 7, 5, 9, 14, 3, 7, 5, 9], [17, 4, 60, 17, 4]]
SPEC = Speculation(num_tokens=4, ngram_min=1)


@pytest.fixture(scope="module", params=["mistral", "llama", "mixtral"])
def llm(request, tmp_path_factory):
    folder = save_hf(hf_model(request.param, seed=3), tmp_path_factory.mktemp("m"), shard=None)
    return LLM(load_model(folder), CharTokenizer())


def speculated(llm: LLM, prompts, params, speculation=SPEC) -> tuple[list, SpeculationStats]:
    before = SpeculationStats(**vars(llm.speculation_stats))
    out = llm.generate(prompts, params, speculation=speculation)
    after = llm.speculation_stats
    return out, SpeculationStats(*(a - b for a, b in zip(vars(after).values(), vars(before).values())))


class Oracle:
    """Drafts what plain decoding answered (as a draft model equal to the target would), every third
    draft wrong from its second token on: both acceptance and rejection are exercised."""

    num_tokens, draft, spent, held = 4, None, 0, 0

    def __init__(self, prompts: list[list[int]], answers: list[list[int]]) -> None:
        self.known = list(zip(prompts, answers))
        self.calls = 0

    def drafter(self) -> Oracle:
        return self

    def check_vocabulary(self, vocab_size: int) -> None:
        pass

    def draft_bytes_per_token(self) -> int:
        return 0

    def unread(self, tokens: list[int]) -> int:
        return 0

    def propose(self, tokens: list[int], room: int, budget: int | None = None, memory: int | None = None) -> list[int]:
        self.calls += 1
        prompt, answer = next((p, a) for p, a in self.known if tokens[: len(p)] == p)
        done = len(tokens) - len(prompt)
        draft = answer[done : done + min(self.num_tokens, room)]
        if self.calls > 0 and self.calls % 3 == 0 and len(draft) > 1:
            draft[1] = (draft[1] + 1) % 96
        return draft

    def update(self, drafted: int, accepted: int) -> None:
        pass


@pytest.mark.parametrize("initial_capacity", [256, 3])
def test_greedy_speculation_equals_plain_decoding(llm, monkeypatch, initial_capacity):
    """40 tokens, past Mistral's window of 8 (the rolling cache keeps spare slots for the drafts);
    capacity 3 makes the cache grow and turn rolling. Drafted by lookup (rarely right on a random
    model) and by an oracle (right but for one token in three drafts)."""
    monkeypatch.setattr(gen_mod, "INITIAL_CAPACITY", initial_capacity)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = llm.generate(PROMPTS, params)
    spec, stats = speculated(llm, PROMPTS, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain] and stats.drafted > 0
    assert stats.emitted == 2 * 39  # the first token comes from the prompt's pass
    oracle = Oracle(PROMPTS, [c.token_ids for c in plain])
    before = SpeculationStats(**vars(llm.speculation_stats))
    drafted = llm.generate(PROMPTS, params, speculation=oracle)
    assert [c.token_ids for c in drafted] == [c.token_ids for c in plain]
    assert [c.finish_reason for c in drafted] == ["length", "length"]
    passes = llm.speculation_stats.passes - before.passes
    accepted = llm.speculation_stats.accepted - before.accepted
    assert accepted > 40 and passes < 40  # up to 5 tokens a pass


def test_greedy_with_penalties_stops_and_logprobs(llm):
    params = SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, presence_penalty=0.4, repetition_penalty=1.1, logprobs=2
    )
    plain = llm.generate(PROMPTS, params)
    spec, stats = speculated(llm, PROMPTS, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain] and stats.drafted > 0
    for a, b in zip(spec, plain):
        assert [t.token for t in a.logprobs] == [t.token for t in b.logprobs]
        got, want = torch.tensor([t.logprob for t in a.logprobs]), torch.tensor([t.logprob for t in b.logprobs])
        assert (got - want).abs().max() <= 1e-4
    stop = llm.tokenizer.decode(plain[0].token_ids[12:14])  # a stop string met in the middle of a draft
    stopped = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    assert llm.generate(PROMPTS, stopped, speculation=SPEC)[0].text == llm.generate(PROMPTS, stopped)[0].text


def test_smollm2_on_the_compiled_step_with_structured_output(smollm2_path):
    llm = tramontane.load(smollm2_path)
    text = (
        "Tramontane is a cold wind from the north. It blows over the Pyrenees and the Alps, down to the "
        "Mediterranean sea, where sailors fear it in winter because it raises short, steep waves."
    )
    messages = [{"role": "user", "content": "Repeat this text exactly:\n\n" + text}]
    plain = llm.chat(messages, temperature=0, max_tokens=60, ignore_eos=True)
    before = llm.speculation_stats.accepted
    spec = llm.chat(messages, temperature=0, max_tokens=60, ignore_eos=True, speculation=Speculation())
    assert spec.token_ids == plain.token_ids
    assert llm.speculation_stats.accepted - before > 15  # the copied text was drafted
    asked = [{"role": "user", "content": 'Give {"a": 1, "b": [2, 3]} back as JSON with keys a, b and c.'}]
    fmt = {"type": "json_object"}
    plain = llm.chat(asked, temperature=0, max_tokens=40, response_format=fmt)
    assert (
        llm.chat(asked, temperature=0, max_tokens=40, response_format=fmt, speculation=Speculation()).text == plain.text
    )


def test_a_required_tool_call_under_speculation(smollm2_path):
    """A required call (its grammar masks every token): the same call, with and without speculation."""
    from test_tools import TOOLS

    llm = tramontane.load(smollm2_path)
    messages = [{"role": "user", "content": "What is the weather in Paris, France, in celsius, for 3 days?"}]
    plain = llm.chat(messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=60)
    before = llm.speculation_stats.passes
    spec = llm.chat(
        messages, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=60, speculation=Speculation()
    )
    assert plain.finish_reason == "tool_calls" and spec.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in spec.tool_calls] == [(c.name, c.arguments) for c in plain.tool_calls]
    assert llm.speculation_stats.passes > before


def chi_square_bound(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (Wilson-Hilferty; z of 0.999)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_the_rejection_rule_draws_from_the_model_distribution():
    """One row of logits and a drafted token: the token the pass emits is distributed as softmax(row),
    whether the draft is likely (0.5), unlikely (0.02) or masked by top-k."""
    torch.manual_seed(0)
    row = torch.randn(1, 96) * 1.5
    tokenizer = CharTokenizer()
    for params, drafted in [
        (SamplingParams(temperature=1.0, seed=1), int(row.argmax())),
        (SamplingParams(temperature=0.7, seed=2), int(row.argsort(descending=True)[0, 20])),
        (SamplingParams(temperature=1.0, top_k=5, seed=3), int(row.argsort(descending=True)[0, 50])),
    ]:
        from tramontane.decoding.sequence import processed_logits

        s = SequenceState(0, [1, 2, 3], params, tokenizer, 1000)
        probs = processed_logits([s], [params], row).float().softmax(dim=-1)[0]
        counts: Counter[int] = Counter()
        n = 5_000
        for _ in range(n):
            s.output, s.finish_reason = [], None
            deltas = list(accept(s, torch.cat([row, row]), [drafted], _NoDrafter(), tokenizer, SpeculationStats()))
            counts[deltas[0].token_ids[0]] += 1
        expected = {t: float(p) * n for t, p in enumerate(probs) if p * n >= 5}
        rare = n - sum(expected.values())
        stat = sum((counts[t] - e) ** 2 / e for t, e in expected.items())
        observed_rare = n - sum(counts[t] for t in expected)
        if rare >= 5:
            stat += (observed_rare - rare) ** 2 / rare
        assert stat < chi_square_bound(len(expected) - (0 if rare >= 5 else 1)), (params, stat)
        assert all(probs[t] > 0 for t in counts)  # nothing masked is ever emitted


class _NoDrafter:
    def update(self, drafted: int, accepted: int) -> None:
        pass


def test_speculative_sampling_keeps_the_model_distribution(tmp_path):
    """10,000 continuations of a prompt sampled speculatively (each row its own seed; the draft is the
    greedy answer, whatever was sampled before it): the second token, the one verification emits, has
    the model's own distribution, summed exactly over every first token (chi-square)."""
    folder = save_hf(hf_model("llama", seed=5), tmp_path / "m", shard=None)
    llm = LLM(load_model(folder), CharTokenizer())
    prompt, temperature = [5, 9, 14, 5, 9, 14, 5, 9], 0.8
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].token_ids
    drafts = Oracle([prompt], [greedy])
    drafts.calls = -(10**9)  # never corrupted
    counts: Counter[int] = Counter()
    for start in range(0, 10_000, 2_500):
        params = [
            SamplingParams(temperature=temperature, seed=start + i, max_tokens=3, ignore_eos=True) for i in range(2_500)
        ]
        for c in llm.generate([prompt] * len(params), params, speculation=drafts):
            counts[c.token_ids[1]] += 1
    assert llm.speculation_stats.accepted > 500  # the draft was often kept: verification ran both ways
    with torch.inference_mode():  # p(t2) = sum over t1 of p(t1) p(t2 | t1), from the model itself
        first = llm.model.logits(llm.backend.prefill(torch.tensor([prompt]), None, None))[0, -1]  # [V]
        rows = torch.tensor([[*prompt, t] for t in range(96)])  # [V, T+1]
        second = llm.model.logits(llm.backend.prefill(rows, None, None))[:, -1]  # [V, V]
    p1 = (first / temperature).softmax(-1)
    p2 = (p1[:, None] * (second / temperature).softmax(-1)).sum(0)  # [V]
    expected = {t: float(p) * 10_000 for t, p in enumerate(p2) if p * 10_000 >= 5}
    pairs = [(counts[t], e) for t, e in expected.items()]
    rest = 10_000 - sum(expected.values())
    if rest >= 5:
        pairs.append((10_000 - sum(counts[t] for t in expected), rest))
    stat = sum((o - e) ** 2 / e for o, e in pairs)
    assert stat < chi_square_bound(len(pairs) - 1), stat


# ---- served: the engine verifies drafts in its steps ------------------------------------------------
@pytest.fixture(scope="module", params=["mistral", "llama-q4_1"])
def served(request, tmp_path_factory):
    """A float model with a window (module path on the paged pool) and a packed one (the compiled step)."""
    kind, _, qtype = request.param.partition("-")
    if qtype:
        path = save_gguf(hf_model(kind, seed=8), tmp_path_factory.mktemp("s") / "m.gguf", qtype.upper())
        return LLM(load_model(path, packed=True), CharTokenizer())
    return LLM(load_model(save_hf(hf_model(kind, seed=8), tmp_path_factory.mktemp("s"), shard=None)), CharTokenizer())


def serve_all(llm: LLM, ps: list[list[int]], params: SamplingParams, speculation=None, blocks=400, **kw):
    engine = AsyncEngine(
        llm,
        model_name="tiny",
        kv_cache_memory=blocks * bytes_per_block(llm.config, 4, torch.float32),
        block_size=4,
        speculation=speculation,
        **kw,
    )

    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(EngineRequest(f"r{i}", prompt, params)):
            tokens += out.token_ids
        return tokens

    async def main() -> list[list[int]]:
        engine.start()
        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
        finally:
            await engine.shutdown(1.0)

    return asyncio.run(main()), engine


def metric(engine: AsyncEngine, name: str) -> float:
    for line in engine.metrics.render().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


SERVED = [PROMPTS[0], PROMPTS[1], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43], [8, 8, 9]]


@pytest.mark.parametrize("batched_tokens", [512, 6])
def test_served_speculation_equals_plain_decoding(served, batched_tokens):
    """Four concurrent requests drafted by the oracle (one draft in three wrong), blocks of 4 tokens; a
    budget of 6 tokens a step cuts drafts short. Answers equal offline plain decoding; every block comes
    back; the metrics count the passes."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = [c.token_ids for c in served.generate(SERVED, params)]
    answers, engine = serve_all(served, SERVED, params, Oracle(SERVED, plain), max_num_batched_tokens=batched_tokens)
    assert answers == plain
    assert engine.pool.num_used == 0
    assert metric(engine, "tramontane_speculative_accepted_tokens_total") > 20
    assert 0 < metric(engine, "tramontane_speculative_acceptance_rate") < 1
    assert metric(engine, "tramontane_generation_tokens_total") == 4 * 30


def test_rejected_drafts_never_reach_the_prefix_cache_and_preemption_stays_exact(served):
    """Rejected drafts wrote keys into blocks: requests that then share those blocks through the prefix
    cache (the same prompts with their answers, and more) still answer as offline; so do speculating
    requests preempted for lack of blocks."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = [c.token_ids for c in served.generate(SERVED, params)]
    oracle = Oracle(SERVED, plain)
    engine = AsyncEngine(
        served,
        model_name="tiny",
        kv_cache_memory=400 * bytes_per_block(served.config, 4, torch.float32),
        block_size=4,
        speculation=oracle,
    )
    longer = [p + a[:10] for p, a in zip(SERVED, plain)]

    async def run(ps: list[list[int]], speculate: bool | None) -> list[list[int]]:
        async def one(i: int, prompt: list[int]) -> list[int]:
            tokens: list[int] = []
            async for out in engine.generate(EngineRequest(f"{speculate}{i}", prompt, params, speculate=speculate)):
                tokens += out.token_ids
            return tokens

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))

    async def main() -> tuple[list[list[int]], list[list[int]]]:
        engine.start()
        try:
            first = await run(SERVED, None)
            return first, await run(longer, False)
        finally:
            await engine.shutdown(1.0)

    first, second = asyncio.run(main())
    assert first == plain
    assert engine.pool.hits > 0
    assert second == [c.token_ids for c in served.generate(longer, params)]
    squeezed, engine = serve_all(
        served, SERVED, params, Oracle(SERVED, plain), blocks=12 if served.config.sliding_window else 24
    )
    assert squeezed == plain and engine.scheduler.preemptions > 0


def test_speculative_config_flag(tmp_path):
    from tramontane.cli.main import _speculation
    from tramontane.errors import TramontaneError

    spec = _speculation(
        '{"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_max": 5, "prompt_lookup_min": 3}'
    )
    assert spec == Speculation(num_tokens=6, ngram_max=5, ngram_min=3)
    assert _speculation(None) is None
    for bad, words in [
        ("{", "not JSON"),
        ('{"method": "eagle"}', "method must be"),
        ('{"num_speculative_tokens": 99}', "num_tokens must be 1..16"),
        ('{"draft_model": "x"}', "unknown keys"),
        ('{"num_speculative_tokens": "4"}', "whole number"),
    ]:
        with pytest.raises(TramontaneError, match=words):
            _speculation(bad)


def test_a_served_request_speculates_as_asked(smollm2_server):
    """Through the official SDK: `speculation: true` per request on a server without the flag; greedy
    answers (plain, a stop string, JSON mode, a required tool call) equal the same requests without it,
    and /metrics counts."""
    import httpx
    from openai import OpenAI
    from test_tools import TOOLS

    client = OpenAI(base_url=f"{smollm2_server}/v1", api_key="none")
    text = "Tramontane is a cold wind from the north. It blows over the Pyrenees and the Alps, down to the sea."
    cases = [
        {"messages": [{"role": "user", "content": f"Repeat this text exactly:\n\n{text}"}], "max_tokens": 40},
        {
            "messages": [{"role": "user", "content": f"Repeat this text exactly:\n\n{text}"}],
            "max_tokens": 40,
            "stop": ["Alps"],
        },
        {
            "messages": [{"role": "user", "content": 'Give {"wind": "tramontane", "cold": true} back as JSON.'}],
            "max_tokens": 30,
            "response_format": {"type": "json_object"},
        },
        {
            "messages": [{"role": "user", "content": "What is the weather in Paris, France, in celsius, for 3 days?"}],
            "max_tokens": 60,
            "tools": TOOLS,
            "tool_choice": "required",
        },
    ]
    model = client.models.list().data[0].id
    for case in cases:
        plain = client.chat.completions.create(model=model, temperature=0, **case)
        spec = client.chat.completions.create(model=model, temperature=0, extra_body={"speculation": True}, **case)
        assert spec.choices[0].message.content == plain.choices[0].message.content
        assert spec.choices[0].finish_reason == plain.choices[0].finish_reason
        calls = [
            [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls or []]
            for r in (plain, spec)
        ]
        assert calls[0] == calls[1]
    metrics = httpx.get(f"{smollm2_server}/metrics").text
    passes = [
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("tramontane_speculative_passes_total ")
    ]
    assert passes and passes[0] > 0


# ---- a draft model -------------------------------------------------------------------------------------
def test_a_draft_model_equal_to_the_model_keeps_every_draft(llm, tmp_path):
    """Issue 21's target 2 as a test: drafting with the model itself keeps every drafted token, and each
    pass gives k + 1 tokens (fewer only where max_tokens leaves less room); another model's drafts are
    partly kept, the answer unchanged; a draft model of another vocabulary is refused."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    plain = [c.token_ids for c in llm.generate(PROMPTS, params)]
    spec = Speculation(method="draft_model", draft=llm, num_tokens=4)
    out, stats = speculated(llm, PROMPTS, params, spec)
    assert [c.token_ids for c in out] == plain
    assert stats.accepted == stats.drafted and stats.passes == 2 * 6 and stats.emitted == 2 * 29  # 5+5+5+5+5+4
    other = copy.deepcopy(llm)  # a draft model close to the model: its weights a little off
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    out, stats = speculated(llm, PROMPTS, params, Speculation(method="draft_model", draft=other, num_tokens=3))
    assert [c.token_ids for c in out] == plain and 0 < stats.accepted < stats.drafted
    small = LLM(
        load_model(save_hf(hf_model("llama", seed=1, vocab_size=64), tmp_path / "v", shard=None)), CharTokenizer()
    )
    with pytest.raises(tramontane.RequestError, match="vocabulary has 64 tokens"):
        llm.generate(PROMPTS, params, speculation=Speculation(method="draft_model", draft=small))


def test_served_draft_model(served):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = [c.token_ids for c in served.generate(SERVED, params)]
    answers, engine = serve_all(served, SERVED, params, Speculation(method="draft_model", draft=served, num_tokens=3))
    assert answers == plain and engine.pool.num_used == 0
    assert metric(engine, "tramontane_speculative_acceptance_rate") == 1.0
    assert metric(engine, "tramontane_speculative_tokens_per_pass") > 3.5


def test_draft_models_read_within_the_step_budget_and_share_the_kv_memory(served, monkeypatch):
    """A draft model's reading counts against the step budget (6 tokens here: the 14-token prompt is
    read over several steps, its request decoding without drafts until then), and its caches against
    kv_cache_memory: the draft model being the model itself, the pool gets half (as many tokens each);
    a draft cache grows only into what the engine leaves it (where it cannot hold even the prompt, no
    drafts and no cache; a model with a window needs only its rolling buffer).
    The answers are plain decoding's either way."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = [c.token_ids for c in served.generate(SERVED, params)]
    spec = Speculation(method="draft_model", draft=served, num_tokens=3)
    steps, spent = [0], Counter()
    draft, propose = AsyncEngine._draft, ModelDraft.propose

    def counting_draft(self):
        steps[0] += 1
        draft(self)

    def recording_propose(self, tokens, room, budget=None, memory=None):
        out = propose(self, tokens, room, budget, memory)
        spent[steps[0]] += self.spent
        return out

    monkeypatch.setattr(AsyncEngine, "_draft", counting_draft)
    monkeypatch.setattr(ModelDraft, "propose", recording_propose)
    answers, engine = serve_all(served, SERVED, params, spec, max_num_batched_tokens=6)
    assert answers == plain and engine.pool.num_blocks == 200  # serve_all gives 400 blocks' worth
    assert max(spent.values()) == 6 and metric(engine, "tramontane_speculative_acceptance_rate") == 1.0
    windowed, prompt = served.config.sliding_window is not None, SERVED[2]  # 14 tokens
    short, roomy = spec.drafter(capacity=41), spec.drafter(capacity=41)
    assert len(short.propose(prompt, 24, memory=12)) == (3 if windowed else 0)  # a window: 8 + 3 slots
    assert short.held == (11 if windowed else 0)  # no room for the prompt: no cache made
    assert len(roomy.propose(prompt, 24, memory=40)) == 3 and roomy.held <= 40


def test_a_failing_drafter_leaves_its_request_decoding(served):
    class Broken:
        num_tokens, draft, held = 2, None, 0

        def drafter(self):
            return self

        def unread(self, tokens) -> int:
            return 0

        def check_vocabulary(self, vocab_size: int) -> None:
            pass

        def draft_bytes_per_token(self) -> int:
            return 0

        def propose(self, tokens, room, budget=None, memory=None):
            raise RuntimeError("the draft model broke")

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = [c.token_ids for c in served.generate(SERVED, params)]
    answers, engine = serve_all(served, SERVED, params, Broken())
    assert answers == plain and engine.pool.num_used == 0


def test_drafts_never_preempt_and_seeded_sampling_does_not_speculate(served):
    """In a pool that plain decoding fills without preempting anyone, speculating requests do not
    preempt either (a draft that does not fit is dropped); a seeded sampled request answers the same
    alone and beside others with speculation on (it does not draft)."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ps = [SERVED[2], SERVED[3]]
    plain = [c.token_ids for c in served.generate(ps, params)]
    blocks = 10
    _, engine = serve_all(served, ps, params, None, blocks=blocks)
    if engine.scheduler.preemptions == 0:
        answers, engine = serve_all(served, ps, params, Oracle(ps, plain), blocks=blocks)
        assert answers == plain and engine.scheduler.preemptions == 0
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True)
    alone, _ = serve_all(served, [SERVED[0]], seeded, SPEC)
    crowded, engine = serve_all(served, SERVED, seeded, SPEC, max_num_batched_tokens=6)
    assert crowded[0] == alone[0] == served.generate([SERVED[0]], seeded)[0].token_ids


def test_prompt_lookup_finds_the_latest_earlier_match_incrementally():
    drafter = Speculation(num_tokens=4, ngram_max=3, ngram_min=1).drafter()
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2]
    assert drafter.propose(tokens, room=10) == [3, 7]  # "1 2" last seen at 4 (then 3, 7, 8 ...): length 2
    drafter.length = 4
    tokens += [3]
    assert drafter.propose(tokens, room=10) == [7, 8, 1, 2]  # "1 2 3" latest at 4
    assert drafter.propose(tokens + [5], room=10) == []  # "3 5", "5": nowhere before
    assert drafter.propose(tokens + [5], room=0) == []
