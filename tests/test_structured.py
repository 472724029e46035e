"""Structured outputs: answers under a JSON schema (or json_object mode) always parse and validate."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

import tramontane
from tramontane.errors import RequestError
from tramontane.text.grammar import MAX_SCHEMA_BYTES, check_grammar, json_grammar, response_format_grammar

MODEL = "SmolLM2-135M-Instruct.Q4_1"
PERSON = {  # nested objects, arrays, enums, required fields; bounded so that answers end
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "doctor", "artist", "farmer"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "country": {"enum": ["France", "Spain", "Italy"]},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "skills", "home"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Invent a person and describe them as JSON."}]
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def test_bad_schemas_are_request_errors(smollm2_path):
    tok = tramontane.load(smollm2_path).tokenizer
    with pytest.raises(RequestError, match="must be an object"):
        json_grammar(["not", "a", "schema"])
    with pytest.raises(RequestError, match="limit"):
        json_grammar({"type": "object", "description": "x" * MAX_SCHEMA_BYTES})
    with pytest.raises(RequestError):
        check_grammar(json_grammar({"type": "integer", "minimum": 5, "maximum": 1}), tok)
    with pytest.raises(RequestError, match="json_schema"):
        response_format_grammar({"type": "json_schema"})
    with pytest.raises(RequestError, match="yaml"):
        response_format_grammar({"type": "yaml"})
    assert response_format_grammar({"type": "text"}) is None


def test_offline_sampled_answers_follow_the_schema(smollm2_path):
    llm = tramontane.load(smollm2_path)
    grammar = json_grammar(PERSON)
    prompt = llm.tokenizer.encode_chat(ASK)
    outs = llm.generate(
        [prompt] * 6,
        [tramontane.SamplingParams(temperature=1.0, seed=i, max_tokens=160, grammar=grammar) for i in range(6)],
    )
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    assert len({o.text for o in outs}) > 1  # sampling still samples


@pytest.fixture(scope="module")
def server(smollm2_server):
    return smollm2_server


def test_two_dozen_sampled_answers_through_both_sdks_validate(server):
    from openai import OpenAI

    try:
        from mistralai import Mistral
    except ImportError:
        from mistralai.client import Mistral
    oai = OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    mistral = Mistral(api_key="none", server_url=server)

    def via_openai(seed: int, response_format: dict) -> str:
        r = oai.chat.completions.create(
            model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=200, response_format=response_format
        )
        return r.choices[0].message.content

    def via_mistral(seed: int, response_format: dict) -> str:
        r = mistral.chat.complete(
            model=MODEL,
            messages=ASK,
            temperature=1.0,
            random_seed=seed,
            max_tokens=200,
            response_format=response_format,
        )
        return r.choices[0].message.content

    jobs = [(via_openai if i % 2 else via_mistral, i, FORMAT) for i in range(12)]  # two dozen answers in all
    jobs += [(via_openai if i % 2 else via_mistral, 100 + i, {"type": "json_object"}) for i in range(12)]
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda job: job[0](job[1], job[2]), jobs))
    for (_, _, fmt), text in zip(jobs, texts):
        value = json.loads(text)
        if fmt is FORMAT:
            jsonschema.validate(value, PERSON)
        else:
            assert isinstance(value, dict)


def test_streamed_answer_validates(server):
    from openai import OpenAI

    oai = OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    chunks = oai.chat.completions.create(
        model=MODEL, messages=ASK, temperature=1.0, seed=7, max_tokens=200, response_format=FORMAT, stream=True
    )
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), PERSON)


def test_invalid_schema_is_a_400_before_scheduling(server):
    import openai

    oai = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3, "maximum": 1}},
    }
    for fmt in (bad, {"type": "json_schema"}, {"type": "xml"}):
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, response_format=fmt)
        assert info.value.body["param"] == "response_format"


def test_answers_close_before_a_short_budget_runs_out(smollm2_path):
    """With little room left, a guided answer is steered to its end instead of being cut mid-string."""
    llm = tramontane.load(smollm2_path)
    prompt = llm.tokenizer.encode_chat(ASK)
    grammar = json_grammar(None)
    outs = llm.generate(
        [prompt] * 6,
        [tramontane.SamplingParams(temperature=1.0, seed=i, max_tokens=40, grammar=grammar) for i in range(6)],
    )
    for out in outs:
        assert isinstance(json.loads(out.text), dict) and len(out.token_ids) <= 40, out.text


def test_cli_json_and_schema_flags(smollm2_path, tmp_path, capsys):
    from tramontane.cli.main import main

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    assert (
        main(
            [
                "run",
                str(smollm2_path),
                ASK[0]["content"],
                "--schema",
                str(schema),
                "--temperature",
                "1",
                "--seed",
                "3",
                "--max-tokens",
                "160",
            ]
        )
        == 0
    )
    jsonschema.validate(json.loads(capsys.readouterr().out), PERSON)
    assert main(["run", str(smollm2_path), "List three fruits.", "--json", "--max-tokens", "80"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), dict)
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["run", str(smollm2_path), "hi", "--schema", str(tmp_path / "bad.json")]) == 1
    assert "--schema" in capsys.readouterr().err


def test_offline_chat_takes_response_format(smollm2_path):
    llm = tramontane.load(smollm2_path)
    answer = llm.chat(ASK, temperature=0, max_tokens=160, response_format=FORMAT)
    jsonschema.validate(json.loads(answer.text), PERSON)
    with pytest.raises(RequestError):
        llm.chat(ASK, max_tokens=5, response_format={"type": "json_schema"})


@pytest.mark.parametrize(
    ("shipped", "name", "vocab"),
    [
        ("tokenizer.model.v1", "tokenizer.model.v1", 32000),
        ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3", 32768),
        ("tekken_240718.json", "tekken.json", 131072),
    ],
)
def test_mistral_tokenizers_are_guided_too(tmp_path, shipped, name, vocab):
    """SentencePiece (v1, v3) and tekken vocabularies: random weights still give valid answers."""
    import importlib.util
    import shutil
    from pathlib import Path

    from models import hf_model, save_hf

    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    folder = save_hf(
        hf_model("mistral", seed=3, vocab_size=vocab, max_position_embeddings=512), tmp_path / "m", shard=None
    )
    shutil.copy(data / shipped, folder / name)
    llm = tramontane.load(folder, dtype="float32")
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    outs = llm.generate(
        ["hello"] * 3,
        [
            tramontane.SamplingParams(temperature=1.0, seed=i, max_tokens=60, grammar=json_grammar(schema))
            for i in range(3)
        ],
    )
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema)


def test_penalties_do_not_lift_the_grammar_mask(smollm2_path):
    """Repetition and presence penalties apply before the mask (they once replaced the masked logits)."""
    llm = tramontane.load(smollm2_path)
    prompt = llm.tokenizer.encode_chat(ASK)
    params = [
        tramontane.SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=160,
            grammar=json_grammar(PERSON),
            presence_penalty=2.0,
            repetition_penalty=1.3,
        )
        for i in range(3)
    ]
    for out in llm.generate([prompt] * 3, params):
        jsonschema.validate(json.loads(out.text), PERSON)


def test_mask_matches_llguidances_own_apply():
    """Our unpacking of the bitmask agrees with llguidance.torch's (the reference) on a vocabulary that is
    not a multiple of 32, for several rows, and ids past the grammar's vocabulary stay masked."""
    import llguidance.torch as lt
    import torch

    from tramontane.decoding.structured import mask_logits

    class FakeGuide:
        def __init__(self, bits):
            self.bits, self.vocab_size = bits, 1000

        def next_mask(self):
            return self.bits

    gen = torch.Generator().manual_seed(0)
    guides = [
        FakeGuide(torch.randint(-(2**31), 2**31 - 1, (1, 32), dtype=torch.int32, generator=gen)) for _ in range(3)
    ]
    logits = torch.randn(4, 1003, generator=gen)
    masked = mask_logits(logits, [guides[0], None, guides[1], guides[2]])
    for row, guide in zip((0, 2, 3), guides):
        reference = logits[row : row + 1, :1000].clone()
        lt.apply_token_bitmask_inplace(reference, guide.bits)
        assert torch.equal(masked[row : row + 1, :1000], reference)
        assert torch.isinf(masked[row, 1000:]).all()
    assert torch.equal(masked[1], logits[1])
