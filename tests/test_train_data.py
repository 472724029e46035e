"""Training data: loss masks against the expected assistant text (SmolLM2's ChatML template and
mistral-common v3), line-numbered problems, packing and batches checked by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tramontane.errors import ConfigError, LoadError
from tramontane.text.tokenizer import MistralCommonTokenizer, Tokenizer, tokenizer_from_gguf
from tramontane.train.data import Example, batches, collate, pack, read_dataset
from tramontane.weights.gguf import open_gguf

MC_DATA = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
SYSTEM, QUESTION, ANSWER = "Be brief.", "What is the capital of France?", "Paris is the capital of France."
CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": ANSWER},
]
TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye!"},
]


@pytest.fixture(scope="module")
def smol_metadata(smollm2_path: Path) -> dict[str, Any]:
    with open_gguf(smollm2_path) as gguf:
        return dict(gguf.metadata)


@pytest.fixture(scope="module")
def smol(smol_metadata: dict[str, Any]) -> Tokenizer:
    return tokenizer_from_gguf(smol_metadata, "SmolLM2.gguf")


@pytest.fixture(scope="module")
def v3() -> Tokenizer:
    return MistralCommonTokenizer(MC_DATA / "mistral_instruct_tokenizer_240323.model.v3")


@pytest.fixture(params=["smol", "v3"])
def any_tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def write(tmp_path: Path, lines: list[Any], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n", encoding="utf-8"
    )
    return path


def one_example(tmp_path: Path, tokenizer: Tokenizer, line: dict[str, Any]) -> Example:
    report = read_dataset(write(tmp_path, [line]), tokenizer, 4096)
    assert report.problems == []
    (example,) = report.examples
    assert len(example.tokens) == len(example.mask)
    return example


def runs(tokenizer: Tokenizer, example: Example, trained: bool = True) -> list[str]:
    """Decoded runs of consecutive tokens whose mask is `trained`, control tokens shown."""
    found: list[list[int]] = []
    previous = not trained
    for token, flag in zip(example.tokens, example.mask):
        if flag == trained:
            if previous != trained:
                found.append([])
            found[-1].append(token)
        previous = flag
    return [tokenizer.decode(run, skip_special=False) for run in found]


# -- loss masks -------------------------------------------------------------------------------------


def test_chatml_trains_only_the_answer_and_its_end(tmp_path: Path, smol: Tokenizer) -> None:
    example = one_example(tmp_path, smol, {"messages": CHAT})
    assert example.tokens == smol.encode_chat(CHAT, add_generation_prompt=False)
    assert runs(smol, example) == [f"{ANSWER}<|im_end|>"]
    assert runs(smol, example, trained=False) == [
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
        "\n",  # after <|im_end|>: scaffolding, never generated
    ]
    last_trained = max(j for j, m in enumerate(example.mask) if m)
    assert example.tokens[last_trained] in smol.stop_ids and last_trained == len(example.tokens) - 2


def test_mistral_v3_trains_only_the_answer_and_eos(tmp_path: Path, v3: Tokenizer) -> None:
    example = one_example(tmp_path, v3, {"messages": CHAT})
    # mistral-common's own encoding of the prompt, then the answer and </s>
    assert example.tokens == v3.encode_chat(CHAT[:-1]) + v3.encode(ANSWER) + [v3.eos_id]
    assert runs(v3, example) == [f"{ANSWER}</s>"]
    assert runs(v3, example, trained=False) == [f"<s>[INST]{SYSTEM}\n\n{QUESTION}[/INST]"]
    assert example.mask[-1] and example.tokens[-1] == v3.eos_id


def test_chatml_two_turns_both_trained(tmp_path: Path, smol: Tokenizer) -> None:
    example = one_example(tmp_path, smol, {"messages": TWO_TURNS})
    assert runs(smol, example) == ["Hello there.<|im_end|>", "Bye!<|im_end|>"]
    assert not any("Hi" in text or "Bye<" in text for text in runs(smol, example))


def test_mistral_v3_two_turns_system_in_last_user_message(tmp_path: Path, v3: Tokenizer) -> None:
    messages = [{"role": "system", "content": SYSTEM}, *TWO_TURNS]
    example = one_example(tmp_path, v3, {"messages": messages})
    assert example.tokens == v3.encode_chat(messages[:-1]) + v3.encode("Bye!") + [v3.eos_id]
    assert runs(v3, example) == ["Hello there.</s>", "Bye!</s>"]
    assert runs(v3, example, trained=False) == ["<s>[INST]Hi[/INST]", f"[INST]{SYSTEM}\n\nBye[/INST]"]


def test_weight_zero_turn_not_trained(tmp_path: Path, smol: Tokenizer, v3: Tokenizer) -> None:
    messages = [dict(m) for m in TWO_TURNS]
    messages[1]["weight"] = 0
    assert runs(smol, one_example(tmp_path, smol, {"messages": messages})) == ["Bye!<|im_end|>"]
    assert runs(v3, one_example(tmp_path, v3, {"messages": messages})) == ["Bye!</s>"]


def test_mistral_v3_tool_call_and_answer_trained(tmp_path: Path, v3: Tokenizer) -> None:
    call = {"id": "abcdefghi", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    tool = {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {}},
        },
    }
    line = {
        "tools": [tool],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "abcdefghi", "name": "weather", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ],
    }
    trained = runs(v3, one_example(tmp_path, v3, line))
    assert trained == [
        '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]</s>',
        "It is sunny.</s>",
    ]


def test_pretrain_lines_fully_trained(tmp_path: Path, smol: Tokenizer, v3: Tokenizer) -> None:
    text = "Once upon a time, a wind blew over the mountains."
    example = one_example(tmp_path, v3, {"text": text})
    assert example.tokens == [v3.bos_id, *v3.encode(text), v3.eos_id] and all(example.mask)
    example = one_example(tmp_path, smol, {"text": text})  # SmolLM2 prompts start without BOS
    assert example.tokens == [*smol.encode(text), smol.eos_id] and all(example.mask)


def test_template_without_prefix_property_reported(tmp_path: Path, smol_metadata: dict[str, Any]) -> None:
    moving = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if loop.last %} (last)"
        "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    unstopped = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for template, reason in ((moving, "growing prefixes"), (unstopped, "no stop token")):
        tokenizer = tokenizer_from_gguf({**smol_metadata, "tokenizer.chat_template": template}, "custom.gguf")
        report = read_dataset(write(tmp_path, [{"messages": CHAT}, {"text": "ok"}]), tokenizer, 4096)
        assert [e.line for e in report.examples] == [2]
        assert [p.line for p in report.problems] == [1] and reason in report.problems[0].reason


# -- problems ---------------------------------------------------------------------------------------


BAD_LINES: list[tuple[Any, str | None]] = [  # (line, expected reason; None for a valid line)
    ({"messages": CHAT}, None),
    ('{"messages": [}', "bad JSON: Expecting value (column 15)"),
    ("   ", None),  # blank: skipped, neither an example nor a problem
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
        "unknown role 'bot' in message 2",
    ),
    ({"text": "Some plain text."}, None),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}, "no assistant turn"),
    ({"text": "word " * 300}, "{long} tokens, over the sequence length 200"),
    ({"prompt": "x", "completion": "y"}, "neither 'messages' nor 'text' (keys: prompt, completion)"),
    (
        {"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]},
        "content of message 1 is not a string (found a list)",
    ),
    ({"messages": "hello"}, "'messages' is not a list (found a string)"),
    ({"messages": TWO_TURNS}, None),
    ({"messages": TWO_TURNS[:3]}, "the last message (3) is a user message; it must be the assistant's"),
    ("[1, 2]", "expected a JSON object, found a list"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "message 1 has no 'role'"),
    ({"text": 42}, "'text' is not a string (found a number)"),
]


def test_every_problem_reported_with_its_line(tmp_path: Path, any_tokenizer: Tokenizer) -> None:
    path = write(tmp_path, [line for line, _ in BAD_LINES])
    report = read_dataset(path, any_tokenizer, 200)
    long = len(any_tokenizer.encode("word " * 300, add_bos=any_tokenizer.default_add_bos)) + 1  # + EOS
    expected = [(n, reason.replace("{long}", str(long))) for n, (_, reason) in enumerate(BAD_LINES, 1) if reason]
    assert [(p.line, p.reason) for p in report.problems] == expected, report.summary()
    assert [e.line for e in report.examples] == [1, 5, 11]
    assert report.kind == "mixed"
    assert report.tokens == sum(len(e.tokens) for e in report.examples)
    assert report.trained_tokens == sum(sum(e.mask) for e in report.examples) < report.tokens
    summary = report.summary().splitlines()
    assert "3 examples" in summary[0] and f"{len(expected)} problem lines" in summary[0]
    assert summary[1:] == [f"{path}:{p.line}: {p.reason}" for p in report.problems]
    assert summary[1] == f"{path}:2: bad JSON: Expecting value (column 15)"


def test_kind_of_single_kind_files(tmp_path: Path, smol: Tokenizer) -> None:
    assert read_dataset(write(tmp_path, [{"text": "a"}, {"text": "b"}]), smol, 64).kind == "pretrain"
    assert read_dataset(write(tmp_path, [{"messages": CHAT}, "{"]), smol, 64).kind == "instruct"


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "does not exist"),
        (b"", "no data"),
        (b"\n  \n\n", "no data"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2 is not UTF-8"),
    ],
)
def test_unreadable_files_raise_naming_the_file(
    tmp_path: Path, smol: Tokenizer, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "broken.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LoadError, match=problem) as info:
        read_dataset(path, smol, 64)
    assert str(info.value).startswith(str(path))


# -- packing and batches ----------------------------------------------------------------------------


def ex(line: int, tokens: list[int], mask: list[bool] | None = None) -> Example:
    return Example(line, tokens, mask if mask is not None else [True] * len(tokens))


def test_pack_and_collate_by_hand() -> None:
    a = ex(1, [5, 6, 7], [False, True, True])
    b = ex(2, [8, 9], [False, True])
    c = ex(3, [10, 11, 12, 13], [True, True, False, True])
    rows = pack([a, b, c], 6)
    assert rows == [[a, b], [c]]
    batch = collate(rows, 6)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0]]
    assert batch.targets.tolist() == [[6, 7, -100, 9, -100, -100], [11, -100, 13, -100, -100, -100]]
    assert batch.positions.tolist() == [[0, 1, 2, 0, 1, -1], [0, 1, 2, 3, -1, -1]]
    assert batch.segments.tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]]
    assert all(
        t.dtype == torch.int64 and t.device.type == "cpu"
        for t in (batch.tokens, batch.targets, batch.positions, batch.segments)
    )


def test_pack_best_fit_keeps_whole_examples() -> None:
    x, y, z, w = ex(1, [1] * 4), ex(2, [2] * 5), ex(3, [3] * 2), ex(4, [4])
    assert pack([x, y, z, w], 6) == [[x, z], [y, w]]  # z fills x's row, w fills y's (next fit: 3 rows)
    a, b, c = ex(5, [5] * 3), ex(6, [6] * 5), ex(7, [7])
    assert pack([a, b, c], 6) == [[a], [b, c]]  # the row with the least room that fits (first fit: a's)
    assert pack([ex(1, [1] * 6)], 6) == [[ex(1, [1] * 6)]]
    with pytest.raises(ConfigError, match="line 7 has 7 tokens, over the sequence length 6"):
        pack([x, ex(7, [1] * 7)], 6)


def examples_for_batches() -> list[Example]:
    lengths = [3, 7, 2, 5, 8, 2, 4, 6, 3, 5, 2, 7, 4, 4, 3, 6, 2, 5, 8, 3]
    return [ex(n, [100 * n + j for j in range(size)]) for n, size in enumerate(lengths, 1)]


def unpack(batch_list: list[Any]) -> list[list[int]]:
    """The examples' tokens found in batches, by segment."""
    found = []
    for batch in batch_list:
        for tokens, segments in zip(batch.tokens.tolist(), batch.segments.tolist()):
            for segment in sorted(set(segments) - {-1}):
                found.append([t for t, s in zip(tokens, segments) if s == segment])
    return found


def test_batches_deterministic_per_seed_and_epoch() -> None:
    examples = examples_for_batches()
    first = batches(examples, 10, 3, seed=0, epoch=0)
    again = batches(examples, 10, 3, seed=0, epoch=0)
    assert [b.tokens.tolist() for b in first] == [b.tokens.tolist() for b in again]
    assert [b.targets.tolist() for b in first] == [b.targets.tolist() for b in again]
    for other in (batches(examples, 10, 3, seed=1, epoch=0), batches(examples, 10, 3, seed=0, epoch=1)):
        assert [b.tokens.tolist() for b in other] != [b.tokens.tolist() for b in first]
    for result in (first, batches(examples, 10, 3, seed=1, epoch=0)):
        assert sorted(unpack(result)) == sorted(e.tokens for e in examples)  # each example once, whole
        assert all(b.tokens.shape[1] == 10 and 1 <= b.tokens.shape[0] <= 3 for b in result)
