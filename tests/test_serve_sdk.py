"""Acceptance 1: a real `tramontane serve` process with the default model (SmolLM2), driven by the
official `openai` and `mistralai` SDKs; the greedy chat answer equals the offline API's, token for token.
The last test drains the server with SIGTERM."""

from __future__ import annotations

import json
import math
import signal
import threading
import time

import httpx
import pytest
from serving import running_server

import tramontane

KEY = "test-key-123"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
N = 24


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with running_server(log, "--kv-cache-memory", "128M", env={"TRAMONTANE_API_KEY": KEY}) as (base, proc):
        line = proc.stdout.readline().strip()
        port = base.rsplit(":", 1)[1]
        # The served SmolLM2 (packed Q4_1) decodes on the backend build.select_backend picks for the paged cache.
        assert line == (
            f"tramontane serving SmolLM2-135M-Instruct.Q4_1 on http://127.0.0.1:{port} (decode backend: compiled)"
        ), line
        yield base, proc


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return tramontane.load(smollm2_path)


@pytest.fixture(scope="module")
def offline(llm):
    return llm.chat(QUESTION, temperature=0, max_tokens=N)


@pytest.fixture(scope="module")
def oai(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def mistral(server):
    try:
        from mistralai import Mistral  # mistralai 1.x
    except ImportError:
        from mistralai.client import Mistral  # mistralai 2.x and later

    return Mistral(api_key=KEY, server_url=server[0])


def test_models(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_openai_greedy_chat_equals_offline(oai, llm, offline):
    r = oai.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=QUESTION, temperature=0, max_tokens=N)
    answer = r.choices[0]
    assert answer.message.content == llm.tokenizer.decode(offline.token_ids) == offline.text
    assert "Paris" in answer.message.content
    assert r.usage.completion_tokens == len(offline.token_ids)
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode_chat(QUESTION))
    assert answer.finish_reason == offline.finish_reason


def test_openai_chat_stream(oai, offline):
    stream = oai.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=QUESTION,
        temperature=0,
        max_tokens=N,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == offline.finish_reason
    assert chunks[-1].usage.completion_tokens == len(offline.token_ids)


def test_openai_completions_equal_offline_generate(oai, llm):
    prompt = "The mistral is a cold wind that"
    r = oai.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=8, temperature=0)
    expected = llm.generate(prompt, temperature=0, max_tokens=8)[0]
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == expected.finish_reason


def test_openai_embeddings(oai, server, llm):
    r = oai.embeddings.create(model="SmolLM2-135M-Instruct.Q4_1", input=["The mistral blows.", "Bonjour"])
    assert len(r.data) == 2 and all(len(d.embedding) == llm.config.dim for d in r.data)  # decoded from base64
    assert all(abs(math.fsum(v * v for v in d.embedding) - 1) < 1e-4 for d in r.data)
    floats = httpx.post(
        f"{server[0]}/v1/embeddings",
        json={"input": "Bonjour", "encoding_format": "float"},
        headers={"Authorization": f"Bearer {KEY}"},
    ).json()
    assert floats["data"][0]["embedding"] == pytest.approx(r.data[1].embedding, abs=1e-6)


def test_mistral_chat_plain_and_stream(mistral, offline):
    r = mistral.chat.complete(model="SmolLM2-135M-Instruct.Q4_1", messages=QUESTION, temperature=0, max_tokens=N)
    assert r.choices[0].message.content == offline.text and r.usage.completion_tokens == len(offline.token_ids)
    events = list(
        mistral.chat.stream(
            model="SmolLM2-135M-Instruct.Q4_1", messages=QUESTION, temperature=0, max_tokens=N, random_seed=3
        )
    )
    text = "".join(e.data.choices[0].delta.content or "" for e in events if e.data.choices)
    assert text == offline.text


def test_tokenize_and_fim_refused(server, llm, mistral):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server[0]}/v1/tokenize", json={"prompt": "Hello world"}, headers=auth).json()
    assert r["tokens"] == llm.tokenizer.encode("Hello world", add_bos=llm.tokenizer.default_add_bos)
    r = httpx.post(f"{server[0]}/v1/fim/completions", json={"prompt": "def f(", "suffix": "x"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "fim_not_supported"
    assert httpx.get(f"{server[0]}/v1/models").status_code == 401


def test_sigterm_drains_then_exits(server):
    """Last: a running stream finishes, new requests get 503, the process exits with status 0."""
    base, proc = server
    auth = {"Authorization": f"Bearer {KEY}"}
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"messages": QUESTION, "max_tokens": 24, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    refused = None
    while refused is None and time.monotonic() < deadline:
        r = httpx.get(f"{base}/health", timeout=5)
        if r.status_code == 503:
            refused = httpx.post(f"{base}/v1/chat/completions", json={"messages": QUESTION}, headers=auth)
    assert refused is not None and refused.status_code == 503, refused
    assert refused.json()["error"]["code"] == "draining"
    reader.join(60)
    assert events[-1] == "[DONE]"
    finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e)["choices"]]
    assert finals[-1] == "length"
    assert proc.wait(30) == 0
