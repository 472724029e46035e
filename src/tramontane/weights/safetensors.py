"""A bounds-checked safetensors reader that reads each tensor straight into its own buffer.

Format: an 8-byte little-endian header length N, N bytes of JSON mapping tensor names to
{dtype, shape, data_offsets: [begin, end)} relative to the data section, then the data section.
Every entry is checked before any tensor is allocated: known dtype, shape x itemsize == byte range,
ranges inside the file, and ranges that exactly tile the data section. Tensors are read with
`readinto`, not mmap, so the page cache never counts towards the process's resident memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoadError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own cap
MAX_DIMS = 64
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    nbytes: int


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise LoadError(self.path, f"cannot open: {e.strerror}") from None
        try:
            self.metadata, self.tensors = _parse_header(self.path, self._file)
        except Exception:
            self._file.close()
            raise

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype and shape."""
        entry = self.tensors[name]
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        self._file.seek(entry.begin)
        got = self._file.readinto(buf.numpy().data)  # ndarray.data: a memoryview of buf's bytes
        if got != entry.nbytes:
            raise LoadError(self.path, f"tensor {name!r}: file ended after {got} of {entry.nbytes} bytes")
        return buf.view(entry.dtype).reshape(entry.shape)

    def read_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """tensor.narrow(dim, start, stop - start) reading only those bytes: one read for dim 0, one per
        leading index otherwise (the part a rank of a sharded model keeps)."""
        entry = self.tensors[name]
        shape = entry.shape
        if not 0 <= dim < len(shape) or not 0 <= start <= stop <= shape[dim]:
            raise ValueError(f"tensor {name!r} {list(shape)}: no part [{start}, {stop}) along dim {dim}")
        item = entry.dtype.itemsize
        inner = item * math.prod(shape[dim + 1 :])  # bytes per step along dim
        outer = math.prod(shape[:dim])
        chunk = (stop - start) * inner
        buf = torch.empty(outer * chunk, dtype=torch.uint8)
        view = buf.numpy().data  # a memoryview of buf's bytes
        for i in range(outer):
            self._file.seek(entry.begin + (i * shape[dim] + start) * inner)
            if self._file.readinto(view[i * chunk : (i + 1) * chunk]) != chunk:
                raise LoadError(self.path, f"tensor {name!r}: file ended inside the tensor")
        return buf.view(entry.dtype).reshape(*shape[:dim], stop - start, *shape[dim + 1 :])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_header(path: Path, f) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise LoadError(path, f"not a safetensors file: only {size} bytes, no header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise LoadError(
            path,
            f"header length {n} exceeds the file ({size} bytes) or the "
            f"{MAX_HEADER_BYTES}-byte cap: not a safetensors file or truncated",
        )
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(path, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise LoadError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LoadError(path, "__metadata__ is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {name: _entry(path, name, spec, data_start, data_size) for name, spec in header.items()}
    _check_tiling(path, entries, data_start, data_size)
    return metadata, entries


def _entry(path: Path, name: str, spec: object, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise LoadError(path, f"tensor {_short(name)}: entry is not an object")
    label = _short(name)
    dtype_name = spec.get("dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise LoadError(path, f"tensor {label}: unknown dtype {_short(dtype_name)}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
        raise LoadError(path, f"tensor {label}: bad shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise LoadError(path, f"tensor {label}: bad data_offsets {_short(offsets)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise LoadError(
            path,
            f"tensor {label}: shape {_short(shape)} of {dtype_name} needs {nbytes} bytes "
            f"but data_offsets {offsets} cover {offsets[1] - offsets[0]}",
        )
    if offsets[1] > data_size:
        raise LoadError(
            path,
            f"tensor {label}: data_offsets {offsets} lie past the end of the data "
            f"({data_size} bytes): file truncated or corrupt",
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], nbytes)


def _short(value: object, limit: int = 80) -> str:
    """repr of a header value for an error message, cut: a hostile header must not come back whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_tiling(path: Path, entries: dict[str, TensorEntry], data_start: int, data_size: int) -> None:
    """The tensors' byte ranges must cover the data section exactly: no overlap, no gap."""
    cursor = data_start
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.nbytes)):
        if e.begin != cursor:
            kind = "overlaps another tensor" if e.begin < cursor else "leaves a gap before it"
            raise LoadError(path, f"tensor {_short(e.name)} at offset {e.begin - data_start} {kind}")
        cursor += e.nbytes
    if cursor != data_start + data_size:
        raise LoadError(
            path,
            f"tensors cover {cursor - data_start} bytes but the data section has {data_size}: file truncated or padded",
        )
