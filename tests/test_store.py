"""The model store: `tramontane pull` from a local fake Hub (the real huggingface_hub download code,
through HF_ENDPOINT) and from local paths, `list`, `rm`, and short names wherever MODEL is taken."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeHub
from models import hf_model, save_hf

DATA = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> dict[str, bytes]:
    folder = save_hf(hf_model("mistral", seed=2, vocab_size=32768), tmp_path_factory.mktemp("src"), shard=None)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["tokenizer.model.v3"] = (DATA / "mistral_instruct_tokenizer_240323.model.v3").read_bytes()
    files["pytorch_model.bin"] = b"a pickle that must never be fetched"
    files["training_args.pt"] = b"another pickle"
    files["docs/notes.md"] = b"not a model file"
    return files


def cli(home: Path, *args: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    """`tramontane ARGS` with the store at `home`: a fresh process when it talks to a hub (huggingface_hub
    reads HF_ENDPOINT when imported), in this process otherwise (`cli.main.main`, as the console script)."""
    if endpoint is None:
        return in_process(home, *args)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(TRAMONTANE_HOME=str(home), HF_ENDPOINT=endpoint or "http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run(
        [sys.executable, "-m", "tramontane", *args], env=env, capture_output=True, text=True, timeout=300
    )


def in_process(home: Path, *args: str) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from tramontane.cli.main import main

    out, err, before = io.StringIO(), io.StringIO(), os.environ.get("TRAMONTANE_HOME")
    os.environ["TRAMONTANE_HOME"] = str(home)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        if before is None:
            del os.environ["TRAMONTANE_HOME"]
        else:
            os.environ["TRAMONTANE_HOME"] = before
    return subprocess.CompletedProcess(list(args), code or 0, out.getvalue(), err.getvalue())


def test_pull_from_the_hub_resumes_skips_pickles_and_runs_by_name(repo, tmp_path):
    home = tmp_path / "home"
    with FakeHub({"acme/tiny-mistral": repo}) as hub:
        cut = len(repo["model.safetensors"]) * 3 // 4
        hub.cut_after["model.safetensors"] = cut  # the first download of the weights breaks off there
        r = cli(home, "pull", "acme/tiny-mistral", "--name", "tiny", endpoint=hub.url)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "pull tiny: 4/4 files" in r.stderr and "\r" not in r.stderr  # a pipe: plain lines, no bars
        fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub.log if m == "GET" and "/resolve/" in p}
        ranges = [rng for m, p, rng in hub.log if m == "GET" and p.endswith("model.safetensors") and rng]
    assert fetched == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model.v3"}
    assert len(ranges) == 1 and 0 < int(ranges[0][6:-1]) <= cut  # went on from (a chunk boundary before) the cut
    stored = home / "models" / "tiny"
    assert (stored / "model.safetensors").read_bytes() == repo["model.safetensors"]
    assert not list(stored.glob("*.bin")) and not (stored / ".cache").exists()
    listed = cli(home, "list")
    assert listed.returncode == 0 and "tiny" in listed.stdout and "hf://acme/tiny-mistral" in listed.stdout
    ran = cli(home, "run", "tiny", "hello", "--max-tokens", "3", "--dtype", "float32")
    assert ran.returncode == 0, ran.stderr[-2000:]
    shown = cli(home, "show", "tiny")
    assert shown.returncode == 0 and "Hugging Face safetensors" in shown.stdout
    assert cli(home, "rm", "tiny").returncode == 0 and not stored.exists()
    gone = cli(home, "rm", "tiny")
    assert gone.returncode == 1 and "no stored model named 'tiny'" in gone.stderr


def test_gguf_repositories_need_a_file_choice(tmp_path, smollm2_path):
    home = tmp_path / "home"
    gguf = smollm2_path.read_bytes()
    with FakeHub(
        {"acme/smol-gguf": {"smol-q4_1.gguf": gguf, "smol-q8_0.gguf": b"GGUF-not-this-one", "README.md": b"# smol"}}
    ) as hub:
        refused = cli(home, "pull", "acme/smol-gguf", endpoint=hub.url)
        assert refused.returncode == 1 and "--file" in refused.stderr and "smol-q4_1.gguf" in refused.stderr
        r = cli(home, "pull", "acme/smol-gguf", "--file", "smol-q4_1.gguf", "--name", "smol", endpoint=hub.url)
        assert r.returncode == 0, r.stderr[-2000:]
        fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub.log if m == "GET" and "/resolve/" in p}
    assert fetched == {"smol-q4_1.gguf"}
    ran = cli(home, "run", "smol", "What is the capital of France?", "--max-tokens", "8")
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr[-2000:]


def test_offline_and_unknown_repositories_get_clear_errors(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the machine is "offline"
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    offline = cli(tmp_path / "home", "pull", "acme/anything", endpoint=closed)
    assert offline.returncode == 1 and "tramontane pull PATH" in offline.stderr and "Traceback" not in offline.stderr
    assert "cannot reach" in offline.stderr and "Retrying" not in offline.stderr  # one probe, no backoff
    assert not list((tmp_path / "home").rglob("*.partial"))  # nothing half-made left in the store
    with FakeHub({}) as hub:
        unknown = cli(tmp_path / "home", "pull", "acme/nothing", endpoint=hub.url)
    assert unknown.returncode == 1 and "no repository 'acme/nothing'" in unknown.stderr
    assert unknown.stderr.count("\n") == 1 and not list((tmp_path / "home").rglob("*.partial"))  # one line, no leftover


def test_pull_a_local_folder_or_gguf_file(tmp_path, smollm2_path):
    home = tmp_path / "home"
    folder = save_hf(hf_model("mistral", seed=3, vocab_size=32768), tmp_path / "mine", shard=None)
    (folder / "tokenizer.model.v3").write_bytes((DATA / "mistral_instruct_tokenizer_240323.model.v3").read_bytes())
    (folder / "optimizer.pt").write_bytes(b"pickle")
    assert cli(home, "pull", str(folder)).returncode == 0
    assert (home / "models" / "mine" / "model.safetensors").is_file()
    assert not (home / "models" / "mine" / "optimizer.pt").exists()
    assert cli(home, "pull", str(smollm2_path), "--name", "smol").returncode == 0
    listed = cli(home, "list").stdout
    assert "mine" in listed and "smol" in listed and "GGUF" in listed
    header, *rows = listed.splitlines()
    assert header.split() == ["NAME", "SOURCE", "SIZE", "TYPE", "MODIFIED"]  # issue 19: columns, a header
    smol = next(r for r in rows if r.startswith("smol "))
    assert str(smollm2_path.resolve()) in smol and " GB " in smol and smol.split()[-2].count("-") == 2
    bad = cli(home, "pull", str(folder), "--name", "../escape")
    assert bad.returncode == 1 and "model name" in bad.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    failed = cli(home, "pull", str(broken))
    assert failed.returncode == 1 and "does not load" in failed.stderr and not (home / "models" / "broken").exists()
