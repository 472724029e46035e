"""Peak resident memory while loading stays under 1.5x the loaded model's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = textwrap.dedent("""
    import sys, torch
    from tramontane.build import load_model
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    def high_water():  # VmHWM belongs to this image; ru_maxrss would inherit the forking parent's
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    base = rss()
    model = load_model(sys.argv[1]).model
    peak = high_water()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(base, peak, size)
""")


def measure(path) -> tuple[int, int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, check=True)
    base, peak, size = map(int, out.stdout.split())
    return base, peak, size


def write_hf_model(folder, dim=1024, layers=6, hidden=3072, vocab=16000) -> None:
    folder.mkdir()
    cfg = {
        "model_type": "mistral",
        "hidden_size": dim,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": hidden,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    kv = dim // 2
    shapes = {"model.embed_tokens.weight": (vocab, dim), "lm_head.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (dim, dim),
            p + "self_attn.k_proj.weight": (kv, dim),
            p + "self_attn.v_proj.weight": (kv, dim),
            p + "self_attn.o_proj.weight": (dim, dim),
            p + "mlp.gate_proj.weight": (hidden, dim),
            p + "mlp.up_proj.weight": (hidden, dim),
            p + "mlp.down_proj.weight": (dim, hidden),
            p + "input_layernorm.weight": (dim,),
            p + "post_attention_layernorm.weight": (dim,),
        }
    names = list(shapes)
    half = len(names) // 2
    index = {}
    for shard, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{shard + 1}-of-00002.safetensors"
        save_file({n: torch.randn(shapes[n]) * 0.02 for n in part}, folder / fname)
        index |= {n: fname for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))


def test_safetensors_load_peak_rss(tmp_path):
    write_hf_model(tmp_path / "m")
    base, peak, size = measure(tmp_path / "m")
    assert size > 200e6
    assert peak - base <= 1.5 * size, f"peak {peak - base:,} bytes over baseline for a {size:,}-byte model"


def test_gguf_load_peak_rss():
    from tramontane.hub.resolve import default_model_path

    try:
        path = default_model_path()
    except Exception as e:  # the default model is installed by `make test`
        pytest.skip(str(e))
    base, peak, size = measure(path)
    assert peak - base <= 1.5 * size, f"peak {peak - base:,} bytes over baseline for a {size:,}-byte model"


def test_loading_does_not_import_the_compiler(tmp_path):
    """The model is built on the meta device: an initialiser or arithmetic run on meta tensors goes through
    torch._refs, which imports torch._dynamo (1.1 s and ~60 MB resident in every process that loads a
    model, measured on SmolLM2: load 1.3 -> 0.2 s). Neither a packed GGUF nor a safetensors folder may."""
    from models import hf_model, save_gguf, save_hf

    gguf = save_gguf(hf_model("mistral", seed=1), tmp_path / "m.gguf", "Q4_0")
    folder = save_hf(hf_model("llama", seed=2), tmp_path / "hf")
    code = (
        "import sys\nfrom tramontane.build import load_model\n"
        "load_model(sys.argv[1], packed=True)\nload_model(sys.argv[2])\nprint('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(gguf), str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "False"
