"""adapter_config.json read defensively: rank_pattern / alpha_pattern matched in linear time with PEFT's
meaning, malformed patterns and bad values as LoadErrors naming the file and key, and the safetensors
header checked against the model and the config before any tensor is read."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from models import hf_model, save_hf

from tramontane.build.load import load_model
from tramontane.errors import LoadError
from tramontane.lora import LoraSpec, apply_lora, load_adapter, lora_scales, save_adapter
from tramontane.lora.peft_config import read_adapter_config
from tramontane.weights.safetensors import SafetensorsFile

peft = pytest.importorskip("peft")
from peft.utils.other import get_pattern_key  # noqa: E402

HF_DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 2, 16.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Mistral (2 layers, dim 64) saved in the HF layout."""
    return save_hf(hf_model("mistral", seed=3), tmp_path_factory.mktemp("base"))


def make_adapter(folder, base, rank=RANK, targets=("wq", "wv", "w2")):
    """Our adapter on `base`, saved in PEFT's format; returns its folder."""
    model = load_model(base).model
    spec = LoraSpec(rank=rank, alpha=ALPHA, targets=targets)
    apply_lora(model, spec, "a", seed=1)
    return save_adapter(model, folder, "a", spec, base_model=str(base))


def edit_config(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def no_reads(monkeypatch):
    """Make reading any safetensors tensor fail: the checks must all come from the header."""

    def boom(self, name):
        raise AssertionError(f"tensor {name!r} read before the adapter was checked")

    monkeypatch.setattr(SafetensorsFile, "read", boom)


# ---- hostile patterns: linear time ------------------------------------------------------------------

# The first three backtrack exponentially on long runs of one letter; the last three do so on the
# module names themselves ("model.layers.0.self_attn.q_proj"), so Python's `re` never returns there.
HOSTILE = ["(a+)+$", "(.*a){20}", "(x+x+)+y", "([a-z_.0-9]+)*y", "(.*.*)*y", "(.*){12}y"]
CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from tramontane.build.load import load_model
    from tramontane.lora import load_adapter, lora_scales
    from tramontane.lora.peft_config import read_adapter_config

    base, folders = sys.argv[1], sys.argv[2:]
    model = load_model(base).model
    out = {}
    for i, folder in enumerate(folders):
        load_adapter(model, folder, f"a{i}")
        table = read_adapter_config(Path(folder) / "adapter_config.json").alpha_pattern
        hits = [table.lookup(text) for text in ("a" * 40 + "!", "x" * 40, "m." + "a" * 30 + "b", "a" * 40)]
        out[folder] = {"scales": lora_scales(model, f"a{i}"), "hits": [h.key if h else None for h in hits]}
    print(json.dumps(out))
    """
)


def test_hostile_patterns_load_in_linear_time_with_peft_results(tmp_path, base):
    """Each hostile pattern in alpha_pattern and rank_pattern ahead of a benign one: loading ends (in a
    child process, so that a hang fails the test instead of stalling it), and the scales are PEFT's."""
    first = make_adapter(tmp_path / "first", base)
    folders = []
    for i, pattern in enumerate(HOSTILE):
        folder = tmp_path / f"hostile{i}"
        shutil.copytree(first, folder)
        edit_config(folder, alpha_pattern={pattern: 3.0, "v_proj": 4.0}, rank_pattern={pattern: 5})
        folders.append(str(folder))
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(base), *folders], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    for pattern, folder in zip(HOSTILE, folders, strict=True):
        # none of them matches a module name (none ends in "a" or "y"): v_proj gets 4, the rest lora_alpha
        want = {p: (4.0 if "wv" in p else ALPHA) / RANK for p in out[folder]["scales"]}
        assert out[folder]["scales"] == want, pattern
        assert len(want) == 2 * 3, "wq, wv, w2 in both layers"
        # texts on which backtracking explodes; only the run of a's ends the way two of them ask
        ends_in_a = pattern in ("(a+)+$", "(.*a){20}")
        assert out[folder]["hits"] == [None, None, None, pattern if ends_in_a else None], pattern


# ---- PEFT's meaning ---------------------------------------------------------------------------------

MODULES = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in [f"self_attn.{p}" for p in HF_DENSE[:4]]
    + [f"mlp.{p}" for p in HF_DENSE[4:]]
    + ["block_sparse_moe.gate", "mlp.gate", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    + [f"block_sparse_moe.experts.{e}.w{w}" for e in range(8) for w in (1, 2, 3)]
]
BENIGN = [
    ["q_proj", "v_proj"],
    [r"layers\.1\.self_attn\.q_proj", "q_proj"],  # the first key that matches wins
    ["q_proj", r"layers\.1\.self_attn\.q_proj"],
    ["proj"],  # matches no module: PEFT wants a whole dotted component (or a prefix ending in ".")
    ["self_attn.(q|k)_proj", "mlp.*"],
    [".*proj"],
    ["model.layers.0.mlp.down_proj"],  # unescaped dots are wildcards for PEFT too
    ["experts.[0-3].w1", "gate", "experts.*"],
    [r".*\.gate_up_proj", "down_proj"],  # what PEFT writes when it fuses Mixtral's w1/w3
    [r"layers\.\d+\.mlp\.(gate|up)_proj"],
    ["a)|(.*o_proj"],  # escapes PEFT's group the same way in both engines
    ["(?i:Q_PROJ)", "(?:up|down)_proj"],
]


@pytest.mark.parametrize("keys", BENIGN, ids=lambda k: "|".join(k))
def test_patterns_resolve_as_peft_does(tmp_path, keys):
    """rank and alpha per module equal what PEFT's own get_pattern_key gives, on every module name."""
    ranks = {k: 3 + i for i, k in enumerate(keys)}
    alphas = {k: 1.5 * (i + 1) for i, k in enumerate(keys)}
    path = tmp_path / "adapter_config.json"
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "rank_pattern": ranks, "alpha_pattern": alphas}
    path.write_text(json.dumps(cfg))
    ours = read_adapter_config(path)
    for module in MODULES:
        assert ours.rank_of(module)[0] == ranks.get(get_pattern_key(list(ranks), module), 8), module
        assert ours.alpha_of(module) == alphas.get(get_pattern_key(list(alphas), module), 32), module


def test_peft_adapter_with_patterns_loads_like_peft(tmp_path, base):
    """An adapter PEFT trained with rank_pattern and alpha_pattern gives PEFT's logits, with its scales."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(base).eval()
    ranks, alphas = {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, {"v_proj": 3, "o_proj": 12}
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=HF_DENSE, rank_pattern=ranks, alpha_pattern=alphas, lora_dropout=0.0
    )
    model = peft.get_peft_model(hf, config)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = model(tokens).logits.float()
    ours = load_model(base).model
    load_adapter(ours, tmp_path / "adapter", "p")
    scales = lora_scales(ours, "p")
    assert scales["layers.0.attention.wq"] == 8 / 2 and scales["layers.1.attention.wv"] == 3 / 4
    assert scales["layers.1.attention.wo"] == 12 / 4 and scales["layers.1.feed_forward.w2"] == 8 / 6
    assert scales["layers.0.feed_forward.w2"] == 8 / 4
    with torch.no_grad():
        mine = ours(tokens).float()
    assert (mine - theirs).abs().max().item() <= 1e-4


# ---- malformed patterns and bad values --------------------------------------------------------------


@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
@pytest.mark.parametrize(
    "pattern",
    [
        "(q_proj",  # unbalanced: Python's re refuses it, as PEFT would
        "q_proj)",
        "*q_proj",
        r"(\w)\3_proj",  # a backreference (group 3: PEFT's wrapping adds two groups first)
        "(?=q)q_proj",  # a look-ahead
        "(?>q_proj)",  # an atomic group
        "q_proj{,2}",  # Python and RE2 read {,n} differently
    ],
)
def test_malformed_patterns_name_file_and_key(tmp_path, base, monkeypatch, field, pattern):
    folder = make_adapter(tmp_path / "ad", base)
    edit_config(folder, **{field: {"v_proj": 4, pattern: 3}})
    model = load_model(base).model
    no_reads(monkeypatch)
    where = re.escape(f"{folder / 'adapter_config.json'}: field {field}[{pattern!r}]")
    with pytest.raises(LoadError, match=where):
        load_adapter(model, folder, "b")


@pytest.mark.parametrize(
    "fields,where",
    [
        ({"r": 0}, "'r'"),
        ({"r": True}, "'r'"),
        ({"r": 2.0}, "'r'"),
        ({"lora_alpha": float("nan")}, "'lora_alpha'"),  # json writes NaN, and Python's json reads it back
        ({"lora_alpha": float("inf")}, "'lora_alpha'"),
        ({"lora_alpha": "16"}, "'lora_alpha'"),
        ({"lora_alpha": 0}, "'lora_alpha'"),
        ({"lora_dropout": "0.1"}, "'lora_dropout'"),
        ({"lora_dropout": float("nan")}, "'lora_dropout'"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']"),
        ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj']"),
        ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern['q_proj']"),
        ({"alpha_pattern": {"v_proj": float("inf")}}, "alpha_pattern['v_proj']"),
        ({"alpha_pattern": {"v_proj": -1.0}}, "alpha_pattern['v_proj']"),
        ({"alpha_pattern": {"v_proj": None}}, "alpha_pattern['v_proj']"),
        ({"alpha_pattern": ["v_proj"]}, "'alpha_pattern'"),
        ({"rank_pattern": "q_proj"}, "'rank_pattern'"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, base, monkeypatch, fields, where):
    folder = make_adapter(tmp_path / "ad", base)
    edit_config(folder, **fields)
    model = load_model(base).model
    no_reads(monkeypatch)
    with pytest.raises(LoadError, match=re.escape(f"{folder / 'adapter_config.json'}: field {where}")):
        load_adapter(model, folder, "b")


# ---- ranks and shapes against the model, from the header -------------------------------------------


@pytest.mark.parametrize(
    "fields,where",
    [
        ({"r": 8}, "'r'"),  # the file's tensors have rank 2
        ({"rank_pattern": {"q_proj": 3, "v_proj": 2}}, "rank_pattern['q_proj']"),
        ({"rank_pattern": {"k_proj": 3, r"layers\.1\..*v_proj": 4}}, r"rank_pattern['layers\\.1\\..*v_proj']"),
    ],
)
def test_rank_disagreeing_with_config_is_refused_before_reading(tmp_path, base, monkeypatch, fields, where):
    folder = make_adapter(tmp_path / "ad", base, targets=("wq", "wv"))
    edit_config(folder, **fields)
    model = load_model(base).model
    no_reads(monkeypatch)
    with pytest.raises(LoadError, match=re.escape(f"{folder / 'adapter_config.json'}: field {where}")) as e:
        load_adapter(model, folder, "b")
    assert "adapter_model.safetensors key 'base_model.model.model.layers." in str(e.value)
    assert "has rank 2" in str(e.value)


def test_rank_pattern_giving_the_files_ranks_loads(tmp_path, base):
    """The same rank written as r or as a matching rank_pattern entry loads the same adapter."""
    folder = make_adapter(tmp_path / "ad", base, targets=("wq", "wv"))
    edit_config(folder, r=7, rank_pattern={"q_proj": 2, "v_proj": 2}, alpha_pattern={"q_proj": 4})
    model = load_model(base).model
    assert load_adapter(model, folder, "b").rank == 7
    assert lora_scales(model, "b")["layers.0.attention.wq"] == 4 / 2
    assert lora_scales(model, "b")["layers.0.attention.wv"] == ALPHA / 2


def test_rank_above_the_projection_is_refused(tmp_path, base, monkeypatch):
    """wq is [64, 64]: a rank of 65 is larger than both of its dimensions."""
    folder = make_adapter(tmp_path / "ad", base, rank=65, targets=("wq",))
    model = load_model(base).model
    no_reads(monkeypatch)
    with pytest.raises(LoadError, match=r"adapter_config\.json: field 'r': rank 65 exceeds both dimensions"):
        load_adapter(model, folder, "b")


@pytest.mark.parametrize(
    "a_shape,b_shape,problem",
    [
        ((2, 65), (64, 2), "do not fit a [64, 64] projection"),  # in of wq is 64
        ((2, 64), (32, 2), "do not fit a [64, 64] projection"),
        ((2, 64), (64, 3), "are not [r,in] and [out,r]"),
        ((2, 64, 1), (64, 2), "are not [r,in] and [out,r]"),
        ((0, 64), (64, 0), "are not [r,in] and [out,r]"),
    ],
)
def test_tensor_shapes_are_checked_from_the_header(tmp_path, base, monkeypatch, a_shape, b_shape, problem):
    from safetensors.torch import save_file

    folder = make_adapter(tmp_path / "ad", base, targets=("wq",))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    tensors = {key.format("A"): torch.zeros(a_shape), key.format("B"): torch.zeros(b_shape)}
    save_file(tensors, folder / "adapter_model.safetensors")
    model = load_model(base).model
    no_reads(monkeypatch)
    with pytest.raises(LoadError, match=r"adapter_model\.safetensors: key .*q_proj") as e:
        load_adapter(model, folder, "b")
    assert problem in str(e.value)
