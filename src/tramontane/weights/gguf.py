"""A hardened, memory-mapped reader for GGUF files (versions 2 and 3, little-endian).

Layout (ggml's docs/gguf.md): magic "GGUF", u32 version, u64 tensor count, u64 metadata count; the
metadata entries (string key, u32 value type, value); the tensor infos (string name, u32 n_dims,
u64 ne[n_dims], u32 type, u64 offset relative to the data section); padding to `general.alignment`;
the data section. Strings are a u64 byte length then UTF-8 bytes; arrays are a u32 element type, a
u64 count, then the elements.

Nothing read from the file is trusted: every count and length is checked against the bytes that
remain before anything is allocated or read, so a hostile or truncated file fails fast with a
`LoadError` naming the problem, and work and memory stay linear in the file's size.

GGML lists dimensions innermost first (ne[0] is the contiguous one, the row length of a 2-D weight);
`GGUFTensorInfo.shape` is torch order, ne reversed: a 2-D weight is [out_features, in_features].
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import numpy as np
import torch

from ..errors import LoadError
from .gguf_quants import DEQUANTIZERS, GGML_TYPES, dequantize

_MAGIC = b"GGUF"
_HEADER = struct.Struct("<4sIQQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_ARRAY_DEPTH = 8  # arrays of arrays nest at most this deep
_MAX_KEY_BYTES = 1024  # metadata keys are short dotted names ("llama.block_count")
_MAX_NAME_BYTES = 256  # llama.cpp itself keeps tensor names under 64 bytes
_MAX_DIMS = 4  # GGML_MAX_DIMS
_INT64_MAX = (1 << 63) - 1  # ggml counts elements and bytes in int64
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

_STRING, _ARRAY, _BOOL = 8, 9, 7
# metadata value type -> (name, struct format); all fixed-size scalar types.
_SCALAR_FORMATS: dict[int, tuple[str, str]] = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<B"),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}
_SCALARS = {vt: (name, np.dtype(fmt)) for vt, (name, fmt) in _SCALAR_FORMATS.items()}
_STRUCTS = {vt: struct.Struct(fmt) for vt, (_, fmt) in _SCALAR_FORMATS.items()}
_TRUNCATED = "the file is truncated or corrupt"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies in the file and what it holds."""

    name: str
    shape: tuple[int, ...]  # torch order: GGML's ne[] reversed
    ggml_type: int  # GGMLQuantizationType value
    type_name: str  # "F32", "Q4_K", ...
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure is a LoadError."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)

    def fail(self, problem: str) -> NoReturn:
        raise LoadError(self.path, problem)

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> int:
        """Claim the next `n` bytes and return where they start."""
        if n > self.end - self.pos:
            self.fail(f"{what} at offset {self.pos} needs {n} bytes but only {self.left()} remain; {_TRUNCATED}")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, st: struct.Struct, what: str) -> Any:
        return st.unpack_from(self.buf, self.take(st.size, what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack(_U64, f"length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long; names longer than {limit} bytes are refused")
        start = self.take(n, f"{what} ({n} bytes)")
        try:
            return str(self.buf[start : start + n], "utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} at offset {start} is not valid UTF-8 ({e.reason} at byte {e.start})")


def _value_type_name(vtype: int) -> str:
    if vtype in _SCALARS:
        return _SCALARS[vtype][0]
    return {_STRING: "string", _ARRAY: "array"}.get(vtype, f"unknown type {vtype}")


def _min_value_bytes(cur: _Cursor, vtype: int, what: str) -> int:
    if vtype in _SCALARS:
        return _SCALARS[vtype][1].itemsize
    if vtype == _STRING:
        return 8
    if vtype == _ARRAY:
        return 4 + 8
    cur.fail(f"{what} has unknown value type {vtype} (known: 0-12)")


def _read_value(cur: _Cursor, vtype: int, what: str, depth: int) -> Any:
    if vtype in _STRUCTS:
        value = cur.unpack(_STRUCTS[vtype], what)
        return bool(value) if vtype == _BOOL else value
    if vtype == _STRING:
        return cur.string(what)
    if vtype == _ARRAY:
        return _read_array(cur, what, depth + 1)
    cur.fail(f"{what} has unknown value type {vtype} (known: 0-12)")


def _read_array(cur: _Cursor, what: str, depth: int) -> list[Any]:
    if depth > _MAX_ARRAY_DEPTH:
        cur.fail(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
    etype = cur.unpack(_U32, f"element type of {what}")
    count = cur.unpack(_U64, f"element count of {what}")
    need = count * _min_value_bytes(cur, etype, f"{what} (array element)")
    if need > cur.left():
        cur.fail(
            f"{what} claims {count} elements of type {_value_type_name(etype)}, which need at least "
            f"{need} bytes, but only {cur.left()} remain; {_TRUNCATED}"
        )
    if count == 0:
        return []
    if etype in _SCALARS:
        dtype = _SCALARS[etype][1]
        arr = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.take(need, what))
        return (arr != 0).tolist() if etype == _BOOL else arr.tolist()
    if etype == _STRING:
        return _read_strings(cur, what, count)
    return [_read_array(cur, f"{what}[{i}]", depth + 1) for i in range(count)]


def _read_strings(cur: _Cursor, what: str, count: int) -> list[str]:
    """The hot loop for vocabularies (~50k strings): inline the checks, build messages only on failure."""
    buf, end, unpack = cur.buf, cur.end, _U64.unpack_from
    out: list[str] = []
    pos = cur.pos
    for i in range(count):
        if pos + 8 > end:
            cur.pos = pos
            cur.take(8, f"length of {what}[{i}]")
        n = unpack(buf, pos)[0]
        pos += 8
        if n > end - pos:
            cur.pos = pos
            cur.take(n, f"{what}[{i}] ({n} bytes)")
        try:
            out.append(str(buf[pos : pos + n], "utf-8"))
        except UnicodeDecodeError as e:
            cur.fail(f"{what}[{i}] at offset {pos} is not valid UTF-8 ({e.reason} at byte {e.start})")
        pos += n
    cur.pos = pos
    return out


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(cur.buf, cur.take(_HEADER.size, "header"))
    if magic != _MAGIC:
        cur.fail(f"not a GGUF file: magic is {magic!r}, expected {_MAGIC!r}")
    if version not in _SUPPORTED_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in _SUPPORTED_VERSIONS:
            cur.fail(f"big-endian GGUF (version {swapped}) is not supported; convert it to little-endian")
        old = " (the pre-2023 format; re-convert the model)" if version == 1 else ""
        cur.fail(f"unsupported GGUF version {version}{old}; supported: 2 and 3")
    need = n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES
    if need > cur.left():
        cur.fail(
            f"header claims {n_kv} metadata entries and {n_tensors} tensors, which need at least "
            f"{need} bytes, but only {cur.left()} remain; {_TRUNCATED}"
        )
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry {i}", _MAX_KEY_BYTES)
        if key in metadata:
            cur.fail(f"duplicate metadata key '{key}' (entry {i})")
        vtype = cur.unpack(_U32, f"value type of metadata '{key}'")
        metadata[key] = _read_value(cur, vtype, f"metadata '{key}'", 0)
    return metadata


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    value = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if type(value) is not int or value <= 0 or value & (value - 1):
        cur.fail(f"metadata 'general.alignment' is {value!r}; it must be a non-zero power of two")
    return value


@dataclass(frozen=True)
class _RawTensor:
    name: str
    ne: tuple[int, ...]  # GGML order, innermost first
    ggml_type: int
    rel_offset: int  # from the start of the data section


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> list[_RawTensor]:
    infos: list[_RawTensor] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", _MAX_NAME_BYTES)
        if name in seen:
            cur.fail(f"duplicate tensor name '{name}' (tensor {i})")
        seen.add(name)
        n_dims = cur.unpack(_U32, f"n_dims of tensor '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            cur.fail(f"tensor '{name}' has n_dims {n_dims}; it must be between 1 and {_MAX_DIMS}")
        start = cur.take(8 * n_dims, f"dimensions of tensor '{name}'")
        ne = struct.unpack_from(f"<{n_dims}Q", cur.buf, start)
        ggml_type = cur.unpack(_U32, f"type of tensor '{name}'")
        offset = cur.unpack(_U64, f"data offset of tensor '{name}'")
        infos.append(_RawTensor(name, ne, ggml_type, offset))
    return infos


def _check_tensor(cur: _Cursor, raw: _RawTensor, data_start: int, alignment: int) -> GGUFTensorInfo:
    """Validate one tensor info against the file; returns it in torch order with absolute offsets."""
    name, size = raw.name, cur.end
    if raw.ggml_type not in GGML_TYPES:
        cur.fail(f"tensor '{name}' has unknown GGML type {raw.ggml_type}")
    gtype = GGML_TYPES[raw.ggml_type]
    n_elements = 1
    for dim in raw.ne:
        if dim == 0:
            cur.fail(f"tensor '{name}' has an empty dimension (ne = {list(raw.ne)})")
        n_elements *= dim
        if n_elements > _INT64_MAX:
            cur.fail(f"tensor '{name}' dimensions {list(raw.ne)} overflow a 64-bit element count")
    if raw.ne[0] % gtype.block_size:
        cur.fail(
            f"tensor '{name}' has rows of {raw.ne[0]} elements, not a multiple of the "
            f"{gtype.name} block size {gtype.block_size}"
        )
    nbytes = n_elements // gtype.block_size * gtype.type_size
    if nbytes > size:
        cur.fail(
            f"tensor '{name}' of shape {list(raw.ne[::-1])} and type {gtype.name} needs {nbytes} "
            f"bytes, more than the whole file ({size} bytes)"
        )
    if raw.rel_offset % alignment:
        cur.fail(f"tensor '{name}' data offset {raw.rel_offset} is not aligned to {alignment} bytes")
    offset = data_start + raw.rel_offset
    if offset + nbytes > size:
        cur.fail(
            f"tensor '{name}' data [offset {offset}, {nbytes} bytes] lies past the end of the "
            f"file ({size} bytes); {_TRUNCATED}"
        )
    return GGUFTensorInfo(name, tuple(reversed(raw.ne)), raw.ggml_type, gtype.name, offset, nbytes)


class GGUFFile:
    """An open GGUF file: parsed metadata and tensor table, tensor data read lazily from a mmap.

    The mapping is private copy-on-write, so tensors built on it can never write to the file."""

    def __init__(
        self, path: Path, buf: mmap.mmap, version: int, metadata: dict[str, Any], tensors: dict[str, GGUFTensorInfo]
    ) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self._buf: mmap.mmap | None = buf

    def _locate(self, name: str) -> tuple[mmap.mmap, GGUFTensorInfo]:
        if self._buf is None:
            raise LoadError(self.path, f"cannot read tensor '{name}': the file has been closed")
        info = self.tensors.get(name)
        if info is None:
            raise LoadError(self.path, f"no tensor named '{name}' in this file")
        return self._buf, info

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes exactly as stored: a read-only uint8 view into the mapping."""
        buf, info = self._locate(name)
        arr = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        arr.flags.writeable = False
        return arr

    def copy_raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes copied into a new uint8 tensor [nbytes]; the mapped pages they came from
        are released at once, so loading a model never holds the file and its copy in memory together."""
        buf, info = self._locate(name)
        out = torch.frombuffer(buf, dtype=torch.uint8, count=info.nbytes, offset=info.offset).clone()
        _release_pages(buf, info.offset, info.nbytes)
        return out

    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages from this process's memory (read again from the file if touched):
        for a tensor read through the mapping into a layout of its own."""
        buf, info = self._locate(name)
        _release_pages(buf, info.offset, info.nbytes)

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a uint8 tensor [nbytes] over the mapping itself (no copy): its pages
        are read from the file when first touched, and the mapping lives as long as any such tensor
        (close() leaves it to them). Private copy-on-write: a write could never reach the file."""
        buf, info = self._locate(name)
        # Through numpy: an ndarray holds a buffer export, which keeps mmap.close() from unmapping under
        # the tensor (torch.frombuffer keeps only a reference: close() would leave it dangling).
        return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset))

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized into a new (file-independent) tensor of `info.shape` and `dtype`."""
        buf, info = self._locate(name)
        if info.ggml_type not in DEQUANTIZERS:
            supported = ", ".join(GGML_TYPES[t].name for t in DEQUANTIZERS)
            raise LoadError(
                self.path,
                f"tensor '{name}' has type {info.type_name}, which tramontane "
                f"cannot dequantize (supported: {supported})",
            )
        # Copy out of the mapping first: aligned memory, and no export pinning the mmap open.
        return dequantize(self.copy_raw(name), info.ggml_type).reshape(info.shape).to(dtype)

    def close(self) -> None:
        """Release the mapping (at once, or when the last raw() or mapped() view is garbage-collected)."""
        buf, self._buf = self._buf, None
        if buf is not None:
            _close_quietly(buf)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _release_pages(buf: mmap.mmap, offset: int, length: int) -> None:
    """Drop the whole pages inside [offset, offset + length) from this process's memory (they are
    read again from the file if touched; the mapping is private and never written)."""
    page = mmap.PAGESIZE
    start, end = -(-offset // page) * page, (offset + length) // page * page
    if end > start and hasattr(buf, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        buf.madvise(mmap.MADV_DONTNEED, start, end - start)


def _close_quietly(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # numpy views from raw() still alive: the mapping goes with the last of them
        pass


def _parse(buf: mmap.mmap, path: Path) -> GGUFFile:
    cur = _Cursor(buf, path)
    version, n_tensors, n_kv = _read_header(cur)
    metadata = _read_metadata(cur, n_kv)
    alignment = _alignment(cur, metadata)
    raw_infos = _read_tensor_infos(cur, n_tensors)
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {r.name: _check_tensor(cur, r, data_start, alignment) for r in raw_infos}
    return GGUFFile(path, buf, version, metadata, tensors)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file; raises LoadError(path, problem) for anything wrong with it."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEADER.size:
                raise LoadError(
                    p, f"file is {size} bytes, too short for a GGUF header ({_HEADER.size} bytes); {_TRUNCATED}"
                )
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise LoadError(p, f"cannot open: {e}") from None
    try:
        return _parse(buf, p)
    except BaseException:
        _close_quietly(buf)
        raise
