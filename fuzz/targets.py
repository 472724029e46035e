"""What the fuzzers run on each input: the reader, then everything built from what it read.

An input may only succeed or raise one of the project's errors (TramontaneError: LoadError,
ConfigError, TokenizerError...). Any other exception is a finding; so is an input that takes longer
than the fuzzer's -timeout or pushes memory past -rss_limit_mb (see README.md)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tramontane.config import ModelConfig
from tramontane.errors import TramontaneError
from tramontane.text.tokenizer import tokenizer_from_gguf
from tramontane.weights.gguf import open_gguf
from tramontane.weights.safetensors import SafetensorsFile

MAX_TENSOR_BYTES = 1 << 20  # tensors larger than this are located but not decoded (speed only)
_SCRATCH = Path(tempfile.mkdtemp(prefix="tramontane-fuzz-"))


def _scratch(data: bytes, suffix: str) -> Path:
    path = _SCRATCH / f"input-{os.getpid()}{suffix}"
    path.write_bytes(data)
    return path


def gguf_input(data: bytes) -> None:
    path = _scratch(data, ".gguf")
    try:
        with open_gguf(path) as f:
            for name, info in f.tensors.items():
                if info.nbytes <= MAX_TENSOR_BYTES:
                    f.load(name)
            _project_errors_only(lambda: ModelConfig.from_gguf_metadata(f.metadata, str(path)))
            tokenizer = _project_errors_only(lambda: tokenizer_from_gguf(f.metadata, str(path)))
            if tokenizer is not None:
                _project_errors_only(lambda: tokenizer.decode(tokenizer.encode("abcd ab", add_bos=True)))
    except TramontaneError:
        pass


def safetensors_input(data: bytes) -> None:
    path = _scratch(data, ".safetensors")
    try:
        with SafetensorsFile(path) as f:
            for name, entry in f.tensors.items():
                if entry.nbytes <= MAX_TENSOR_BYTES:
                    f.read(name)
    except TramontaneError:
        pass


def _project_errors_only(work):
    try:
        return work()
    except TramontaneError:
        return None
