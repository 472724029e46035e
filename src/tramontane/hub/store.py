"""The local model store: `$TRAMONTANE_HOME` (default ~/.cache/tramontane), one folder per model under
`models/NAME/`, with the weights (a Hugging Face or Mistral folder's files, or one GGUF file) and
`tramontane.json` (where it came from, when, its size). A stored model's NAME works wherever a MODEL
is taken (resolve.resolve_model).

`create` makes one from an Ollama Modelfile (modelfile.py): the weights it names, with its settings.

`pull` takes a local folder or GGUF file (copied in), or a Hugging Face Hub repository id, downloaded
with huggingface_hub (resumable, with progress bars; `HF_ENDPOINT` points it at another hub): only the
files a model needs (safetensors or consolidated weights, configs, tokenizer files; or the one GGUF
file chosen with --file), never pickle files. A pulled model must load (config, tensor index and
tokenizer are read) before it is registered."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoadError, TramontaneError
from ..progress import tracked
from .modelfile import Modelfile, ModelSettings

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
INFO = "tramontane.json"
WANTED = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "params.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tekken.json",
    "tokenizer.model",
    "tokenizer.model.v*",
)
PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.pickle")


class StoreError(TramontaneError):
    """A store operation failed: unknown name, bad name, unreachable hub, nothing to download."""


@dataclass
class StoredModel:
    name: str
    path: Path  # the folder, or the GGUF file inside it
    info: dict[str, Any]


def home() -> Path:
    return Path(os.environ.get("TRAMONTANE_HOME") or Path.home() / ".cache" / "tramontane").expanduser()


def models_dir() -> Path:
    return home() / "models"


def _check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise StoreError(f"model name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return name


def _weights_path(folder: Path) -> Path:
    ggufs = sorted(folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 and not (folder / "config.json").exists() else folder


def find(name: str) -> StoredModel | None:
    if not NAME.fullmatch(name):
        return None
    folder = models_dir() / name
    info_file = folder / INFO
    if not info_file.is_file():
        return None
    try:
        info = json.loads(info_file.read_text())
    except ValueError:
        info = {}
    return StoredModel(name, _weights_path(folder), info)


def list_models() -> list[StoredModel]:
    root = models_dir()
    if not root.is_dir():
        return []
    found = (find(p.name) for p in sorted(root.iterdir()) if p.is_dir())
    return [m for m in found if m is not None]


def remove(name: str) -> Path:
    model = find(_check_name(name))
    if model is None:
        raise StoreError(f"no stored model named {name!r} (see `tramontane list`)")
    folder = models_dir() / name
    try:
        if folder.is_symlink():  # the link only: what it points to is not the store's to delete
            folder.unlink()
        else:
            shutil.rmtree(folder)
    except OSError as exc:
        raise StoreError(f"could not remove {folder}: {exc.strerror or exc}") from None
    return folder


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _verify(path: Path) -> str:
    """The model loads: config, tensor index and tokenizer are read (LoadError otherwise)."""
    from .describe import describe

    try:
        return describe(path)["format"]
    except TramontaneError as exc:
        raise LoadError(path, f"the pulled model does not load: {exc}") from None


def _register(staging: Path, name: str, source: dict[str, Any]) -> StoredModel:
    kind = _verify(_weights_path(staging))
    info = {**source, "format": kind, "size": _size(staging), "pulled": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (staging / INFO).write_text(json.dumps(info, indent=2) + "\n")
    final = models_dir() / name
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return StoredModel(name, _weights_path(final), info)


def pull_local(path: Path, name: str | None = None) -> StoredModel:
    """Copy a local model folder (its model files only) or GGUF file into the store."""
    path = path.expanduser()
    name = _check_name(name or (path.stem if path.is_file() else path.name))
    staging = models_dir() / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if path.is_file():
            shutil.copyfile(path, staging / path.name)
        elif path.is_dir():
            for p in sorted(path.iterdir()):
                if p.is_file() and _wanted(p.name):
                    shutil.copyfile(p, staging / p.name)
        else:
            raise StoreError(f"{path}: no such file or folder")
        return _register(staging, name, {"source": str(path.resolve())})
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stored_info(path: Path) -> dict[str, Any] | None:
    """The tramontane.json of the stored model at `path` (its folder or the GGUF file in it), else None."""
    folder = path if path.is_dir() else path.parent
    info_file = folder / INFO
    if folder.parent.resolve() != models_dir().resolve() or not info_file.is_file():
        return None
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def created_name(path: Path) -> str | None:
    """The store name of the model at `path` when `tramontane create` made it (it is served by that name)."""
    info = _stored_info(path)
    return (path if path.is_dir() else path.parent).name if info and "modelfile" in info else None


def settings_for(path: Path) -> ModelSettings:
    """The Modelfile settings of the model at `path`: empty unless `tramontane create` made it."""
    stored = (_stored_info(path) or {}).get("modelfile")
    folder = path if path.is_dir() else path.parent
    return ModelSettings.read(stored, folder) if isinstance(stored, dict) else ModelSettings()


def _link(source: Path, target: Path) -> None:
    """A hard link (no second copy on disk, and the stored model outlives the file), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _base_of(modelfile: Modelfile) -> Path:
    """What FROM names: a file or folder (relative to the Modelfile), else a stored model (NAME[:latest])."""
    path = (modelfile.folder / modelfile.base).expanduser()
    if path.exists():
        return path
    stored = find(modelfile.base.removesuffix(":latest"))
    if stored is None:
        raise StoreError(
            f"FROM {modelfile.base[:200]!r}: no such file or folder (relative to the Modelfile), and no "
            "stored model of that name (see `tramontane list`)"
        )
    return stored.path


def _copy_adapter(source: Path, target: Path) -> None:
    """A PEFT adapter folder's config and safetensors weights (never pickle files)."""
    if not (source / "adapter_config.json").is_file():
        raise StoreError(f"ADAPTER {source}: not a LoRA adapter folder (PEFT's adapter_config.json is missing)")
    target.mkdir()
    for p in sorted(source.iterdir()):
        if p.is_file() and (p.name == "adapter_config.json" or p.suffix == ".safetensors"):
            shutil.copyfile(p, target / p.name)


def create(name: str, modelfile: Modelfile) -> StoredModel:
    """A stored model from a Modelfile: FROM's weights (hard-linked where the file system allows) with
    the Modelfile's settings over those of the model it builds on (modelfile.py)."""
    name = _check_name(name)
    base = _base_of(modelfile)
    settings = modelfile.settings.over(settings_for(base))
    staging = models_dir() / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        files = [base] if base.is_file() else [p for p in sorted(base.iterdir()) if p.is_file() and _wanted(p.name)]
        for f in files:
            _link(f, staging / f.name)
        if settings.adapter is not None:
            _copy_adapter(settings.adapter, staging / "adapter")
        info = {
            "source": f"Modelfile (FROM {modelfile.base})",
            "from": str(base.resolve()),
            "modelfile": settings.stored(),
        }
        return _register(staging, name, info)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _wanted(filename: str) -> bool:
    base = filename.rsplit("/", 1)[-1]
    if any(fnmatch.fnmatch(base, p) for p in PICKLES):
        return False
    return any(fnmatch.fnmatch(base, p) for p in WANTED) and "/" not in filename


def choose_files(files: list[str], gguf_file: str | None) -> list[str]:
    """What to download from a repository's file list (see the module docstring)."""
    if gguf_file is not None:
        if gguf_file not in files:
            raise StoreError(
                f"--file {gguf_file!r} is not in the repository (GGUF files there: "
                f"{', '.join(f for f in files if f.endswith('.gguf')) or 'none'})"
            )
        return [gguf_file]
    chosen = [f for f in files if _wanted(f)]
    consolidated = [f for f in chosen if f.startswith("consolidated") and f.endswith(".safetensors")]
    if "config.json" in chosen and any(f.startswith("model") and f.endswith(".safetensors") for f in chosen):
        chosen = [f for f in chosen if f not in consolidated and f != "params.json"]  # the HF layout
    if not any(f.endswith(".safetensors") for f in chosen):
        ggufs = [f for f in files if f.endswith(".gguf")]
        hint = f"; choose a GGUF file with --file ({', '.join(ggufs[:8])})" if ggufs else ""
        raise StoreError(f"the repository has no safetensors weights{hint}")
    return chosen


def gguf_of_type(files: list[str], tag: str) -> str:
    """The one GGUF file whose name ends in the type `tag` (case aside): "x.Q4_K_M.gguf", "x-q4_k_m.gguf"."""
    tag = tag.lower()
    found = [f for f in files if re.search(rf"(^|[./\-]){re.escape(tag)}\.gguf$", f.lower())]
    if len(found) != 1:
        ggufs = ", ".join(f for f in files if f.endswith(".gguf")) or "none"
        what = "no GGUF file" if not found else f"{len(found)} GGUF files"
        raise StoreError(f"the repository has {what} of type {tag.upper()} (GGUF files there: {ggufs[:400]})")
    return found[0]


def _http_errors() -> tuple[type[Exception], ...]:
    """The HTTP client errors huggingface_hub lets through (httpx, or its own copy `httpx2`)."""
    import importlib

    found = []
    for module in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _check_reachable(endpoint: str, repo_id: str) -> None:
    """One quick request to the hub before anything else: an offline machine gets its answer at once,
    not after huggingface_hub's retries with backoff (about half a minute), and no empty staging folder
    is left behind. Any HTTP answer, even an error, means the hub is there."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=10.0).close()
    except urllib.error.HTTPError:
        return  # an answer
    except (OSError, ValueError) as exc:  # URLError (refused, no DNS), timeouts, a malformed HF_ENDPOINT
        raise StoreError(
            f"cannot reach {endpoint} to download {repo_id!r}: {type(exc).__name__}: {str(exc)[:200]}; "
            "offline machines can import a local copy with `tramontane pull PATH`"
        ) from None


def _drop_if_empty(staging: Path) -> bool:
    """Remove a staging folder no byte has reached (a file in it, even huggingface_hub's .incomplete
    part of an interrupted download, keeps it for the next pull to resume); True if it was removed."""
    if any(p.is_file() for p in staging.rglob("*")):
        return False
    shutil.rmtree(staging, ignore_errors=True)
    return True


def pull_hub(
    repo_id: str,
    revision: str | None = None,
    name: str | None = None,
    gguf_file: str | None = None,
    *,
    gguf_tag: str | None = None,
    progress: bool = False,
) -> StoredModel:
    """Download a Hub repository's model files into the store (resumable: an interrupted pull picks up
    where it stopped the next time). `gguf_tag` ("Q4_K_M") chooses the repository's one GGUF file of
    that type, as Ollama's `hf.co/ORG/REPO:Q4_K_M`. With `progress`: huggingface_hub's bars per file
    on a terminal, and ours for the files; a plain line per file otherwise (progress.py)."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    name = _check_name(name or repo_id.rsplit("/", 1)[-1])
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    _check_reachable(endpoint, repo_id)
    staging = models_dir() / f".{name}.partial"  # kept on failure: huggingface_hub resumes from it
    staging.mkdir(parents=True, exist_ok=True)
    try:
        files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        wanted = choose_files(files, gguf_file if gguf_tag is None else gguf_of_type(files, gguf_tag))
        _download(repo_id, revision, wanted, staging, f"pull {name}", progress)
    except RepositoryNotFoundError:
        _drop_if_empty(staging)
        raise StoreError(f"no repository {repo_id!r} on {endpoint} (or it needs a token: set HF_TOKEN)") from None
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) + _http_errors() as exc:
        kept = "" if _drop_if_empty(staging) else f"; what arrived is kept in {staging}: the same pull resumes it"
        raise StoreError(
            f"cannot download {repo_id!r} from {endpoint}: {type(exc).__name__}: {str(exc)[:200]}{kept}; "
            "offline machines can import a local copy with `tramontane pull PATH`"
        ) from None
    shutil.rmtree(staging / ".cache", ignore_errors=True)
    return _register(staging, name, {"source": f"hf://{repo_id}", "revision": revision or "main", "files": wanted})


def _download(repo_id: str, revision: str | None, files: list[str], staging: Path, desc: str, show: bool) -> None:
    """The files into `staging`, one after the other, counted by progress.py; huggingface_hub's byte
    bars only where ours are bars (a terminal, when shown): in a pipe they would write carriage returns."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not (show and sys.stderr.isatty()) and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        for file in tracked(files, len(files), desc, "files", show):
            huggingface_hub.hf_hub_download(repo_id, file, revision=revision, local_dir=staging)
    finally:
        if quiet:
            enable_progress_bars()
