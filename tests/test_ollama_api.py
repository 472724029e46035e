"""Ollama's API (/api/...) against the ASGI app and the fake engine: the translation of each request
(options, names, messages, prompts) as the engine receives it, Ollama's answer and error shapes, and
the streamed JSON lines; the tool-call lines through the real SmolLM2 tokenizer. The official client
against a real server is tests/test_ollama_client.py."""

from __future__ import annotations

import json

import pytest
from fake_engine import SCRIPT, FakeEngine
from fastapi.testclient import TestClient

from tramontane.serve import create_app

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def api(engine):
    return TestClient(create_app(engine))


def lines(r) -> list[dict]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def test_chat_streams_json_lines_by_default_and_ends_with_the_counts(api, engine):
    out = lines(api.post("/api/chat", json={"model": "fake-model", "messages": HI}))
    assert [o["message"]["content"] for o in out[:-1]] == SCRIPT[:-1]
    last = out[-1]
    assert last["done"] is True and last["done_reason"] == "stop" and last["message"]["content"] == SCRIPT[-1]
    assert last["eval_count"] == len(SCRIPT)
    assert last["prompt_eval_count"] == len(engine.requests[0].prompt_token_ids)
    assert all(o["model"] == "fake-model" and o["created_at"].endswith("Z") for o in out)
    assert all(last[k] >= 0 for k in ("total_duration", "prompt_eval_duration", "eval_duration"))
    assert not any(o["done"] for o in out[:-1])


def test_chat_whole_answer(api):
    r = api.post("/api/chat", json={"model": "fake-model:latest", "messages": HI, "stream": False})
    body = r.json()
    assert r.status_code == 200 and body["message"] == {"role": "assistant", "content": "".join(SCRIPT)}
    assert body["done"] and body["done_reason"] == "stop" and body["model"] == "fake-model:latest"


def test_options_map_to_sampling_with_ollamas_defaults(api, engine):
    api.post("/api/chat", json={"model": "fake-model", "messages": HI, "stream": False})
    p = engine.requests[-1].params
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.8, 40, 0.9, 1.0)  # Ollama's defaults
    options = {
        "temperature": 0.2,
        "top_k": 5,
        "top_p": 0.5,
        "min_p": 0.1,
        "seed": 7,
        "num_predict": 3,
        "stop": ["x"],
        "repeat_penalty": 1.3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "num_ctx": 4096,  # runner options: accepted, ignored
        "num_thread": 2,
        "mirostat": 0,  # an absent sampler at its "off" value
    }
    api.post("/api/chat", json={"model": "fake-model", "messages": HI, "stream": False, "options": options})
    p = engine.requests[-1].params
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed, p.max_tokens) == (0.2, 5, 0.5, 0.1, 7, 3)
    assert (p.stop, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (("x",), 1.3, 0.5, 0.25)
    api.post(
        "/api/chat",
        json={
            "model": "fake-model",
            "messages": HI,
            "stream": False,
            "options": {"repeat_penalty": 1.3, "repeat_last_n": 0, "num_predict": -1},
        },
    )
    p = engine.requests[-1].params
    assert p.repetition_penalty == 1.0 and p.max_tokens is None  # repeat_last_n 0: no penalty; -1: no limit


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "nope", "messages": HI}, 404, 'model "nope" not found'),
        ({"model": "fake-model", "messages": HI, "options": {"bogus": 1}}, 400, "unknown option 'bogus'"),
        ({"model": "fake-model", "messages": HI, "options": {"mirostat": 2}}, 400, "no mirostat sampler"),
        ({"model": "fake-model", "messages": HI, "options": {"num_predict": -3}}, 400, "num_predict"),
        ({"model": "fake-model", "messages": HI, "think": True}, 400, "does not support thinking"),
        ({"model": "fake-model", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400, "text only"),
        ({"model": "fake-model", "messages": [{"role": "tool", "content": "1", "tool_name": "f"}]}, 400, "no earlier"),
        ({"model": "fake-model", "messages": HI, "format": "yaml"}, 400, "format must be"),
        ({"model": "fake-model", "messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role"),
        ({"messages": HI}, 422, "model"),
    ],
)
def test_bad_requests_get_ollamas_error_shape(api, body, status, words):
    r = api.post("/api/chat", json=body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str) and words in r.json()["error"]


def test_errors_outside_the_routes_take_ollamas_shape_too():
    api = TestClient(create_app(FakeEngine(), api_key="k"))
    r = api.post("/api/chat", json={"model": "fake-model", "messages": HI})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]
    r = api.get("/api/nothing", headers={"Authorization": "Bearer k"})
    assert r.status_code == 404 and r.json() == {"error": "no route GET /api/nothing"}
    assert "message" in api.get("/v1/nothing", headers={"Authorization": "Bearer k"}).json()["error"]  # OpenAI's


def test_no_messages_or_prompt_loads_the_model(api, engine):
    r = api.post("/api/chat", json={"model": "fake-model", "messages": []})
    assert r.json()["done_reason"] == "load" and r.json()["message"]["content"] == ""
    r = api.post("/api/generate", json={"model": "fake-model", "keep_alive": 0})
    assert r.json()["done_reason"] == "unload" and r.json()["response"] == ""
    assert engine.requests == []


def test_tool_history_gets_call_ids_in_order(api, engine):
    """Ollama names a result by its tool; the Mistral prompt needs the id of the call it answers."""
    messages = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_time", "arguments": {"city": "Rome"}}},
            ],
        },
        {"role": "tool", "content": "13:00", "tool_name": "get_time"},
        {"role": "tool", "content": "sunny"},
    ]
    api.post("/api/chat", json={"model": "fake-model", "messages": messages, "stream": False})
    expected = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call00000",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call00001",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"city": "Rome"}'},
                },
            ],
        },
        {"role": "tool", "content": "13:00", "tool_call_id": "call00001"},
        {"role": "tool", "content": "sunny", "tool_call_id": "call00000"},
    ]
    oai = TestClient(create_app(other := FakeEngine()))
    oai.post("/v1/chat/completions", json={"messages": expected})
    assert engine.requests[-1].prompt_token_ids == other.requests[-1].prompt_token_ids


def test_generate_formats_the_prompt_and_returns_the_context(api, engine):
    body = lines(api.post("/api/generate", json={"model": "fake-model", "prompt": "hi", "options": {"num_predict": 2}}))
    chat_ids = engine.requests[-1].prompt_token_ids
    TestClient(create_app(other := FakeEngine())).post("/v1/chat/completions", json={"messages": HI})
    assert chat_ids == other.requests[-1].prompt_token_ids  # the chat template, as a one-message chat
    assert [b["response"] for b in body] == SCRIPT[:2] and body[-1]["done_reason"] == "length"
    assert body[-1]["context"] == chat_ids + [100, 101]
    api.post(
        "/api/generate", json={"model": "fake-model", "prompt": "more", "context": body[-1]["context"], "stream": False}
    )
    more = engine.requests[-1].prompt_token_ids
    assert more[: len(body[-1]["context"])] == body[-1]["context"] and more.count(engine.tokenizer.bos_id) == 1
    api.post("/api/generate", json={"model": "fake-model", "prompt": "[INST] x [/INST]", "raw": True, "stream": False})
    assert engine.requests[-1].prompt_token_ids == engine.tokenizer.encode("[INST] x [/INST]", add_bos=True)
    r = api.post("/api/generate", json={"model": "fake-model", "prompt": "x", "template": "{{ .Prompt }}"})
    assert r.status_code == 400 and "Go template" in r.json()["error"]


def test_embed_shapes_truncation_and_dimensions(api, engine):
    r = api.post("/api/embed", json={"model": "fake-model", "input": ["a", "b c"]}).json()
    assert (
        len(r["embeddings"]) == 2
        and len(r["embeddings"][0]) == 8
        and r["prompt_eval_count"] == sum(len(ids) for ids in engine.embedded)
    )
    short = api.post("/api/embed", json={"model": "fake-model", "input": "a", "dimensions": 3}).json()["embeddings"][0]
    assert len(short) == 3 and abs(sum(v * v for v in short) - 1) < 1e-6
    long = "word " * 400  # over the fake's 256-token context
    assert api.post("/api/embed", json={"model": "fake-model", "input": long}).status_code == 200  # truncated
    assert len(engine.embedded[-1]) == 256
    r = api.post("/api/embed", json={"model": "fake-model", "input": long, "truncate": False})
    assert r.status_code == 400 and "truncate" in r.json()["error"]
    assert len(api.post("/api/embeddings", json={"model": "fake-model", "prompt": "a"}).json()["embedding"]) == 8


def test_model_listing_routes(api):
    tags = api.get("/api/tags").json()["models"]
    assert tags[0]["name"] == "fake-model:latest"
    ps = api.get("/api/ps").json()["models"]
    assert ps[0]["context_length"] == 256 and ps[0]["name"] == "fake-model:latest"
    show = api.post("/api/show", json={"model": "fake-model"}).json()
    assert show["capabilities"][0] == "completion" and "\nFROM fake-model\n" in show["modelfile"]
    assert show["parameters"] == ""  # a model without a Modelfile of its own sets none
    assert api.post("/api/show", json={"model": "other"}).status_code == 404
    assert api.get("/api/version").json()["version"].count(".") == 2


def test_pull_refuses_names_that_are_not_hub_repositories(api):
    r = api.post("/api/pull", json={"model": "llama3.2", "stream": False})
    assert r.status_code == 400 and "hf.co/ORG/REPO:QUANT" in r.json()["error"]


def _ollama_stream(tokenizer, text: str, tools: list) -> list[dict]:
    """`text` fed token by token through the Ollama format of a chat that offers `tools`."""
    from tramontane.engine.types import RequestOutput
    from tramontane.serve.ollama_format import OllamaFormat
    from tramontane.serve.streaming import Choice
    from tramontane.serve.tool_format import ToolChatFormat
    from tramontane.tools.request import read_tools

    fmt = OllamaFormat(ToolChatFormat("c", "m", 1, False, read_tools(tools, "auto"), tokenizer), "m")
    choice = Choice(index=0, prompt_tokens=3)
    ids = [*tokenizer.encode(text), 2]
    out = []
    for k, token in enumerate(ids):
        o = RequestOutput("r", tokenizer.decode([token]), [token], finish_reason="stop" if k == len(ids) - 1 else None)
        offset = len(choice.text)
        choice.add(o)
        for chunk in fmt.inner.chunks(choice, o, offset):
            line = fmt._from_chunk(chunk, choice)
            if line is not None:
                out.append(line)

    def calls(message: dict) -> list:
        return [c["function"] for c in message.get("tool_calls") or []]  # ids are fresh per reading

    streamed = [c for o in out for c in calls(o["message"])]
    assert calls(fmt.response([choice])["message"]) == streamed  # whole and streamed answers agree
    return out


def test_tool_calls_come_as_objects_in_their_own_line(smollm2_path):
    import tramontane

    tokenizer = tramontane.load(smollm2_path).tokenizer
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    out = _ollama_stream(tokenizer, "Checking.\n<tool_call>\n" + json.dumps(call) + "\n</tool_call>", tools)
    assert "".join(o["message"]["content"] for o in out) == "Checking.\n"
    (with_calls,) = [o for o in out if o["message"].get("tool_calls")]
    assert [c["function"] | {"index": None} for c in with_calls["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": {"city": "Paris"}, "index": None}
    ]
    assert not with_calls["done"] and out[-1]["done"] and out[-1]["done_reason"] == "stop"
    plain = _ollama_stream(tokenizer, "No call here.", tools)
    assert "".join(o["message"]["content"] for o in plain) == "No call here." and plain[-1]["done"]
