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
