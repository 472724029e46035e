"""`tramontane convert`: HF -> mistral -> gguf round trips keep the logits (exactly in float32, within
f16 / block-format error otherwise); GGUF output carries what llama.cpp reads (gguf package's reader)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from models import hf_model, save_hf

from tramontane.build.load import load_model
from tramontane.cli.main import main

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 4, 88, 12, 3, 41]])


@cache
def gguf_fields(path: Path) -> dict:
    """The gguf package's reading of a file's fields (SmolLM2's: ~49k tokens and merges, seconds to parse;
    read once for the tests that compare against it)."""
    import gguf

    return gguf.GGUFReader(str(path)).fields


def logits(path) -> torch.Tensor:
    with torch.inference_mode():
        return load_model(path, dtype=torch.float32).model(TOKENS)


@pytest.mark.parametrize("kind", ["mistral", "mixtral"])
def test_hf_to_mistral_to_gguf_keeps_the_logits(kind, tmp_path):
    hf = hf_model(kind, seed=21)
    source = save_hf(hf, tmp_path / "hf", shard=None)
    with torch.inference_mode():
        reference = hf(TOKENS).logits.float()
    scale = reference.abs().max().item()
    assert main(["convert", str(source), "--to", "mistral", "--out", str(tmp_path / "native")]) == 0
    assert (tmp_path / "native" / "params.json").is_file()
    assert torch.allclose(logits(tmp_path / "native"), reference, atol=1e-5 * scale)
    assert main(["convert", str(tmp_path / "native"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert (logits(tmp_path / "m.gguf") - reference).abs().max().item() < 5e-3 * scale  # f16 weights
    assert main(["convert", str(tmp_path / "m.gguf"), "--to", "hf", "--out", str(tmp_path / "back")]) == 0
    assert (logits(tmp_path / "back") - reference).abs().max().item() < 5e-3 * scale


@pytest.mark.parametrize(("quant", "ggml_type", "tolerance"), [("q8_0", 8, 0.08), ("q4_0", 2, 0.5), ("q5_1", 7, 0.25)])
def test_block_formats_load_back_within_their_error(quant, ggml_type, tolerance, tmp_path):
    import gguf

    hf = hf_model("mistral", seed=22)
    source = save_hf(hf, tmp_path / "hf", shard=None)
    out = tmp_path / f"m-{quant}.gguf"
    assert main(["convert", str(source), "--to", "gguf", "--type", quant, "--out", str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert int(tensors["blk.0.attn_q.weight"].tensor_type) == ggml_type
    assert int(tensors["blk.0.attn_norm.weight"].tensor_type) == 0  # norms stay float32
    # the blocks are what the gguf package's own quantizer writes for the source weights (interleaved q rows)
    ours = load_model(source, dtype=torch.float32).model.state_dict()["layers.0.feed_forward.w2.weight"].numpy()
    expected = gguf.quants.quantize(ours, gguf.GGMLQuantizationType(ggml_type))
    assert np.array_equal(np.asarray(tensors["blk.0.ffn_down.weight"].data).reshape(expected.shape), expected)
    loaded = load_model(out, dtype=torch.float32, packed=False).model.state_dict()["layers.0.feed_forward.w2.weight"]
    assert np.array_equal(loaded.numpy(), gguf.quants.dequantize(expected, gguf.GGMLQuantizationType(ggml_type)))
    with torch.inference_mode():
        reference = hf(TOKENS).logits.float()
    diff = (logits(out) - reference).abs().max().item()
    print(f"{quant}: max |logit diff| {diff:.4f} of {reference.abs().max().item():.3f}")
    assert diff < tolerance * reference.abs().max().item(), diff


def test_gguf_output_has_what_llama_cpp_reads(smollm2_path, tmp_path):
    """SmolLM2's GGUF converted to q8_0: architecture, sizes, rope base, vocabulary, merges and chat
    template, read back by the gguf package's reader; and it loads and answers here."""
    import gguf

    import tramontane

    out = tmp_path / "smol-q8_0.gguf"
    assert main(["convert", str(smollm2_path), "--to", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    fields = gguf.GGUFReader(str(out)).fields
    source = gguf_fields(smollm2_path)

    def value(fs, key):
        f = fs[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    for key in (
        "general.architecture",
        "llama.context_length",
        "llama.embedding_length",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ):
        assert value(fields, key) == value(source, key), key
    llm = tramontane.load(out)
    answer = llm.chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0,
        max_tokens=12,
    )
    assert "Paris" in answer.text

    # Issue 19: q4_k was 3x q8_0's size (rows of 576 are not whole super-blocks, so they stayed F32);
    # now such matrices take llama.cpp's fallback (Q5_0). llama-bench loads this file (stop 35's note).
    k_quant = tmp_path / "smol-q4_k.gguf"
    assert main(["convert", str(smollm2_path), "--to", "gguf", "--type", "q4_k", "--out", str(k_quant)]) == 0
    assert k_quant.stat().st_size < out.stat().st_size
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(k_quant)).tensors}
    assert types == {"Q4_K", "Q5_0", "F32"}, types


@pytest.mark.parametrize(("name", "ggml_type", "bound"), [("q4_k", 12, 0.09), ("q6_k", 14, 0.025)])
def test_k_quants_are_read_back_by_the_gguf_package(name, ggml_type, bound, tmp_path):
    """Our Q4_K / Q6_K blocks, decoded by the gguf package's reference dequantizer: relative RMS error of
    random normal weights within the format's error (Q4_0 gives 0.084, Q8_0 0.005), and our own decoder
    reads exactly the same values."""
    import gguf

    from tramontane.weights.gguf_quants import QUANTIZERS, dequantize

    x = np.random.default_rng(1).standard_normal((16, 1024)).astype(np.float32)
    blocks = QUANTIZERS[ggml_type](x)
    reference = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(ggml_type))
    assert np.sqrt(((reference - x) ** 2).mean()) / x.std() < bound
    ours = dequantize(torch.from_numpy(blocks).flatten(), ggml_type).reshape(x.shape)
    assert np.array_equal(ours.numpy(), reference)
    hf = hf_model("mistral", seed=23, hidden_size=256, intermediate_size=512)
    source = save_hf(hf, tmp_path / "hf", shard=None)
    out = tmp_path / f"m-{name}.gguf"
    assert main(["convert", str(source), "--to", "gguf", "--type", name, "--out", str(out)]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert int(tensors["blk.0.attn_q.weight"].tensor_type) == ggml_type
    down = tensors["blk.0.ffn_down.weight"]
    assert int(down.tensor_type) == ggml_type
    loaded = load_model(out, dtype=torch.float32, packed=False).model.state_dict()["layers.0.feed_forward.w2.weight"]
    expected = gguf.quants.dequantize(np.asarray(down.data), gguf.GGMLQuantizationType(ggml_type))
    assert np.array_equal(loaded.numpy(), expected.reshape(loaded.shape))
    assert torch.isfinite(logits(out)).all()


def test_folder_tokenizers_are_written_into_gguf(smollm2_path, tmp_path):
    """GGUF -> hf -> gguf gives back SmolLM2's vocabulary, merges, token types, pre-tokenizer, BOS/EOS and
    chat template; a Mistral SentencePiece tokenizer written into GGUF encodes as mistral-common does."""
    import gguf

    import tramontane
    from tramontane.text.tokenizer import MistralCommonTokenizer

    hf = ["convert", str(smollm2_path), "--to", "hf", "--type", "f16", "--out", str(tmp_path / "hf")]  # half the bytes
    assert main(hf) == 0
    assert (
        main(["convert", str(tmp_path / "hf"), "--to", "gguf", "--type", "q8_0", "--out", str(tmp_path / "b.gguf")])
        == 0
    )
    original, back = gguf_fields(smollm2_path), gguf.GGUFReader(str(tmp_path / "b.gguf")).fields
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
    ):
        assert original[key].contents() == back[key].contents(), key
    answer = tramontane.load(tmp_path / "b.gguf").chat(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0,
        max_tokens=12,
    )
    assert "Paris" in answer.text

    data = Path(__import__("importlib").util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    for shipped, name, vocab in (
        ("mistral_instruct_tokenizer_240323.model.v3", "tokenizer.model.v3", 32768),
        ("tekken_240911.json", "tekken.json", 131072),
    ):
        folder = save_hf(hf_model("mistral", seed=5, vocab_size=vocab), tmp_path / name, shard=None)
        (folder / name).write_bytes((data / shipped).read_bytes())
        out = tmp_path / f"{name}.gguf"
        assert main(["convert", str(folder), "--to", "gguf", "--out", str(out)]) == 0
        ours, reference = tramontane.load(out).tokenizer, MistralCommonTokenizer(data / shipped)
        for text in (
            "Hello world",
            "  two  spaces, digits 12345 and émoji 🙂",
            "[INST] stays text",
            "日本語",
            "don't WE'LL x12345y\n\ttabs",
        ):
            assert ours.encode(text, add_bos=True) == reference.encode(text, add_bos=True), (shipped, text)


@pytest.mark.parametrize(("ffn", "down", "bound"), [(96, "Q5_0", 0.05), (80, "F16", 1e-3)])
def test_k_quants_fall_back_per_tensor_as_llama_cpp(ffn, down, bound, tmp_path, capsys):
    """Issue 19: rows that are not whole 256-value super-blocks (SmolLM2's 576) took float32 and made a
    q4_k file 3x a q8_0 one; now each such matrix takes llama.cpp's fallback (Q4_K -> Q5_0 for rows of
    whole 32-value blocks, else F16), the file is smaller than q8_0's, and convert says what it wrote."""
    import gguf

    hf = hf_model("mistral", seed=5, hidden_size=256, intermediate_size=ffn)
    source = save_hf(hf, tmp_path / "hf", shard=None)
    sizes = {}
    for name in ("q8_0", "q4_k"):
        out = tmp_path / f"{name}.gguf"
        assert main(["convert", str(source), "--to", "gguf", "--type", name, "--out", str(out)]) == 0
        sizes[name] = out.stat().st_size
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == "Q4_K"
    assert types["blk.0.ffn_down.weight"] == down and types["blk.0.attn_norm.weight"] == "F32"
    assert sizes["q4_k"] < sizes["q8_0"]
    n_layers = hf.config.num_hidden_layers
    assert f"{down} x{n_layers}" in capsys.readouterr().out.splitlines()[-2]
    want = hf.model.layers[0].mlp.down_proj.weight.detach()
    got = load_model(out, dtype=torch.float32, packed=False).model.state_dict()["layers.0.feed_forward.w2.weight"]
    assert ((got - want).pow(2).mean().sqrt() / want.std()).item() < bound


def test_convert_shows_a_bar_on_a_terminal_and_plain_lines_in_a_pipe(tmp_path):
    """Issue 19: convert said nothing until done; now a tqdm bar on a terminal (a pty here) and, in a
    pipe, a plain line per tenth of the work (no carriage returns in logs)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    source = save_hf(hf_model("mistral", seed=4), tmp_path / "hf", shard=None)
    command = [sys.executable, "-m", "tramontane", "convert", str(source), "--to", "gguf", "--type", "q8_0", "--out"]
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 x 0
    proc = subprocess.Popen([*command, str(tmp_path / "a.gguf")], stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the other end closed: the process has finished
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert proc.wait(timeout=240) == 0
    shown = seen.decode(errors="replace")
    assert "writing a.gguf" in shown and "tensors" in shown and "\r" in shown, shown
    piped = subprocess.run([*command, str(tmp_path / "b.gguf")], capture_output=True, text=True, timeout=240)
    assert piped.returncode == 0 and "\r" not in piped.stderr
    lines = [line for line in piped.stderr.splitlines() if line.startswith("writing b.gguf: ")]
    assert lines and lines[0] == "writing b.gguf: 1 tensors", piped.stderr
