"""Issue 20: Ollama's TEMPLATE (Go's text/template) rendered as Go and Ollama render it: the language on
hand-computed outputs, chats collated and rendered with .Messages or turn by turn (cut where the answer
goes), a ChatML Go template giving the same token ids as transformers' apply_chat_template of SmolLM2's
Jinja template, a Modelfile TEMPLATE replacing the model's chat template, and /api/generate's
`template` through the official ollama client. Every bad template is a TemplateError naming it."""

from __future__ import annotations

import json

import pytest

import tramontane
from tramontane.errors import TemplateError
from tramontane.hub.modelfile import ModelfileError, parse_modelfile
from tramontane.text.go_chat import parse_ollama, render_go_chat
from tramontane.text.go_template import GoMap, GoTemplate


def render(source: str, data: object = None) -> str:
    return GoTemplate.parse(source).render(data if data is not None else {})


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        (
            "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}",
            {"System": "Be brief.", "Prompt": "Hi"},
            "Be brief.\nHi",
        ),
        ("{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}", {"System": "", "Prompt": "Hi"}, "Hi"),
        ("a  {{- 1 -}}  b", {}, "a1b"),
        ("a {{- /* gone */ -}}\n b", {}, "ab"),
        ("{{ range $i, $v := .L }}{{ $i }}:{{ $v }} {{ end }}", {"L": ["x", "y"]}, "0:x 1:y "),
        ("{{ range .L }}{{ . }}{{ else }}none{{ end }}", {"L": []}, "none"),
        ("{{ range $k, $v := .M }}{{ $k }}={{ $v }};{{ end }}", {"M": {"b": 2, "a": 1}}, "a=1;b=2;"),
        ("{{ range 3 }}{{ . }}{{ end }}", {}, "012"),
        (
            "{{ range .L }}{{ if eq . 2 }}{{ continue }}{{ end }}{{ if eq . 4 }}{{ break }}{{ end }}{{ . }}{{ end }}",
            {"L": [1, 2, 3, 4, 5]},
            "13",
        ),
        ("{{ with .X }}[{{ . }}]{{ else with .Y }}({{ . }}){{ else }}-{{ end }}", {"X": "", "Y": "y"}, "(y)"),
        ("{{ if and .A .B }}both{{ else if or .A .B }}one{{ else }}none{{ end }}", {"A": 1, "B": 0}, "one"),
        (
            '{{ eq .R "user" "tool" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ not .Z }}',
            {"R": "tool", "Z": ""},
            "true true true true",
        ),
        (
            '{{ len .L }} {{ index .L 1 }} {{ slice .L 1 }} {{ index .M "k" }}',
            {"L": [1, 2, 3], "M": {"k": "v"}},
            "3 2 [2 3] v",
        ),
        ("{{ $last := eq (len (slice $.L 1)) 2 }}{{ $last }}", {"L": [1, 2, 3]}, "true"),
        ('{{ printf "%s=%d %q %%" "n" 7 "q" }}|{{ print 1 2 "a" 3 }}|{{ println "x" 1 }}', {}, 'n=7 "q" %|1 2a3|x 1\n'),
        (
            "{{ .Missing }} {{ .M }} {{ 1.5 }} {{ 2.0 }} {{ true }}",
            {"M": {"b": [1, 2]}},
            "<no value> map[b:[1 2]] 1.5 2 true",
        ),
        (
            '{{ json .M }} {{ .A }} {{ "a\\tb" }} {{ `raw\\n` }}',
            {"M": {"k": [1, "x"]}, "A": GoMap(x=1)},
            '{"k":[1,"x"]} {"x":1} a\tb raw\\n',
        ),
        ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", {}, "2"),
        ('{{ .A | printf "<%s>" }}', {"A": "z"}, "<z>"),
        ("{{ (index .L 0).Name }}", {"L": [{"Name": "n"}]}, "n"),
        ('{{ if and (eq .R "a") .T }}yes{{ end }}|{{ $r := .R }}{{ eq $r .R }}', {"R": "a", "T": [1]}, "yes|true"),
        # a variable declared in an if or with pipeline lives to its end, else branch included
        ("{{ with $x := .A }}{{ $x }}{{ . }}{{ end }}", {"A": 1}, "11"),
        ("{{ if $x := .Z }}y{{ else }}[{{ $x }}]{{ end }}", {"Z": 0}, "[0]"),
        # fmt's %v: float64s in shortest form, exponent from 1e+06 and below 1e-04; nil inside a slice
        ("{{ 1e6 }} {{ 123456.0 }} {{ 0.0001 }} {{ 0.00001 }} {{ -2.50 }}", {}, "1e+06 123456 0.0001 1e-05 -2.5"),
        (
            "{{ .N }} {{ .L }} {{ print .N }} {{ .Gone }}",
            {"N": None, "L": [1, None]},
            "<no value> [1 <nil>] <nil> <no value>",
        ),
        # Go's html and js escapes
        (
            "{{ html .S }}|{{ js .S }}",
            {"S": "<a href='x'>\"&=\n\x7f\u00a0é"},
            "&lt;a href=&#39;x&#39;&gt;&#34;&amp;=\n\x7f\u00a0é|"
            "\\u003Ca href\\u003D\\'x\\'\\u003E\\\"\\u0026\\u003D\\u000A\x7f\\u00A0é",
        ),
        # encoding/json: keys sorted, <>& escaped, float64s as Go writes them
        (
            "{{ json .J }}",
            {"J": {"b": 1.0, "a": "<&>", "c": 1e21, "d": 1e-7, "e": [1e6, 0.5]}},
            '{"a":"\\u003c\\u0026\\u003e","b":1,"c":1e+21,"d":1e-7,"e":[1000000,0.5]}',
        ),
        # a comment holds anything up to */, quotes and }} too
        ('a {{/* "q }} */}} b {{- /* x */ -}} c', {}, "a  bc"),
    ],
)
def test_the_language_renders_as_go_does(source, data, expected):
    assert render(source, data) == expected


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("{{ if .X }}open", "needs {{ end }}"),
        ("{{ end }}", "unexpected {{ end }}"),
        ("{{ frobnicate .X }}", 'function "frobnicate" not defined'),
        ('{{ define "t" }}x{{ end }}', "define }} is not supported"),
        ("{{ .X", "unclosed action"),
        ("{{ $nope }}", "undefined variable $nope"),
        ("{{ index .L 500 }}", "index out of range"),
        ("{{ range .N }}{{ end }}", "range can't iterate over float64"),
        ('{{ lt 1 "a" }}', "incompatible types for comparison"),
        ("{{ lt 1 2.5 }}", "incompatible types for comparison: int and float64"),
        ("{{ eq 1 1.0 }}", "incompatible types for comparison"),
        ("{{ eq .L .L }}", "invalid type for comparison"),
        ("{{ lt true false }}", "invalid type for comparison"),
        ("{{ if $y := .X }}{{ end }}{{ $y }}", "undefined variable $y"),
        ("{{/* x */ }}", "comment ends before closing delimiter"),
        ("{{/* x }}", "unclosed comment"),
        ("{{ .Gone.Deeper }}", "nil pointer evaluating .Deeper"),  # Ollama's missingkey=zero
        ("{{ range 2000000 }}{{ end }}", "step budget"),
        ("{{ range 1000 }}{{ range 1000 }}{{ range 1000 }}{{ end }}{{ end }}{{ end }}", "steps"),
        ('{{ $x := "ab" }}{{ range 40 }}{{ $x = json $x }}{{ end }}', "json"),
        ("{{ if true }}{{ break }}{{ end }}", "outside a range"),
        ('{{ $x := "ab" }}{{ range 40 }}{{ $x = print $x $x }}{{ end }}', "print of more than"),
        ("{{ range .L }}{{ range $.L }}{{ range $.L }}xxxxxxxxxx{{ end }}{{ end }}{{ end }}", "larger than"),
    ],
)
def test_bad_templates_are_template_errors(source, words):
    data = {"L": list(range(200)), "N": 2.5, "X": 1}
    with pytest.raises(TemplateError, match=words.replace("(", r"\(").replace("$", r"\$")):
        GoTemplate.parse(source).render(data, max_output=100_000)


CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}{{ else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>{{ end }}<|im_end|>
{{ else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def test_chats_are_collated_and_rendered_with_their_messages():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "user", "content": "In Paris."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "system", "content": "Answer in French."},
    ]
    expected = (
        "<|im_start|>system\nBe brief.\n\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nWeather?\n\nIn Paris.<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city":"Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"  # the last message (a system one) is not the assistant's
    )
    assert render_go_chat(GoTemplate.parse(CHATML), messages) == expected
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
    listed = GoTemplate.parse(  # .Tools come with .Messages (a template without them is rendered turn by turn)
        "{{ range .Messages }}{{ end }}{{ range .Tools }}{{ .Function.Name }}: {{ .Function }}{{ end }}|{{ .Tools }}"
    )
    function = '{"name":"weather","description":"","parameters":{"type":"object","properties":{}}}'
    assert (
        render_go_chat(listed, [], tools=tools) == f'weather: {function}|[{{"type":"function","function":{function}}}]'
    )


def test_tools_and_arguments_print_as_ollama_writes_them():
    """Ollama keeps a tool in its own structs: its JSON has their field order, leaves out the schema keys
    they lack, sorts map keys, escapes <>& and writes numbers as float64s (all by hand from Go's rules)."""
    tool = {
        "function": {
            "parameters": {
                "properties": {
                    "z": {"enum": ["a", "b"], "description": "Z <b>", "type": "string", "default": "a"},
                    "a": {"minimum": 0, "type": ["integer", "null"]},
                },
                "required": ["z"],
                "type": "object",
            },
            "description": "Tom & Jerry",
            "name": "f",
            "strict": True,
        },
        "type": "function",
    }
    expected = (
        '{"type":"function","function":{"name":"f","description":"Tom \\u0026 Jerry","parameters":{"type":"object",'
        '"required":["z"],"properties":{"a":{"type":["integer","null"]},'
        '"z":{"type":"string","description":"Z \\u003cb\\u003e","enum":["a","b"]}}}}}'
    )
    template = GoTemplate.parse(
        "{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Arguments }}|{{ range $k, $v := .Function.Arguments }}"
        "{{ $k }}={{ $v }};{{ end }}{{ end }}{{ end }}|{{ range .Tools }}{{ . }}|"
        "{{ range $name, $p := .Function.Parameters.Properties }}{{ $name }}:{{ $p.Type }};{{ end }}{{ end }}"
    )
    call = {"id": "c", "function": {"name": "f", "arguments": '{"n": 3, "big": 1000000, "x": 1.5, "s": "<"}'}}
    messages = [{"role": "assistant", "content": "", "tool_calls": [call]}]
    assert render_go_chat(template, messages, tools=[tool]) == (
        f'{{"big":1000000,"n":3,"s":"\\u003c","x":1.5}}|big=1e+06;n=3;s=<;x=1.5;|{expected}|a:[integer null];z:string;'
    )
    structs = GoTemplate.parse("{{ range .Messages }}{{ . }}|{{ range .ToolCalls }}{{ . }}{{ end }}{{ end }}")
    assert (
        render_go_chat(structs, messages)
        == '&{assistant   [] [{c {0 f {"big":1000000,"n":3,"s":"\\u003c","x":1.5}}}]  }|{c {0 f {"big":1000000,"n":3,"s":"\\u003c","x":1.5}}}'
    )


def test_a_template_without_messages_renders_turn_by_turn_up_to_the_answer():
    legacy = GoTemplate.parse(
        "{{ if .System }}[S]{{ .System }}{{ end }}[U]{{ .Prompt }}[A]{{ .Response }}{{ if .Response }}[E]{{ end }}"
    )
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"},
    ]
    assert render_go_chat(legacy, messages) == "[S]sys[U]one[A]uno[E][U]two[A]"
    # a system message ends the turn before it; tool results are not shown (Ollama's switch)
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "tool", "content": "result"},
        {"role": "system", "content": "s2"},
        {"role": "user", "content": "two"},
    ]
    assert render_go_chat(legacy, messages) == "[U]one[A]uno[E][S]s2[U]two[A]"
    messages = [{"role": "system", "content": "s1"}, {"role": "user", "content": "u1"}, *messages[3:]]
    assert render_go_chat(legacy, messages) == "[S]s1[U]u1[A][S]s2[U]two[A]"


def test_a_template_without_response_gets_one_as_in_ollama():
    """Ollama's own test ("mistral", "no response"): a template reading neither .Messages nor .Response
    gets a {{ .Response }} appended at parse, so earlier answers show."""
    template = parse_ollama("[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}[/INST] ")
    messages = [
        {"role": "user", "content": "Hello friend!"},
        {"role": "assistant", "content": "Hello human!"},
        {"role": "user", "content": "What is your name?"},
    ]
    assert (
        render_go_chat(template, messages)
        == "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "
    )
    assert parse_ollama("{{ .Response }}x").source == "{{ .Response }}x"


def test_typescript_types_nil_slices_and_call_indexes():
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": ["integer", "null"]},
                    "b": {"anyOf": [{"type": "string"}, {"type": "array"}]},
                    "c": {"type": "object"},
                    "d": {},
                },
            },
        },
    }
    types = GoTemplate.parse(
        "{{ range .Messages }}{{ json .ToolCalls }}{{ range .ToolCalls }}{{ .Function.Index }}{{ end }}{{ end }}|"
        "{{ range .Tools }}{{ json .Function.Parameters.Required }}|{{ range $k, $p := .Function.Parameters.Properties }}"
        "{{ $k }}: {{ toTypeScriptType $p }}; {{ end }}{{ end }}"
    )
    call = {"function": {"name": "f", "arguments": {}, "index": 2}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    assert render_go_chat(types, messages, tools=[tool]) == (
        'null[{"ID":"","Function":{"Index":2,"Name":"f","Arguments":{}}}]2|'
        "null|a: number | null; b: string | any[]; c: Record<string, any>; d: any; "
    )
    assert render_go_chat(GoTemplate.parse("{{ range .Messages }}{{ end }}{{ json .Tools }}"), messages) == "null"


def test_the_last_turn_is_cut_after_its_response_field_inside_blocks_too():
    """Ollama keeps the .Response action (an answer the chat ends with is continued) and drops every node
    after it, inside the block it is in as well; a block's condition does not cut."""
    llama3 = GoTemplate.parse(
        "{{ if .Prompt }}<u>{{ .Prompt }}</u>{{ end }}<a>{{ if .Response }}{{ .Response }}<eot>{{ end }}</a>{{ .System }}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure, "}]
    assert render_go_chat(llama3, messages) == "<u>q</u><a>Sure, "
    looped = GoTemplate.parse("{{ range .L }}[{{ .Response }}|after]{{ end }}tail")
    assert looped.cut_at("Response").render({"L": [{"Response": "a"}, {"Response": "b"}]}) == "[a[b"
    pipeline = GoTemplate.parse('{{ print "x" .Response "gone" }}{{ $.Response }}')  # $.Response is not a field
    assert pipeline.cut_at("Response").render({"Response": "r"}) == "xr"


def test_a_chatml_go_template_gives_transformers_token_ids(smollm2_path, smollm2_hf_tokenizer):
    """SmolLM2's Jinja template adds a default system prompt: the Go template written with it gives the
    same ids as transformers' apply_chat_template, over a multi-turn chat."""
    reference, _ = smollm2_hf_tokenizer
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    go = CHATML.replace(
        "{{- if .System }}",
        "{{- if not .System }}<|im_start|>system\n" + default + "<|im_end|>\n{{ end }}{{- if .System }}",
        1,
    )
    tokenizer = tramontane.load(smollm2_path).tokenizer.with_go_template(go)
    chat = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
    ]
    for messages in (chat, [{"role": "system", "content": "Be terse."}, *chat]):
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tokenizer.encode_chat(messages) == list(expected)


def test_a_modelfile_template_replaces_the_chat_template(smollm2_path, tmp_path, monkeypatch):
    from test_modelfile import run_cli

    (tmp_path / "Modelfile").write_text(
        f'FROM {smollm2_path}\nSYSTEM "Be terse."\nTEMPLATE """<|im_start|>{{{{ .System }}}}|{{{{ .Prompt }}}}<|im_end|>\n"""\n'
    )
    code, _, err = run_cli(tmp_path / "home", "create", "terse", "-f", str(tmp_path / "Modelfile"))
    assert code == 0, err
    plain = tramontane.load(smollm2_path).tokenizer
    monkeypatch.setenv("TRAMONTANE_HOME", str(tmp_path / "home"))
    llm = tramontane.load("terse")
    ids = llm.tokenizer.encode_chat([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    start, end = plain.control_id("<|im_start|>"), plain.control_id("<|im_end|>")
    assert ids == [start, *plain.encode("Be terse.|Hi"), end, *plain.encode("\n")]
    with pytest.raises(ModelfileError, match="Modelfile:2: TEMPLATE is not a valid Go template"):
        parse_modelfile("FROM x\nTEMPLATE {{ if .System }}", tmp_path)
    # a TEMPLATE stored before create checked them: the model loads with its own template, and says so
    info_file = next((tmp_path / "home").rglob("tramontane.json"))
    info = json.loads(info_file.read_text())
    info["modelfile"]["template"] = "{{ if .System }}"
    info_file.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="TEMPLATE does not parse"):
        fallback = tramontane.load("terse")
    chat = [{"role": "user", "content": "Hi"}]
    assert fallback.tokenizer.encode_chat(chat) == plain.encode_chat(chat)


def test_generate_formats_with_a_request_template(smollm2_server, smollm2_path):
    ollama = pytest.importorskip("ollama")
    client = ollama.Client(host=smollm2_server)
    name = client.list().models[0].model
    template = "<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
    answer = client.generate(
        model=name, prompt="Name a colour.", template=template, options={"temperature": 0, "num_predict": 8}
    )
    llm = tramontane.load(smollm2_path)
    ids = llm.tokenizer.with_go_template(template).encode_chat([{"role": "user", "content": "Name a colour."}])
    assert answer.prompt_eval_count == len(ids) and ids[0] == llm.tokenizer.control_id("<|im_start|>")
    assert answer.response == llm.generate(ids, temperature=0, max_tokens=8)[0].text
    with pytest.raises(ollama.ResponseError, match="template"):
        client.generate(model=name, prompt="x", template="{{ if }}")
    # an empty template is the model's own; a raw prompt is not formatted, whatever the template
    default = client.generate(model=name, prompt="Name a colour.", template="", options={"num_predict": 1})
    chat_ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Name a colour."}])
    assert default.prompt_eval_count == len(chat_ids)
    raw = client.generate(
        model=name, prompt="Name a colour.", template="{{ if }}", raw=True, options={"num_predict": 1}
    )
    assert raw.prompt_eval_count == len(llm.tokenizer.encode("Name a colour."))
