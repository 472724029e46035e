"""The tool-call parser: well-formed calls in both formats, and malformed output that never raises."""

from __future__ import annotations

import json
import re

import pytest

from tramontane.tools.parser import call_id, parse_tool_calls

TOOLS = ["get_weather", "add"]


def test_mistral_v3_json_list():
    out = parse_tool_calls(
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        "mistral",
        TOOLS,
    )
    assert out.problem is None and out.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in out.calls)
    assert len({c.id for c in out.calls}) == 2


def test_mistral_v11_name_args():
    out = parse_tool_calls(
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]add[ARGS]{"a": 2, "b": 3}', "mistral", TOOLS
    )
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [
        ("get_weather", {"city": "Lyon"}),
        ("add", {"a": 2, "b": 3}),
    ]


def test_hermes_blocks_and_surrounding_text():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    out = parse_tool_calls(text, "hermes", TOOLS, id_style="openai")
    assert out.content == "Let me check." and out.calls[0].name == "get_weather"
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", out.calls[0].id)


def test_plain_text_is_content():
    for fmt in ("mistral", "hermes"):
        out = parse_tool_calls("The weather is fine.", fmt, TOOLS)
        assert (out.content, out.calls, out.problem) == ("The weather is fine.", [], None)


@pytest.mark.parametrize(
    ("fmt", "text", "problem"),
    [
        ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Pa', "truncated"),
        ("mistral", '[TOOL_CALLS][{"name": "launch_rockets", "arguments": {}}]', "not one of the tools"),
        ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": [1, 2]}]', "must be a JSON object"),
        ("mistral", '[TOOL_CALLS][{"arguments": {}}]', "string 'name'"),
        ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": ', "truncated"),
        ("mistral", '[TOOL_CALLS]get_weather{"city": "x"}', "malformed"),
        ("mistral", '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]get_weather', "without [ARGS]"),
        ("mistral", "[TOOL_CALLS]", "truncated"),
        ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}', "never closed"),
        ("hermes", "<tool_call>not json</tool_call>", "malformed"),
        ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "not one of the tools"),
        ("hermes", '<tool_call>{"name": "add", "arguments": "{broken"}</tool_call>', "not JSON"),
    ],
)
def test_malformed_output_is_kept_as_content_with_a_reason(fmt, text, problem):
    out = parse_tool_calls(text, fmt, TOOLS)
    assert out.calls == [] and out.content == text and problem in out.problem


def test_extra_text_after_a_mistral_call_is_content():
    out = parse_tool_calls('Sure. [TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}] Done.', "mistral", TOOLS)
    assert out.calls[0].name == "add" and out.content == "Sure. Done."


def test_string_arguments_are_decoded_and_ids_are_fresh():
    out = parse_tool_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>', "hermes", TOOLS)
    assert json.loads(out.calls[0].arguments) == {"a": 1}
    assert len({call_id() for _ in range(50)}) == 50
    with pytest.raises(ValueError, match="format"):
        parse_tool_calls("x", "xml", TOOLS)
