"""Acceptance 1: logits equal transformers' on tiny random Mistral, Mixtral and Llama models."""

from __future__ import annotations

import pytest
import torch
from models import hf_model, save_hf

from tramontane.build.load import load_model
from tramontane.model import KVCache

LENGTHS = (20, 13)  # two prompts of different lengths, both past the sliding window of 8


@pytest.fixture(scope="module", params=["mistral", "mixtral", "llama"])
def pair(request, tmp_path_factory):
    hf = hf_model(request.param, seed=1)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    ours = load_model(folder).model
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=gen) for n in LENGTHS]
    with torch.no_grad():
        reference = [hf(p[None]).logits[0].float() for p in prompts]
    return ours, prompts, reference


def padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and positions [B,T], -1 marking padding."""
    t = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), t, dtype=torch.long)
    positions = torch.full((len(prompts), t), -1)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = torch.arange(len(p))
    return tokens, positions


def assert_close(ours: torch.Tensor, prompts, reference, what: str) -> None:
    for i, (p, ref) in enumerate(zip(prompts, reference)):
        diff = (ours[i, : len(p)] - ref).abs().max().item()
        assert diff <= 1e-4, f"{what}: prompt {i} max abs diff {diff}"


def test_full_prefill_without_cache(pair):
    model, prompts, reference = pair
    tokens, positions = padded(prompts)
    with torch.no_grad():
        assert_close(model(tokens, positions), prompts, reference, "prefill")


@pytest.mark.parametrize("chunk", [1, 3, 5, 32])
def test_chunked_prefill_and_decode_with_cache(pair, chunk):
    """Chunks of 1 are token-by-token decoding; the rolling buffer (W=8) wraps several times."""
    model, prompts, reference = pair
    tokens, positions = padded(prompts)
    cache = KVCache(model.config, batch_size=2, capacity=64)
    if model.config.sliding_window:
        assert cache.rolling and cache.size == 8
    outs = []
    with torch.no_grad():
        for s in range(0, tokens.shape[1], chunk):
            outs.append(model(tokens[:, s : s + chunk], positions[:, s : s + chunk], cache))
    assert_close(torch.cat(outs, dim=1), prompts, reference, f"chunk {chunk}")


def test_moe_batched_path_equals_oracle(pair):
    model, prompts, _ = pair
    if model.config.moe is None:
        pytest.skip("dense model")
    moe = model.layers[0].feed_forward
    x = torch.randn(3, 17, model.config.dim)
    torch.testing.assert_close(moe(x), moe.forward_reference(x), atol=1e-5, rtol=1e-5)
    for row in x.reshape(-1, model.config.dim)[:8]:  # the one-token (decode) path, token by token
        one = row.view(1, 1, -1)
        torch.testing.assert_close(moe(one), moe.forward_reference(one), atol=1e-5, rtol=1e-5)
