"""Seed corpora for the fuzzers: small valid files that reach every part of the readers.

    python fuzz/seeds.py        # writes fuzz/corpus/gguf/* and fuzz/corpus/safetensors/*

GGUF seeds come from the `gguf` package's writer (a tiny llama model with a byte-level BPE vocabulary
and merges, one with a SentencePiece-style vocabulary and scores, tensors in F32, F16, Q8_0, Q4_0)
and from the reader tests' field-by-field builder (every metadata value type, nested arrays).
Safetensors seeds come from the `safetensors` library (several dtypes, metadata, an empty tensor)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"


def _llama_writer(path: Path, vocab: str):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    tokens = ["<unk>", "<s>", "</s>", *[chr(c) for c in range(97, 107)], "ab", "cd", "abcd"]
    if vocab == "gpt2":
        w.add_tokenizer_model("gpt2")
        w.add_token_merges(["a b", "c d", "ab cd"])
    else:
        w.add_tokenizer_model("llama")
        w.add_token_scores([0.0] * 3 + [-float(i) for i in range(len(tokens) - 3)])
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return w


def gguf_seeds() -> dict[str, bytes]:
    import tempfile

    import gguf

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab, types in (("gpt2", ("F32", "F16")), ("llama", ("Q8_0", "Q4_0"))):
            path = Path(tmp) / f"{vocab}.gguf"
            w = _llama_writer(path, vocab)
            rng = np.random.default_rng(0)
            w.add_tensor("token_embd.weight", rng.standard_normal((16, 8), dtype=np.float32))
            for name, qtype in zip(("blk.0.attn_q.weight", "blk.0.ffn_up.weight"), types):
                data = rng.standard_normal((8, 32), dtype=np.float32)
                kind = getattr(gguf.GGMLQuantizationType, qtype)
                if qtype not in ("F32", "F16"):
                    data = gguf.quants.quantize(data, kind)
                elif qtype == "F16":
                    data = data.astype(np.float16)
                w.add_tensor(name, data, raw_dtype=kind if qtype not in ("F32", "F16") else None)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            out[f"{vocab}.gguf"] = path.read_bytes()
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_gguf_reader import valid  # the field-by-field builder of the reader tests

    out["builder.gguf"] = valid().build()
    return out


def safetensors_seeds() -> dict[str, bytes]:
    import torch
    from safetensors.torch import save

    return {
        "float.safetensors": save(
            {"a": torch.randn(4, 4), "b": torch.randn(3).half(), "c": torch.randn(2, 2).bfloat16()}
        ),
        "mixed.safetensors": save(
            {
                "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
                "e": torch.zeros(0, 4),
                "u": torch.ones(5, dtype=torch.uint8),
            },
            metadata={"format": "pt"},
        ),
    }


def main() -> None:
    for kind, seeds in (("gguf", gguf_seeds()), ("safetensors", safetensors_seeds())):
        folder = CORPUS / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{folder}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
