"""Hardening, round two (issue 15) on the ASGI app and the fake engine: cheap checks before expensive
work (oversized prompts), absurd integers, Host and Origin checks, JSON bodies only, logit_bias
(checked here, its effect on greedy decoding against transformers below), the default max_tokens, and
the CLI's refusals."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from chartok import CharTokenizer
from fake_engine import FakeEngine
from fastapi.testclient import TestClient
from models import hf_model, save_hf
from rss import rss_growth

from tramontane.api import LLM
from tramontane.build.load import load_model
from tramontane.decoding.sampling import MAX_LOGIT_BIAS, SamplingParams
from tramontane.engine import AsyncEngine, EngineRequest
from tramontane.serve import create_app
from tramontane.serve.middleware import LOOPBACK_HOSTS
from tramontane.serve.prompt_size import count_past, pieces

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
BIG = 16 << 20


def api(engine: FakeEngine | None = None, **kw) -> TestClient:
    kw.setdefault("max_body_bytes", BIG)
    return TestClient(create_app(engine or FakeEngine(), **kw))


class Counting:
    """Wraps a tokenizer's `encode` and `encode_chat`, counting the characters they were given."""

    def __init__(self, engine: FakeEngine) -> None:
        self.chars, self.chats = 0, 0
        tok = engine.tokenizer
        encode, encode_chat = tok.encode, tok.encode_chat

        def counting_encode(text, **kw):
            self.chars += len(text)
            return encode(text, **kw)

        def counting_chat(*a, **kw):
            self.chats += 1
            return encode_chat(*a, **kw)

        tok.encode, tok.encode_chat = counting_encode, counting_chat


def words(n_chars: int) -> str:
    return ("the quick brown fox jumps over the lazy dog " * (n_chars // 44 + 1))[:n_chars]


@pytest.mark.parametrize("route", ["completion", "chat", "embedding", "fim"])
def test_an_oversized_prompt_is_refused_after_counting_a_context_of_it(route):
    engine = FakeEngine(max_model_len=256)
    seen = Counting(engine)
    text = words(15 << 20)
    body = {
        "completion": ("/v1/completions", {"prompt": text}),
        "chat": (CHAT, {"messages": [{"role": "user", "content": text}]}),
        "embedding": ("/v1/embeddings", {"input": text}),
        "fim": ("/v1/fim/completions", {"prompt": text, "suffix": "x"}),
    }[route]
    client = api(engine)

    def post():
        post.response = client.post(body[0], json=body[1])

    growth = rss_growth(post)
    r = post.response
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert seen.chars <= 64 * 1024  # a few pieces of the 15 MB, not all of it
    assert seen.chats == 0  # the template never ran
    assert growth < 400 << 20  # the body and its parsed copy (2 x 15 MB) and little else


def test_a_prompt_of_four_million_ids_is_refused_by_its_length():
    r = api(FakeEngine(max_model_len=256)).post("/v1/completions", json={"prompt": [5] * 4_000_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_counting_is_a_lower_bound_and_pieces_cover_the_text():
    engine = FakeEngine()
    tok = engine.tokenizer
    text = words(100_000) + "\n" + "x" * 20_000
    assert "".join(pieces(text)) == text
    whole = len(tok.encode(text))
    assert count_past(tok, [text], whole * 9 // 10) is not None  # the slack per piece is small
    counted = count_past(tok, [text], whole // 2)
    assert counted is not None and whole // 2 < counted <= whole
    assert count_past(tok, [text], whole) is None  # never above the exact count
    assert count_past(tok, ["short"], 2) is None


class _Uncounted:
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        raise AssertionError("counted")


def test_a_text_whose_bytes_fit_is_not_counted():
    """Tokens are at most the UTF-8 bytes (plus a dummy prefix): a prompt whose bytes fit the context is
    never tokenized to be counted (a 2,000-token system prompt otherwise cost each request a second
    tokenization); one that may not fit is."""
    text = "é" * 100  # 200 bytes
    assert count_past(_Uncounted(), [text], 202) is None  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="counted"):
        count_past(_Uncounted(), [text], 201)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 4299 + b"}",
        b'{"messages": [{"role": "user", "content": "hi"}], "seed": -' + b"9" * 5000 + b"}",
    ],
)
def test_absurd_integers_are_a_400(raw):
    r = api().post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400  # 4299 digits: refused by size; 5000: Python's own int limit while parsing
    assert len(r.content) < 1000


def test_min_tokens_beyond_the_default_max_tokens_is_a_400():
    r = api().post(CHAT, json={"messages": HI, "min_tokens": 10**12})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_the_default_max_tokens_applies_when_the_request_gives_none():
    engine = FakeEngine(max_model_len=256)
    client = api(engine, default_max_tokens=5)
    assert client.post(CHAT, json={"messages": HI}).status_code == 200
    assert engine.requests[-1].params.max_tokens == 5
    assert client.post(CHAT, json={"messages": HI, "max_tokens": 9}).status_code == 200
    assert engine.requests[-1].params.max_tokens == 9
    roomy = FakeEngine(max_model_len=256)
    assert api(roomy, default_max_tokens=4096).post(CHAT, json={"messages": HI}).status_code == 200
    assert roomy.requests[-1].params.max_tokens is None  # the context ends first: finish "model_length"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_bodies_a_web_page_can_send_without_asking_are_refused(content_type):
    r = api().post(
        CHAT, content=b'{"messages": [{"role": "user", "content": "hi"}]}', headers={"content-type": content_type}
    )
    assert r.status_code == 415


def test_host_and_origin_checks():
    loopback = TestClient(create_app(FakeEngine(), allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:8080")
    assert loopback.get("/health").status_code == 200
    assert loopback.get("/health", headers={"host": "localhost:8080"}).status_code == 200
    assert loopback.get("/health", headers={"host": "[::1]:8080"}).status_code == 200
    assert loopback.get("/health", headers={"host": "rebound.example:8080"}).status_code == 421
    assert loopback.post(CHAT, json={"messages": HI}, headers={"origin": "http://evil.example"}).status_code == 403
    assert loopback.post(CHAT, json={"messages": HI}, headers={"origin": "http://127.0.0.1:8080"}).status_code == 200
    allowed = TestClient(create_app(FakeEngine(), allow_origins=["http://app.example"]))
    assert allowed.post(CHAT, json={"messages": HI}, headers={"origin": "http://app.example"}).status_code == 200
    assert allowed.post(CHAT, json={"messages": HI}, headers={"origin": "http://other.example"}).status_code == 403


def test_logit_bias_reaches_the_engine_as_token_ids():
    engine = FakeEngine()
    client = api(engine)
    r = client.post(CHAT, json={"messages": HI, "logit_bias": {"5": 100, "17": -100, "0005": 1.5}})
    assert r.status_code == 200
    assert dict(engine.requests[-1].params.logit_bias) == {5: 1.5, 17: -100}
    vocab = engine.tokenizer.vocab_size
    for bad in ({"x": 1}, {str(vocab): 1}, {"5": 100.5}, {"-1": 1}):
        r = client.post(CHAT, json={"messages": HI, "logit_bias": bad})
        assert r.status_code in (400, 422), bad
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}'
    assert client.post(CHAT, content=raw, headers={"content-type": "application/json"}).status_code == 400
    many = {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}
    assert client.post(CHAT, json={"messages": HI, "logit_bias": many}).status_code == 400


def test_logit_bias_steers_greedy_decoding_as_the_logits_say(tmp_path):
    """The first greedy token under a bias is the argmax of transformers' logits plus that bias."""
    hf = hf_model("llama", seed=11)
    llm = LLM(load_model(save_hf(hf, tmp_path, shard=None)), CharTokenizer())
    prompt = [5, 9, 14, 3, 22]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].float()
    top2 = logits.topk(2).indices.tolist()
    cases = {(): top2[0], ((top2[0], -100.0),): top2[1], ((40, 100.0),): 40}
    engine = AsyncEngine(llm, model_name="tiny", kv_cache_memory=1 << 22, block_size=4)

    async def first_tokens():
        engine.start()
        try:
            out = []
            for i, bias in enumerate(cases):
                params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logit_bias=bias)
                stream = engine.generate(EngineRequest(f"r{i}", prompt, params))
                out.append([t async for o in stream for t in o.token_ids])
            return out
        finally:
            await engine.shutdown(1.0)

    got = asyncio.run(first_tokens())
    assert [tokens[0] for tokens in got] == list(cases.values())
    assert got[2] == [40, 40, 40]  # +100 wins at every step


def test_cli_misuse_is_one_line(tmp_path, capsys):
    from tramontane.cli.main import main

    assert main(["serve", str(tmp_path), "--kv-cache-memory", "0.0000001G"]) == 1
    assert "--kv-cache-memory must be at least 1M" in capsys.readouterr().err


def test_rm_of_a_stored_symlink_removes_the_link_only(tmp_path, capsys, monkeypatch):
    from tramontane.cli.main import main
    from tramontane.hub.store import INFO, models_dir

    monkeypatch.setenv("TRAMONTANE_HOME", str(tmp_path / "home"))
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / INFO).write_text("{}")
    (target / "keep.txt").write_text("mine")
    models_dir().mkdir(parents=True, exist_ok=True)
    os.symlink(target, models_dir() / "linked")
    assert main(["rm", "linked"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert not (models_dir() / "linked").exists()
    assert (target / "keep.txt").read_text() == "mine"  # what the link pointed to is not the store's
