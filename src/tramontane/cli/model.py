"""`tramontane convert`: a model between the three weight formats.

    tramontane convert MODEL --to hf|mistral|gguf [--type f16|q8_0|q4_0|q4_1|q5_0|q5_1|q4_k|q6_k] --out PATH

The model is loaded in float32 (GGUF blocks dequantized), then written by the format's writer
(weights/hf_writer.py, native_writer.py, gguf_writer.py). Tokenizers: a folder's tokenizer files are
copied to hf/mistral outputs and a GGUF file's vocabulary is written as tokenizer.json; a GGUF output
takes a GGUF source's `tokenizer.*` metadata unchanged, or a folder's tokenizer converted by
gguf_tokenizer.py (byte-level BPE tokenizer.json, Mistral SentencePiece files)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import TramontaneError
from .help import RenamedFlag, add_command, add_model_argument

TARGETS = ("hf", "mistral", "gguf")
QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k")


def add_store_parsers(sub: Any) -> None:
    add_command(sub, "list")
    rm = add_command(sub, "rm")
    rm.add_argument("name", metavar="NAME", help="the stored model's name, as `tramontane list` shows it")
    pull = add_command(sub, "pull")
    pull.add_argument(
        "source", metavar="REPO_ID|PATH", help="a Hugging Face repo id (owner/name) or a local file or folder"
    )
    pull.add_argument("--revision", default=None, help="branch, tag or commit (Hub only)")
    pull.add_argument("--name", default=None, help="name in the store (default: the repo's or file's name)")
    pull.add_argument("--file", default=None, metavar="FILE.gguf", help="the one GGUF file to download (Hub only)")
    create = add_command(sub, "create")
    create.add_argument("name", metavar="NAME", help="the new model's name in the store")
    create.add_argument(
        "-f", "--file", type=Path, default=Path("Modelfile"), metavar="MODELFILE", help="default: ./Modelfile"
    )


def cmd_create(ns: argparse.Namespace) -> int:
    from ..hub.modelfile import parse_modelfile
    from ..hub.store import create

    try:
        text = ns.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TramontaneError(f"cannot read the Modelfile {ns.file}: {getattr(exc, 'strerror', None) or exc}") from None
    stored = create(ns.name, parse_modelfile(text, ns.file.resolve().parent, str(ns.file)))
    settings = stored.info["modelfile"]
    if settings["adapter"]:
        from ..api import load
        from ..hub.store import remove

        try:
            load(ns.name)  # the adapter fits the weights (else the error names its first mismatch)
        except TramontaneError:
            remove(ns.name)
            raise
    if settings["template"]:
        print(
            "note: TEMPLATE is kept (shown by /api/show); chats are formatted with the model's own chat template",
            file=sys.stderr,
        )
    print(f"created {stored.name} from {stored.info['from']}: `tramontane run {stored.name}`")
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    from ..hub.store import home, list_models

    models = list_models()
    if not models:
        print(f"no models in {home()} (add one with `tramontane pull`)")
        return 0
    rows = [("NAME", "SOURCE", "SIZE", "TYPE", "MODIFIED")]
    for m in models:
        pulled = str(m.info.get("pulled", ""))
        modified = f"{pulled[:10]} {pulled[11:16]}" if len(pulled) >= 16 else "?"
        size = f"{m.info.get('size', 0) / 1e9:.2f} GB"
        rows.append((m.name, str(m.info.get("source", "?")), size, str(m.info.get("format", "?")), modified))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) + "  " + row[4])
    return 0


def cmd_rm(ns: argparse.Namespace) -> int:
    from ..hub.store import remove

    print(f"removed {remove(ns.name)}")
    return 0


def cmd_pull(ns: argparse.Namespace) -> int:
    from ..hub.store import pull_hub, pull_local

    local = Path(ns.source).expanduser()
    if local.exists():
        if ns.revision or ns.file:
            raise TramontaneError("--revision and --file apply to Hub downloads, not to a local path")
        stored = pull_local(local, ns.name)
    else:
        stored = pull_hub(ns.source, ns.revision, ns.name, ns.file, progress=True)
    print(
        f"pulled {ns.source} as {stored.name} ({stored.info['format']}, {stored.info['size'] / 1e9:.2f} GB): "
        f"`tramontane run {stored.name}`"
    )
    return 0


def add_model_parsers(sub: Any) -> None:
    conv = add_command(sub, "convert")
    add_model_argument(conv, optional=False)
    conv.add_argument(
        "--to",
        required=True,
        choices=TARGETS,
        help="hf: a Hugging Face folder (safetensors); mistral: Mistral's native folder; gguf: one GGUF file",
    )
    conv.add_argument(
        "--type",
        "--quant",
        dest="type",
        action=RenamedFlag,
        choices=QUANTS,
        default=None,
        help="the weights' type in the file written: GGUF: f32, f16 (default) or a block format; hf/mistral: "
        "f32 (default) or f16 (--quant: its old name)",
    )
    conv.add_argument("--out", required=True, type=Path, metavar="PATH", help="folder (hf, mistral) or .gguf file")


def _tokenizer_metadata(loaded: Any, source: Path) -> dict[str, Any] | None:
    """A GGUF output's tokenizer keys: a GGUF source's own; None for a source without a tokenizer."""
    if loaded.format == "gguf":
        return {k: v for k, v in loaded.metadata.items() if k.startswith("tokenizer.")}
    from ..text.gguf_tokenizer import gguf_tokenizer_metadata
    from ..text.tokenizer import HF_FILES, MISTRAL_FILES, load_tokenizer

    if not any(any(source.glob(p)) for p in (*MISTRAL_FILES, *HF_FILES[:1])):
        return None  # weights only (a test model, say): the GGUF file has no vocabulary
    return gguf_tokenizer_metadata(load_tokenizer(source))


def _type_counts(path: Path) -> str:
    """The tensors of a written GGUF file by type, most first: "Q5_0 x181, F32 x61, Q4_K x30"."""
    from collections import Counter

    from ..weights.gguf import open_gguf

    with open_gguf(path) as f:  # our reader: the gguf package's parses every vocabulary string (seconds on SmolLM2)
        counts = Counter(t.type_name for t in f.tensors.values())
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())


def cmd_convert(ns: argparse.Namespace) -> int:
    import torch

    from ..build.load import load_model
    from ..hub.resolve import resolve_model

    source = resolve_model(ns.model)
    quant = ns.type or ("f16" if ns.to == "gguf" else "f32")
    if ns.to != "gguf" and quant not in ("f32", "f16"):
        raise TramontaneError(f"--type {quant} is a GGUF block format; --to {ns.to} writes f32 or f16")
    loaded = load_model(source, dtype=torch.float32, packed=False)
    model = loaded.model
    if ns.to == "gguf":
        from ..weights.gguf_writer import write_gguf

        tokenizer = _tokenizer_metadata(loaded, Path(source))
        float_type = "f32" if quant == "f32" else "f16"
        write_gguf(
            model,
            ns.out,
            tokenizer,
            name=Path(source).stem,
            float_type=float_type,
            quant=None if quant in ("f32", "f16") else quant,
            progress=True,
        )
        print(f"wrote {_type_counts(ns.out)}")
    else:
        if quant == "f16":
            model = model.to(torch.float16)
        folder_source = Path(source) if Path(source).is_dir() else None
        if ns.to == "hf":
            from ..weights.hf_writer import write_hf

            write_hf(model, ns.out, tokenizer_source=folder_source, progress=True)
        else:
            from ..weights.native_writer import write_native

            write_native(model, ns.out, tokenizer_source=folder_source)
        if folder_source is None and "tokenizer.ggml.tokens" in loaded.metadata:  # a GGUF file's vocabulary
            from ..text.tokenizer import tokenizer_from_gguf

            tokenizer_from_gguf(loaded.metadata, str(source)).save_hf(ns.out)
    print(f"{source} -> {ns.out} ({ns.to}, {quant})")
    return 0
