"""A `tokenizers.Tokenizer` built from the vocabulary a GGUF file stores in its metadata.

Two vocabulary kinds exist (key `tokenizer.ggml.model`):

* "llama": SentencePiece BPE. Tokens carry scores; there are no merges, so they are recovered from
  the vocabulary: every split of a normal token into two normal tokens is a merge, ranked by the
  merged token's score (SentencePiece merges the best-scoring pair first). Spaces become "▁", a
  "▁" is prepended to each text run (`add_space_prefix`, llama.cpp's behaviour also after control
  tokens), unknown characters fall back to `<0xXX>` byte tokens.
* "gpt2": byte-level BPE with explicit merges; `tokenizer.ggml.pre` names the regex that splits text
  into words before merging (the variants are llama.cpp's names).

Token types (`tokenizer.ggml.token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte. Control and unknown tokens become special added tokens (never produced from plain
text when special-token parsing is off), user-defined ones plain added tokens (always matched whole,
as llama.cpp does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from tramontane.errors import TokenizerError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MAX_VOCAB = 2_000_000

# Regexes that split text into words before byte-level BPE (llama.cpp's pre-tokenizer names).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex or None for GPT-2's own, split digits one by one first, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "default": (None, False, False),
    "gpt2": (None, False, False),
    "smollm": (None, True, False),
    "llama-bpe": (_LLAMA3, False, True),
    "llama3": (_LLAMA3, False, True),
    "llama-v3": (_LLAMA3, False, True),
    "qwen2": (_QWEN2, False, False),
    "tekken": (_TEKKEN, False, True),
}
# Control tokens that end a turn in common chat formats: generation stops on them too.
END_OF_TURN = frozenset(
    {
        "</s>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end|>",
        "<|endoftext|>",
        "<end_of_turn>",
        "<|end_of_text|>",
        "<EOT>",
        "<|return|>",
    }
)


@dataclass(frozen=True)
class GGUFVocab:
    tokenizer: Tokenizer
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]
    add_bos: bool
    chat_template: str | None


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (a reader may hand those out) as plain Python values."""
    return value.tolist() if hasattr(value, "tolist") else value


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _field(meta: dict[str, Any], key: str, kind: type, source: str, default: Any = None) -> Any:
    value = _plain(meta.get(key, default))
    if value is not None and not _is(value, kind):
        raise TokenizerError(f"{source}: GGUF field {key} has type {type(value).__name__}, expected {kind.__name__}")
    return value


def _list_field(meta: dict[str, Any], key: str, kind: type, count: int | None, source: str) -> list[Any] | None:
    raw = _plain(meta.get(key))
    value = list(raw) if isinstance(raw, tuple) else raw
    if value is None:
        return None
    if not isinstance(value, list):
        raise TokenizerError(f"{source}: GGUF field {key} has type {type(value).__name__}, expected an array")
    if count is not None and len(value) != count:
        raise TokenizerError(f"{source}: GGUF field {key} has {len(value)} entries, the vocabulary {count}")
    bad = next((i for i, item in enumerate(value) if not _is(item, kind)), None)
    if bad is not None:
        raise TokenizerError(f"{source}: GGUF field {key}[{bad}] is {value[bad]!r}, expected {kind.__name__}")
    return value


def _token_id(meta: dict[str, Any], name: str, n_tokens: int, source: str) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    value = _field(meta, key, int, source)
    if value is not None and not 0 <= value < n_tokens:
        raise TokenizerError(f"{source}: GGUF field {key} = {value} is outside the vocabulary (0..{n_tokens - 1})")
    return value


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    """token -> id; a duplicated token keeps its first id (the later copies cannot be produced)."""
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    return vocab


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary, best first (see the module docstring)."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(meta: dict[str, Any], tokens: list[str], types: list[int], source: str) -> Tokenizer:
    scores = _list_field(meta, "tokenizer.ggml.scores", float, len(tokens), source)
    if scores is None:
        raise TokenizerError(f"{source}: a 'llama' (SentencePiece) vocabulary needs tokenizer.ggml.scores")
    unk_id = _token_id(meta, "unknown", len(tokens), source)
    unk = tokens[unk_id] if unk_id is not None else next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
    model = models.BPE(
        _vocab_dict(tokens),
        sentencepiece_merges(tokens, scores, types),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    prefix = _field(meta, "tokenizer.ggml.add_space_prefix", bool, source, True)
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*decode, decoders.Strip(" ", 1, 0)] if prefix else decode)
    return tok


def _check_merges(merges: list[str], vocab: dict[str, int], source: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(p in vocab for p in parts) or parts[0] + parts[1] not in vocab:
            raise TokenizerError(
                f"{source}: GGUF merge {index} ({merge!r}) is not two vocabulary tokens "
                "whose concatenation is a vocabulary token"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def _byte_level_pre(pre: str, source: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{source}: unsupported GGUF pre-tokenizer tokenizer.ggml.pre = {pre!r} "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    regex, digits, ignore_merges = PRE_TOKENIZERS[pre]
    steps: list[pre_tokenizers.PreTokenizer] = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    return pre_tokenizers.Sequence(steps), ignore_merges


def _bpe_tokenizer(meta: dict[str, Any], tokens: list[str], source: str) -> Tokenizer:
    merges = _list_field(meta, "tokenizer.ggml.merges", str, None, source)
    if merges is None:
        raise TokenizerError(f"{source}: a 'gpt2' (byte-level BPE) vocabulary needs tokenizer.ggml.merges")
    vocab = _vocab_dict(tokens)
    pre, ignore_merges = _byte_level_pre(_field(meta, "tokenizer.ggml.pre", str, source, "default"), source)
    tok = Tokenizer(models.BPE(vocab, _check_merges(merges, vocab, source), ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int], forced: set[int]) -> None:
    control = [i for i, k in enumerate(types) if k in (CONTROL, UNKNOWN) or i in forced]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    user = [i for i, k in enumerate(types) if k == USER_DEFINED and i not in forced]
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])


def _check_added_ids(tok: Tokenizer, tokens: list[str], source: str) -> None:
    """Adding a token whose text the model already holds must reuse its id, not grow the vocabulary."""
    for index, added in tok.get_added_tokens_decoder().items():
        if index >= len(tokens) or tokens[index] != added.content:
            raise TokenizerError(f"{source}: GGUF special token {added.content!r} did not keep its id")


def build_gguf_vocab(meta: dict[str, Any], source: str) -> GGUFVocab:
    """Build the tokenizer a GGUF metadata dict describes; inconsistent metadata raises TokenizerError
    naming `source` (the file) and the field."""
    kind = _field(meta, "tokenizer.ggml.model", str, source)
    if kind not in ("llama", "gpt2"):
        raise TokenizerError(
            f"{source}: unsupported GGUF tokenizer model tokenizer.ggml.model = {kind!r} (supported: 'llama', 'gpt2')"
        )
    tokens = _list_field(meta, "tokenizer.ggml.tokens", str, None, source)
    if not tokens or len(tokens) > MAX_VOCAB:
        raise TokenizerError(f"{source}: GGUF field tokenizer.ggml.tokens is missing, empty or too large")
    types = _list_field(meta, "tokenizer.ggml.token_type", int, len(tokens), source) or [NORMAL] * len(tokens)
    if any(not NORMAL <= k <= BYTE for k in types):
        raise TokenizerError(f"{source}: GGUF field tokenizer.ggml.token_type has values outside 1..6")
    ids = {
        name: _token_id(meta, name, len(tokens), source) for name in ("bos", "eos", "unknown", "padding", "eot", "eom")
    }
    try:
        tok = _spm_tokenizer(meta, tokens, types, source) if kind == "llama" else _bpe_tokenizer(meta, tokens, source)
        forced = {ids[name] for name in ("bos", "eos", "unknown", "eot", "eom")}
        _add_special_tokens(tok, tokens, types, {i for i in forced if i is not None})
    except Exception as exc:  # tokenizers reports bad vocabularies with plain Exceptions
        if isinstance(exc, TokenizerError):
            raise
        raise TokenizerError(f"{source}: cannot build the GGUF tokenizer: {exc}") from exc
    _check_added_ids(tok, tokens, source)
    return GGUFVocab(
        tokenizer=tok,
        vocab_size=len(tokens),
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        stop_ids=_stop_ids(tokens, types, ids),
        add_bos=_field(meta, "tokenizer.ggml.add_bos_token", bool, source, _default_add_bos(meta, kind)),
        chat_template=_field(meta, "tokenizer.chat_template", str, source),
    )


def _default_add_bos(meta: dict[str, Any], kind: str) -> bool:
    return kind == "llama" or meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "llama-v3", "tekken")


def _stop_ids(tokens: list[str], types: list[int], ids: dict[str, int | None]) -> frozenset[int]:
    stops = {ids[name] for name in ("eos", "eot", "eom") if ids[name] is not None}
    stops |= {i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_TURN}
    return frozenset(i for i in stops if i is not None)
