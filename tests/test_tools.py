"""Tool calling: request checks, prompts (mistral-common and transformers as references), the grammar
of a required call in every call format, and calls through the openai and mistralai SDKs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest
from models import hf_model, save_hf

import tramontane
from tramontane.text.grammar import MAX_SCHEMA_BYTES, guidance_tokenizer
from tramontane.text.tokenizer import MistralCommonTokenizer, load_tokenizer
from tramontane.tools.request import (
    ToolError,
    call_grammar,
    call_text,
    mistral_id,
    prepare_messages,
    read_calls,
    read_tools,
)

MODEL = "SmolLM2-135M-Instruct.Q4_1"
DATA = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
WEATHER = {  # enum, bounded string, integer range, required fields, nested object
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "where": {
            "type": "object",
            "properties": {"country": {"type": "string", "maxLength": 16}},
            "required": ["country"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "unit", "days", "where"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast for a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
CALL = {
    "name": "get_weather",
    "arguments": {"city": "Paris", "unit": "celsius", "days": 3, "where": {"country": "France"}},
}


def _tool(name: str, parameters: object) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def tekken_v11(folder: Path) -> Path:
    """A v11 tekken file (name[CALL_ID]id[ARGS]{...} calls) made from the shipped v3 one."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    spec = json.loads((DATA / "tekken_240911.json").read_text())
    spec["config"]["version"] = "v11"
    names = [str(t["token_str"]) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS] + ["[ARGS]", "[CALL_ID]"]
    spec["special_tokens"] = [{"rank": i, "token_str": n, "is_control": True} for i, n in enumerate(names)]
    path = folder / "tekken.json"
    path.write_text(json.dumps(spec))
    return path


# ---- request checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tools", "choice", "field"),
    [
        ([_tool("bad name!", {})], None, "tools[0].function.name"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        (None, "required", "tool_choice"),
        ([TOOLS[1], TOOLS[1]], None, "tools"),
        ({"not": "a list"}, None, "tools"),
        ([{"type": "retrieval"}], None, "tools[0]"),
        ([_tool("f", {"type": "integer", "minimum": 3, "maximum": 1})], None, "tools[0].function.parameters"),
        ([_tool("f", {"type": "bogus"})], None, "tools[0].function.parameters"),
        ([_tool("f", {"enum": ["x" * 100] * (MAX_SCHEMA_BYTES // 100)})], None, "tools[0].function.parameters"),
    ],
)
def test_bad_tools_name_their_field(smollm2_path, tools, choice, field):
    tokenizer = tramontane.load(smollm2_path).tokenizer
    with pytest.raises(ToolError) as info:
        read_tools(tools, choice, None, tokenizer)
    assert info.value.field == field, str(info.value)


def test_tool_choice_forms():
    assert read_tools(TOOLS, "any").mode == "required"
    named = read_tools(TOOLS, {"type": "function", "function": {"name": "add"}}, False)
    assert (named.mode, named.forced, named.parallel, named.names) == ("required", "add", False, ["add"])
    assert read_tools(TOOLS, {"type": "function", "name": "add"}).forced == "add"  # the flat form
    assert read_tools(TOOLS, None).mode == "auto" and read_tools(TOOLS, "none").mode == "none"
    assert read_tools(None, "auto") is None and read_tools([], None) is None


# ---- prompts -----------------------------------------------------------------------------------------


def _history(call_id: str) -> list[dict]:
    call = {"id": call_id, "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    return [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "name": "add", "content": "5"},
    ]


@pytest.mark.parametrize("shipped", ["mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json"])
def test_mistral_prompt_is_mistral_commons_encoding(shipped):
    """Tools and the call/result history reach the prompt exactly as mistral-common encodes them; an
    OpenAI-style call id is mapped to 9 alphanumerics, the same in the call and in its result."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tokenizer = MistralCommonTokenizer(DATA / shipped)
    use = read_tools(TOOLS, "auto")
    messages, offered = prepare_messages(_history("call_AbC123xyz456"), use, tokenizer)
    ours = tokenizer.encode_chat(messages, tools=offered)
    reference = MistralTokenizer.from_file(str(DATA / shipped)).encode_chat_completion(
        ChatCompletionRequest.from_openai(_history(mistral_id("call_AbC123xyz456")), tools=TOOLS)
    )
    assert ours == reference.tokens
    assert "[AVAILABLE_TOOLS]" in reference.text and reference.text.count(mistral_id("call_AbC123xyz456")) == 2
    assert mistral_id("abcDEF123") == "abcDEF123" and len(mistral_id("call_1")) == 9


HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}\n<|im_start|>assistant"
    "{%- for call in message.tool_calls %}\n<tool_call>\n{{ {'name': call.function.name, "
    "'arguments': call.function.arguments} | tojson }}\n</tool_call>{%- endfor %}<|im_end|>"
    "{%- elif message.role == 'tool' %}\n<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>"
    "{%- else %}\n<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}\n<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="module")
def hermes_folder(smollm2_path, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer with a template that reads `tools` and writes <tool_call> blocks."""
    folder = tmp_path_factory.mktemp("hermes")
    tramontane.load(smollm2_path).tokenizer.save_hf(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": HERMES_TEMPLATE}))
    return folder


def test_jinja_template_gets_the_tools_as_transformers_passes_them(hermes_folder):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(hermes_folder))
    tokenizer = load_tokenizer(hermes_folder)
    assert tokenizer.tool_format == "hermes"
    history = _history("call_1")
    history[1]["tool_calls"][0]["function"]["arguments"] = {"a": 2, "b": 3}  # transformers' convention
    text = reference.apply_chat_template(history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    messages, offered = prepare_messages(_history("call_1"), read_tools(TOOLS, "auto"), tokenizer)
    assert tokenizer.encode_chat(messages, tools=offered) == reference(text, add_special_tokens=False)["input_ids"]
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in text


def test_template_without_tools_gets_them_in_a_system_turn(smollm2_path):
    tokenizer = tramontane.load(smollm2_path).tokenizer
    assert tokenizer.tool_format is None
    messages, offered = prepare_messages(_history("call_1"), read_tools(TOOLS, "auto"), tokenizer)
    assert offered is None and messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": "<tool_response>\n5\n</tool_response>"}
    none, _ = prepare_messages(_history("call_1"), read_tools(TOOLS, "none"), tokenizer)
    assert none[0]["role"] == "user"  # tool_choice none: the tools are not described


# ---- the grammar of a required call -------------------------------------------------------------------


def _accepts(grammar: str, tokenizer, ids: list[int]) -> bool:
    import llguidance

    matcher = llguidance.LLMatcher(guidance_tokenizer(tokenizer), grammar)
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


def _reference_call_ids(shipped: Path, call: dict) -> list[int]:
    """mistral-common's own encoding of an assistant tool call: what the model was trained to write."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mistral = MistralTokenizer.from_file(str(shipped))
    raw = mistral.instruct_tokenizer.tokenizer
    openai_call = {
        "id": "abcDEF123",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
    }
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [openai_call]},
        {"role": "tool", "tool_call_id": "abcDEF123", "name": call["name"], "content": "ok"},
    ]
    ids = list(mistral.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=TOOLS)).tokens)
    start = ids.index(raw.get_special_token("[/INST]")) + 1
    return ids[start : ids.index(raw.eos_id)]  # between [/INST] and </s>


@pytest.mark.parametrize("shipped", ["mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json", "v11"])
def test_mistral_grammar_accepts_mistral_commons_calls(shipped, tmp_path):
    path = tekken_v11(tmp_path) if shipped == "v11" else DATA / shipped
    tokenizer = MistralCommonTokenizer(path)
    ids = _reference_call_ids(path, CALL)
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        use = read_tools(TOOLS, choice)
        assert _accepts(call_grammar(use, tokenizer), tokenizer, ids), tokenizer.decode(ids, skip_special=False)
    parsed = read_calls(call_text(tokenizer, ids), read_tools(TOOLS, "required"), tokenizer)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [(CALL["name"], CALL["arguments"])]
    assert len(parsed.calls[0].id) == 9 and parsed.calls[0].id.isalnum()
    bad = _reference_call_ids(path, {**CALL, "arguments": {**CALL["arguments"], "days": 9}})
    assert not _accepts(call_grammar(read_tools(TOOLS, "required"), tokenizer), tokenizer, bad)
    forced_add = read_tools(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert not _accepts(call_grammar(forced_add, tokenizer), tokenizer, ids)


def test_hermes_grammar_accepts_what_the_prompt_shows(smollm2_path, hermes_folder):
    """A call written the way the prompt's history shows calls is what a required call allows."""
    block = "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>"
    for tokenizer in (tramontane.load(smollm2_path).tokenizer, load_tokenizer(hermes_folder)):
        grammar = call_grammar(read_tools(TOOLS, "required"), tokenizer)
        assert _accepts(grammar, tokenizer, tokenizer.encode(block + "\n" + block))
        single = call_grammar(read_tools(TOOLS, "required", False), tokenizer)
        assert _accepts(single, tokenizer, tokenizer.encode(block))
        assert not _accepts(single, tokenizer, tokenizer.encode(block + "\n" + block))
        assert not _accepts(grammar, tokenizer, tokenizer.encode(block.replace('"days": 3', '"days": "3"')))
        parsed = read_calls(block + "\n" + block, read_tools(TOOLS, "required"), tokenizer)
        assert [c.name for c in parsed.calls] == ["get_weather", "get_weather"] and parsed.content == ""
        assert len(read_calls(block + "\n" + block, read_tools(TOOLS, "auto", False), tokenizer).calls) == 1


@pytest.mark.parametrize("shipped", ["mistral_instruct_tokenizer_240323.model.v3", "tekken_240718.json", "v11"])
def test_required_calls_of_a_random_mistral_model_validate(shipped, tmp_path):
    """Random weights, temperature 1: every answer is still a valid call of the named function."""
    path = tekken_v11(tmp_path) if shipped == "v11" else DATA / shipped
    vocab = 32768 if path.suffix != ".json" else 131072
    folder = save_hf(
        hf_model("mistral", seed=3, vocab_size=vocab, max_position_embeddings=512), tmp_path / "m", shard=None
    )
    shutil.copy(path, folder / ("tekken.json" if path.suffix == ".json" else "tokenizer.model.v3"))
    llm = tramontane.load(folder, dtype="float32")
    for seed in range(3):
        out = llm.chat(
            ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=seed != 0,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        assert out.finish_reason == "tool_calls" and out.tool_calls, call_text(llm.tokenizer, out.token_ids)
        for call in out.tool_calls:
            assert call.name == "get_weather"
            jsonschema.validate(json.loads(call.arguments), WEATHER)


# ---- through the server and both SDKs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


def _clients(base: str):
    from openai import OpenAI

    try:
        from mistralai import Mistral
    except ImportError:
        from mistralai.client import Mistral
    return OpenAI(base_url=base + "/v1", api_key="none", max_retries=0), Mistral(api_key="none", server_url=base)


def _check(name: str, arguments: str | dict) -> None:
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments, SCHEMAS[name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_calls_through_both_sdks(server, choice):
    oai, mistral = _clients(server)

    def via_openai(seed: int) -> None:
        r = oai.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed, temperature=1.0, max_tokens=160
        )
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        for call in r.choices[0].message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            _check(call.function.name, call.function.arguments)

    def via_mistral(seed: int) -> None:
        m = mistral.chat.complete(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            random_seed=seed,
            temperature=1.0,
            tool_choice="any" if choice == "required" else choice,
            max_tokens=160,
        )
        assert m.choices[0].finish_reason == "tool_calls"
        for call in m.choices[0].message.tool_calls:
            _check(call.function.name, call.function.arguments)
        if isinstance(choice, dict):
            assert {c.function.name for c in m.choices[0].message.tool_calls} == {"get_weather"}

    # sampled: two seeds per SDK and choice, sent together (the server batches them)
    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(ask, seed) for ask in (via_openai, via_mistral) for seed in range(2)]:
            done.result()


def test_streamed_calls_through_both_sdks(server):
    oai, mistral = _clients(server)

    def via_openai(seed: int) -> None:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in oai.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            seed=seed,
            temperature=1.0,
            max_tokens=160,
            stream=True,
        ):
            delta = chunk.choices[0].delta
            for c in delta.tool_calls or []:  # the way OpenAI's docs accumulate streamed calls
                entry = calls.setdefault(c.index, {"name": "", "arguments": ""})
                entry["name"] += c.function.name or ""
                entry["arguments"] += c.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls" and calls
        for entry in calls.values():
            _check(entry["name"], entry["arguments"])

    def via_mistral(seed: int) -> None:
        events = list(
            mistral.chat.stream(
                model=MODEL,
                messages=ASK,
                tools=TOOLS,
                tool_choice="any",
                random_seed=seed,
                temperature=1.0,
                max_tokens=160,
            )
        )
        streamed = [c for e in events for c in e.data.choices[0].delta.tool_calls or []]
        assert events[-1].data.choices[0].finish_reason == "tool_calls" and streamed
        for call in streamed:
            _check(call.function.name, call.function.arguments)

    with ThreadPoolExecutor(4) as pool:  # the four streams at once: the server batches them
        for done in [pool.submit(ask, seed) for ask in (via_openai, via_mistral) for seed in range(2)]:
            done.result()


def test_round_trip_through_both_sdks(server):
    """Assistant tool_calls message, tool result, final answer: the conversation the APIs define."""
    oai, mistral = _clients(server)
    first = oai.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=160,
    )
    message = first.choices[0].message
    assert len(message.tool_calls) == 1
    results = [{"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "Sunny, 21 C every day."}]
    final = oai.chat.completions.create(
        model=MODEL,
        messages=[*ASK, message.model_dump(exclude_none=True), *results],
        tools=TOOLS,
        temperature=0,
        max_tokens=40,
    )
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content
    m_first = mistral.chat.complete(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="any",
        temperature=0,
        parallel_tool_calls=False,
        max_tokens=160,
    )
    m_message = m_first.choices[0].message
    call = m_message.tool_calls[0]
    m_final = mistral.chat.complete(
        model=MODEL,
        tools=TOOLS,
        temperature=0,
        max_tokens=40,
        messages=[
            *ASK,
            m_message,
            {"role": "tool", "tool_call_id": call.id, "name": call.function.name, "content": "21 C"},
        ],
    )
    assert m_final.choices[0].finish_reason in ("stop", "length") and m_final.choices[0].message.content


def test_bad_tool_requests_are_400s(server):
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [_tool("f", {"type": "integer", "minimum": 3, "maximum": 1})]}, "tools[0].function.parameters"),
        ({"tools": [_tool("f", {"enum": ["x" * 100] * 700})]}, "tools[0].function.parameters"),
        ({"tools": [_tool("no spaces", {})]}, "tools[0].function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"messages": [{"role": "tool", "content": "5"}]}, "messages[0].tool_call_id"),
    ]
    for extra, field in cases:
        r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **extra}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (extra, r.text[:300])
        assert len(r.text) < 2000  # the error names the problem; it does not echo the schema back
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "x", "tools": TOOLS}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    card = httpx.get(server + f"/v1/models/{MODEL}", timeout=30).json()
    assert card["capabilities"]["function_calling"] is True


# ---- streaming ---------------------------------------------------------------------------------------


def _stream(tokenizer, text: str, use) -> tuple[str, list, str | None]:
    """Feed `text` token by token through ToolChatFormat's streaming: (content, calls, finish_reason)."""
    from tramontane.engine.types import RequestOutput
    from tramontane.serve.streaming import Choice
    from tramontane.serve.tool_format import ToolChatFormat

    fmt = ToolChatFormat("chatcmpl-1", MODEL, 1, False, use, tokenizer)
    choice = Choice(index=0, prompt_tokens=3)
    ids = [*tokenizer.encode(text), 2]  # then <|im_end|>
    content, calls, finish = "", [], None
    for k, token in enumerate(ids):
        out = RequestOutput(
            "r", tokenizer.decode([token]), [token], finish_reason="stop" if k == len(ids) - 1 else None
        )
        offset = len(choice.text)
        choice.add(out)
        for chunk in fmt.chunks(choice, out, offset):
            delta = chunk["choices"][0]["delta"]
            content += delta.get("content") or ""
            calls += delta.get("tool_calls") or []
            finish = chunk["choices"][0]["finish_reason"] or finish
            assert finish or "<tool_call>" not in content, content  # what may be a call waits for the end
    return content, calls, finish


def test_streaming_holds_back_calls_and_releases_text(smollm2_path):
    tokenizer = tramontane.load(smollm2_path).tokenizer
    use = read_tools(TOOLS, "auto")
    block = "<tool_call>\n" + json.dumps(CALL) + "\n</tool_call>"
    content, calls, finish = _stream(tokenizer, "Let me check.\n" + block, use)
    assert content == "Let me check.\n" and finish == "tool_calls"
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "get_weather", CALL["arguments"])
    ] and calls[0]["id"].startswith("call_")
    for text in (
        "No call here, only text.",
        'A <tool_call> never closed {"name": "add"',
        '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
        "a < b, and <tool is a word",
    ):
        assert _stream(tokenizer, text, use) == (text, [], "stop")  # no valid call: all of it is content
