"""The fine-tuning loop: it learns, resumes exactly, refuses bad data, and its settings come from files and flags."""

from __future__ import annotations

import json
import math

import pytest
import torch
from chartok import CharTokenizer
from models import hf_model, save_hf

from tramontane.build.load import load_model
from tramontane.cli.main import main
from tramontane.errors import ConfigError
from tramontane.train.config import TrainConfig, build_config
from tramontane.train.loop import DataError, Trainer, lr_factor


def text_lines(path, n: int = 24, seed: int = 0) -> str:
    """Pretraining lines over the tiny vocabulary (CharTokenizer: 'A' is token 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 60, (int(torch.randint(8, 20, (1,), generator=g)),), generator=g)
        rows.append(json.dumps({"text": "".join(chr(0x41 + int(t)) for t in ids)}))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_hf(hf_model("mistral", seed=11), tmp_path_factory.mktemp("m"), shard=None)


def trainer(folder, cfg: TrainConfig) -> Trainer:
    return Trainer(cfg, load_model(folder).model, CharTokenizer())


def test_resume_repeats_the_uninterrupted_loss_curve(tmp_path, tiny):
    data = text_lines(tmp_path / "train.jsonl")
    held_out = text_lines(tmp_path / "eval.jsonl", n=6, seed=1)
    cfg = TrainConfig(
        data=data,
        eval=held_out,
        out=str(tmp_path / "a"),
        seq_len=48,
        batch_size=2,
        grad_accum=2,
        max_steps=8,
        lr=5e-3,
        warmup_steps=2,
        dropout=0.1,
        rank=4,
        autocast="off",
        save_every=3,
        eval_every=4,
    )
    whole = trainer(tiny, cfg).run(progress=False)
    cut = cfg.with_(out=str(tmp_path / "b"))
    first = trainer(tiny, cut)
    first.run(progress=False, stop_after=4)  # interrupted after step 4; the checkpoint is from step 3
    second = trainer(tiny, cut)
    second.resume()
    assert second.step == 3
    resumed = second.run(progress=False)
    key = [(r["step"], r["loss"], r["lr"]) for r in whole.train]
    assert [(r["step"], r["loss"], r["lr"]) for r in resumed.train] == key
    assert len(key) == 8 and key[-1][1] < key[0][1]
    assert [e["step"] for e in resumed.eval] == [4, 8] and resumed.eval == whole.eval
    assert resumed.eval[-1]["loss"] < resumed.eval[0]["loss"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "loss.png", "metrics.jsonl"):
        assert (tmp_path / "b" / name).is_file()
    assert (tmp_path / "b" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_checkpoint_is_listed_only_once_it_is_saved(tmp_path, tiny, monkeypatch):
    """out/checkpoints.jsonl (what the jobs API lists, and what a restarted server resumes from) never
    names a checkpoint whose state is not on disk: a worker killed while saving (here: torch.save
    fails at the second checkpoint) leaves the list at the first, whose state resumes."""
    data = text_lines(tmp_path / "train.jsonl")
    cfg = TrainConfig(
        data=data, out=str(tmp_path / "o"), seq_len=48, batch_size=2, max_steps=4, rank=4, autocast="off", save_every=2
    )
    save = torch.save

    def killed_at_step_4(obj, path, *args, **kwargs):
        if obj.get("step") == 4:
            raise KeyboardInterrupt("killed while saving")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer(tiny, cfg).run(progress=False)
    lines = (tmp_path / "o" / "checkpoints.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2]
    again = trainer(tiny, cfg)
    again.resume()
    assert again.step == 2


def test_resume_refuses_changed_settings(tmp_path, tiny):
    data = text_lines(tmp_path / "train.jsonl")
    cfg = TrainConfig(
        data=data, out=str(tmp_path / "o"), seq_len=48, batch_size=2, max_steps=2, rank=4, autocast="off", save_every=1
    )
    trainer(tiny, cfg).run(progress=False)
    with pytest.raises(ConfigError, match="batch_size"):
        trainer(tiny, cfg.with_(batch_size=3)).resume()
    with pytest.raises(ConfigError, match="no checkpoint"):
        trainer(tiny, cfg.with_(out=str(tmp_path / "none"))).resume()


def test_gradient_accumulation_and_checkpointing_change_nothing(tmp_path, tiny):
    data = text_lines(tmp_path / "train.jsonl", n=8)
    base = TrainConfig(
        data=data, out=str(tmp_path / "x"), seq_len=48, batch_size=2, max_steps=1, rank=4, autocast="off", lr=1e-2
    )
    one = trainer(tiny, base.with_(batch_size=2)).run(progress=False).train[0]["loss"]
    # the same rows as two micro-batches of one row: the step's loss is still the mean over all targets
    split = trainer(tiny, base.with_(batch_size=1, grad_accum=2)).run(progress=False).train[0]["loss"]
    ckpt = trainer(tiny, base.with_(activation_checkpointing=True)).run(progress=False).train[0]["loss"]
    assert split == pytest.approx(one, rel=1e-5) and ckpt == pytest.approx(one, rel=1e-6)


def test_bad_data_never_trains(tmp_path, tiny):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ABC"}\n{"text": \n{"messages": [{"role": "bot", "content": "x"}]}\n')
    cfg = TrainConfig(data=str(path), out=str(tmp_path / "o"), seq_len=48, rank=4)
    model = load_model(tiny).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError) as info:
        Trainer(cfg, model, CharTokenizer())
    assert ":2:" in str(info.value) and ":3:" in str(info.value) and "bad JSON" in str(info.value)
    assert not (tmp_path / "o").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_factor(TrainConfig(max_steps=12, warmup_steps=4, min_lr_ratio=0.1))
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(12) == pytest.approx(0.1) and all(f(s) >= f(s + 1) for s in range(4, 12))


def test_settings_file_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('data = "d.jsonl"\nmax_steps = 7\n[lora]\nrank = 4\ntargets = ["wq", "wv"]\n')
    cfg = build_config(toml, {"max_steps": 9, "lr": None})
    assert (cfg.max_steps, cfg.rank, cfg.targets, cfg.lr) == (9, 4, ("wq", "wv"), 1e-4)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("data: d.jsonl\nlr: 0.001\n")
    assert build_config(yaml, {}).lr == 0.001
    bad = tmp_path / "bad.toml"
    bad.write_text("rnak = 4\n")
    with pytest.raises(ConfigError, match="rnak"):
        build_config(bad, {})
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_cli_validate_reports_lines_and_estimate(tmp_path, capsys, smollm2_path):
    path = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path.write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    assert (
        main(
            ["finetune", str(smollm2_path), "--data", str(path), "--validate", "--seq-len", "128", "--batch-size", "1"]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert f"{path}:2:" in out and "estimated time per epoch" in out


CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Greece", "Athens"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"),
]


def test_smollm2_learns_a_format_it_did_not_know(tmp_path, smollm2_path):
    """40 examples teach '### CITY ###' answers; a held-out country gets an answer in that format."""
    import tramontane
    from tramontane.lora.layers import set_active

    rows = [
        {
            "messages": [
                {"role": "user", "content": q.format(c)},
                {"role": "assistant", "content": f"### {city.upper()} ###"},
            ]
        }
        for c, city in CAPITALS
        for q in ("What is the capital of {}?", "Which city is the capital of {}?")
    ]
    data = tmp_path / "capitals.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    llm = tramontane.load(smollm2_path, dtype="float32", packed=False)
    question = [{"role": "user", "content": "What is the capital of Italy?"}]
    before = llm.chat(question, temperature=0, max_tokens=12).text
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "out"),
        seq_len=128,
        batch_size=2,
        max_steps=8,
        lr=3e-3,
        warmup_steps=3,
        rank=8,
        alpha=16,
    )
    history = Trainer(cfg, llm.model, llm.tokenizer).run(progress=False)
    losses = [r["loss"] for r in history.train]
    assert losses[-1] <= 0.5 * losses[0], losses
    set_active(llm.model, "default")
    llm.model.eval()
    after = llm.chat(question, temperature=0, max_tokens=12).text
    assert not before.startswith("###"), before
    assert after.startswith("### ") and after.endswith(" ###"), after


def test_cli_finetune_then_merge(tmp_path, smollm2_path):
    """`finetune` with a settings file and flags, then `merge`: the merged folder loads in transformers and
    here, with the logits of the base model plus the adapter."""
    import transformers

    import tramontane

    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w.upper()}]}
        for w in ("apple", "river", "cloud", "stone")
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    settings = tmp_path / "ft.toml"
    settings.write_text(f'data = "{data}"\nseq_len = 128\nmax_steps = 50\nlr = 0.01\n[lora]\nrank = 4\n')
    out = tmp_path / "adapter"
    assert (
        main(
            [
                "finetune",
                str(smollm2_path),
                "--config",
                str(settings),
                "--out",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--autocast",
                "off",
            ]
        )
        == 0
    )
    assert json.loads((out / "training_config.json").read_text())["max_steps"] == 2  # the flag won
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # the file's [lora] table
    merged = tmp_path / "merged"
    assert main(["merge", str(smollm2_path), str(out), "--out", str(merged)]) == 0
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"]  # issue 19: complete

    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]])
    llm = tramontane.load(smollm2_path, dtype="float32", packed=False, lora={"ft": out})
    llm.use_adapter("ft")
    with torch.no_grad():
        ours = llm.model(ids)[0]
        hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits[0]
        again = tramontane.load(merged, dtype="float32").model(ids)[0]
    # logits of SmolLM2 reach ~30; 1e-4 of an fp32 dot product's rounding across 30 layers
    assert (hf - ours).abs().max().item() <= 5e-4 and (again - ours).abs().max().item() <= 5e-4
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    assert tok("Say apple.")["input_ids"] == llm.tokenizer.encode("Say apple.")


def test_packed_sequences_do_not_see_each_other(tiny):
    """Two sequences packed in one row (positions restart, segments differ) give each one's own logits."""
    model = load_model(tiny).model
    a, b = torch.tensor([5, 9, 14, 3, 7]), torch.tensor([17, 4, 60, 8])
    row = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None]
    segments = torch.tensor([[0] * 5 + [1] * 4])
    with torch.no_grad():
        packed = model(row, positions, segments=segments)[0]
        alone = torch.cat([model(a[None])[0], model(b[None])[0]])
        leaky = model(row, positions)[0]  # without segments the second sequence would see the first
    assert (packed - alone).abs().max().item() <= 1e-5
    assert (leaky[5:] - alone[5:]).abs().max().item() > 1e-3
