"""Acceptance 2: the same random weights in every format load to the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from models import hf_model, save_gguf, save_hf, save_native

from tramontane.build.load import load_model
from tramontane.errors import LoadError

KINDS = ["mistral", "mixtral", "llama"]
GGUF_TYPES = ["F32", "F16", "Q8_0", "Q4_0"]


@pytest.fixture(scope="module", params=KINDS)
def source(request, tmp_path_factory):
    hf = hf_model(request.param, seed=5)
    root = tmp_path_factory.mktemp(request.param)
    tokens = torch.randint(3, hf.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = load_model(save_hf(hf, root / "hf")).model(tokens)
    return hf, root, tokens, reference


def test_hf_folder_is_sharded(source):
    _, root, _, _ = source
    assert len(list((root / "hf").glob("model-*.safetensors"))) > 1
    assert (root / "hf" / "model.safetensors.index.json").is_file()


def test_hf_single_file(source):
    hf, root, tokens, reference = source
    model = load_model(save_hf(hf, root / "hf1", shard=None)).model
    assert torch.equal(model(tokens), reference)


def test_native_folder(source):
    hf, root, tokens, reference = source
    loaded = load_model(save_native(hf, root / "native"))
    assert loaded.format == "mistral"
    torch.testing.assert_close(loaded.model(tokens), reference, atol=1e-5, rtol=0)


def round_trip(hf, qtype: str):
    """A copy of the transformers model whose matrices went through gguf's own quantize/dequantize:
    the exact weights a correct GGUF reader must produce (norms and the router stay float32)."""
    import copy

    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    model = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith("mlp.gate.weight"):
                q = gguf.quants.quantize(p.numpy(), kind)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, kind).copy()).reshape(p.shape))
    return model


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf(source, qtype):
    """F32 loads exactly; quantized files give the logits of the round-tripped weights."""
    hf, root, tokens, reference = source
    loaded = load_model(save_gguf(hf, root / f"model-{qtype}.gguf", qtype))
    assert loaded.format == "gguf"
    assert loaded.config.tie_embeddings == (hf.config.model_type == "llama")
    logits = loaded.model(tokens)
    if qtype == "F32":
        assert torch.equal(logits, reference)
        return
    with torch.no_grad():
        expected = round_trip(hf, qtype)(tokens).logits
    diff = (logits - expected).abs().max().item()
    assert diff <= 1e-4, f"{qtype}: max abs difference {diff} from the round-tripped weights"
    assert (logits - reference).abs().max().item() > 1e-3  # the weights really were quantized


def test_native_params_json_rope_theta_rule(source):
    """v0.1 params.json has no rope_theta: 10000 with a sliding window, 1e6 without."""
    hf, root, _, _ = source
    if hf.config.model_type == "llama":
        pytest.skip("the llama test model has rope_theta 500, which params.json must state")
    folder = save_native(hf, root / "native-rule")
    params = json.loads((folder / "params.json").read_text())
    config = load_model(folder).config
    assert "rope_theta" not in params
    assert config.rope_theta == (10_000.0 if params.get("sliding_window") else 1e6)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    for target in (path, tmp_path):
        with pytest.raises(LoadError, match="pickle") as err:
            load_model(target)
        assert "safetensors" in str(err.value) and "GGUF" in str(err.value)


def test_missing_and_misshapen_tensors_are_named(source, tmp_path):
    from safetensors.torch import load_file, save_file

    hf, root, _, _ = source
    folder = save_hf(hf, tmp_path / "broken", shard=None)
    state = load_file(folder / "model.safetensors")
    state.pop("model.norm.weight")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(LoadError, match="missing tensors: norm.weight"):
        load_model(folder)
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(LoadError, match="model.norm.weight.*shape"):
        load_model(folder)
