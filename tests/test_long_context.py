"""Issue 21: RoPE and masks hold at 32k tokens. A tiny Llama (no window) reads a 32,768-token prompt in
chunks and its next-token distribution equals transformers' over the whole sequence; a tiny Mistral with
a 4,096-token window reads it through its rolling cache and equals transformers' over the last
2 x (W - 1) + 1 tokens at their true positions (all that two windowed layers let the last token see),
which also shows the window is honoured far from the start."""

from __future__ import annotations

import pytest
import torch
from chartok import CharTokenizer
from models import VOCAB, hf_model, save_hf

from tramontane.api import LLM
from tramontane.build.load import load_model
from tramontane.decoding.sampling import SamplingParams

LENGTH = 32_768


def reference_logprobs(hf, ids: list[int], first_position: int) -> torch.Tensor:
    with torch.inference_mode():
        positions = torch.arange(first_position, first_position + len(ids))[None]
        logits = hf(torch.tensor([ids]), position_ids=positions).logits[0, -1]
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_a_32k_token_prompt_reads_as_in_transformers(kind, tmp_path):
    overrides = {"max_position_embeddings": LENGTH + 64, "hidden_size": 32, "num_attention_heads": 2}
    overrides["num_key_value_heads"] = 1  # attention over 32k keys costs with the width: kept small
    if kind == "mistral":
        overrides["sliding_window"] = 4096
    hf = hf_model(kind, seed=21, **overrides)
    hf.config._attn_implementation = "sdpa"  # the eager path would hold 32k x 32k scores
    llm = LLM(load_model(save_hf(hf, tmp_path, shard=None)), CharTokenizer())
    ids = torch.randint(3, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(5)).tolist()
    answer = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=5))[0]
    seen = LENGTH if kind == "llama" else 2 * (4096 - 1) + 1
    expected = reference_logprobs(hf, ids[-seen:], LENGTH - seen)
    top = answer.logprobs[0].top
    assert [t for t, _, _ in top] == expected.topk(5).indices.tolist()
    assert max(abs(lp - float(expected[t])) for t, _, lp in top) < 2e-3
