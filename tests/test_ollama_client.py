"""Issue 20's Ollama acceptance: the official `ollama` Python client, LangChain's ChatOllama and
ChatMistralAI, and an Open-WebUI-style sequence of raw requests, against `tramontane serve` on SmolLM2
(the shared session server). Greedy answers equal the offline API's, token for token."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

import tramontane

ollama = pytest.importorskip("ollama")

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
N = 16
GREEDY = {"temperature": 0, "num_predict": N}


@pytest.fixture(scope="module")
def base(smollm2_server):
    return smollm2_server


@pytest.fixture(scope="module")
def client(base):
    return ollama.Client(host=base)


@pytest.fixture(scope="module")
def name(client):
    return client.list().models[0].model


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return tramontane.load(smollm2_path)


@pytest.fixture(scope="module")
def offline(llm):
    return llm.chat(QUESTION, temperature=0, max_tokens=N)


def test_chat_whole_and_streamed_equal_the_offline_answer(client, name, offline):
    whole = client.chat(model=name, messages=QUESTION, options=GREEDY)
    assert whole.message.content == offline.text and whole.eval_count == len(offline.token_ids)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.prompt_eval_count > 10
    parts = list(client.chat(model=name, messages=QUESTION, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == offline.text
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]


def test_generate_and_its_context_continue_as_offline(client, name, llm, offline):
    first = client.generate(model=name, prompt=QUESTION[0]["content"], options=GREEDY)
    assert first.response == offline.text  # the prompt goes through the chat template
    second = client.generate(model=name, prompt="And of Italy?", context=first.context, options=GREEDY)
    follow = llm.tokenizer.encode_chat([{"role": "user", "content": "And of Italy?"}], add_generation_prompt=True)
    bos = [llm.tokenizer.bos_id] if follow[:1] == [llm.tokenizer.bos_id] else []
    expected = llm.generate(list(first.context) + follow[len(bos) :], temperature=0, max_tokens=N)[0]
    assert second.response == expected.text
    raw = client.generate(model=name, prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.response == llm.generate("The capital of France is", temperature=0, max_tokens=N)[0].text


def test_embed_equals_the_openai_route(client, name, base):
    got = client.embed(model=name, input=["Paris is in France.", "A cat"])
    reference = httpx.post(f"{base}/v1/embeddings", json={"input": ["Paris is in France.", "A cat"]}, timeout=60).json()
    assert got.embeddings == [d["embedding"] for d in reference["data"]]
    assert client.embeddings(model=name, prompt="A cat").embedding == reference["data"][1]["embedding"]


def test_list_show_and_ps_describe_the_served_model(client, name):
    (listed,) = [m for m in client.list().models if m.model == name]
    assert name == "SmolLM2-135M-Instruct.Q4_1:latest"
    assert (listed.details.family, listed.details.quantization_level, listed.details.parameter_size) == (
        "llama",
        "Q4_1",
        "135M",
    )
    shown = client.show(name)
    assert shown.modelinfo["llama.block_count"] == 30 and shown.modelinfo["llama.embedding_length"] == 576
    assert "<|im_start|>" in shown.template and "completion" in shown.capabilities
    (running,) = client.ps().models
    assert running.model == name and running.context_length > 0
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("llama3.2")
    assert missing.value.status_code == 404 and 'model "llama3.2" not found' in missing.value.error


def test_json_schema_format_answers_validate(client, name):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    for seed in range(3):
        r = client.chat(
            model=name,
            messages=[{"role": "user", "content": "Describe Paris as JSON."}],
            format=schema,
            options={"temperature": 1.0, "seed": seed, "num_predict": 80},
        )
        jsonschema.validate(json.loads(r.message.content), schema)


def test_a_tool_round_trip_answers_as_the_openai_route(client, name, base):
    """The client's tool calls (arguments objects, results named by tool) reach the model as the
    OpenAI route's messages with ids do."""

    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
          city: The city's name
        """
        return "sunny"

    call = ollama.Message.ToolCall(
        function=ollama.Message.ToolCall.Function(name="get_weather", arguments={"city": "Paris"})
    )
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        ollama.Message(role="assistant", content="", tool_calls=[call]),
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
    ]
    got = client.chat(model=name, messages=messages, tools=[get_weather], options=GREEDY)
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city's name"}},
                "required": ["city"],
            },
        },
    }
    oai = [
        messages[0],
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call00000",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call00000"},
    ]
    reference = httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": oai, "tools": [tool], "temperature": 0, "max_tokens": N, "top_k": 40, "top_p": 0.9},
        timeout=120,
    ).json()
    assert got.message.content == reference["choices"][0]["message"]["content"]


def test_langchain_chat_models_answer_as_offline(base, name, offline):
    langchain_ollama = pytest.importorskip("langchain_ollama")
    langchain_mistralai = pytest.importorskip("langchain_mistralai")
    chat = langchain_ollama.ChatOllama(model=name, base_url=base, temperature=0, num_predict=N)
    answer = chat.invoke(QUESTION[0]["content"])
    assert answer.content == offline.text and answer.usage_metadata["output_tokens"] == len(offline.token_ids)
    mistral = langchain_mistralai.ChatMistralAI(
        model=name.removesuffix(":latest"), endpoint=f"{base}/v1", api_key="none", temperature=0, max_tokens=N
    )
    assert mistral.invoke(QUESTION[0]["content"]).content == offline.text


def test_an_open_webui_style_sequence(base, offline):
    """What Open WebUI sends when a user opens it and asks: version, tags, show, then a streamed chat."""
    assert httpx.get(f"{base}/api/version").json()["version"]
    models = httpx.get(f"{base}/api/tags").json()["models"]
    chosen = models[0]["model"]
    assert httpx.post(f"{base}/api/show", json={"name": chosen}).status_code == 200  # older clients send name
    body = {"model": chosen, "messages": QUESTION, "stream": True, "options": GREEDY, "keep_alive": "5m"}
    with httpx.stream("POST", f"{base}/api/chat", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        parts = [json.loads(line) for line in r.iter_lines() if line]
    assert "".join(p["message"]["content"] for p in parts) == offline.text and parts[-1]["done"]
