"""Hardening: a request or file can fail only itself. Faults inside one request's engine step, salted
prefix-cache keys, request-supplied chat templates, request size limits, hostile tokenizer metadata."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from chartok import CharTokenizer
from fake_engine import FakeEngine
from fastapi.testclient import TestClient
from models import hf_model, save_hf
from test_engine import GREEDY, engine_for, prompts, sequential

import tramontane
from tramontane.api import LLM
from tramontane.build.load import load_model
from tramontane.decoding.sequence import SequenceState
from tramontane.engine import EngineRequest
from tramontane.engine import engine as engine_module
from tramontane.engine.blocks import block_key
from tramontane.errors import TemplateError
from tramontane.serve.app import create_app
from tramontane.serve.errors import APIError
from tramontane.serve.requests import MAX_MESSAGES, request_template


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(
        load_model(save_hf(hf_model("mistral", seed=8), tmp_path_factory.mktemp("e"), shard=None)), CharTokenizer()
    )


def _serve(engine, ps: list[list[int]]) -> dict[str, tuple[list[int], str | None, str | None]]:
    async def one(rid: str, prompt: list[int]):
        tokens, last = [], None
        async for out in engine.generate(EngineRequest(rid, prompt, GREEDY)):
            tokens += out.token_ids
            last = out
        return rid, (tokens, last.finish_reason, last.error)

    async def main():
        engine.start()
        try:
            results = dict(await asyncio.gather(*(one(f"r{i}", p) for i, p in enumerate(ps))))
            assert engine.is_healthy()  # the loop went on
            return results
        finally:
            await engine.shutdown(1.0)

    return asyncio.run(main())


def test_a_request_failing_in_its_step_fails_alone(llm, monkeypatch):
    """Detokenizing / stop rules (SequenceState.append) and sampling (pick_tokens) raise for one request:
    that request ends with "error", the others get their exact answers, every KV block comes back."""
    ps = prompts(6, seed=3)
    expected = sequential(llm, ps)
    append = SequenceState.append

    def failing_append(self, token, logprob=None):
        if self.prompt == ps[2] and len(self.output) == 5:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return append(self, token, logprob)

    pick = engine_module.pick_tokens

    def failing_pick(states, logits, tokenizer, argmax):
        if any(s.prompt == ps[4] and len(s.output) == 9 for s in states):
            raise RuntimeError("injected sampling failure")
        return pick(states, logits, tokenizer, argmax)

    monkeypatch.setattr(SequenceState, "append", failing_append)
    monkeypatch.setattr(engine_module, "pick_tokens", failing_pick)
    engine = engine_for(llm, blocks=400)
    results = _serve(engine, ps)
    for i in range(len(ps)):
        tokens, finish, error = results[f"r{i}"]
        if i in (2, 4):
            assert finish == "error" and "injected" in error
        else:
            assert (tokens, finish) == (expected[i], "length")
    assert engine.pool.num_used == 0


def test_prefix_cache_keys_are_salted_per_process():
    here = block_key("m", None, [1, 2, 3])
    assert here == block_key("m", None, [1, 2, 3]) and here != block_key("m", None, [1, 2, 4])
    code = "from tramontane.engine.blocks import block_key; print(block_key('m', None, [1, 2, 3]).hex())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other != here.hex()  # another process cannot compute this process's keys
    assert block_key("ab", None, [1]) != block_key("a", None, [1])


def test_request_chat_templates_are_refused_unless_allowed(smollm2_path):
    messages = [{"role": "user", "content": "hi"}]
    tokenizer = tramontane.load(smollm2_path).tokenizer
    with pytest.raises(APIError) as info:
        request_template(tokenizer, "{{ messages[0].content }}", allowed=False)
    assert info.value.status == 400 and info.value.param == "chat_template"
    own = request_template(tokenizer, "[{{ messages[0]['content'] }}]", allowed=True)
    assert own.encode_chat(messages) == tokenizer.encode("[hi]")
    assert tokenizer.encode_chat(messages) != own.encode_chat(messages)  # the model's own is untouched
    for hostile in (
        "{{ cycler.__init__.__globals__.os.system('id') }}",
        "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
    ):
        with pytest.raises(TemplateError):
            request_template(tokenizer, hostile, allowed=True).encode_chat(messages)
    with pytest.raises(APIError):  # mistral-common formats chats without a template
        request_template(FakeEngine().tokenizer, "{{ x }}", allowed=True)


def test_request_template_flag_through_the_api():
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ messages }}"}
    refused = TestClient(create_app(FakeEngine())).post("/v1/chat/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "chat_template_not_allowed"
    allowed = TestClient(create_app(FakeEngine(), allow_request_templates=True)).post("/v1/chat/completions", json=body)
    assert allowed.status_code == 400 and "Jinja" in allowed.json()["error"]["message"]


def test_too_many_messages_is_a_400():
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * (MAX_MESSAGES // 2 + 1)
    r = TestClient(create_app(FakeEngine())).post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and len(r.content) < 1000


def test_too_many_headers_is_a_431():
    api = TestClient(create_app(FakeEngine()))
    headers = {f"x-h{i}": "v" for i in range(150)}
    r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, headers=headers)
    assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_fields_too_large"
    big = api.get("/health", headers={"x-big": "a" * 40_000})
    assert big.status_code == 431 and len(big.content) < 500
    assert api.get("/health", headers={"x-ok": "a" * 20_000}).status_code == 200


def test_errors_never_echo_a_large_input():
    api = TestClient(create_app(FakeEngine()))
    hi = [{"role": "user", "content": "x"}]
    for body in (
        {"messages": hi, "stop": ["s" * 5000]},
        {"messages": hi, "model": "m" * 10_000},
        {"messages": hi, "temperature": "t" * 10_000},
        {"messages": [{"role": "r" * 10_000}]},
        {
            "messages": hi,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "schema": {"type": "object", "properties": {f"k{i}": {"type": "bogus"} for i in range(2000)}}
                },
            },
        },
    ):
        r = api.post("/v1/chat/completions", json=body)
        assert 400 <= r.status_code < 500 and len(r.content) < 1200, (r.status_code, len(r.content))
    assert len(api.get("/v1/" + "a" * 10_000).content) < 1000


def test_a_failed_request_is_a_500_or_an_error_event_then_done():
    engine = FakeEngine()
    engine.fail_seed = 13
    api = TestClient(create_app(engine))
    ask = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 6}
    failed = api.post("/v1/chat/completions", json={**ask, "seed": 13})
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error"
    assert "injected" in failed.json()["error"]["message"]
    with api.stream("POST", "/v1/chat/completions", json={**ask, "seed": 13, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert any(
        json.loads(e).get("choices") and json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-2]
    )
    assert api.post("/v1/chat/completions", json={**ask, "seed": 1}).status_code == 200  # the others go on


def test_streamed_events_survive_line_splitting_readers():
    """A token decoding to NEL, LINE or PARAGRAPH SEPARATOR (a random model produced one) must not cut its
    event for readers that split lines the way Python's str.splitlines does (httpx's iter_lines)."""
    from tramontane.serve.streaming import sse

    text = "a\x85b\u2028c\u2029d\re\nf\x1cg"
    event = sse({"choices": [{"delta": {"content": text}}]})
    lines = [line for line in event.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ") and event.endswith("\n\n")
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == text


def test_plain_text_events_are_the_full_path_bytes():
    """A plain text output's event is its choice's chunk serialised once with a marker, the text filled
    in: the same bytes as validating and dumping the chunk, for every format and any text (line breaks
    readers split on, quotes, non-ASCII, a text that looks like the marker); outputs that finish or
    carry logprobs, and formats that override `chunks` (tool calls hold text back), take the full path."""
    from tramontane.decoding.sequence import TokenLogprob
    from tramontane.engine.types import RequestOutput
    from tramontane.serve.echo import Echo, EchoCompletionFormat
    from tramontane.serve.formats import _MARK, ChatFormat, CompletionFormat, Format
    from tramontane.serve.streaming import Choice, sse

    texts = ["Hello", " a\x85b\u2028c\u2029d\re\nf", '"q" \\ </script>', "é😀\t", _MARK, "x" + _MARK[:-1]]
    formats = [
        ChatFormat("chatcmpl-1", "m", 2, False),
        CompletionFormat("cmpl-1", "m", 1, False),
        EchoCompletionFormat("cmpl-2", "m", 1, False, [Echo(text="prompt ", logprobs=None)] * 2),
        ChatFormat("chatcmpl-2", "m", 1, True),
    ]
    for fmt in formats:
        for index in (0, 1):
            choice = Choice(index=index, prompt_tokens=3)
            for text in texts:
                for finish in (None, "stop"):
                    out = RequestOutput(request_id="r", text=text, finish_reason=finish)
                    assert fmt.sse_events(choice, out, 4) == [sse(c) for c in fmt.chunks(choice, out, 4)]
        assert set(fmt._templates) == {0, 1}
    logprob = TokenLogprob(token_id=5, token="a", logprob=-0.5, top=[])
    out = RequestOutput(request_id="r", text="a", logprobs=[logprob])
    fmt = ChatFormat("chatcmpl-3", "m", 1, True)
    assert fmt.sse_events(Choice(index=0, prompt_tokens=1), out, 0)[0].count('"logprob"') >= 1
    assert not fmt._templates  # logprobs: never through the template

    class Holding(ChatFormat):  # as ToolChatFormat: chunks depend on more than the output's text
        def chunks(self, choice, out, offset):
            return [] if out.text == "<" else super().chunks(choice, out, offset)

    held = Holding("chatcmpl-4", "m", 1, False)
    assert held.sse_events(Choice(index=0, prompt_tokens=1), RequestOutput(request_id="r", text="<"), 0) == []
    assert not held._templates and type(held).chunks is not Format.chunks
