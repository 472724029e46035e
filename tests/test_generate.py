"""Acceptance 5 and the generation loop, against transformers' own greedy generation."""

from __future__ import annotations

import pytest
import torch
from chartok import CharTokenizer
from models import hf_model, save_hf

import tramontane.decoding.offline as gen_mod
from tramontane.api import LLM
from tramontane.build.load import load_model
from tramontane.decoding.sampling import SamplingParams


@pytest.fixture(scope="module", params=["mistral", "llama", "mixtral"])
def models(request, tmp_path_factory):
    hf = hf_model(request.param, seed=3)
    folder = save_hf(hf, tmp_path_factory.mktemp("m"), shard=None)
    return hf, LLM(load_model(folder), CharTokenizer())


PROMPTS = [[5, 9, 14, 3, 7, 22, 31, 40, 8, 11, 12], [17, 4, 60]]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("initial_capacity,prefill_chunk", [(256, 512), (3, 512), (256, 4)])
def test_greedy_batch_equals_transformers(models, monkeypatch, initial_capacity, prefill_chunk):
    """24 tokens, past the window of 8; capacity 3 forces the cache to grow (and turn rolling);
    chunks of 4 prefill the 11-token prompt in three steps, the shorter prompt ending in the first."""
    hf, llm = models
    monkeypatch.setattr(gen_mod, "INITIAL_CAPACITY", initial_capacity)
    monkeypatch.setattr(gen_mod, "PREFILL_CHUNK", prefill_chunk)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = llm.generate(PROMPTS, params)
    for prompt, completion in zip(PROMPTS, got):
        assert completion.token_ids == hf_greedy(hf, prompt, 24)
        assert completion.finish_reason == "length"


def test_logprobs_match_one_pass_scoring(models):
    _, llm = models
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=20, ignore_eos=True, logprobs=3)
    for prompt, completion in zip(PROMPTS, llm.generate(PROMPTS, params)):
        incremental = torch.tensor([lp.logprob for lp in completion.logprobs])
        scored = llm.score(prompt + completion.token_ids)[len(prompt) - 1 :]
        assert (incremental - scored).abs().max().item() <= 5e-4
        for lp in completion.logprobs:
            assert [t[2] for t in lp.top] == sorted((t[2] for t in lp.top), reverse=True)
            assert lp.top[0][2] >= lp.logprob - 1e-6


def test_seeded_sampling_repeats_and_ignores_batch(models):
    _, llm = models
    params = SamplingParams(temperature=1.3, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    first = llm.generate([PROMPTS[0]], params)[0].token_ids
    again = llm.generate([PROMPTS[0]], params)[0].token_ids
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[1]], params)[1].token_ids
    other = llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=1.3, top_p=0.95, seed=99, max_tokens=16, ignore_eos=True)
    )[0].token_ids
    assert first == again == batched
    assert other != first


def test_greedy_is_deterministic_and_touches_no_global_rng(models):
    _, llm = models
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    state = torch.get_rng_state()
    a = llm.generate(PROMPTS, params)
    assert torch.equal(state, torch.get_rng_state())
    b = llm.generate(PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_stop_string_and_stop_token(models):
    _, llm = models
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate([PROMPTS[0]], params)[0]
    stop = full.text[5:7]
    cut = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    token = full.token_ids[4]
    by_id = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=(token,)))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == full.token_ids[: full.token_ids.index(token) + 1]


def test_streaming_deltas_join_to_the_completion(models):
    _, llm = models
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    whole = llm.generate(PROMPTS, params)
    texts = ["", ""]
    reasons = [None, None]
    for d in llm.generate(PROMPTS, params, stream=True):
        texts[d.index] += d.text
        reasons[d.index] = d.finish_reason or reasons[d.index]
    assert texts == [c.text for c in whole] and reasons == ["length", "length"]
