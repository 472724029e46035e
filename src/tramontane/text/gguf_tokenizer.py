"""A tokenizer as GGUF `tokenizer.*` metadata (the inverse of gguf_vocab.py), for `tramontane convert
--to gguf` from a folder.

* A byte-level BPE `tokenizer.json` (GPT-2 style: SmolLM2, Llama 3, Qwen) becomes `gpt2`: tokens by id,
  merges, token types (3 control for special added tokens, 4 user-defined for other added tokens).
  llama.cpp names its pre-tokenizer regexes (`tokenizer.ggml.pre`); the name is found by building the
  tokenizer back from the metadata with each known name and keeping the first that encodes a probe text
  exactly as the source tokenizer does (none fits: a TokenizerError).
* Mistral's SentencePiece files (`tokenizer.model.v1`..`v7`) become `llama`: pieces, scores and types
  (control, unknown, byte) from the SentencePiece model.
* Mistral's tekken files become `gpt2` with llama.cpp's `tekken` pre-tokenizer: the control tokens, then
  each rank's bytes in GPT-2's alphabet, merges recovered from the ranks (tiktoken's BPE restricted to
  lower ranks splits each token into the two it was merged from).
BOS/EOS ids, whether a prompt starts with BOS, and the chat template come along. SentencePiece-style
`tokenizer.json` (byte_fallback BPE) is refused with a TokenizerError."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import TokenizerError
from .gguf_vocab import BYTE, CONTROL, NORMAL, PRE_TOKENIZERS, UNKNOWN, USER_DEFINED, build_gguf_vocab

if TYPE_CHECKING:
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from tokenizers import Tokenizer as HFBackend

    from .tokenizer import Tokenizer

PROBE = (
    "Hello world! It's 2024: 12345 apples, 3.14 pies -- naïve café; tabs\tand\nnew lines...  "
    "  spaces, CamelCase, snake_case, émoji 🙂, 日本語のテキスト, don't WE'LL"
)


def gguf_tokenizer_metadata(tokenizer: Tokenizer) -> dict[str, Any]:
    # What the vocabulary is read from, beyond the Tokenizer protocol: mistral-common's own tokenizer
    # (MistralCommonTokenizer._raw) or the `tokenizers` backend (HFTokenizer._backend).
    raw = getattr(tokenizer, "_raw", None)
    if raw is not None:  # mistral-common
        from mistral_common.tokens.tokenizers.tekken import is_tekkenizer

        return _tekken(tokenizer, raw) if is_tekkenizer(raw) else _sentencepiece(tokenizer, raw)
    backend = getattr(tokenizer, "_backend", None)
    if backend is not None:
        return _byte_level_bpe(tokenizer, backend)
    raise TokenizerError(f"writing this tokenizer ({tokenizer.chat_format}) into a GGUF file is not supported")


def _common(tokenizer: Tokenizer) -> dict[str, Any]:
    meta: dict[str, Any] = {"tokenizer.ggml.add_bos_token": bool(tokenizer.default_add_bos)}
    if tokenizer.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = int(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        meta["tokenizer.ggml.eos_token_id"] = int(tokenizer.eos_id)
    template = getattr(tokenizer, "_template", None)
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def _sentencepiece(tokenizer: Tokenizer, raw: SentencePieceTokenizer) -> dict[str, Any]:
    sp: Any = raw._model  # a sentencepiece.SentencePieceProcessor (untyped; mistral-common declares a few methods)
    n = sp.get_piece_size()
    types = [
        CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else BYTE if sp.is_byte(i) else NORMAL
        for i in range(n)
    ]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": int(sp.unk_id()),
        **_common(tokenizer),
    }
    return meta


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """tiktoken's BPE of `token` with only merges ranked below `below`: the two tokens it is made of."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], below))
        if ranks.get(parts[best] + parts[best + 1], below) >= below:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _tekken(tokenizer: Tokenizer, raw: Tekkenizer) -> dict[str, Any]:
    """Mistral's tekken (tiktoken ranks) as `gpt2` with the `tekken` pre-tokenizer: the control tokens
    first, then every rank's bytes in GPT-2's alphabet, merges recovered from the ranks."""
    n_special, chars = raw.num_special_tokens, _byte_chars()
    ranks: dict[bytes, int] = raw._model._mergeable_ranks
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])[: raw.n_words - n_special]

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    merges = []
    for token, rank in by_rank:
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) != 2:
                raise TokenizerError(f"tekken token {rank} ({token!r}) is not the merge of two lower-ranked tokens")
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    tokens = [raw.id_to_piece(i) for i in range(n_special)] + [text(t) for t, _ in by_rank]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "tekken",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL] * n_special + [NORMAL] * len(by_rank),
        "tokenizer.ggml.merges": merges,
        **_common(tokenizer),
    }


def _byte_level_bpe(tokenizer: Tokenizer, backend: HFBackend) -> dict[str, Any]:
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError(
            f"writing a {model.get('type')} tokenizer.json "
            f"{'with byte_fallback ' if model.get('byte_fallback') else ''}into a GGUF file is not "
            "supported (byte-level BPE and Mistral's SentencePiece files are)"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    n = max([*vocab.values(), *added]) + 1
    tokens = [""] * n
    for text, index in vocab.items():
        tokens[index] = text
    types = [NORMAL] * n
    for index, token in added.items():
        tokens[index] = token["content"]
        types[index] = CONTROL if token.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        **_common(tokenizer),
    }
    meta["tokenizer.ggml.pre"] = _pre_name(tokenizer, meta, spec.get("pre_tokenizer"))
    return meta


def _walk(spec: Any) -> list[dict[str, Any]]:
    """Every pre-tokenizer of a (possibly nested Sequence) tokenizer.json pre_tokenizer."""
    if not isinstance(spec, dict):
        return []
    return [spec, *[p for child in spec.get("pretokenizers", []) for p in _walk(child)]]


def _pre_name(tokenizer: Tokenizer, meta: dict[str, Any], pre_spec: Any) -> str:
    """The llama.cpp pre-tokenizer name whose shape matches the source's (digits split one by one, own
    split regex or GPT-2's) and under which the metadata encodes PROBE as the source does."""
    parts = _walk(pre_spec)
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    regex = any(p.get("type") == "Split" for p in parts)
    expected = tokenizer.encode(PROBE)
    for name, (pattern, split_digits, _) in PRE_TOKENIZERS.items():
        if split_digits != digits or (pattern is not None) != regex:
            continue
        try:
            candidate = build_gguf_vocab({**meta, "tokenizer.ggml.pre": name}, "candidate").tokenizer
        except TokenizerError:
            continue
        if candidate.encode(PROBE, add_special_tokens=False).ids == expected:
            return name
    raise TokenizerError(
        "no llama.cpp pre-tokenizer (tokenizer.ggml.pre) splits text as this tokenizer.json "
        f"does (tried {', '.join(PRE_TOKENIZERS)})"
    )
