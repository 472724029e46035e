"""Go's text/template language, as Ollama's TEMPLATE uses it: parse once, render with a budget.

Written here because no Python package renders Go templates without a Go toolchain (the ones on PyPI
wrap Go's own library through cgo). What Ollama's templates use is covered: text and actions with
`{{-`/`-}}` trimming and comments; pipelines with `|`; fields (`.A.B`, `$.A`, `$x.A`), variables
(`$x := ...`, `$x = ...`, `range $i, $m := ...`), parenthesised pipelines, string, raw-string, number,
`true`/`false`/`nil` literals; `if`/`else if`/`else`, `range` (lists, maps in key order, integers)
with `else`, `break` and `continue`, `with`/`else with`/`else`; the functions and, or, not, eq, ne,
lt, le, gt, ge, len, index, slice, print, printf, println, html, js, urlquery, and Ollama's json,
currentDate, yesterdayDate and toTypeScriptType. `define`, `template`, `block` and `call` are refused when parsing.

    template = GoTemplate.parse("{{ if .System }}{{ .System }}\\n{{ end }}{{ .Prompt }}")
    template.render({"System": "Be brief.", "Prompt": "Hi"})      # "Be brief.\\nHi"

Values are Python dicts, lists, strings, numbers, booleans and None, and go_values.py's structs; they
print as Go's fmt prints them and `json` writes what Go's encoding/json writes. A variable declared in
an `if`, `with` or `range` lives until its `{{ end }}`; an int never equals a float (Go refuses the
comparison). A missing field of a struct is an error, as in Go; a missing map key is `<no value>`.
Every failure, and a render past its output or step budget, is a TemplateError."""

from __future__ import annotations

import datetime
import functools
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import TemplateError
from .go_values import MISSING, GoList, GoMap, GoStruct, GoValue, go_json, show

__all__ = ["GoList", "GoMap", "GoStruct", "GoTemplate", "GoValue", "go_json", "show"]

MAX_OUTPUT = 4 << 20  # characters a render may write
MAX_STEPS = 1_000_000  # nodes a render may visit (a range over a huge list, nested loops)
MAX_DEPTH = 64  # nesting of blocks and parentheses
Thunk = Callable[[], Any]  # a function's argument, evaluated when needed (and, or stop early)


# ---- lexing ----------------------------------------------------------------------------------------
_ACTION = re.compile(r"\{\{(-\s)?|\{\{")
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>"(?:[^"\\\n]|\\.)*")
    | (?P<raw>`[^`]*`)
    | (?P<char>'(?:[^'\\\n]|\\.)+')
    | (?P<num>[+-]?(?:0[xX][0-9a-fA-F_]+|[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+))
    | (?P<decl>:=)
    | (?P<assign>=)
    | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
    | (?P<var>\$[A-Za-z0-9_]*)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<dot>\.)
    | (?P<punct>[()|,])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    spaced: bool = False  # whitespace before it: `$x .A` is two operands, `$x.A` one


_TRIM_LEFT = re.compile(r"\{\{-[ \t\r\n]")
_TRIM_RIGHT = re.compile(r"[ \t\r\n]-$")
_TRIM_RIGHT_COMMENT = re.compile(r"[ \t\r\n]-\}\}")
_SPACE = " \t\r\n"


def _split(source: str) -> Iterator[tuple[str, str]]:
    """("text", text) and ("action", inside) pieces, `{{- ` and ` -}}` trims applied, comments dropped."""
    pos, trim_next = 0, False
    while True:
        start = source.find("{{", pos)
        text = source[pos:] if start < 0 else source[pos:start]
        if start >= 0 and _TRIM_LEFT.match(source, start):
            text = text.rstrip(_SPACE)
        if trim_next:
            text = text.lstrip(_SPACE)
        if text:
            yield "text", text
        if start < 0:
            return
        after = start + (4 if _TRIM_LEFT.match(source, start) else 2)
        if source.startswith("/*", after):  # {{/* ... */}}: anything inside, up to the first */
            pos, trim_next = _comment_end(source, after)
            continue
        end = _action_end(source, start)
        inner = source[start + 2 : end]
        trim_next = bool(_TRIM_RIGHT.search(inner))
        inner = inner[after - start - 2 : len(inner) - 2 if trim_next else len(inner)]
        pos = end + 2
        yield "action", inner


def _comment_end(source: str, start: int) -> tuple[int, bool]:
    """Where the text after the comment at `start` begins, and whether it ends ` -}}` (trimming)."""
    close = source.find("*/", start + 2)
    if close < 0:
        raise TemplateError(f"template: unclosed comment at offset {start}")
    if source.startswith("}}", close + 2):
        return close + 4, False
    if _TRIM_RIGHT_COMMENT.match(source, close + 2):
        return close + 6, True
    raise TemplateError(f"template: comment ends before closing delimiter at offset {close}")


def _action_end(source: str, start: int) -> int:
    """Offset of the `}}` closing the action at `start` (skipping quoted strings)."""
    i = start + 2
    while i < len(source):
        if source.startswith("}}", i):
            return i
        quote = source[i]
        if quote in "\"'`":
            close = source.find(quote, i + 1) if quote == "`" else _quoted_end(source, i)
            if close < 0:
                break
            i = close
        i += 1
    raise TemplateError(f"template: unclosed action at offset {start}")


def _quoted_end(source: str, i: int) -> int:
    quote, j = source[i], i + 1
    while j < len(source) and source[j] != "\n":
        if source[j] == "\\":
            j += 2
            continue
        if source[j] == quote:
            return j
        j += 1
    return -1


def _tokens(inner: str) -> list[_Tok]:
    out, pos = [], 0
    while pos < len(inner):
        if not inner[pos:].strip():
            break
        match = _TOKEN.match(inner, pos)
        if match is None or match.end() == pos:
            raise TemplateError(f"template: unexpected {inner[pos:].strip()[:20]!r} in action {inner.strip()[:60]!r}")
        kind = match.lastgroup or ""
        out.append(_Tok(kind, match.group(kind), match.start(kind) > pos))
        pos = match.end()
    return out


# ---- parsing ---------------------------------------------------------------------------------------
@dataclass
class _Pipe:
    decl: list[str]  # variables declared (":=") or assigned ("=")
    assign: bool
    commands: list[list[Any]]  # each: operands (("lit", v), ("field", base, names), ("call", name), ("pipe", _Pipe))


@dataclass
class _Node:
    kind: str  # "text", "action", "if", "range", "with", "break", "continue"
    text: str = ""
    pipe: _Pipe | None = None
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


FUNCTIONS = frozenset(
    "and or not eq ne lt le gt ge len index slice print printf println html js urlquery json currentDate "
    "yesterdayDate toTypeScriptType".split()
)
_REFUSED = ("define", "template", "block", "call")


class _Parser:
    def __init__(self, source: str) -> None:
        self.pieces = list(_split(source))
        self.at = 0

    def nodes(self, depth: int, ends: tuple[str, ...]) -> tuple[list[_Node], str, list[_Tok]]:
        """Nodes up to an action whose first word is in `ends`: (nodes, that word, its tokens)."""
        if depth > MAX_DEPTH:
            raise TemplateError(f"template: blocks nested deeper than {MAX_DEPTH}")
        out: list[_Node] = []
        while self.at < len(self.pieces):
            kind, value = self.pieces[self.at]
            self.at += 1
            if kind == "text":
                out.append(_Node("text", value))
                continue
            toks = _tokens(value)
            if not toks:
                raise TemplateError("template: empty action {{ }}")
            word = toks[0].text if toks[0].kind == "ident" else ""
            if word in ends:
                return out, word, toks[1:]
            out.append(self.action(word, toks, depth))
        if ends:
            raise TemplateError(f"template: unexpected end of template: a block needs {{{{ {ends[0]} }}}}")
        return out, "", []

    def action(self, word: str, toks: list[_Tok], depth: int) -> _Node:
        if word in _REFUSED:
            raise TemplateError(f"template: {{{{ {word} }}}} is not supported here")
        if word in ("break", "continue"):
            return _Node(word)
        if word in ("end", "else"):
            raise TemplateError(f"template: unexpected {{{{ {word} }}}}")
        if word in ("if", "range", "with"):
            return self.block(word, toks[1:], depth)
        return _Node("action", pipe=_pipeline(toks, depth))

    def block(self, word: str, toks: list[_Tok], depth: int) -> _Node:
        node = _Node(word, pipe=_pipeline(toks, depth, in_range=word == "range"))
        node.body, end, rest = self.nodes(depth + 1, ("end", "else"))
        if end == "else":
            if rest and rest[0].kind == "ident" and rest[0].text in ("if", "with"):  # else if / else with
                node.orelse = [self.block(rest[0].text, rest[1:], depth + 1)]
                return node
            if rest:
                raise TemplateError(f"template: unexpected {rest[0].text!r} after else")
            node.orelse, _, rest = self.nodes(depth + 1, ("end",))
        if rest:
            raise TemplateError(f"template: unexpected {rest[0].text!r} after end")
        return node


def _pipeline(toks: list[_Tok], depth: int, in_range: bool = False) -> _Pipe:
    if not toks:
        raise TemplateError("template: missing value for command")
    decl, assign = _declaration(toks, in_range)
    if decl:
        toks = toks[4:] if len(decl) == 2 else toks[2:]
    commands: list[list[Any]] = [[]]
    i = 0
    while i < len(toks):
        tok = toks[i]
        if tok.text == "|" and tok.kind == "punct":
            if not commands[-1]:
                raise TemplateError("template: missing command before '|'")
            commands.append([])
            i += 1
            continue
        operand, i = _operand(toks, i, depth)
        commands[-1].append(operand)
    if not commands[-1]:
        raise TemplateError("template: missing command after '|'")
    return _Pipe(decl, assign, commands)


def _declaration(toks: list[_Tok], in_range: bool) -> tuple[list[str], bool]:
    if len(toks) >= 2 and toks[0].kind == "var" and toks[1].kind in ("decl", "assign"):
        return [toks[0].text], toks[1].kind == "assign"
    if (
        in_range
        and len(toks) >= 4
        and toks[0].kind == "var"
        and toks[1].text == ","
        and toks[2].kind == "var"
        and toks[3].kind == "decl"
    ):
        return [toks[0].text, toks[2].text], False
    return [], False


def _operand(toks: list[_Tok], i: int, depth: int) -> tuple[Any, int]:
    tok = toks[i]
    if tok.kind == "punct" and tok.text == "(":
        close, level = i, 0
        for close in range(i, len(toks)):
            level += {"(": 1, ")": -1}.get(toks[close].text, 0) if toks[close].kind == "punct" else 0
            if level == 0:
                break
        if level != 0:
            raise TemplateError("template: unclosed '('")
        if depth > MAX_DEPTH:
            raise TemplateError(f"template: parentheses nested deeper than {MAX_DEPTH}")
        operand: Any = ("pipe", _pipeline(toks[i + 1 : close], depth + 1))
        i = close + 1
        if i < len(toks) and toks[i].kind == "field" and not toks[i].spaced:  # (index .X 0).Name
            operand = ("chain", operand, toks[i].text[1:].split("."))
            i += 1
        return operand, i
    if tok.kind == "field":
        return ("field", ".", tok.text[1:].split(".")), i + 1
    if tok.kind == "var":
        names: list[str] = []
        if i + 1 < len(toks) and toks[i + 1].kind == "field" and not toks[i + 1].spaced:
            names = toks[i + 1].text[1:].split(".")
            i += 1
        return ("field", tok.text, names), i + 1
    if tok.kind == "dot":
        return ("field", ".", []), i + 1
    if tok.kind == "ident":
        return _ident(tok.text), i + 1
    if tok.kind in ("str", "raw", "char", "num"):
        return ("lit", _literal(tok)), i + 1
    raise TemplateError(f"template: unexpected {tok.text!r}")


def _ident(name: str) -> Any:
    if name in ("true", "false"):
        return ("lit", name == "true")
    if name == "nil":
        return ("lit", None)
    if name in _REFUSED:
        raise TemplateError(f"template: function {name!r} is not supported here")
    if name not in FUNCTIONS:
        raise TemplateError(f'template: function "{name}" not defined')
    return ("call", name)


def _literal(tok: _Tok) -> Any:
    text = tok.text
    if tok.kind == "raw":
        return text[1:-1]
    if tok.kind in ("str", "char"):
        try:
            value = json.loads('"' + text[1:-1].replace("\\'", "'") + '"')
        except ValueError:
            raise TemplateError(f"template: bad string {text[:40]}") from None
        return ord(value) if tok.kind == "char" and len(value) == 1 else value
    clean = text.replace("_", "")
    try:
        return int(clean, 0) if re.fullmatch(r"[+-]?(0[xX][0-9a-fA-F]+|[0-9]+)", clean) else float(clean)
    except ValueError:
        raise TemplateError(f"template: bad number {text[:40]}") from None


# ---- rendering -------------------------------------------------------------------------------------
class _Break(Exception):
    pass


class _Continue(Exception):
    pass


class GoTemplate:
    def __init__(self, nodes: list[_Node], source: str) -> None:
        self._nodes, self.source = nodes, source

    @classmethod
    def parse(cls, source: str) -> GoTemplate:
        parser = _Parser(source)
        nodes, _, _ = parser.nodes(0, ())
        return cls(nodes, source)

    def then(self, action: str) -> GoTemplate:
        """This template with the action `{{ action }}` at its end."""
        return GoTemplate([*self._nodes, _Node("action", pipe=_pipeline(_tokens(action), 0))], self.source)

    def cut_at(self, name: str) -> GoTemplate:
        """This template with every node after the first `.{name}` field left out, inside blocks too: the
        field's own action stays (Ollama renders the last turn of a template without .Messages this
        way, so the prompt ends where the answer goes). Block conditions are not looked at, as Ollama
        does not."""
        return GoTemplate(_Cut(name).nodes(self._nodes) or [], self.source)

    def reads(self, name: str) -> bool:
        """Whether a field or variable reads `name`, in any case (Ollama: a template that reads .Messages
        gets them all)."""
        return any(_reads(node, name.lower()) for node in self._nodes)

    def render(self, data: Any, max_output: int = MAX_OUTPUT, max_steps: int = MAX_STEPS) -> str:
        run = _Run(max_output, max_steps)
        try:
            run.nodes(self._nodes, data, [{"$": data}])
        except (_Break, _Continue):
            raise TemplateError("template: {{ break }} or {{ continue }} outside a range") from None
        except (ValueError, OverflowError, RecursionError) as exc:
            raise TemplateError(f"template: {type(exc).__name__}: {exc}") from None
        return "".join(run.out)


def _reads(node: _Node, name: str) -> bool:
    pipes = [node.pipe] if node.pipe is not None else []
    return any(_pipe_reads(p, name) for p in pipes) or any(_reads(n, name) for n in (*node.body, *node.orelse))


def _pipe_reads(pipe: _Pipe, name: str) -> bool:
    def operand(o: Any) -> bool:
        if o[0] == "field":
            return any(n.lower() == name for n in o[2])
        return o[0] == "pipe" and _pipe_reads(o[1], name)

    return any(operand(o) for command in pipe.commands for o in command)


class _Cut:
    """Ollama's cut of a template at its answer: walking the nodes in order, the first field node
    (`.Response`, `.X.Response`; not `$.Response`) naming `name` is kept and everything after it goes."""

    def __init__(self, name: str) -> None:
        self.name, self.cut = name, False

    def nodes(self, nodes: list[_Node]) -> list[_Node] | None:
        if self.cut:
            return None
        return [kept for node in nodes if (kept := self.node(node)) is not None]

    def node(self, node: _Node) -> _Node | None:
        if self.cut:
            return None
        if node.kind == "action":
            assert node.pipe is not None
            pipe = self.pipe(node.pipe)
            return None if pipe is None else replace(node, pipe=pipe)
        if node.kind in ("if", "range", "with"):
            body = self.nodes(node.body) or []
            return replace(node, body=body, orelse=(self.nodes(node.orelse) or []) if node.orelse else [])
        return node

    def pipe(self, pipe: _Pipe) -> _Pipe | None:
        if self.cut:
            return None
        commands = []
        for command in pipe.commands:
            operands = [kept for o in command if (kept := self.operand(o)) is not None]
            if not operands:
                return None
            commands.append(operands)
        return replace(pipe, commands=commands)

    def operand(self, operand: Any) -> Any:
        if operand[0] == "field" and operand[1] == "." and self.name in operand[2]:
            self.cut = True
            return operand
        if self.cut:
            return None
        if operand[0] == "pipe":
            inner = self.pipe(operand[1])
            return None if inner is None else ("pipe", inner)
        return operand


class _Run:
    def __init__(self, max_output: int, max_steps: int) -> None:
        self.size, self.steps = 0, 0
        self.out: list[str] = []
        self.max_output, self.max_steps = max_output, max_steps

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > self.max_output:
            raise TemplateError(f"template output is larger than {self.max_output:,} characters")
        self.out.append(text)

    def tick(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise TemplateError(f"template took more than {self.max_steps:,} steps")

    def nodes(self, nodes: list[_Node], dot: Any, scopes: list[dict[str, Any]]) -> None:
        scopes = [*scopes, {}]  # variables declared in a block end with it
        for node in nodes:
            self.tick()
            if node.kind == "text":
                self.write(node.text)
            elif node.kind == "action":
                assert node.pipe is not None
                value = self.pipe(node.pipe, dot, scopes)
                if not node.pipe.decl:
                    self.write(show(value))
            elif node.kind == "break":
                raise _Break
            elif node.kind == "continue":
                raise _Continue
            else:
                self.block(node, dot, scopes)

    def block(self, node: _Node, dot: Any, scopes: list[dict[str, Any]]) -> None:
        assert node.pipe is not None
        scopes = [*scopes, {}]  # `if $x := ...`, `with $x := ...`: $x lives until {{ end }}, else included
        if node.kind == "range":
            return self.range(node, dot, scopes)
        value = self.pipe(node.pipe, dot, scopes)
        if truth(value):
            return self.nodes(node.body, value if node.kind == "with" else dot, scopes)
        return self.nodes(node.orelse, dot, scopes)

    def range(self, node: _Node, dot: Any, scopes: list[dict[str, Any]]) -> None:
        assert node.pipe is not None
        value = self.pipe(_Pipe([], False, node.pipe.commands), dot, scopes)
        names, local = node.pipe.decl, scopes[-1]
        empty = True
        for key, item in _items(value):
            empty = False
            self.tick()
            if len(names) == 1:
                local[names[0]] = item
            elif len(names) == 2:
                local[names[0]], local[names[1]] = key, item
            try:
                self.nodes(node.body, item, scopes)
            except _Break:
                break
            except _Continue:
                continue
        if empty:
            self.nodes(node.orelse, dot, scopes)
        return None

    def pipe(self, pipe: _Pipe, dot: Any, scopes: list[dict[str, Any]]) -> Any:
        value: Any = _NOTHING
        for command in pipe.commands:
            value = self.command(command, dot, scopes, value)
        for name in pipe.decl[:1]:
            if pipe.assign:
                for scope in reversed(scopes):
                    if name in scope:
                        scope[name] = value
                        break
                else:
                    raise TemplateError(f"template: undefined variable {name}")
            else:
                scopes[-1][name] = value
        return value

    def command(self, operands: list[Any], dot: Any, scopes: list[dict[str, Any]], piped: Any) -> Any:
        head = operands[0]
        self.tick()
        if head[0] == "call":
            args: list[Thunk] = [functools.partial(self.argument, o, dot, scopes) for o in operands[1:]]
            if piped is not _NOTHING:
                args.append(functools.partial(_nil, piped))
            return _call(head[1], args)
        if len(operands) > 1 or piped is not _NOTHING:
            raise TemplateError("template: can't give arguments to a non-function value")
        return self.operand(head, dot, scopes)

    def argument(self, operand: Any, dot: Any, scopes: list[dict[str, Any]]) -> Any:
        return _nil(self.operand(operand, dot, scopes))

    def operand(self, operand: Any, dot: Any, scopes: list[dict[str, Any]]) -> Any:
        kind = operand[0]
        if kind == "lit":
            return operand[1]
        if kind == "pipe":
            return self.pipe(operand[1], dot, scopes)
        if kind == "chain":
            return _fields(self.operand(operand[1], dot, scopes), operand[2])
        if kind == "call":  # a function named without arguments: `{{ if not }}` is Go's error too
            return _call(operand[1], [])
        _, base, names = operand
        if base == ".":
            start = dot
        else:
            for scope in reversed(scopes):
                if base in scope:
                    start = scope[base]
                    break
            else:
                raise TemplateError(f"template: undefined variable {base}")
        return _fields(start, names)


_NOTHING = object()  # no value piped in yet


def _nil(value: Any) -> Any:
    """A function's argument: a missing key is nil there."""
    return None if value is MISSING else value


def _fields(value: Any, names: list[str]) -> Any:
    for name in names:
        if isinstance(value, GoValue):
            if name not in value.fields:
                raise TemplateError(f"template: can't evaluate field {name}")
            value = value.fields[name]
        elif isinstance(value, Mapping):
            value = value.get(name, MISSING)
        elif value is None or value is MISSING:  # Ollama's missingkey=zero: a missing key is nil
            raise TemplateError(f"template: nil pointer evaluating .{name}")
        else:
            raise TemplateError(f"template: can't evaluate field {name} in type {_type(value)}")
    return value


def truth(value: Any) -> bool:
    if isinstance(value, GoValue):
        return True
    return bool(value) if value is not MISSING and value is not _NOTHING else False


def _items(value: Any) -> Iterable[tuple[Any, Any]]:
    if value is None or value is MISSING:
        return []
    if isinstance(value, bool):
        raise TemplateError("template: range can't iterate over a bool")
    if isinstance(value, int):
        if value > MAX_STEPS:
            raise TemplateError(f"template: range over {value} is larger than the step budget")
        return ((i, i) for i in range(value))
    if isinstance(value, Mapping):
        return [(k, value[k]) for k in sorted(value)]
    if isinstance(value, list | tuple):
        return list(enumerate(value))
    raise TemplateError(f"template: range can't iterate over {_type(value)}")


def _type(value: Any) -> str:
    if isinstance(value, GoValue):
        return "struct"
    return {str: "string", int: "int", float: "float64", bool: "bool", type(None): "nil"}.get(
        type(value), "slice" if isinstance(value, list | tuple) else "map" if isinstance(value, Mapping) else "value"
    )


# ---- functions -------------------------------------------------------------------------------------
def _call(name: str, args: list[Thunk]) -> Any:
    if name == "and":
        return _and_or(args, stop_on=False)
    if name == "or":
        return _and_or(args, stop_on=True)
    values = [a() for a in args]
    if sum(len(v) if isinstance(v, str) else 1 for v in values) > MAX_OUTPUT:
        raise TemplateError(f"template: {name} of more than {MAX_OUTPUT:,} characters")  # {{ $x = print $x $x }}
    function = _FUNCTIONS[name]
    try:
        result = function(*values)
        if isinstance(result, str) and len(result) > MAX_OUTPUT:  # {{ $x = json $x }} grows too
            raise TemplateError(f"template: {name} made more than {MAX_OUTPUT:,} characters")
        return result
    except TemplateError:
        raise
    except TypeError as exc:
        raise TemplateError(f"template: wrong arguments for {name}: {exc}") from None
    except (ValueError, IndexError, KeyError) as exc:
        raise TemplateError(f"template: error calling {name}: {exc}") from None


def _and_or(args: list[Thunk], stop_on: bool) -> Any:
    if not args:
        raise TemplateError("template: and/or need at least one argument")
    value = None
    for arg in args:
        value = arg()
        if truth(value) == stop_on:
            return value
    return value


def _kind(value: Any) -> str:
    """Go's basic kind of a value for comparisons (an int and a float64 are different kinds)."""
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("string", str)):
        if isinstance(value, types):
            return kind
    return "nil" if value is None else "other"


def _eq(first: Any, *others: Any) -> bool:
    """Go's eq: true when `first` equals any of `others`; ints and floats are not comparable, nor slices,
    maps or structs; nil equals only nil."""
    if not others:
        raise TemplateError("template: eq needs at least two arguments")
    for other in others:
        kinds = (_kind(first), _kind(other))
        if "other" in kinds:
            raise TemplateError(f"template: invalid type for comparison: {_type(first)} and {_type(other)}")
        if kinds[0] != kinds[1] and "nil" not in kinds:
            raise TemplateError(f"template: incompatible types for comparison: {_type(first)} and {_type(other)}")
        if first == other and kinds[0] == kinds[1]:
            return True
    return False


def _ordered(a: Any, b: Any) -> tuple[Any, Any]:
    """lt, le, gt, ge: two ints, two floats or two strings."""
    kinds = (_kind(a), _kind(b))
    if any(k not in ("int", "float", "string") for k in kinds):
        raise TemplateError(f"template: invalid type for comparison: {_type(a)} and {_type(b)}")
    if kinds[0] != kinds[1]:
        raise TemplateError(f"template: incompatible types for comparison: {_type(a)} and {_type(b)}")
    return a, b


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(value, Mapping):
            value = value.get(key)
        elif isinstance(value, list | tuple | str) and _kind(key) == "int" and not isinstance(key, bool):
            if not 0 <= key < len(value):
                raise TemplateError(f"template: index out of range: {key}")
            value = value[key]
        else:
            raise TemplateError(f"template: can't index item of type {_type(value)}")
    return value


def _slice(value: Any, *bounds: int) -> Any:
    if not isinstance(value, list | tuple | str) or len(bounds) > 2:
        raise TemplateError(f"template: can't slice item of type {_type(value)}")
    low = bounds[0] if bounds else 0
    high = bounds[1] if len(bounds) > 1 else len(value)
    if not 0 <= low <= high <= len(value):
        raise TemplateError(f"template: slice index out of range: {low}:{high} of {len(value)}")
    return value[low:high]


def _length(value: Any) -> int:
    if isinstance(value, str | list | tuple | Mapping):
        return len(value)
    raise TemplateError(f"template: len of type {_type(value)}")


def _sprint(*values: Any) -> str:
    """fmt.Sprint: a space between operands when neither is a string."""
    out = ""
    for i, v in enumerate(values):
        if i and not isinstance(v, str) and not isinstance(values[i - 1], str):
            out += " "
        out += show(v, top=False)
    return out


def _sprintf(fmt: str, *values: Any) -> str:
    queue = list(values)

    def one(match: re.Match[str]) -> str:
        verb = match.group(1)
        if verb == "%":
            return "%"
        if not queue:
            return f"%!{verb}(MISSING)"
        value = queue.pop(0)
        if verb == "q":
            return json.dumps(value if isinstance(value, str) else show(value, top=False), ensure_ascii=False)
        if verb == "d" and isinstance(value, int):
            return str(value)
        return show(value, top=False)

    return re.sub(r"%[-+# 0-9.]*([a-zA-Z%])", one, fmt)


_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;", "'": "&#39;", '"': "&#34;", "\0": "\ufffd"}
_JS = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026", "=": "\\u003D"}


def _html(text: str) -> str:
    """Go's HTMLEscapeString."""
    return "".join(_HTML.get(c, c) for c in text)


def _js(text: str) -> str:
    """Go's JSEscapeString: quotes and backslashes escaped, <>&= and control characters as \\uXXXX."""
    return "".join(
        _JS.get(c) or (f"\\u{ord(c):04X}" if c < " " or (c > "\x7f" and not c.isprintable()) else c) for c in text
    )


_TS_TYPES = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean"}
_TS_TYPES.update({"array": "any[]", "object": "Record<string, any>", "null": "null"})


def _typescript(value: Any) -> str:
    """Ollama's toTypeScriptType of a tool parameter: its JSON type as TypeScript ("any" for the rest)."""
    if not isinstance(value, GoValue) or "AnyOf" not in value.fields:
        return "any"
    if value.fields["AnyOf"]:
        return " | ".join(_typescript(v) for v in value.fields["AnyOf"])
    types = value.fields.get("Type")
    types = [types] if isinstance(types, str) and types else list(types or [])
    return " | ".join(_TS_TYPES.get(t, "any") for t in types) or "any"


def _date(days_ago: int) -> Callable[[], str]:
    return lambda: (datetime.date.today() - datetime.timedelta(days=days_ago)).isoformat()


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not truth(v),
    "eq": _eq,
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: (lambda x, y: x < y)(*_ordered(a, b)),
    "le": lambda a, b: (lambda x, y: x <= y)(*_ordered(a, b)),
    "gt": lambda a, b: (lambda x, y: x > y)(*_ordered(a, b)),
    "ge": lambda a, b: (lambda x, y: x >= y)(*_ordered(a, b)),
    "len": _length,
    "index": _index,
    "slice": _slice,
    "print": _sprint,
    "printf": _sprintf,
    "println": lambda *v: " ".join(show(x, top=False) for x in v) + "\n",
    "html": lambda *v: _html(_sprint(*v)),
    "js": lambda *v: _js(_sprint(*v)),
    "urlquery": lambda *v: urllib.parse.quote_plus(_sprint(*v)),
    "json": go_json,
    "currentDate": _date(0),
    "yesterdayDate": _date(1),
    "toTypeScriptType": _typescript,
}
