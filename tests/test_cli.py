"""Acceptance 7: the command line with the default model."""

from __future__ import annotations

import subprocess
import sys

import pytest


def tramontane(*args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tramontane", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def test_run_answers_paris(smollm2_path):
    out = tramontane("run", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_show_prints_smollm2_numbers(smollm2_path):
    out = tramontane("show")
    assert out.returncode == 0, out.stderr
    fields = {line[:20].strip(): line[20:].strip() for line in out.stdout.splitlines()}
    assert fields["layers"] == "30" and fields["heads"] == "9" and fields["kv heads"] == "3"
    assert fields["sliding window"] == "none" and fields["experts"] == "none (dense)"
    assert fields["context length"] == "8192"
    assert "Q4_1" in fields["weight types"] and "chat" not in fields["weight types"]
    assert fields["parameters"].startswith("134.52M")


def test_chat_keeps_history_and_leaves_on_bye(smollm2_path):
    turns = "My name is Ada. Please remember it.\nWhat is my name?\n/bye\nnever read\n"
    out = tramontane("chat", "--temperature", "0", "--max-tokens", "40", stdin=turns)
    assert out.returncode == 0, out.stderr
    answers = [a for a in out.stdout.split("\n") if a.strip()]
    assert len(answers) >= 2
    assert "Ada" in out.stdout.split("\n", 1)[1]  # the second answer knows the first turn


def test_bad_model_path_is_a_clean_error(tmp_path):
    out = tramontane("show", str(tmp_path / "nope"))
    assert out.returncode == 1
    assert "no such file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", [["--temperature", "-1"], ["--top-p", "0"], ["--max-tokens", "0"]])
def test_bad_sampling_flags_are_clean_errors(flag):
    out = tramontane("run", "hello", *flag)
    assert out.returncode == 1 and "Traceback" not in out.stderr


def _commands() -> dict:
    import argparse

    from tramontane.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_command_has_a_description_examples_and_flag_help():
    """Issue 19: `tramontane COMMAND --help` describes the command, shows examples of it, and explains
    every argument, with the default where there is one."""
    import argparse

    commands = _commands()
    assert set(commands) == {
        "run",
        "chat",
        "show",
        "serve",
        "eval",
        "finetune",
        "merge",
        "convert",
        "list",
        "rm",
        "pull",
        "create",
    }
    for name, parser in commands.items():
        text = parser.format_help()
        assert parser.description and len(parser.description) > 60, name
        assert "examples:" in text and f"  tramontane {name}" in text, name
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            has_default = action.default not in (None, False, [], argparse.SUPPRESS)
            if action.option_strings and has_default and not action.required:
                assert "default" in action.help, (name, action.option_strings)
    assert "MODEL" in commands["run"].format_help() and "tramontane list" in commands["chat"].format_help()


def test_version_flag(capsys):
    from tramontane import __version__
    from tramontane.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"tramontane {__version__}"


@pytest.mark.parametrize(
    ("argv", "usage", "suggestion"),
    [
        (["run", "hello", "--tempreature", "0.5"], "tramontane run --help", "'--temperature'"),
        (["serve", "--max-runing", "4"], "tramontane serve --help", "'--max-running'"),
        (["rnu", "hello"], "tramontane --help", "'run'"),
        (["convert", "m.gguf", "--to", "gguff", "--out", "x"], "tramontane convert --help", "'gguf'"),
    ],
)
def test_mistyped_flags_commands_and_choices_suggest_the_closest(capsys, argv, usage, suggestion):
    """A misspelled flag is reported with its command's usage and the flag meant, not the top level's."""
    from tramontane.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert f"did you mean {suggestion}?" in err and f"(see `{usage}`)" in err, err


def test_convert_takes_quant_as_the_old_name_of_type(capsys):
    from tramontane.cli.main import build_parser

    ns = build_parser().parse_args(["convert", "m.gguf", "--to", "gguf", "--quant", "q8_0", "--out", "x.gguf"])
    assert ns.type == "q8_0" and "--quant is now --type" in capsys.readouterr().err
    ns = build_parser().parse_args(["convert", "m.gguf", "--to", "gguf", "--type", "q4_k", "--out", "x.gguf"])
    assert ns.type == "q4_k" and capsys.readouterr().err == ""


def test_unknown_model_name_suggests_stored_names_and_pull(tmp_path, monkeypatch):
    """A MODEL that is neither a path nor a stored name: the closest stored names, `list` and `pull`."""
    from tramontane.errors import LoadError
    from tramontane.hub.resolve import resolve_model

    monkeypatch.setenv("TRAMONTANE_HOME", str(tmp_path))
    folder = tmp_path / "models" / "mistral-7b"
    folder.mkdir(parents=True)
    (folder / "tramontane.json").write_text("{}")
    with pytest.raises(LoadError) as info:
        resolve_model("mistral-7")
    text = str(info.value)
    assert "no such file or folder" in text and "did you mean 'mistral-7b'?" in text
    assert "tramontane list" in text and "tramontane pull" in text


def test_an_answer_cut_at_max_tokens_says_so_on_stderr(smollm2_path):
    cut = tramontane("run", str(smollm2_path), "What is the capital of France?", "--max-tokens", "3")
    assert cut.returncode == 0 and "[length]" in cut.stderr and "[length]" not in cut.stdout
    whole = tramontane("run", str(smollm2_path), "What is the capital of France?", "--max-tokens", "200")
    assert whole.returncode == 0 and "[length]" not in whole.stderr


def test_interactive_chat_names_the_model_in_its_banner(smollm2_path):
    """On a terminal (a pty here) chat opens with the model's name, parameters and context length."""
    import os
    import pty
    import select
    import time

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tramontane", "chat", str(smollm2_path)],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        close_fds=True,
    )
    os.close(secondary)
    seen, deadline = b"", time.monotonic() + 240
    try:
        while b">>> " not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([primary], [], [], 1.0)[0]:
                seen += os.read(primary, 4096)
        os.write(primary, b"/bye\n")
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)
    banner = seen.decode(errors="replace")
    assert f"tramontane chat: {smollm2_path.name}, 135M parameters, context 8192 tokens" in banner, banner


def test_run_takes_a_stored_name_alone_as_the_model(tmp_path, monkeypatch):
    """`tramontane run NAME < prompt.txt`: a stored model's name is the MODEL, not the prompt."""
    from tramontane.cli.main import _split_run_args

    monkeypatch.setenv("TRAMONTANE_HOME", str(tmp_path))
    folder = tmp_path / "models" / "mistral-7b"
    folder.mkdir(parents=True)
    (folder / "tramontane.json").write_text("{}")
    assert _split_run_args(["mistral-7b"]) == ("mistral-7b", None)
    assert _split_run_args(["What is a mistral?"]) == (None, "What is a mistral?")
