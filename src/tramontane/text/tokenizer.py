"""One `Tokenizer` protocol over three vocabularies: Mistral's own files through mistral-common
(`tekken.json`, `tokenizer.model.v*`), Hugging Face `tokenizer.json` folders and GGUF metadata
(both through the `tokenizers` library), and an incremental detokenizer for streaming.

Plain text never turns into control tokens: `encode` treats `[INST]`, `</s>` or `<|im_end|>` in its
input as ordinary characters, and so does `encode_chat` for message content (see chat.py for how the
content is located in a rendered template).
"""

from __future__ import annotations

import copy
import json
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tokenizers import Tokenizer as HFBackend

from tramontane.errors import LoadError, TemplateError, TokenizerError
from tramontane.text.chat_template import (
    field_strings,
    mistral_request,
    render_chat_parts,
    render_chat_template,
    template_tool_format,
)
from tramontane.text.go_chat import parse_ollama, render_go_chat
from tramontane.text.go_template import GoTemplate

Message = dict[str, Any]


class IncrementalDecoder:
    """Streaming detokenizer: `push(id)` returns only text that is complete, `flush()` the rest.

    It decodes a small window of recent tokens twice, without and with the new tokens, and emits the
    difference (the way text-generation servers do), so each step costs O(window), not O(output).
    The window starts one decodable token back, so SentencePiece's stripping of the first leading
    space hits text already emitted; the difference is held back while it ends in U+FFFD (a
    character whose bytes are split over several tokens), for at most `max_pending` tokens.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], max_pending: int = 8) -> None:
        self._decode = decode
        self._max_pending = max_pending
        self._window: list[int] = []  # ids from the window start on
        self._read = 0  # window[:read] was emitted already
        self._prefix_text = ""  # decode(window[:read])

    def push(self, token_id: int) -> str:
        self._window.append(int(token_id))
        text = self._decode(self._window)
        pending = len(self._window) - self._read
        if text.endswith("\ufffd") and pending <= self._max_pending:
            return ""
        return self._advance(text)

    def flush(self) -> str:
        if self._read == len(self._window):
            return ""
        return self._advance(self._decode(self._window))

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        tail = self._window[self._read :]
        tail_text = self._decode(tail)
        if tail_text:  # start the next window at the first new token
            self._window, self._prefix_text = tail, tail_text
        else:  # the new tokens print nothing alone: keep the old start for space stripping
            self._prefix_text = text
        self._read = len(self._window)
        return delta


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]  # ids that end generation (eos, <|im_end|>, <|eot_id|> ...)
    chat_format: str  # human-readable: "mistral-common v3", "jinja (tokenizer_config.json)", ...
    default_add_bos: bool  # whether a plain completion prompt should start with BOS
    supports_fim: bool  # whether `encode_fim` works (Mistral's v3+ tokenizers through mistral-common)
    tool_format: str | None  # how encode_chat's tools and the model's calls look (chat.template_tool_format)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str: ...

    def encode_chat(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]: ...

    def incremental_decoder(self, *, skip_special: bool = True) -> IncrementalDecoder: ...

    def encode_fim(self, prompt: str, suffix: str) -> list[int]: ...  # TokenizerError unless supports_fim

    def control_id(self, text: str) -> int | None: ...  # a control token's id, None if `text` is not one


class _SentencePieceVocabulary:
    """A mistral-common SentencePiece vocabulary as llguidance's TokenizerWrapper reads it: each token's
    bytes ("▁" as a space, <0xHH> pieces as that byte), control tokens written <NAME> and listed."""

    CONTROL = re.compile(r"\[(.*)\]|<(.*)>")

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.bos_token_id, self.eos_token_id = raw.bos_id, raw.eos_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(raw.n_words):
            piece = raw.id_to_piece(i)
            control = self.CONTROL.fullmatch(piece)
            if raw.is_special(i) or (control and piece in ("<unk>", "<s>", "</s>")):
                name = control.group(1) or control.group(2) if control else f"special_{i}"
                self.tokens.append(f"<{name}>".encode())
                self.special_token_ids.append(i)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode("utf-8"))

    def __call__(self, text: str) -> list[int]:
        """Token ids of `text` as a continuation: without the "▁" SentencePiece puts before a text's
        first word (encoded after a newline, whose ids are then dropped)."""
        anchor = list(self._raw.encode("\n", bos=False, eos=False))
        ids = list(self._raw.encode("\n" + text, bos=False, eos=False))
        if ids[: len(anchor)] == anchor:
            return ids[len(anchor) :]
        return list(self._raw.encode(text, bos=False, eos=False))


class MistralCommonTokenizer:
    """Mistral's own tokenizer files, with mistral-common's instruct encoding for chat."""

    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        try:
            self._mistral = MistralTokenizer.from_file(str(path))
        except Exception as exc:  # mistral-common raises assorted types for unreadable files
            raise LoadError(path, f"not a mistral-common tokenizer file: {exc}") from exc
        raw = self._mistral.instruct_tokenizer.tokenizer
        self._raw = raw
        self.vocab_size: int = raw.n_words
        self.bos_id: int | None = raw.bos_id
        self.eos_id: int | None = raw.eos_id
        self.stop_ids = frozenset({raw.eos_id})
        self.default_add_bos = True
        kind = " tekken" if path.suffix == ".json" else ""
        self.chat_format = f"mistral-common {raw.version.value}{kind}"
        self.supports_fim = self._probe_fim()
        version = int(re.match(r"v(\d+)", str(raw.version.value)).group(1))  # type: ignore[union-attr]
        # v2-v7 write [TOOL_CALLS] and a JSON list of calls, v11 and later name[ARGS]{...}; v1 has no tools
        self.tool_format = None if version < 2 else "mistral-v11" if version >= 11 else "mistral-v3"

    def control_id(self, text: str) -> int | None:
        """The id of control token `text` ("[TOOL_CALLS]"), None when this vocabulary has none."""
        try:
            token_id = int(self._raw.get_special_token(text))
        except Exception:  # tekken raises for unknown control tokens (SentencePiece answers <unk>)
            return None
        return token_id if self._raw.id_to_piece(token_id) == text else None

    def guidance_tokenizer(self) -> Any:
        """This vocabulary for llguidance (structured output; see structured.py): mistral-common's own
        wrapper for tekken files, the same conventions for SentencePiece ones (control tokens as <...>)."""
        import llguidance
        from mistral_common.tokens.tokenizers.tekken import is_tekkenizer

        if is_tekkenizer(self._raw):
            from mistral_common.guidance.tokenizer import from_mistral_tokenizer

            return from_mistral_tokenizer(self._mistral)
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceVocabulary(self._raw)))

    def _probe_fim(self) -> bool:
        """FIM needs the [PREFIX]/[SUFFIX] control tokens of v3 and later: mistral-common refuses v1,
        and encodes v2's missing markers as <unk> (id 0)."""
        version = re.match(r"v(\d+)", str(self._raw.version.value))
        if version is None or int(version.group(1)) < 3:
            return False
        try:
            self.encode_fim("a", "b")
        except TokenizerError:
            return False
        return True

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        """Fill-in-the-middle prompt: the model writes what goes between `prompt` and `suffix`."""
        from mistral_common.protocol.fim.request import FIMRequest

        try:
            return list(self._mistral.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens)
        except Exception as exc:  # TokenizerException for versions without FIM tokens, validation errors
            raise TokenizerError(f"fill-in-the-middle is not available with {self.chat_format}: {exc}") from exc

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(self._raw.encode(text, bos=add_bos, eos=False))

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        ids = [int(i) for i in ids]
        if skip_special:
            return self._raw.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
        # KEEP would print SentencePiece pieces ("▁Hello"): decode the runs between control tokens
        return "".join(
            "".join(self._raw.id_to_piece(i) for i in run)
            if special
            else self._raw.decode(list(run), special_token_policy=SpecialTokenPolicy.IGNORE)
            for special, run in groupby(ids, self._raw.is_special)
        )

    def encode_chat(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """mistral-common's instruct encoding. It always ends a conversation whose last message is
        the user's (or a tool's) with `[/INST]`, which is its generation prompt, so
        `add_generation_prompt` changes nothing."""
        request = mistral_request(messages, tools)
        try:
            return list(self._mistral.encode_chat_completion(request).tokens)
        except Exception as exc:  # validation errors of mistral-common
            raise TemplateError(f"mistral-common cannot encode these messages: {exc}") from exc

    def incremental_decoder(self, *, skip_special: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(lambda ids: self.decode(ids, skip_special=skip_special))


def _through_final_content(parts: list[tuple[str, bool]], content: str) -> list[tuple[str, bool]]:
    """The prompt cut right after the final message's content (as written, or stripped where the
    template trims it), for an assistant message with `prefix` (Mistral's API; transformers'
    `continue_final_message`): the model goes on with that message instead of closing it."""
    marked = any(is_content for _, is_content in parts)
    for wanted in dict.fromkeys((content, content.strip())):
        for i in range(len(parts) - 1, -1, -1):
            text, is_content = parts[i]
            at = text.rfind(wanted)
            if at >= 0 and (is_content or not marked):
                return [*parts[:i], (text[: at + len(wanted)], is_content)]
    raise TemplateError("the chat template does not show the final assistant message's content: it cannot be continued")


def _without_first_prefix(spec: Any) -> Any:
    """Copy of a tokenizer.json spec whose Metaspace pre-tokenizers never prepend "▁"."""
    if isinstance(spec, dict):
        fixed = {k: _without_first_prefix(v) for k, v in spec.items()}
        if fixed.get("type") == "Metaspace" and fixed.get("prepend_scheme") == "first":
            fixed["prepend_scheme"] = "never"
        return fixed
    if isinstance(spec, list):
        return [_without_first_prefix(v) for v in spec]
    return spec


def _plain_copy(source: str) -> HFBackend:
    tok = HFBackend.from_str(source)
    tok.encode_special_tokens = True  # control-token look-alikes stay text
    return tok


class _Segments:
    """The token ids of the long texts between control tokens that recent chats held (a system prompt
    that every request repeats), each encoded once: 2,000 tokens cost ~2 ms a request otherwise, taken
    one after another while requests queue. Exact: `_encode_parts` encodes such a text on its own anyway.
    Texts of SHORTEST to LONGEST characters, the ENTRIES most recently used, their ids as 4-byte integers
    (a list of ints takes ~36 bytes a token): 16 MB in all for ASCII text, 64 MB at most."""

    SHORTEST, LONGEST, ENTRIES = 1024, 256 * 1024, 32

    def __init__(self) -> None:
        self._held: OrderedDict[tuple[int, str], array[int]] = OrderedDict()
        self._lock = threading.Lock()

    def encode(self, backend: HFBackend, text: str) -> list[int]:
        if not self.SHORTEST <= len(text) <= self.LONGEST:
            return backend.encode(text, add_special_tokens=False).ids
        key = (id(backend), text)
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
                return held.tolist()
        ids = backend.encode(text, add_special_tokens=False).ids
        with self._lock:
            self._held[key] = array("i", ids)
            if len(self._held) > self.ENTRIES:
                self._held.popitem(last=False)
        return ids


class HFTokenizer:
    """A `tokenizers.Tokenizer` (from tokenizer.json or GGUF metadata) with a Jinja chat template.

    The original backend only decodes. Encoding uses copies with special-token matching off:
    `_first` for text at the start of the prompt, `_rest` for text after a control token. They differ
    only for a Metaspace pre-tokenizer with `prepend_scheme: "first"`, which prepends "▁" at offset 0
    only. The control tokens of a chat template are found by a regex over the template's own text
    (leftmost-longest, as `tokenizers` matches them), never in message content."""

    def __init__(
        self,
        backend: HFBackend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: Iterable[int] = (),
        chat_template: str | None,
        chat_format: str,
        default_add_bos: bool,
        vocab_size: int | None = None,
    ) -> None:
        self._backend = backend
        spec = backend.to_str()
        self._first = _plain_copy(spec)
        self._rest = self._first
        self._remembered = _Segments()  # (keyed by the backend: _first and _rest encode apart)
        if '"Metaspace"' in spec:
            parsed = json.loads(spec)
            fixed = _without_first_prefix(parsed)
            if fixed != parsed:
                self._rest = _plain_copy(json.dumps(fixed))
        self.vocab_size = vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.stop_ids = frozenset(i for i in (eos_id, *stop_ids) if i is not None)
        self.chat_format = chat_format
        self.default_add_bos = default_add_bos
        self.supports_fim = False  # no FIM token convention is read from tokenizer.json or GGUF files
        self._template = chat_template
        self._go: GoTemplate | None = None  # an Ollama TEMPLATE that replaces the chat template
        self.tool_format = template_tool_format(chat_template)
        added = {i: t for i, t in backend.get_added_tokens_decoder().items() if t.special}
        specials = {t.content: i for i, t in added.items()}
        self._specials = specials
        self._strips = {i: (t.lstrip, t.rstrip) for i, t in added.items()}
        alternatives = sorted(specials, key=len, reverse=True)  # leftmost-longest, like tokenizers
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if specials else None

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template this tokenizer formats chats with (None: the file had none)."""
        return self._template

    def with_template(self, template: str) -> HFTokenizer:
        """This tokenizer with another chat template (a request's own, see serve --allow-request-chat-template)."""
        other = copy.copy(self)
        other._template, other.tool_format = template, template_tool_format(template)
        other._go = None  # a request's own template wins over a Modelfile's TEMPLATE
        return other

    def with_go_template(self, source: str) -> HFTokenizer:
        """This tokenizer formatting chats with an Ollama TEMPLATE (a Go template: a Modelfile's, or an
        /api/generate request's) instead of its chat template. TemplateError if it does not parse."""
        from .go_chat import go_tool_format

        other = copy.copy(self)
        other._go = parse_ollama(source)
        other.tool_format = go_tool_format(other._go)
        other.chat_format = f"go template (Ollama TEMPLATE) over {self.chat_format}"
        return other

    def control_id(self, text: str) -> int | None:
        """The id of special token `text` ("<tool_call>", "[TOOL_CALLS]"), None when it is not one."""
        return self._specials.get(text)

    def _token_text(self, token_id: int | None) -> str | None:
        return self._backend.id_to_token(token_id) if token_id is not None else None

    def guidance_tokenizer(self) -> Any:
        """This vocabulary for llguidance (structured output; see structured.py)."""
        import llguidance

        return llguidance.LLTokenizer(
            self._backend.to_str(), n_vocab=self.vocab_size, eos_token=sorted(self.stop_ids) or None
        )

    def save_hf(self, folder: Path | str) -> None:
        """Write tokenizer.json, tokenizer_config.json (special tokens, BOS rule, chat template) and
        generation_config.json (stop ids) so that this folder's tokenizer loads here and in transformers
        (e.g. for a model merged or converted from a GGUF file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self._backend.to_str(), encoding="utf-8")
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.default_add_bos,
            "bos_token": self._token_text(self.bos_id),
            "eos_token": self._token_text(self.eos_id),
        }
        if self._template is not None:
            config["chat_template"] = self._template
        (folder / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        stops = sorted(self.stop_ids)
        generation = {"bos_token_id": self.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self._first.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_fim(self, prompt: str, suffix: str) -> list[int]:
        raise TokenizerError(f"fill-in-the-middle is not supported by this tokenizer ({self.chat_format})")

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def incremental_decoder(self, *, skip_special: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(lambda ids: self.decode(ids, skip_special=skip_special))

    def encode_chat(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        if self._template is None and self._go is None:
            raise TemplateError(f"this tokenizer has no chat template ({self.chat_format})")
        self._refuse_controls(field_strings(messages, tools), "a message field or tool definition")
        continuing = bool(messages) and messages[-1].get("role") == "assistant" and bool(messages[-1].get("prefix"))
        rendered = render_chat_parts(
            self._go if self._go is not None else self._template,
            messages,
            add_generation_prompt=add_generation_prompt and not continuing,
            tools=tools,
            bos_token=self._token_text(self.bos_id),
            eos_token=self._token_text(self.eos_id),
            render=render_go_chat if self._go is not None else render_chat_template,
        )
        parts = rendered.parts
        if parts is None:  # the template rewrites content: safe only if no content holds control text
            self._refuse_controls(rendered.contents, "message content the chat template rewrites")
            parts = [(rendered.text, False)]
        if continuing:
            parts = _through_final_content(parts, str(messages[-1].get("content") or ""))
        ids = self._encode_parts(parts)
        if self._go is not None and self.default_add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)  # Go templates leave BOS to the tokenizer, as llama.cpp adds it
        return ids

    def _refuse_controls(self, texts: Iterable[str], where: str) -> None:
        if self._special_re is None:
            return
        for text in texts:
            found = self._special_re.search(text)
            if found:
                raise TemplateError(f"control-token text {found.group()!r} in {where} cannot be encoded safely")

    def _segments(self, parts: Sequence[tuple[str, bool]]) -> list[str | int]:
        """Texts and control-token ids, control tokens looked for in template text only."""
        segments: list[str | int] = []
        pending: list[str] = []
        for text, is_content in parts:
            start = 0
            matches = [] if is_content or self._special_re is None else self._special_re.finditer(text)
            for match in matches:
                segments.append("".join((*pending, text[start : match.start()])))
                segments.append(self._specials[match.group()])
                pending, start = [], match.end()
            pending.append(text[start:])
        segments.append("".join(pending))
        return segments

    def _encode_parts(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        segments = self._segments(parts)
        for index, segment in enumerate(segments):  # the lstrip/rstrip flags of added tokens
            if isinstance(segment, int):
                lstrip, rstrip = self._strips[segment]
                if lstrip and isinstance(segments[index - 1], str):
                    segments[index - 1] = str(segments[index - 1]).rstrip()
                if rstrip and index + 1 < len(segments) and isinstance(segments[index + 1], str):
                    segments[index + 1] = str(segments[index + 1]).lstrip()
        ids: list[int] = []
        for index, segment in enumerate(segments):
            if isinstance(segment, int):
                ids.append(segment)
            elif segment:
                ids += self._remembered.encode(self._first if index == 0 else self._rest, segment)
        return ids


# -- loading ----------------------------------------------------------------------------------------

MISTRAL_FILES = ("tekken.json", "tokenizer.model.v*", "tokenizer.model")
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _version_key(path: Path) -> int:
    found = re.match(r"v(\d+)", path.name.rsplit(".", 1)[-1])
    return int(found.group(1)) if found else -1


def find_mistral_file(folder: Path) -> Path | None:
    """tekken.json, else the newest tokenizer.model.vN, else a bare tokenizer.model unless a
    tokenizer.json sits next to it (then the folder is a Hugging Face one, and may be any model)."""
    if (folder / "tekken.json").is_file():
        return folder / "tekken.json"
    versioned = sorted((p for p in folder.glob("tokenizer.model.v*") if p.is_file()), key=_version_key)
    if versioned:
        return versioned[-1]
    bare = folder / "tokenizer.model"
    return bare if bare.is_file() and not (folder / "tokenizer.json").is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(path, f"not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadError(path, f"expected a JSON object, found {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, config: dict[str, Any]) -> tuple[str | None, str]:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), "jinja (chat_template.jinja)"
        except (OSError, UnicodeDecodeError) as exc:
            raise LoadError(jinja_file, f"not readable: {exc}") from exc
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template, "jinja (tokenizer_config.json chat_template)"
    return None, "none (no chat template)"


def _id_of(backend: HFBackend, token: str | None, folder: Path, field: str) -> int | None:
    if token is None:
        return None
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {field} {token!r} is not in the vocabulary")
    return token_id


def _load_hf(folder: Path) -> HFTokenizer:
    path = folder / "tokenizer.json"
    try:
        backend = HFBackend.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exceptions
        raise LoadError(path, f"not a valid tokenizer.json: {exc}") from exc
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")
    template, chat_format = _chat_template(folder, config)
    bos_id = _id_of(backend, _token_content(config.get("bos_token")), folder, "bos_token")
    eos_id = _id_of(backend, _token_content(config.get("eos_token")), folder, "eos_token")
    extra_eos = generation.get("eos_token_id")
    stops = [extra_eos] if isinstance(extra_eos, int) else [i for i in extra_eos or () if isinstance(i, int)]
    add_bos = config.get("add_bos_token")
    if not isinstance(add_bos, bool):  # infer it from tokenizer.json's post-processor
        add_bos = bos_id is not None and backend.encode("a").ids[:1] == [bos_id]
    return HFTokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        stop_ids=stops,
        chat_template=template,
        chat_format=chat_format,
        default_add_bos=add_bos,
    )


def load_tokenizer(folder: Path | str) -> Tokenizer:
    """The tokenizer of a model folder: Mistral's own files first (see `find_mistral_file`), else
    tokenizer.json with the optional tokenizer_config.json, chat_template.jinja and
    generation_config.json."""
    folder = Path(folder)
    mistral_file = find_mistral_file(folder)
    if mistral_file is not None:
        return MistralCommonTokenizer(mistral_file)
    if (folder / "tokenizer.json").is_file():
        return _load_hf(folder)
    raise TokenizerError(f"{folder}: no tokenizer found (looked for {', '.join(MISTRAL_FILES + HF_FILES[:1])})")


def tokenizer_from_gguf(metadata: dict[str, Any], source: str) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (see gguf_vocab.py); `source` names the file
    in error messages. Bad tokenizer metadata (an id past the vocabulary, merges that do not fit) is a
    LoadError of that file, like any other defect of it."""
    from tramontane.text.gguf_vocab import build_gguf_vocab

    try:
        vocab = build_gguf_vocab(metadata, source)
    except TokenizerError as exc:
        raise LoadError(source, str(exc).removeprefix(f"{source}: ")) from None
    chat_format = "jinja (GGUF tokenizer.chat_template)" if vocab.chat_template else "none (no chat template)"
    return HFTokenizer(
        vocab.tokenizer,
        bos_id=vocab.bos_id,
        eos_id=vocab.eos_id,
        stop_ids=vocab.stop_ids,
        chat_template=vocab.chat_template,
        chat_format=chat_format,
        default_add_bos=vocab.add_bos,
        vocab_size=vocab.vocab_size,
    )
