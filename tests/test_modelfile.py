"""Issue 20: `tramontane create NAME -f Modelfile` reads Ollama's Modelfile into a stored model whose
settings (PARAMETER, SYSTEM, MESSAGE, ADAPTER) run, chat and serve (OpenAI and Ollama routes) apply;
answers equal the offline API's given the same settings by hand."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import httpx
import pytest
from serving import running_server
from test_serve_lora import make_adapter

import tramontane
from tramontane.cli.main import main
from tramontane.hub.modelfile import ModelfileError, parse_modelfile

MODELFILE = '''# a French assistant
FROM {base}
PARAMETER temperature 0
PARAMETER num_predict 12
PARAMETER stop "Paris"
SYSTEM """Tu réponds
en français."""
MESSAGE user Bonjour
MESSAGE assistant "Bonjour ! Que puis-je faire pour vous ?"
ADAPTER ./lora
LICENSE Apache-2.0
'''
QUESTION = "What is the capital of France?"


def test_modelfile_syntax():
    text = MODELFILE.format(base="x.gguf") + 'parameter stop "\\"end\\""\nTEMPLATE """{{ .Prompt }}"""\n'
    found = parse_modelfile(text, Path("/models"))
    s = found.settings
    assert found.base == "x.gguf" and s.adapter == Path("/models/lora") and s.template == "{{ .Prompt }}"
    assert s.parameters == {"temperature": 0.0, "num_predict": 12, "stop": ["Paris", '"end"']}
    assert s.system == "Tu réponds\nen français." and s.license == "Apache-2.0"
    assert s.messages == [
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Bonjour ! Que puis-je faire pour vous ?"},
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("FROM a\nPARAMETER temperature warm", "Modelfile:2: parameter temperature takes float values"),
        ("FROM a\nPARAMETER heat 1", "Modelfile:2: unknown parameter 'heat'"),
        ("FROM a\nPARAMETER mirostat 2", "Modelfile:2: this engine has no mirostat sampler"),
        ("FROM a\nINCLUDE b", "Modelfile:2: unknown instruction 'INCLUDE'"),
        ('FROM a\n\nSYSTEM """never closed', 'Modelfile:3: a """ string that is never closed'),
        ("FROM a\nMESSAGE robot hi", "Modelfile:2: MESSAGE role must be one of system, user, assistant"),
        ("FROM a\nFROM b", "Modelfile:2: a second FROM"),
        ("SYSTEM hi", "no FROM line"),
    ],
)
def test_modelfile_mistakes_name_their_line(text, words):
    with pytest.raises(ModelfileError, match=words.replace("(", r"\(")):
        parse_modelfile(text, Path("."))


def run_cli(home: Path, *args: str) -> tuple[int, str, str]:
    out, err, before = io.StringIO(), io.StringIO(), os.environ.get("TRAMONTANE_HOME")
    os.environ["TRAMONTANE_HOME"] = str(home)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        if before is None:
            del os.environ["TRAMONTANE_HOME"]
        else:
            os.environ["TRAMONTANE_HOME"] = before
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def created(smollm2_path, tmp_path_factory):
    """(store home, folder of the Modelfile, the expected greedy answer) for a model named "french"."""
    root = tmp_path_factory.mktemp("modelfile")
    make_adapter(smollm2_path, root / "lora", seed=3)
    (root / "Modelfile").write_text(MODELFILE.format(base=smollm2_path), encoding="utf-8")
    code, out, err = run_cli(root / "home", "create", "french", "-f", str(root / "Modelfile"))
    assert code == 0, err
    assert "created french" in out
    llm = tramontane.load(smollm2_path, lora={"lora": root / "lora"})
    llm.use_adapter("lora")
    messages = [
        {"role": "system", "content": "Tu réponds\nen français."},
        {"role": "user", "content": "Bonjour"},
        {"role": "assistant", "content": "Bonjour ! Que puis-je faire pour vous ?"},
        {"role": "user", "content": QUESTION},
    ]
    expected = llm.chat(messages, temperature=0, max_tokens=12, stop=["Paris"]).text
    llm.use_adapter(None)
    assert llm.chat(messages, temperature=0, max_tokens=12, stop=["Paris"]).text != expected  # the adapter shows
    return root / "home", root, expected


def test_run_applies_the_modelfile(created):
    home, _, expected = created
    code, out, err = run_cli(home, "run", "french", QUESTION)
    assert code == 0, err
    assert out.rstrip("\n") == expected
    stored = home / "models" / "french"
    assert (stored / "adapter" / "adapter_config.json").is_file()
    code, out, _ = run_cli(home, "list")
    assert "Modelfile (FROM" in out


def test_serve_applies_the_modelfile_on_both_apis(created, tmp_path):
    home, _, expected = created
    with running_server(tmp_path / "log", "french", "--kv-cache-memory", "64M", env={"TRAMONTANE_HOME": str(home)}) as (
        base,
        _,
    ):
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["french"]  # its adapter: its own
        ask = [{"role": "user", "content": QUESTION}]
        oai = httpx.post(f"{base}/v1/chat/completions", json={"messages": ask}, timeout=120).json()
        assert oai["choices"][0]["message"]["content"] == expected and oai["model"] == "french"
        ollama = httpx.post(
            f"{base}/api/chat", json={"model": "french:latest", "messages": ask, "stream": False}, timeout=120
        )
        assert ollama.json()["message"]["content"] == expected
        shown = httpx.post(f"{base}/api/show", json={"model": "french"}).json()
        assert "temperature 0.0" in shown["parameters"] and 'stop "Paris"' in shown["parameters"]
        assert shown["system"] == "Tu réponds\nen français." and shown["license"] == "Apache-2.0"
        assert "MESSAGE user" in shown["modelfile"]
        assert [m["name"] for m in httpx.get(f"{base}/api/tags").json()["models"]] == ["french:latest"]


def test_create_builds_on_a_created_model_and_refuses_what_does_not_fit(created, tmp_path):
    home, root, _ = created
    (tmp_path / "Modelfile").write_text('FROM french:latest\nSYSTEM "Be brief."\n', encoding="utf-8")
    assert run_cli(home, "create", "brief", "-f", str(tmp_path / "Modelfile"))[0] == 0
    from tramontane.hub.store import find, settings_for

    before, os.environ["TRAMONTANE_HOME"] = os.environ.get("TRAMONTANE_HOME"), str(home)
    try:
        s = settings_for(find("brief").path)
    finally:
        os.environ.pop("TRAMONTANE_HOME")
        if before is not None:
            os.environ["TRAMONTANE_HOME"] = before
    assert s.system == "Be brief." and s.parameters["num_predict"] == 12 and s.adapter is not None  # inherited
    (tmp_path / "bad").write_text("FROM ./nowhere.gguf\n", encoding="utf-8")
    code, _, err = run_cli(home, "create", "bad", "-f", str(tmp_path / "bad"))
    assert code == 1 and "FROM './nowhere.gguf': no such file or folder" in err
    (tmp_path / "noadapter").write_text(f"FROM french\nADAPTER {tmp_path}\n", encoding="utf-8")
    code, _, err = run_cli(home, "create", "noadapter", "-f", str(tmp_path / "noadapter"))
    assert code == 1 and "not a LoRA adapter folder" in err and not (home / "models" / "noadapter").exists()
