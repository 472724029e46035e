"""`torchrun -m tramontane run|serve` with 2 ranks answers exactly as one process does."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import hf_model, save_hf
from serving import free_port, running_server

V3 = (
    Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0])
    / "data"
    / "mistral_instruct_tokenizer_240323.model.v3"
)
QUESTION = "Name the largest planet."


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Mistral (4 heads, 2 kv heads, window 8) with Mistral's v3 tokenizer (32768 tokens)."""
    folder = save_hf(
        hf_model("mistral", seed=7, vocab_size=32768, max_position_embeddings=512),
        tmp_path_factory.mktemp("m") / "tiny",
        shard=None,
    )
    shutil.copy(V3, folder / "tokenizer.model.v3")
    return folder


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "tramontane",
        *args,
    ]


def test_run_under_torchrun_reads_stdin_on_rank_zero_and_prints_once_the_single_process_answer(model):
    """The prompt comes on stdin, which only rank 0 reads (and broadcasts); only rank 0 prints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["run", str(model), "--max-tokens", "12", "--dtype", "float32"]
    single = subprocess.run(
        [sys.executable, "-m", "tramontane", *args],
        input=QUESTION,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    split = subprocess.run(torchrun(*args), input=QUESTION, capture_output=True, text=True, env=env, timeout=900)
    assert single.returncode == 0 and split.returncode == 0, split.stderr[-2000:]
    assert single.stdout.strip() and split.stdout == single.stdout  # rank 1 printed nothing


def answers(base: str) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    name = client.models.list().data[0].id
    out = []
    for question in (QUESTION, "Bonjour !", "Count to five."):
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=10
        )
        out.append(reply.choices[0].message.content)
    streamed = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=10, stream=True
    )
    out.append("".join(c.choices[0].delta.content or "" for c in streamed if c.choices))
    out.append(str(len(client.embeddings.create(model=name, input="hello").data[0].embedding)))
    return out


def test_serve_under_torchrun_answers_as_one_process(model, tmp_path):
    with running_server(tmp_path / "one.log", str(model), "--dtype", "float32", "--kv-cache-memory", "32M") as (b, _):
        expected = answers(b)
    port = free_port()
    log = (tmp_path / "two.log").open("w")
    proc = subprocess.Popen(
        torchrun("serve", str(model), "--dtype", "float32", "--kv-cache-memory", "32M", "--port", str(port)),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        from serving import wait_healthy

        base = wait_healthy(f"http://127.0.0.1:{port}", proc, tmp_path / "two.log")
        assert answers(base) == expected
    finally:
        proc.terminate()
        proc.wait(60)


def test_chat_under_torchrun_keeps_history_like_one_process(model):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["chat", str(model), "--max-tokens", "6", "--temperature", "0", "--dtype", "float32"]
    lines = "Hello there.\nAnd again?\n/bye\n"
    single = subprocess.run(
        [sys.executable, "-m", "tramontane", *args], input=lines, capture_output=True, text=True, env=env, timeout=600
    )
    split = subprocess.run(torchrun(*args), input=lines, capture_output=True, text=True, env=env, timeout=900)
    assert split.returncode == 0, split.stderr[-2000:]
    assert split.stdout == single.stdout and len(single.stdout.strip().splitlines()) == 2
