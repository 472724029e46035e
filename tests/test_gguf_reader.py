"""The GGUF reader against hand-built files: a valid one field by field, then a corpus of hostile ones.

Every hostile file must fail with a LoadError naming the problem, quickly and without allocating more
than the file's size (or 1 MiB for tiny files)."""

from __future__ import annotations

import re
import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from rss import rss_growth

from tramontane.errors import LoadError
from tramontane.weights.gguf import open_gguf

# metadata value types (gguf.md)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
T_F32, T_Q8_0, T_IQ2_XXS = 0, 8, 16


def p32(x: int) -> bytes:
    return struct.pack("<I", x)


def p64(x: int) -> bytes:
    return struct.pack("<Q", x)


def pstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return p64(len(b)) + b


@dataclass
class Tensor:
    name: str | bytes
    ne: list[int]  # GGML order, innermost first
    ggml_type: int
    offset: int
    n_dims: int | None = None  # override the count written before ne


@dataclass
class Builder:
    """Writes a GGUF file field by field; every field can be overridden to build hostile files."""

    kvs: list[bytes] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    data: bytes = b""
    magic: bytes = b"GGUF"
    version: int = 3
    n_kv: int | None = None
    n_tensors: int | None = None
    alignment: int = 32

    def kv(self, key: str | bytes, vtype: int, payload: bytes) -> Builder:
        self.kvs.append(pstr(key) + p32(vtype) + payload)
        return self

    def tensor(self, name: str | bytes, ne: list[int], ggml_type: int, offset: int, **kw: int) -> Builder:
        self.tensors.append(Tensor(name, ne, ggml_type, offset, **kw))
        return self

    def sections(self) -> tuple[bytes, bytes, bytes]:
        """(header + metadata, tensor infos, padding + data)."""
        head = self.magic + p32(self.version)
        head += p64(len(self.tensors) if self.n_tensors is None else self.n_tensors)
        head += p64(len(self.kvs) if self.n_kv is None else self.n_kv)
        head += b"".join(self.kvs)
        infos = b""
        for t in self.tensors:
            n_dims = len(t.ne) if t.n_dims is None else t.n_dims
            infos += pstr(t.name) + p32(n_dims) + b"".join(p64(d) for d in t.ne) + p32(t.ggml_type) + p64(t.offset)
        pad = -(len(head) + len(infos)) % self.alignment
        return head, infos, b"\0" * pad + self.data

    def build(self) -> bytes:
        return b"".join(self.sections())


F32_VALUES = np.arange(32, dtype=np.float32) / 4  # tensor "w": ne [8, 4] -> torch shape (4, 8)
Q8_BLOCKS = np.concatenate(
    [
        np.float16([0.5, -0.25]).view(np.uint8).reshape(2, 2),
        np.arange(64, dtype=np.int8).view(np.uint8).reshape(2, 32) - 32,
    ],
    axis=1,
)


def valid() -> Builder:
    """A small valid file: every scalar type, strings, arrays, two tensors."""
    b = Builder()
    b.kv("general.architecture", STR, pstr("llama"))
    b.kv("k.u8", U8, b"\xff").kv("k.i8", I8, b"\xff").kv("k.u16", U16, struct.pack("<H", 65535))
    b.kv("k.i16", I16, struct.pack("<h", -2)).kv("k.u32", U32, p32(4_000_000_000))
    b.kv("k.i32", I32, struct.pack("<i", -3)).kv("k.f32", F32, struct.pack("<f", 1.5))
    b.kv("k.bool", BOOL, b"\x01").kv("k.u64", U64, p64(2**64 - 1))
    b.kv("k.i64", I64, struct.pack("<q", -(2**63))).kv("k.f64", F64, struct.pack("<d", 0.1))
    b.kv("k.strs", ARR, p32(STR) + p64(3) + pstr("a") + pstr("") + pstr("ß"))
    b.kv("k.ints", ARR, p32(I32) + p64(3) + struct.pack("<3i", 1, -2, 3))
    b.kv("k.bools", ARR, p32(BOOL) + p64(2) + b"\x00\x01")
    b.kv("k.nested", ARR, p32(ARR) + p64(2) + p32(U8) + p64(2) + b"\x01\x02" + p32(STR) + p64(1) + pstr("x"))
    b.kv("k.empty", ARR, p32(F64) + p64(0))
    b.kv("general.name", STR, pstr("tiny test model"))
    b.tensor("w", [8, 4], T_F32, 0).tensor("q", [64, 1], T_Q8_0, 128)
    b.data = F32_VALUES.tobytes() + Q8_BLOCKS.tobytes()
    return b


EXPECTED_META = {
    "general.architecture": "llama",
    "k.u8": 255,
    "k.i8": -1,
    "k.u16": 65535,
    "k.i16": -2,
    "k.u32": 4_000_000_000,
    "k.i32": -3,
    "k.f32": 1.5,
    "k.bool": True,
    "k.u64": 2**64 - 1,
    "k.i64": -(2**63),
    "k.f64": 0.1,
    "k.strs": ["a", "", "ß"],
    "k.ints": [1, -2, 3],
    "k.bools": [False, True],
    "k.nested": [[1, 2], ["x"]],
    "k.empty": [],
    "general.name": "tiny test model",
}


def write(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    return path


# --- the valid file ---------------------------------------------------------------------------------


def test_valid_file_parses_field_by_field(tmp_path: Path) -> None:
    with open_gguf(write(tmp_path, valid().build())) as f:
        assert f.version == 3
        assert f.metadata == EXPECTED_META
        assert list(f.metadata) == list(EXPECTED_META)
        assert type(f.metadata["k.bool"]) is bool and type(f.metadata["k.bools"][1]) is bool
        w, q = f.tensors["w"], f.tensors["q"]
        assert (w.shape, w.type_name, w.nbytes) == ((4, 8), "F32", 128)
        assert (q.shape, q.type_name, q.nbytes) == ((1, 64), "Q8_0", 68)
        assert q.offset == w.offset + 128 and w.offset % 32 == 0
        assert torch.equal(f.load("w"), torch.from_numpy(F32_VALUES.reshape(4, 8)))
        expected_q = (
            Q8_BLOCKS[:, 2:].view(np.int8).astype(np.float32)
            * Q8_BLOCKS[:, :2].copy().view(np.float16).astype(np.float32)
        ).reshape(1, 64)
        assert torch.equal(f.load("q"), torch.from_numpy(expected_q))
        assert f.raw("q").tobytes() == Q8_BLOCKS.tobytes()


def test_version_2_is_read(tmp_path: Path) -> None:
    b = valid()
    b.version = 2
    assert open_gguf(write(tmp_path, b.build())).version == 2


def test_custom_alignment_is_honoured(tmp_path: Path) -> None:
    b = valid()
    b.alignment = 64
    b.kv("general.alignment", U32, p32(64))
    b.tensors[1].offset = 128
    with open_gguf(write(tmp_path, b.build())) as f:
        assert f.tensors["w"].offset % 64 == 0
        assert torch.equal(f.load("w").flatten(), torch.from_numpy(F32_VALUES))


def test_file_without_tensors_or_metadata(tmp_path: Path) -> None:
    f = open_gguf(write(tmp_path, Builder().build()))
    assert f.metadata == {} and f.tensors == {}


def test_arrays_nested_up_to_the_limit_are_read(tmp_path: Path) -> None:
    b = Builder().kv("x", ARR, _nested(7))  # 8 levels of arrays
    assert open_gguf(write(tmp_path, b.build())).metadata["x"] == [[[[[[[[0]]]]]]]]


def test_unsupported_known_type_fails_at_load_naming_it(tmp_path: Path) -> None:
    b = valid()
    b.tensor("iq", [256], T_IQ2_XXS, 256)
    b.data = b.data.ljust(256, b"\0") + bytes(66)
    f = open_gguf(write(tmp_path, b.build()))
    assert f.tensors["iq"].type_name == "IQ2_XXS" and len(f.raw("iq")) == 66
    with pytest.raises(LoadError, match="'iq' has type IQ2_XXS"):
        f.load("iq")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="cannot open"):
        open_gguf(tmp_path / "absent.gguf")
    with pytest.raises(LoadError, match="cannot open"):
        open_gguf(tmp_path)


# --- the hostile corpus -----------------------------------------------------------------------------


def _with(mutate: Callable[[Builder], object]) -> Callable[[], bytes]:
    def make() -> bytes:
        b = valid()
        mutate(b)
        return b.build()

    return make


def _set(**fields: object) -> Callable[[Builder], None]:
    return lambda b: b.__dict__.update(fields)


def _tensor(i: int, **fields: object) -> Callable[[Builder], None]:
    return lambda b: b.tensors[i].__dict__.update(fields)


def _nested(depth: int) -> bytes:
    return (p32(ARR) + p64(1)) * depth + p32(U8) + p64(1) + b"\x00"


def _cut_points() -> list[tuple[str, int]]:
    head, infos, data = valid().sections()
    first_key_end = 24 + 8 + len("general.architecture")
    return [
        ("empty", 0),
        ("in-magic", 2),
        ("in-version", 6),
        ("in-counts", 20),
        ("after-header", 24),
        ("in-key-length", 28),
        ("in-key", first_key_end - 5),
        ("in-value-type", first_key_end + 2),
        ("in-string-value", first_key_end + 4 + 10),
        ("in-array", head.index(pstr("ß")) + 9),
        ("in-late-key", head.index(b"k.ints") + 3),
        ("in-late-string", head.index(b"tiny test") + 4),
        ("end-of-metadata", len(head)),
        ("in-tensor-name", len(head) + 9),
        ("in-tensor-dims", len(head) + 8 + 1 + 4 + 3),
        ("end-of-infos", len(head) + len(infos)),
        ("in-padding", len(head) + len(infos) + 1),
        ("in-first-tensor", len(head) + len(infos) + len(data) - 150),
        ("in-last-tensor", len(head) + len(infos) + len(data) - 1),
    ]


TRUNCATED = "truncated|past the end|too short"
HOSTILE: list[tuple[str, Callable[[], bytes], str]] = [
    ("bad-magic", _with(_set(magic=b"GGML")), "magic"),
    ("version-1", _with(_set(version=1)), "version 1"),
    ("version-99", _with(_set(version=99)), "version 99"),
    ("big-endian", _with(_set(version=3 << 24)), "big-endian"),
    *[(f"cut-{what}", (lambda n=n: valid().build()[:n]), TRUNCATED) for what, n in _cut_points()],
    ("tensor-count-2^63", _with(_set(n_tensors=2**63)), "9223372036854775808 tensors"),
    ("tensor-count-max", _with(_set(n_tensors=2**64 - 1)), "18446744073709551615 tensors"),
    ("kv-count-2^63", _with(_set(n_kv=2**63)), "9223372036854775808 metadata entries"),
    ("kv-count-minus-1", _with(_set(n_kv=2**64 - 1)), "18446744073709551615 metadata entries"),
    # (the tensor infos read as one more key: its "length" is the name length and first tensor dims, too long)
    ("kv-count-one-too-many", _with(lambda b: setattr(b, "n_kv", len(b.kvs) + 1)), "truncated|bytes long"),
    ("key-length-past-end", _with(lambda b: b.kvs.insert(0, p64(2**62) + b"abc")), "4611686018427387904 bytes"),
    ("string-length-past-end", _with(lambda b: b.kv("s", STR, p64(10**6) + b"abc")), "truncated"),
    ("string-length-2^64-1", _with(lambda b: b.kv("s", STR, p64(2**64 - 1))), "truncated"),
    ("array-length-past-end", _with(lambda b: b.kv("a", ARR, p32(U32) + p64(10**6) + p32(1))), "claims 1000000"),
    ("string-array-2^62", _with(lambda b: b.kv("a", ARR, p32(STR) + p64(2**62) + pstr("x"))), "claims"),
    ("array-of-arrays-2^60", _with(lambda b: b.kv("a", ARR, p32(ARR) + p64(2**60))), "claims"),
    (
        "string-in-array-past-end",
        _with(lambda b: b.kv("a", ARR, p32(STR) + p64(2) + pstr("x") + p64(999))),
        r"'a'\[1\].*truncated",
    ),
    ("key-1MB", _with(lambda b: b.kv("k" * (1 << 20), U8, b"\x01")), "1048576 bytes long"),
    ("tensor-name-1MB", _with(_tensor(0, name=b"w" * (1 << 20))), "1048576 bytes long"),
    ("duplicate-key", _with(lambda b: b.kv("k.u8", U8, b"\x01")), "duplicate metadata key 'k.u8'"),
    ("duplicate-tensor", _with(lambda b: b.tensor("w", [32], T_F32, 0)), "duplicate tensor name 'w'"),
    ("alignment-0", _with(lambda b: b.kv("general.alignment", U32, p32(0))), "alignment"),
    ("alignment-3", _with(lambda b: b.kv("general.alignment", U32, p32(3))), "alignment"),
    ("alignment-string", _with(lambda b: b.kv("general.alignment", STR, pstr("32"))), "alignment"),
    ("n-dims-5", _with(_tensor(0, ne=[2, 2, 2, 2, 2])), "n_dims 5"),
    ("n-dims-0", _with(_tensor(0, ne=[])), "n_dims 0"),
    ("n-dims-huge", _with(_tensor(0, n_dims=2**32 - 1)), "n_dims 4294967295"),
    ("dims-wrap-to-0", _with(_tensor(0, ne=[2**32, 2**32])), "overflow"),
    ("dims-wrap-3d", _with(_tensor(0, ne=[2**21, 2**21, 2**22])), "overflow"),
    ("dim-2^64-1", _with(_tensor(0, ne=[2**64 - 1])), "overflow"),
    ("dim-0", _with(_tensor(0, ne=[8, 0])), "empty dimension"),
    ("bytes-exceed-file", _with(_tensor(0, ne=[1024, 1024])), "more than the whole file"),
    ("q8-bytes-exceed-file", _with(_tensor(1, ne=[2**40, 2**20])), "more than the whole file"),
    ("offset-past-end", _with(_tensor(1, offset=1 << 20)), r"'q' data \[offset \d+, 68 bytes\] lies past the end"),
    ("offset-2^64-32", _with(_tensor(1, offset=2**64 - 32)), "lies past the end"),
    ("offset-overlaps-end", _with(_tensor(1, offset=160)), "lies past the end"),
    ("misaligned-offset", _with(_tensor(1, offset=130)), "offset 130 is not aligned to 32"),
    ("unknown-tensor-type", _with(_tensor(0, ggml_type=9999)), "unknown GGML type 9999"),
    ("removed-tensor-type", _with(_tensor(0, ggml_type=4)), "unknown GGML type 4"),
    ("row-not-whole-blocks", _with(_tensor(1, ne=[48, 1])), "not a multiple of the Q8_0 block size 32"),
    ("unknown-value-type", _with(lambda b: b.kv("x", 13, b"\0" * 8)), "unknown value type 13"),
    ("unknown-value-type-max", _with(lambda b: b.kv("x", 2**32 - 1, b"")), "unknown value type 4294967295"),
    ("unknown-array-type", _with(lambda b: b.kv("x", ARR, p32(77) + p64(1) + b"\0")), "unknown value type 77"),
    ("nested-arrays-9", _with(lambda b: b.kv("x", ARR, _nested(8))), "nests arrays more than 8 deep"),
    ("nested-arrays-100000", _with(lambda b: b.kv("x", ARR, _nested(100_000))), "nests arrays"),
    ("key-not-utf8", _with(lambda b: b.kv(b"bad\xff", U8, b"\0")), "not valid UTF-8"),
    ("string-not-utf8", _with(lambda b: b.kv("s", STR, pstr(b"\xc3"))), "'s'.*not valid UTF-8"),
    ("tensor-name-not-utf8", _with(_tensor(0, name=b"w\xff")), "not valid UTF-8"),
]


@pytest.mark.parametrize("make,expected", [(m, e) for _, m, e in HOSTILE], ids=[c for c, _, _ in HOSTILE])
def test_hostile_file_is_refused(tmp_path: Path, make: Callable[[], bytes], expected: str) -> None:
    content = make()
    path = write(tmp_path, content)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(LoadError) as info:
            rss_growth(lambda: open_gguf(path))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rss_growth.last < 50 << 20, f"RSS grew by {rss_growth.last >> 20} MiB"
    assert info.value.path == str(path) and str(info.value).startswith(str(path))
    assert info.value.problem
    assert re.search(expected, info.value.problem), info.value.problem
    assert elapsed < 1.0
    assert peak < max(len(content), 1 << 20)


def test_every_cut_of_the_valid_file_is_refused(tmp_path: Path) -> None:
    content = valid().build()
    assert open_gguf(write(tmp_path, content)).tensors  # the uncut file is fine
    for n in range(len(content)):
        with pytest.raises(LoadError):
            open_gguf(write(tmp_path, content[:n]))
