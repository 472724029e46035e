"""Find a model's weights, build its config, and assemble a `Transformer` from them.

Formats: a Hugging Face folder (config.json + model.safetensors, or shards with an index), Mistral's
native folder (params.json + consolidated.safetensors or numbered shards), or a GGUF file. The model is
built on the meta device and each tensor is read once, straight into its final dtype, then assigned:
peak memory is the model plus one tensor in flight (plus the packed GGUF file, which is mapped)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import ModelConfig
from ..errors import ConfigError, LoadError
from ..model import Transformer
from ..model.layers import rope_frequencies
from . import names
from .safetensors import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_MESSAGE = ("pickle checkpoints (.bin, .pt, .pth) are refused: unpickling runs arbitrary code from "
                  "the file. tramontane loads Hugging Face safetensors folders, Mistral native folders "
                  "(params.json + consolidated.safetensors) and GGUF files; convert the checkpoint to "
                  "safetensors first")


class TensorSource(Protocol):
    path: Path

    def items(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]: ...


@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    format: str  # "hf", "mistral", "gguf"
    path: Path
    weight_types: dict[str, int] = field(default_factory=dict)  # stored type name -> tensor count
    metadata: dict[str, Any] = field(default_factory=dict)  # GGUF metadata (tokenizer lives there)


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
    raise LoadError(path, "no weights found: expected config.json + model*.safetensors (Hugging Face), "
                          "params.json + consolidated*.safetensors (Mistral) or a .gguf file")


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

    def items(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
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
                    yield name, Reader(lambda st=st, name=name: st.read(name),
                                       lambda d, a, b, st=st, name=name: st.read_part(name, d, a, b))


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

    def items(self) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
        for name in self.file.tensors:
            yield name, Reader(lambda name=name: self.file.load(name, torch.float32))

    def packed(self, name: str) -> tuple[torch.Tensor, int] | None:
        """A 2-D tensor's blocks as uint8 rows [out, row_bytes] when the packed kernels run its type."""
        from ..quant.linear import PACKED_TYPES

        info = self.file.tensors[name]
        if len(info.shape) != 2 or info.type_name not in PACKED_TYPES:
            return None
        rows = self.file.copy_raw(name)  # [nbytes], owned: the file closes after load
        return rows.view(info.shape[0], -1), info.ggml_type


def open_source(path: Path) -> tuple[str, ModelConfig, Any, names.NameMap]:
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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
               packed: bool = False, shard: tuple[str, int, int] | None = None) -> LoadedModel:
    """Read a model folder or GGUF file into a ready `Transformer` (eval mode, no gradients).

    packed=True keeps a GGUF file's quantized matrices as their blocks (see quant/linear.py).
    shard = (mode, rank, world): keep only this rank's part of each tensor under the parallel plan `mode`
    ("tp", "ep", "tp+ep"; see parallel/plan.py); tensors are sliced as they are read, so the rank never
    holds the whole model."""
    path = Path(path)
    fmt, config, source, name_map = open_source(path)
    layout = None
    if shard is not None:
        from ..parallel.plan import layout_for

        layout = layout_for(config, *shard)
    packed = packed and fmt == "gguf" and layout is None
    with torch.device("meta"):
        model = Transformer(config.with_(quant="gguf") if packed else config)
    if layout is not None:
        from ..parallel.shard import shard_model

        shard_model(model, layout)
    state = _assemble(model, config, source, name_map, dtype, progress, packed, layout)
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the modules own the tensors now: fusing projections below must not double them
    if packed:
        from ..quant.fused import install

        install(model)
    model.inv_freq = rope_frequencies(config.head_dim, config.rope_theta)
    model.eval().requires_grad_(False)
    meta = source.file.metadata if fmt == "gguf" else {}
    if fmt == "gguf":
        source.file.close()  # every tensor was copied out; unmapping drops the file's pages from RSS
    return LoadedModel(model, model.config, fmt, path, dict(source.types), meta)


def _assemble(model: Transformer, config: ModelConfig, source: Any, name_map: names.NameMap,
              dtype: torch.dtype, progress: bool, packed: bool = False, layout: Any = None
              ) -> dict[str, torch.Tensor]:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    swapped: set[str] = set()
    experts: dict[str, set[int]] = {}
    items = source.items()
    if progress:
        from tqdm import tqdm

        # Shown only when loading takes more than a moment (tqdm's delay).
        items = tqdm(items, desc="loading weights", unit=" tensors", leave=False, delay=0.5)
    for name, read in items:
        try:
            m = name_map.map(name)
        except KeyError:
            raise LoadError(source.path, f"unexpected tensor {name!r}: not part of a "
                                         f"{config.architecture} model") from None
        if m is None or (m.target == "output.weight" and config.tie_embeddings):
            continue
        if m.target not in expected:
            raise LoadError(source.path, f"tensor {name!r} maps to {m.target!r}, which this "
                                         f"configuration ({config.n_layers} layers, moe={config.moe}) lacks")
        if packed and m.transform is None and PACKABLE.fullmatch(m.target):
            blocks = source.packed(name)
            if blocks is not None:
                _swap_packed(model, source.path, name, m.target, blocks, expected, state)
                swapped.add(m.target)
                continue
        if layout is not None:
            m, tensor = _rank_part(m, read, layout, config)
            if tensor is None:
                continue  # an expert another rank holds
        else:
            tensor = _transform(read(), m.transform, config)
        _place(source.path, name, m, tensor.to(dtype), expected[m.target], state, experts, dtype)
    if config.tie_embeddings and "tok_embeddings.weight" in swapped:
        from ..quant.linear import PackedEmbedding

        embedding = model.tok_embeddings
        assert isinstance(embedding, PackedEmbedding)
        model.output = embedding.as_linear()
        state["output.packed"] = state["tok_embeddings.packed"]
    _check_complete(source.path, {k: v for k, v in expected.items() if k not in swapped}, state, experts)
    return state


# Matrices that may stay packed: the attention and dense feed-forward projections, output, embedding.
PACKABLE = re.compile(r"(layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])|output|tok_embeddings)\.weight")


def _swap_packed(model: Transformer, path: Path, name: str, target: str, blocks: tuple[torch.Tensor, int],
                 expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> None:
    """Put a packed module where the float one was; its blocks go into the state dict."""
    from ..quant.linear import GGUFLinear, PackedEmbedding, set_module

    rows, qtype = blocks
    out_features, in_features = expected[target]
    if rows.shape[0] != out_features:
        raise LoadError(path, f"tensor {name!r} has {rows.shape[0]} rows, expected {out_features}")
    module_path = target.removesuffix(".weight")
    with torch.device("meta"):
        module = (PackedEmbedding if module_path == "tok_embeddings" else GGUFLinear)(
            torch.empty(rows.shape, dtype=torch.uint8), qtype, in_features)
    set_module(model, module_path, module)
    state[module_path + ".packed"] = rows


def _transform(t: torch.Tensor, transform: str | None, config: ModelConfig) -> torch.Tensor:
    if transform == "q":
        return names.unpermute_rotary(t, config.n_heads)
    if transform == "k":
        return names.unpermute_rotary(t, config.n_kv_heads)
    return t


def _rank_part(m: names.Mapping, read: Reader, layout: Any, config: ModelConfig
               ) -> tuple[names.Mapping, torch.Tensor | None]:
    """Read only this rank's part of a tensor. Per-expert tensors of HF/native files are slices of the
    stacked [E,...] target: their dims shift by one. The HF q/k row permutation acts within each head,
    and parts are whole heads: it is undone on the part, over the heads the part holds."""
    from ..parallel.plan import slice_of

    part = slice_of(m.target, layout)
    if part is None:
        return m, _transform(read(), m.transform, config)
    dim, start, stop = part
    if m.expert is not None:
        if dim == 0:  # whole experts per rank
            if not start <= m.expert < stop:
                return m, None
            return names.Mapping(m.target, m.transform, m.expert - start), _transform(read(), m.transform, config)
        dim -= 1
    tensor = read.part(dim, start, stop)
    if m.transform in ("q", "k"):
        tensor = names.unpermute_rotary(tensor, (stop - start) // config.head_dim)
    return m, tensor


def _place(path: Path, name: str, m: names.Mapping, tensor: torch.Tensor, shape: tuple[int, ...],
           state: dict[str, torch.Tensor], experts: dict[str, set[int]], dtype: torch.dtype) -> None:
    want = shape[1:] if m.expert is not None else shape
    if tuple(tensor.shape) != want:
        raise LoadError(path, f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(want)}")
    if m.expert is None:
        if m.target in state:
            raise LoadError(path, f"tensor {name!r} duplicates {m.target!r}")
        state[m.target] = tensor
        return
    if not 0 <= m.expert < shape[0]:
        raise LoadError(path, f"tensor {name!r}: expert {m.expert} but the model has {shape[0]} experts")
    stacked = state.setdefault(m.target, torch.empty(shape, dtype=dtype))
    seen = experts.setdefault(m.target, set())
    if m.expert in seen:
        raise LoadError(path, f"tensor {name!r} duplicates expert {m.expert}")
    stacked[m.expert].copy_(tensor)
    seen.add(m.expert)


def _check_complete(path: Path, expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor],
                    experts: dict[str, set[int]]) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise LoadError(path, f"missing tensors: {', '.join(missing[:5])}{more}")
    for target, seen in experts.items():
        if len(seen) != expected[target][0]:
            absent = sorted(set(range(expected[target][0])) - seen)
            raise LoadError(path, f"{target}: experts {absent} are missing")
