"""Corrupt safetensors files raise LoadError naming the file and the problem, quickly."""

from __future__ import annotations

import json
import struct
import time

import pytest
import torch
from rss import rss_growth
from safetensors.torch import save_file

from tramontane.errors import LoadError
from tramontane.weights.safetensors import SafetensorsFile


def raw(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
CASES = {
    "empty file": (b"", "header length"),
    "header length past the end": (raw(GOOD, bytes(16), length=1 << 40), "header length"),
    "header length 2^64-1": (struct.pack("<Q", (1 << 64) - 1) + b"{}", "header length"),
    "header not JSON": (struct.pack("<Q", 4) + b"{{{{", "JSON"),
    "header not an object": (raw([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
    "unknown dtype": (raw({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "dtype"),
    "negative dim": (raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "shape"),
    "size mismatch": (raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}, bytes(4)), "needs 12"),
    "huge shape": (
        raw({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}}, bytes(4)),
        "needs",
    ),
    "offsets past end": (raw(GOOD, bytes(8)), "past the end"),
    "reversed offsets": (raw({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, bytes(4)), "data_offsets"),
    "overlap": (
        raw(
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
        ),
        "overlaps",
    ),
    "gap": (raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), "gap"),
    "trailing bytes": (raw(GOOD, bytes(20)), "cover 16 bytes"),
    # found by fuzz/fuzz_safetensors.py: a list as dtype was looked up in a dict (TypeError)
    "dtype a list": (raw({"a": {"dtype": [4, 4], "shape": [4], "data_offsets": [0, 16]}}, bytes(16)), "dtype"),
    "dtype null": (raw({"a": {"dtype": None, "shape": [4], "data_offsets": [0, 16]}}, bytes(16)), "dtype"),
    "shape of booleans": (raw({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)), "shape"),
    "65 dims": (raw({"a": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, bytes(4)), "shape"),
    "huge name not echoed": (
        raw({"n" * 100_000: {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        r"^.{0,400}$",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_file(tmp_path, case):
    data, message = CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(LoadError, match=message) as err:
        rss_growth(lambda: SafetensorsFile(path))
    assert time.perf_counter() - start < 1.0
    assert rss_growth.last < 50 << 20, f"RSS grew by {rss_growth.last >> 20} MiB"
    assert str(path) in str(err.value)


def test_reads_what_safetensors_wrote(tmp_path):
    tensors = {"x": torch.randn(3, 5), "y": torch.randn(7).to(torch.bfloat16), "z": torch.arange(6).int()}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert f.metadata == {"format": "pt"}
        for name, t in tensors.items():
            assert torch.equal(f.read(name), t)


def test_read_part_reads_the_narrowed_tensor(tmp_path):
    """A rank's part along any dimension equals narrowing the whole tensor (bf16 and float32)."""
    from safetensors.torch import save_file

    from tramontane.weights.safetensors import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(6, 4, 5, generator=g), "b": torch.randn(8, 12, generator=g).bfloat16()}
    save_file(tensors, tmp_path / "t.safetensors")
    with SafetensorsFile(tmp_path / "t.safetensors") as st:
        for name, t in tensors.items():
            for dim in range(t.dim()):
                for start, stop in ((0, t.shape[dim] // 2), (t.shape[dim] // 2, t.shape[dim]), (1, 2)):
                    assert torch.equal(st.read_part(name, dim, start, stop), t.narrow(dim, start, stop - start))
        with pytest.raises(ValueError, match="no part"):
            st.read_part("a", 1, 3, 9)
