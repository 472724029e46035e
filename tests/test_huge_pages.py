"""Packed weights on transparent huge pages (quant/pages.py): where huge_empty carves its tensors, that the
loader's interleaved and fused matrices lie there, and that a mapping goes with the last tensor carved
from it."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
from models import hf_model, save_gguf

from tramontane.build.load import load_model
from tramontane.model.cache import HUGE_PAGE
from tramontane.quant import kernels
from tramontane.quant.pages import CHUNK, huge_empty

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
# A kernel built with transparent huge pages takes the advice (VmFlags "hg"), whatever its policy says.
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()


def mapping_of(address: int) -> tuple[int, int, set[str]] | None:
    """(start, end, VmFlags) of this process's mapping holding `address`, or None."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                start, end = (int(x, 16) for x in head.split("-"))
                found = (start, end) if start <= address < end else None
            elif found and line.startswith("VmFlags:"):
                return (*found, set(line.split()[1:]))
    return None


def test_carved_tensors_lie_page_aligned_in_one_advised_mapping_that_goes_with_the_last():
    # Larger than a chunk: a mapping of its own, from a 2 MiB boundary, and full (whole huge pages), so
    # that a and b start a chunk of their own whatever the tests before left in the carver's.
    big = huge_empty(CHUNK + HUGE_PAGE)
    a, b = huge_empty(5000), huge_empty(3 * 4096)
    assert a.dtype == torch.uint8 and a.shape == (5000,) and not a.any() and not b.any()
    assert b.data_ptr() - a.data_ptr() == 8192  # 5000 bytes rounded up to whole pages
    a.fill_(7)
    assert not b.any()  # carved apart: writing one leaves the other
    where = mapping_of(a.data_ptr())
    assert where is not None and where == mapping_of(b.data_ptr())
    assert ("hg" in where[2]) == THP
    assert big.data_ptr() % HUGE_PAGE == 0 and mapping_of(big.data_ptr())[:2] != where[:2]
    start = where[0]
    del a, b
    gc.collect()
    assert mapping_of(start) is None or mapping_of(start)[:2] != where[:2]  # unmapped with its last tensor
    del big


@pytest.fixture
def q16():
    previous = kernels.set_activations("q16")  # the interleaved layouts are loaded for the integer kernels
    yield
    kernels.set_activations(previous)


def test_the_loaders_interleaved_and_fused_matrices_lie_on_advised_pages(tmp_path, q16):
    if not kernels.regroups(2):  # Q4_0 interleaved only where its integer kernel runs
        pytest.skip("no interleaved kernels here")
    model = load_model(save_gguf(hf_model("llama", seed=3, hidden_size=128), tmp_path / "m.gguf", "Q4_0"), packed=True)
    assert kernels.interleaved(model.model.layers[0].attention.wo.qtype)
    block = model.model.layers[0]
    matrices = {
        "wqkv": block.attention.wqkv.packed,
        "wo": block.attention.wo.packed,
        "w13": block.feed_forward.w13.packed,
        "w2": block.feed_forward.w2.packed,
    }
    for name, rows in matrices.items():
        where = mapping_of(rows.data_ptr())
        assert where is not None and rows.data_ptr() % 4096 == 0 and ("hg" in where[2]) == THP, name


def test_parts_of_different_types_that_stay_apart_are_moved_onto_advised_pages(tmp_path, q16):
    """A llama-quantize mix with attn_v of another type (Q8_0 beside Q4_0): q, k and v stay three modules,
    and each lies on huge pages all the same (quant/linear.py's _onto_huge_pages), computing as before."""
    if not kernels.regroups(2):
        pytest.skip("no interleaved kernels here")
    hf = hf_model("llama", seed=4, hidden_size=128)
    path = save_gguf(hf, tmp_path / "m.gguf", "Q4_0", types={"attn_v": "Q8_0"})
    model = load_model(path, packed=True).model
    att = model.layers[0].attention
    assert att.wqkv is None and kernels.interleaved(att.wq.qtype) and kernels.interleaved(att.wv.qtype)
    for rows in (att.wq.packed, att.wk.packed, att.wv.packed):
        where = mapping_of(rows.data_ptr())
        assert where is not None and rows.data_ptr() % 4096 == 0 and ("hg" in where[2]) == THP
    x = torch.randn(3, 128)
    ref = x @ kernels.dequantize_packed(*kernels.ggml_blocks(att.wv.packed, att.wv.qtype, 128), 128).T
    kernels.set_activations("f32")
    assert torch.allclose(att.wv(x), ref, atol=1e-4, rtol=1e-4)
