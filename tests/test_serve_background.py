"""Embeddings and prompt scoring next to streaming chats on a real server (a tiny random model): the
chats' answers do not change, a client that leaves an embeddings request stops its work, and SIGTERM
drains cleanly while a large embeddings request runs."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from models import hf_model, save_hf
from serving import free_port, metric, running_server

DATA = Path(__import__("importlib").util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
CHATS = 8


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = save_hf(
        hf_model("mistral", seed=6, vocab_size=32768, max_position_embeddings=512),
        tmp_path_factory.mktemp("model"),
        shard=None,
    )
    shutil.copy(DATA / "mistral_instruct_tokenizer_240323.model.v3", folder / "tokenizer.model.v3")
    return folder


def serve(folder: Path, log: Path, *extra: str):
    return running_server(
        log, str(folder), "--served-model-name", "tiny", "--kv-cache-memory", "64M", "--dtype", "float32", *extra
    )


async def stream_chat(client: httpx.AsyncClient, i: int) -> str:
    body = {
        "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
        "temperature": 0,
        "max_tokens": 24,
        "ignore_eos": True,
        "stream": True,
    }
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text


def aborted(base: str) -> float:
    try:
        return metric(base, 'tramontane_requests_finished_total{reason="abort"}')
    except KeyError:  # no request has finished that way yet
        return 0.0


def embedding_inputs(n: int, words: int) -> list[str]:
    return [" ".join(f"w{(i * 7 + k) % 97}" for k in range(words)) for i in range(n)]


LARGE = embedding_inputs(2048, 20)  # ~60 tokens each, under the 131072-token cap of one request


def test_chats_beside_embeddings_and_scoring_answer_as_alone(model_folder, tmp_path):
    with serve(model_folder, tmp_path / "log.txt") as (base, _):

        async def chats(extra: bool):
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                work = [stream_chat(client, i) for i in range(CHATS)]
                if extra:
                    work.append(client.post("/v1/embeddings", json={"input": embedding_inputs(64, 40)}))
                    work.append(
                        client.post(
                            "/v1/completions",
                            json={"prompt": embedding_inputs(4, 60), "max_tokens": 0, "echo": True, "logprobs": 2},
                        )
                    )
                return await asyncio.gather(*work)

        alone = asyncio.run(chats(False))
        *beside, embedded, scored = asyncio.run(chats(True))
        assert beside == alone
        assert embedded.status_code == 200 and len(embedded.json()["data"]) == 64
        assert scored.status_code == 200 and len(scored.json()["choices"]) == 4


def test_a_client_leaving_an_embeddings_request_stops_its_work(model_folder, tmp_path):
    with serve(model_folder, tmp_path / "log.txt") as (base, _):
        tokens_before = metric(base, "tramontane_step_tokens_sum")

        async def leave():
            async with httpx.AsyncClient(base_url=base, timeout=300) as client:
                job = asyncio.ensure_future(client.post("/v1/embeddings", json={"input": LARGE}))
                while metric(base, "tramontane_step_tokens_sum") == tokens_before and not job.done():
                    await asyncio.sleep(0.05)
                assert not job.done(), job.result().text[:300]
                job.cancel()  # the client gives up: its connection closes
                with pytest.raises(asyncio.CancelledError):
                    await job

        asyncio.run(leave())
        deadline = time.monotonic() + 60
        while aborted(base) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert aborted(base) >= 1
        settled = metric(base, "tramontane_step_tokens_sum")
        time.sleep(1.0)
        assert metric(base, "tramontane_step_tokens_sum") == settled  # nothing runs once the job is dropped
        assert settled - tokens_before < 2048 * 20  # far from all of it had run
        with httpx.Client(base_url=base, timeout=60) as client:
            assert client.post("/v1/embeddings", json={"input": "still serving"}).status_code == 200


def test_sigterm_drains_while_a_large_embeddings_request_runs(model_folder, tmp_path):
    log = tmp_path / "log.txt"
    with serve(model_folder, log, "--drain-timeout", "1") as (base, proc):

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                job = asyncio.ensure_future(client.post("/v1/embeddings", json={"input": LARGE}))
                while metric(base, "tramontane_step_tokens_sum") == 0:
                    await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                return await job

        answer = asyncio.run(scenario())
        assert answer.status_code == 503, answer.text[:300]  # the drain timeout ended it, with a clear error
        assert proc.wait(60) == 0
    text = log.read_text()
    assert "terminate called" not in text and "Traceback" not in text, text[-2000:]


def test_sigterm_as_soon_as_the_server_answers_exits_cleanly(model_folder, tmp_path):
    """SIGTERM at the first answer of /health: the model may still be loading (503 "loading") or just
    loaded; either way the process ends with status 0 and no abort from a thread left inside torch."""
    port = free_port()
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tramontane", "serve", str(model_folder), "--port", str(port), "--dtype", "float32"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "terminate called" not in log.read_text()
