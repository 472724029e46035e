"""Acceptance 3: the real SmolLM2 GGUF against transformers' own loading of the same file (float32)."""

from __future__ import annotations

import pytest
import torch

import tramontane

TEXT = ("The mistral is a strong, cold wind that blows from the north into the Gulf of Lion. It brings "
        "clear skies and sunshine to Provence, but it can last for days and is said to make people "
        "restless. Farmers plant rows of cypress trees to shelter their fields, and the old houses of the "
        "region turn their backs to the north, with few windows on that side. Sailors know it well: the sea "
        "rises quickly, and small boats stay in harbour until it drops. Its cousin, the tramontane, blows "
        "across Languedoc and Roussillon from the mountains.")
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def both(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": smollm2_path.name}
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32, **kw).eval()
    hf_tok = AutoTokenizer.from_pretrained(smollm2_path.parent, **kw)
    return tramontane.load(smollm2_path), hf, hf_tok


def test_logits_over_100_tokens_match_transformers(both):
    llm, hf, _ = both
    ids = llm.tokenizer.encode(TEXT)[:100]
    assert len(ids) == 100
    with torch.inference_mode():
        ours = llm.model(torch.tensor([ids]))
        theirs = hf(torch.tensor([ids])).logits.float()
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-3, f"max abs logit difference {diff}"


def test_greedy_chat_answer_matches_transformers(both):
    llm, hf, hf_tok = both
    prompt = llm.tokenizer.encode_chat(QUESTION)
    assert prompt == hf_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    theirs = out[0, len(prompt):].tolist()
    ours = llm.chat(QUESTION, temperature=0, max_tokens=32)
    assert ours.token_ids == theirs[: len(ours.token_ids)]
    assert len(ours.token_ids) == 32 or ours.finish_reason == "stop"
    assert "Paris" in ours.text
