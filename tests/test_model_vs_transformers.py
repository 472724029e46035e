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


def test_a_one_token_step_records_each_rows_position_by_hand(pair):
    """Steps of one token per row: the row's slot (position mod the buffer's size) takes its position and
    its key; a padding row (-1) keeps what its slot held, position and key."""
    model, _, _ = pair
    cache = KVCache(model.config, batch_size=2, capacity=64)
    size, shape = cache.size, (2, 1, model.config.n_kv_heads, model.config.head_dim)
    k1, k2 = torch.randn(shape), torch.randn(shape)
    cache.begin(torch.tensor([[0], [size + 1]]))
    cache.update(0, k1, k1)
    cache.begin(torch.tensor([[-1], [size + 2]]))
    keys, values, key_pos = cache.update(0, k2, k2)
    expected = torch.full((2, size), -1)
    expected[0, 0], expected[1, 1], expected[1, 2] = 0, size + 1, size + 2
    assert torch.equal(cache.pos, expected) and torch.equal(key_pos, expected)
    assert torch.equal(keys[0, :, 0], k1[0, 0]) and torch.equal(values[0, :, 0], k1[0, 0])  # kept
    assert torch.equal(keys[1, :, 1], k1[1, 0]) and torch.equal(keys[1, :, 2], k2[1, 0])


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
