"""Find a model's weight files, read its config, and hand out its tensors one at a time.

Formats: a Hugging Face folder (config.json + model.safetensors, or shards with an index), Mistral's
native folder (params.json + consolidated.safetensors or numbered shards), or a GGUF file. Each source
yields (name, reader) pairs; a reader reads its tensor only when called (whole, or the part one rank of
a sharded model keeps). Assembling a model from them is build/load.py's job: this package only reads
and writes files."""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from ..config import ModelConfig
from ..errors import ConfigError, LoadError
from . import names
from .safetensors import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_MESSAGE = (
    "pickle checkpoints (.bin, .pt, .pth) are refused: unpickling runs arbitrary code from "
    "the file. tramontane loads Hugging Face safetensors folders, Mistral native folders "
    "(params.json + consolidated.safetensors) and GGUF files; convert the checkpoint to "
    "safetensors first"
)


class TensorSource(Protocol):
    path: Path

    def items(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]: ...


def detect_format(path: Path) -> str:
    if not path.exists():
        raise LoadError(path, "no such file or folder")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise LoadError(path, PICKLE_MESSAGE)
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise LoadError(path, "not a GGUF file (no GGUF magic); for safetensors, pass the model's folder")
    if (path / "config.json").is_file() and _hf_files(path):
        return "hf"
    if (path / "params.json").is_file() and _native_files(path):
        return "mistral"
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise LoadError(path, f"only pickle weights found ({', '.join(pickles[:3])}): {PICKLE_MESSAGE}")
    raise LoadError(
        path,
        "no weights found: expected config.json + model*.safetensors (Hugging Face), "
        "params.json + consolidated*.safetensors (Mistral) or a .gguf file",
    )


def _hf_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / n for n in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LoadError(index, f"malformed shard index: {e!r}") from None
    return sorted(folder.glob("model*.safetensors"))


def _native_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("consolidated*.safetensors"))


def read_json_object(path: Path) -> dict:
    """A JSON object file; LoadError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(path, f"cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise LoadError(path, "expected a JSON object")
    return data


@dataclass(frozen=True)
class Reader:
    """Reads one tensor of a file: whole (call it), or only the part along one dimension that a rank of
    a sharded model keeps (formats that cannot read a part read the whole and narrow it)."""

    whole: Callable[[], torch.Tensor]
    part_reader: Callable[[int, int, int], torch.Tensor] | None = None

    def __call__(self) -> torch.Tensor:
        return self.whole()

    def part(self, dim: int, start: int, stop: int) -> torch.Tensor:
        if self.part_reader is not None:
            return self.part_reader(dim, start, stop)
        return self.whole().narrow(dim, start, stop - start).clone()


class SafetensorsSource:
    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self.files = files
        self.types: dict[str, int] = {}

    def type_counts(self) -> dict[str, int]:
        """Stored dtype -> tensor count, from the headers alone."""
        counts: dict[str, int] = {}
        for file in self.files:
            with SafetensorsFile(file) as st:
                for entry in st.tensors.values():
                    key = str(entry.dtype).removeprefix("torch.")
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def items(self) -> Iterator[tuple[str, Reader]]:
        seen: set[str] = set()
        for file in self.files:
            if not file.is_file():
                raise LoadError(file, "shard listed in the index is missing")
            with SafetensorsFile(file) as st:
                for name, entry in st.tensors.items():
                    if name in seen:
                        raise LoadError(file, f"tensor {name!r} appears in more than one shard")
                    seen.add(name)
                    key = str(entry.dtype).removeprefix("torch.")
                    self.types[key] = self.types.get(key, 0) + 1
                    yield name, Reader(partial(st.read, name), partial(st.read_part, name))


class GGUFSource:
    def __init__(self, path: Path) -> None:
        from .gguf import open_gguf

        self.path = path
        self.file = open_gguf(path)
        self.types: dict[str, int] = {}
        for info in self.file.tensors.values():
            self.types[info.type_name] = self.types.get(info.type_name, 0) + 1

    def type_counts(self) -> dict[str, int]:
        return dict(self.types)

    def items(self) -> Iterator[tuple[str, Reader]]:
        for name in self.file.tensors:
            yield name, Reader(partial(self._load, name))

    def _load(self, name: str) -> torch.Tensor:
        return self.file.load(name, torch.float32)

    def packed(self, name: str, types: Container[str], mapped: bool = False) -> tuple[torch.Tensor, int] | None:
        """A matrix's blocks as uint8 rows [out, row_bytes], or a stack of them [E, out, row_bytes]
        (Mixtral's `*_exps`), when its type is one of `types`. mapped=True: a view of the file's mapping
        (nothing copied; pages are read as they are touched); False: a copy owned by the tensor."""
        info = self.file.tensors[name]
        if len(info.shape) not in (2, 3) or info.type_name not in types:
            return None
        rows = self.file.mapped(name) if mapped else self.file.copy_raw(name)  # [nbytes]
        return rows.view(*info.shape[:-1], -1), info.ggml_type


def open_source(path: Path) -> tuple[str, ModelConfig, SafetensorsSource | GGUFSource, names.NameMap]:
    fmt = detect_format(path)
    if fmt == "hf":
        cfg_path = path / "config.json"
        config = _config(cfg_path, ModelConfig.from_hf_config)
        return fmt, config, SafetensorsSource(path, _hf_files(path)), names.HF
    if fmt == "mistral":
        cfg_path = path / "params.json"
        config = _config(cfg_path, ModelConfig.from_params_json)
        return fmt, config, SafetensorsSource(path, _native_files(path)), names.NATIVE
    source = GGUFSource(path)
    try:
        config = ModelConfig.from_gguf_metadata(source.file.metadata, source=str(path))
    except ConfigError as e:
        raise LoadError(path, str(e).removeprefix(f"{path}: ")) from None
    config = config.with_(tie_embeddings="output.weight" not in source.file.tensors)
    return fmt, config, source, names.GGUF


def _config(path: Path, build: Callable[..., ModelConfig]) -> ModelConfig:
    try:
        return build(read_json_object(path), source=str(path))
    except ConfigError as e:
        raise LoadError(path, str(e).removeprefix(f"{path}: ")) from None
