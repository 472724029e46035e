"""Issue 3 acceptance 2-5 against a real server with SmolLM2: concurrency, disconnects, a tight KV
budget with preemption, and prefix caching."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from serving import metric, running_server

import tramontane

QUESTIONS = [f"In one sentence, what is special about the number {i}?" for i in range(16)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return tramontane.load(smollm2_path)


@pytest.fixture(scope="module")
def sequential(llm):
    """Offline greedy answers, one request at a time."""
    return [llm.chat([{"role": "user", "content": q}], temperature=0, max_tokens=MAX_TOKENS).text for q in QUESTIONS]


async def stream_chat(
    client: httpx.AsyncClient, messages: list[dict], max_tokens: int = MAX_TOKENS
) -> tuple[str, dict, float]:
    """(text, final usage, time to first token) of one streaming greedy chat request."""
    body = {
        "model": "m",
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text, usage, ttft, start = "", {}, None, time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text += choice["delta"]["content"]
    return text, usage, ttft


def concurrent_answers(base: str) -> list[str]:
    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            return await asyncio.gather(*(stream_chat(client, [{"role": "user", "content": q}]) for q in QUESTIONS))

    return [text for text, _, _ in asyncio.run(main())]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    with running_server(
        tmp_path_factory.mktemp("s") / "log.txt", "--kv-cache-memory", "256M", "--served-model-name", "m"
    ) as (base, _):
        yield base


def test_sixteen_concurrent_streams_equal_sequential(server, sequential):
    assert concurrent_answers(server) == sequential
    steps = metric(server, "tramontane_step_requests_count")
    single = metric(server, 'tramontane_step_requests_bucket{le="1.0"}')
    assert single < steps  # some forward steps carried more than one request


def test_dropped_stream_is_aborted_and_frees_its_blocks(server):
    before = metric(server, "tramontane_kv_blocks_used")
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=server, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(4):
                next(lines)
            assert metric(server, "tramontane_running_requests") == 1
            assert metric(server, "tramontane_kv_blocks_used") > before
    # The connection is closed: the engine forgets it at its next step (polled with a deadline generous
    # enough for a loaded machine; 400 tokens would take far longer, and the abort counter says why it left).
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline and metric(server, "tramontane_running_requests") != 0:
        time.sleep(0.05)
    assert metric(server, "tramontane_running_requests") == 0
    assert metric(server, "tramontane_kv_blocks_used") == before
    assert metric(server, 'tramontane_requests_finished_total{reason="abort"}') >= 1


def test_shared_system_prompt_hits_the_prefix_cache(server):
    system = {"role": "system", "content": " ".join(f"Rule {i}: answer politely and briefly." for i in range(25))}

    async def main():
        async with httpx.AsyncClient(base_url=server, timeout=300) as client:
            first = await stream_chat(client, [system, {"role": "user", "content": "Name a colour."}], 4)
            second = await stream_chat(client, [system, {"role": "user", "content": "Name a fruit."}], 4)
            return first, second

    hits_before = metric(server, "tramontane_prefix_cache_hits")
    (_, usage1, ttft1), (_, usage2, ttft2) = asyncio.run(main())
    assert usage1["prompt_tokens"] > 200
    assert usage2["prompt_tokens_details"]["cached_tokens"] >= 192  # the system prompt's full blocks
    assert metric(server, "tramontane_prefix_cache_hits") > hits_before
    assert ttft2 < ttft1, (ttft1, ttft2)


def test_tight_kv_budget_preempts_and_stays_exact(smollm2_path, tmp_path, sequential):
    # 12 MB holds 16 blocks of 16 tokens: 16 requests of ~60 tokens need 64.
    with running_server(tmp_path / "log.txt", "--kv-cache-memory", "12M", "--served-model-name", "m") as (base, _):
        assert concurrent_answers(base) == sequential
        assert metric(base, "tramontane_preemptions") > 0
        long_prompt = " ".join(["wind"] * 400)  # more tokens than the whole pool holds

        async def impossible():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                r = await client.post("/v1/completions", json={"model": "m", "prompt": long_prompt, "max_tokens": 5})
                return r.json()

        answer = asyncio.run(asyncio.wait_for(impossible(), 60))
        assert answer["choices"][0]["finish_reason"] == "length"
