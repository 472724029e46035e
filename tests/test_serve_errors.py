"""Every error class of the HTTP API, with its status and OpenAI-shaped body, against the ASGI app and a
fake engine (fast); plus the request translation the fake engine can observe."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import pytest
from fake_engine import V1, FakeEngine
from fastapi.testclient import TestClient

from tramontane.engine.types import EngineUnavailableError, QueueFullError
from tramontane.serve import create_app, drain
from tramontane.serve.requests import SAFE_PROMPT

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def client(engine=None, **kwargs) -> TestClient:
    kwargs.setdefault("max_body_bytes", 64 << 10)
    return TestClient(create_app(engine if engine is not None else FakeEngine(), **kwargs))


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def api(engine):
    return client(engine)


def assert_error(r, status: int, *, param=None, code=None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert contains in err["message"], err
    return err


# ---- 400: invalid values, naming the parameter ---------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2),
        ("presence_penalty", 3),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("max_tokens", 0),
        ("n", 0),
        ("n", 1000),
        ("min_tokens", -1),
        ("seed", 1 << 70),
        ("random_seed", -(1 << 70)),
        ("stop", [""]),
        ("stop", ["x"] * 40),
        ("top_logprobs", 2),
        ("cache_salt", ""),
        ("cache_salt", "s" * 257),
    ],
)
def test_invalid_value_is_400_naming_the_field(api, field, value):
    assert_error(api.post(CHAT, json={"messages": HI, field: value}), 400, param=field)


def test_temperature_above_the_apis_maximum_is_400_as_openai_words_it(api):
    """Issue 19: temperature 5 was accepted where OpenAI's API answers 400 (its maximum is 2)."""
    r = api.post(CHAT, json={"messages": HI, "temperature": 5})
    err = assert_error(r, 400, param="temperature", code="decimal_above_max_value", contains="Expected a value <= 2")
    assert err["type"] == "invalid_request_error"
    assert api.post(CHAT, json={"messages": HI, "temperature": 2, "max_tokens": 1}).status_code == 200


def test_a_cache_salt_reaches_the_engine(api, engine):
    r = api.post(CHAT, json={"messages": HI, "max_tokens": 1, "cache_salt": "tenant-a"})
    assert r.status_code == 200, r.text
    assert engine.requests[-1].cache_salt == "tenant-a"


def test_nan_and_infinity_are_400(api):
    for text in ("NaN", "Infinity", "-Infinity", "1e999"):
        r = api.post(CHAT, content=f'{{"messages": [{{"role": "user", "content": "x"}}], "temperature": {text}}}')
        assert_error(r, 400, param="temperature")


def test_value_rules_of_combinations(api):
    assert_error(api.post(CHAT, json={"messages": HI, "max_tokens": 2, "min_tokens": 3}), 400, param="min_tokens")
    assert_error(api.post(CHAT, json={"messages": HI, "seed": 1, "random_seed": 2}), 400, param="random_seed")
    assert_error(api.post(CHAT, json={"messages": HI, "logprobs": True, "top_logprobs": 21}), 400, param="top_logprobs")
    assert_error(api.post(CHAT, json={"messages": []}), 400, param="messages")
    assert_error(api.post(CHAT, json={"messages": [{"role": "user"}]}), 400, param="messages[0].content")
    assert_error(
        api.post(CHAT, json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        400,
        param="messages[0].content[0]",
    )
    assert_error(api.post("/v1/completions", json={"prompt": [], "max_tokens": 1}), 400, param="prompt")
    assert_error(api.post("/v1/completions", json={"prompt": [1, 10**6]}), 400, param="prompt")
    assert_error(api.post("/v1/completions", json={"prompt": "x", "logprobs": 30}), 400, param="logprobs")
    assert_error(
        api.post("/v1/embeddings", json={"input": "x", "encoding_format": "hex"}), 400, param="encoding_format"
    )
    assert_error(api.post("/v1/detokenize", json={"tokens": [-1]}), 400, param="tokens")


def test_context_length_exceeded(api, engine):
    err = assert_error(
        api.post(CHAT, json={"messages": HI, "max_tokens": 10**30}),
        400,
        param="messages",
        code="context_length_exceeded",
    )
    assert str(engine.max_model_len) in err["message"]
    long = "word " * (engine.max_model_len + 10)
    assert_error(
        api.post("/v1/completions", json={"prompt": long}), 400, param="prompt", code="context_length_exceeded"
    )
    assert_error(api.post("/v1/embeddings", json={"input": [long]}), 400, param="input", code="context_length_exceeded")
    assert not engine.requests


def test_bad_response_format_and_tools_are_400s(api):
    assert_error(
        api.post(CHAT, json={"messages": HI, "response_format": {"type": "yaml"}}),
        400,
        param="response_format",
        contains="yaml",
    )
    assert_error(
        api.post(CHAT, json={"messages": HI, "response_format": {"type": "json_schema"}}),
        400,
        param="response_format",
        contains="json_schema",
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    bad = [{"type": "function", "function": {"name": "f(x)", "parameters": {}}}]
    assert_error(
        api.post(CHAT, json={"messages": HI, "tools": bad}), 400, param="tools[0].function.name", contains="f(x)"
    )
    assert_error(
        api.post(CHAT, json={"messages": HI, "tools": tools, "tool_choice": {"type": "function"}}),
        400,
        param="tool_choice",
        contains="name a function",
    )
    assert api.post(CHAT, json={"messages": HI, "tools": tools}).status_code == 200
    assert api.post(CHAT, json={"messages": HI, "response_format": {"type": "text"}}).status_code == 200


def test_invalid_json_is_400(api):
    for body in (
        b"",
        b"{",
        b"{'messages': []}",
        b"\xff\xfe\x00",
        b"[" * 50_000,
        b'{"n": 1' + b"0" * 5000 + b"}",
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    ):  # a lone surrogate is not text
        assert_error(api.post(CHAT, content=body), 400, code="invalid_json")
    for path in ("/v1/completions", "/v1/tokenize", "/v1/embeddings"):
        body = b'{"prompt": "a\\udfffb", "input": "\\udc00"}'
        assert_error(api.post(path, content=body), 400, code="invalid_json", contains="surrogate")
    paired = api.post("/v1/tokenize", content=b'{"prompt": "\\ud83d\\ude00"}')  # an escaped pair is fine
    assert paired.status_code == 200


def test_fim_needs_a_tokenizer_with_fim_tokens():
    api = client(FakeEngine(tokenizer_file=V1))
    err = assert_error(
        api.post("/v1/fim/completions", json={"prompt": "def f(", "suffix": "return 1"}),
        400,
        param="suffix",
        code="fim_not_supported",
    )
    assert "fill-in-the-middle" in err["message"]
    assert_error(api.post("/v1/completions", json={"prompt": "def f(", "suffix": "x"}), 400, param="suffix")
    assert api.get("/v1/models").json()["data"][0]["capabilities"]["completion_fim"] is False


# ---- 401, 404, 413, 422, 429, 503 ----------------------------------------------------------------------


def test_api_key_guards_every_route_but_health():
    api = client(api_key="s3cret")
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", CHAT),
        ("GET", "/metrics"),
        ("POST", "/v1/tokenize"),
        ("GET", "/no/such/route"),
    ):
        assert_error(api.request(method, path, json={}), 401, code="invalid_api_key", contains="missing")
        r = api.request(method, path, json={}, headers={"Authorization": "Bearer s3cre"})
        assert_error(r, 401, code="invalid_api_key", contains="invalid")
    assert api.get("/health").status_code == 200
    assert api.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert api.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401


def test_unknown_model_and_route_are_404(api, engine):
    for path, body in (
        (CHAT, {"model": "gpt-4", "messages": HI}),
        ("/v1/completions", {"model": "x", "prompt": "a"}),
        ("/v1/embeddings", {"model": "x", "input": "a"}),
        ("/v1/fim/completions", {"model": "x", "prompt": "a"}),
    ):
        assert_error(api.post(path, json=body), 404, param="model", code="model_not_found")
    assert_error(api.get("/v1/models/gpt-4"), 404, param="model", code="model_not_found")
    assert api.get("/v1/models/fake-model").json()["id"] == "fake-model"
    assert_error(api.get("/v2/nothing"), 404)
    assert_error(api.get(CHAT), 405)
    assert not engine.requests


def test_body_over_the_limit_is_413_with_or_without_content_length(api, engine):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (70 << 10)}]}).encode()
    assert_error(api.post(CHAT, content=big), 413, code="request_too_large")

    def chunks():  # no Content-Length: the body arrives in pieces (Transfer-Encoding: chunked)
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_error(api.post(CHAT, content=chunks()), 413, code="request_too_large")
    assert not engine.requests


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "king", "content": "x"}]}, "messages[0].role"),
        ({"messages": HI, "temperature": "hot"}, "temperature"),
        ({"messages": HI, "max_tokens": 1.5}, "max_tokens"),
        ({"messages": HI, "stream": "sometimes"}, "stream"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": HI, "stop": [1, 2]}, "stop"),
        ({"temperature": 0}, "messages"),
    ],
)
def test_schema_violation_is_422(api, body, param):
    assert_error(api.post(CHAT, json=body), 422, param=param)


def test_non_object_body_is_422(api):
    assert_error(api.post(CHAT, json=[1, 2]), 422)
    assert_error(api.post("/v1/embeddings", json={"input": {"a": 1}}), 422, param="input")


def test_full_queue_is_429(api, engine):
    engine.refuse = QueueFullError
    assert_error(api.post(CHAT, json={"messages": HI}), 429, code="queue_full")
    assert_error(api.post(CHAT, json={"messages": HI, "stream": True}), 429, code="queue_full")


def test_503_while_loading_draining_or_refused(engine):
    loading = TestClient(create_app(None, model_name="m"))
    assert loading.get("/health").status_code == 503 and loading.get("/health").json() == {"status": "loading"}
    assert_error(loading.post(CHAT, json={"messages": HI}), 503, code="model_loading")
    assert_error(loading.get("/v1/models"), 503)

    app = create_app(engine)
    api = TestClient(app)
    assert api.get("/health").json() == {"status": "ok"}
    engine.refuse = EngineUnavailableError
    assert_error(api.post(CHAT, json={"messages": HI}), 503, code="engine_unavailable")
    engine.refuse = None
    engine.healthy = False
    assert api.get("/health").status_code == 503 and api.get("/health").json() == {"status": "unhealthy"}
    asyncio.run(drain(app))
    assert engine.closed
    assert api.get("/health").json() == {"status": "draining"}
    assert_error(api.post(CHAT, json={"messages": HI}), 503, code="draining")


# ---- what reaches the engine ---------------------------------------------------------------------------


def test_chat_request_translation(api, engine):
    r = api.post(
        CHAT,
        json={
            "model": "fake-model",
            "messages": HI,
            "random_seed": 7,
            "temperature": 0.5,
            "top_k": 5,
            "min_tokens": 2,
            "max_tokens": 3,
            "stop": "zz",
            "n": 2,
            "safe_prompt": True,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from the"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert (
        body["usage"]["completion_tokens"] == 6 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6
    )
    first, second = engine.requests
    assert (first.params.seed, second.params.seed) == (7, 8)  # seed + i per choice
    assert first.params.temperature == 0.5 and first.params.top_k == 5 and first.params.stop == ("zz",)
    assert first.min_tokens == 2 and first.prompt_token_ids == second.prompt_token_ids
    assert SAFE_PROMPT in engine.tokenizer.decode(first.prompt_token_ids)


def test_streaming_chunks_usage_and_done(api):
    r = api.post(
        CHAT, json={"messages": HI, "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in r.text.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == "Hello from the"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_completions_logprobs_embeddings_tokenize(api, engine):
    r = api.post("/v1/completions", json={"prompt": [[5, 6], [1, 2, 3]], "max_tokens": 2, "logprobs": 1, "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3] and body["choices"][0]["text"] == "Hello from"
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-9999.0, -0.25]  # -inf is not JSON
    assert body["choices"][0]["logprobs"]["text_offset"] == [0, 5]
    assert engine.requests[2].prompt_token_ids == [1, 2, 3]
    chat = api.post(CHAT, json={"messages": HI, "max_tokens": 1, "logprobs": True, "top_logprobs": 2}).json()
    assert [t["token"] for t in chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]] == ["t0", "t1"]

    floats = api.post("/v1/embeddings", json={"input": ["a", "b"]}).json()
    packed = api.post("/v1/embeddings", json={"input": ["a", "b"], "encoding_format": "base64"}).json()
    vec = floats["data"][1]["embedding"]
    raw = base64.b64decode(packed["data"][1]["embedding"])
    assert struct.unpack(f"<{len(vec)}f", raw) == pytest.approx(vec)
    assert abs(sum(v * v for v in vec) - 1) < 1e-6 and floats["usage"]["prompt_tokens"] == 4

    tokens = api.post("/v1/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["tokens"] == engine.tokenizer.encode("Hello world", add_bos=True)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == engine.max_model_len
    chat_tokens = api.post("/v1/tokenize", json={"messages": HI}).json()["tokens"]
    assert chat_tokens == engine.tokenizer.encode_chat(HI)
    text = api.post("/v1/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Hello world"


def test_fim_success_with_v3_tokenizer(api, engine):
    r = api.post("/v1/fim/completions", json={"prompt": "def f(", "suffix": "return 1", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from"
    assert engine.requests[0].prompt_token_ids == engine.tokenizer.encode_fim("def f(", "return 1")


def test_metrics_count_http_statuses(api):
    api.post(CHAT, json={"messages": HI})
    api.post(CHAT, json={"messages": []})
    text = api.get("/metrics").text
    assert 'status="200"} 1' in text and 'status="400"} 1' in text


def test_chat_page_is_guarded_and_asks_a_browser_for_the_key():
    import base64

    with client(api_key="sekret") as c:
        denied = c.get("/")
        assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Basic")
        assert denied.json()["error"]["code"] == "invalid_api_key"
        basic = "Basic " + base64.b64encode(b"anyone:sekret").decode()
        assert c.get("/", headers={"Authorization": basic}).status_code == 200
        assert c.get("/web/chat.js", headers={"Authorization": basic}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": basic}).status_code == 200
        assert c.get("/", headers={"Authorization": "Bearer sekret"}).status_code == 200
        wrong = "Basic " + base64.b64encode(b"anyone:nope").decode()
        assert c.get("/v1/models", headers={"Authorization": wrong}).status_code == 401
        assert c.get("/v1/models").headers["www-authenticate"] == "Bearer"
        assert c.get("/health").status_code == 200


def test_the_fake_engine_and_the_real_one_fit_the_engine_protocol():
    """serve/ is typed against `engine.types.Engine`; both engines it is tested with declare every member."""
    import inspect

    from fake_engine import FakeEngine

    from tramontane.engine import AsyncEngine
    from tramontane.engine.types import Engine

    assert isinstance(FakeEngine(), Engine)
    members = {n for n in dir(Engine) if not n.startswith("_")} | set(Engine.__annotations__)
    real = set(dir(AsyncEngine)) | set(inspect.signature(AsyncEngine.__init__).parameters)
    source = inspect.getsource(AsyncEngine.__init__)
    missing = {m for m in members if m not in real and f"self.{m}" not in source}
    assert not missing, missing


def test_a_client_gone_before_its_body_arrived_is_a_quiet_400():
    """The disconnect surfaced as starlette's ClientDisconnect, a 500 with a traceback in the log (the
    fault-injection load test caught it when a client left mid-body)."""
    import asyncio

    from starlette.requests import Request

    from tramontane.serve.common import parse_body
    from tramontane.serve.errors import APIError
    from tramontane.serve.protocol import ChatCompletionRequest

    async def receive():
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "headers": [(b"content-type", b"application/json")]}, receive)
    with pytest.raises(APIError) as caught:
        asyncio.run(parse_body(request, ChatCompletionRequest))
    assert (caught.value.status, caught.value.code) == (400, "client_disconnected")
