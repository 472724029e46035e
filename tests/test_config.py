"""ModelConfig constructors against the published Mistral 7B and Mixtral 8x7B v0.1 numbers."""

from __future__ import annotations

import pytest

from tramontane.config import ModelConfig
from tramontane.errors import ConfigError

MISTRAL_7B_PARAMS = {
    "dim": 4096,
    "n_layers": 32,
    "head_dim": 128,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "norm_eps": 1e-5,
    "sliding_window": 4096,
    "vocab_size": 32000,
}
MIXTRAL_PARAMS = {
    "dim": 4096,
    "n_layers": 32,
    "head_dim": 128,
    "hidden_dim": 14336,
    "n_heads": 32,
    "n_kv_heads": 8,
    "norm_eps": 1e-5,
    "vocab_size": 32000,
    "moe": {"num_experts_per_tok": 2, "num_experts": 8},
}


def test_mistral_7b_v01_params_json():
    c = ModelConfig.from_params_json(MISTRAL_7B_PARAMS)
    assert (c.sliding_window, c.rope_theta, c.moe, c.n_rep) == (4096, 10_000.0, None, 4)
    assert round(c.parameter_count() / 1e9, 2) == 7.24  # Mistral 7B: 7,241,732,096 parameters


def test_mixtral_params_json_counts():
    c = ModelConfig.from_params_json(MIXTRAL_PARAMS)
    assert (c.sliding_window, c.rope_theta, c.moe.num_experts, c.moe.num_experts_per_tok) == (None, 1e6, 8, 2)
    assert round(c.parameter_count() / 1e9, 1) == 46.7
    assert round(c.active_parameter_count() / 1e9, 1) == 12.9


def test_explicit_rope_theta_wins():
    assert ModelConfig.from_params_json({**MISTRAL_7B_PARAMS, "rope_theta": 1e6}).rope_theta == 1e6


def test_hf_and_gguf_constructors_agree():
    hf = ModelConfig.from_hf_config(
        {
            "model_type": "mistral",
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "intermediate_size": 14336,
            "rms_norm_eps": 1e-5,
            "vocab_size": 32000,
            "sliding_window": 4096,
            "rope_theta": 10000.0,
            "max_position_embeddings": 32768,
        }
    )
    gguf = ModelConfig.from_gguf_metadata(
        {
            "general.architecture": "llama",
            "llama.embedding_length": 4096,
            "llama.block_count": 32,
            "llama.attention.head_count": 32,
            "llama.attention.head_count_kv": 8,
            "llama.feed_forward_length": 14336,
            "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.vocab_size": 32000,
            "llama.rope.freq_base": 10000.0,
            "llama.context_length": 32768,
            "llama.attention.sliding_window": 4096,
        }
    )
    assert hf.with_(architecture="llama") == gguf


@pytest.mark.parametrize(
    "change,field",
    [
        ({"n_heads": 30}, "n_kv_heads"),
        ({"dim": None}, "dim"),
        ({"n_layers": "many"}, "n_layers"),
        ({"n_layers": 10**9}, "n_layers 1000000000 must be in 1..1024"),  # layer counts within reason
        ({"n_layers": 2**63}, "n_layers"),
        ({"dim": 2**40, "head_dim": 128}, "dim"),
        ({"vocab_size": 2**40}, "vocab_size"),
        ({"hidden_dim": 2**50}, "hidden_dim"),
        ({"sliding_window": -3}, "sliding_window"),
        ({"moe": {"num_experts": 2, "num_experts_per_tok": 3}}, "moe"),
    ],
)
def test_bad_params_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_params_json({**MISTRAL_7B_PARAMS, **change}, source="x/params.json")


def test_unsupported_hf_model_type():
    with pytest.raises(ConfigError, match="gpt2"):
        ModelConfig.from_hf_config({"model_type": "gpt2"})
