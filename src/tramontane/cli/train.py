"""`tramontane finetune` and `tramontane merge`: the fine-tuning half of the command line."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..errors import TramontaneError
from .help import add_command, add_model_argument

# flag -> (TrainConfig field, type, help); every flag defaults to None = "not given" (file or default wins)
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str, 'training data, JSONL: {"messages": [...]} or {"text": ...} per line'),
    ("--eval", "eval", str, "eval data in the same formats (eval loss every --eval-every steps)"),
    ("--out", "out", str, "output folder: adapter (PEFT layout), checkpoint/, metrics.jsonl, loss.png"),
    ("--seq-len", "seq_len", int, "tokens per packed row (default 1024); longer lines are errors"),
    ("--batch-size", "batch_size", int, "packed rows per micro-batch (default 4)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 1)"),
    ("--max-steps", "max_steps", int, "optimizer steps (default 100)"),
    ("--lr", "lr", float, "peak learning rate (default 1e-4)"),
    ("--warmup-steps", "warmup_steps", int, "linear warm-up steps, then cosine decay (default 10)"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate as a fraction of --lr (default 0.1)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (default 0)"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm, 0 = off (default 1.0)"),
    ("--rank", "rank", int, "LoRA rank (default 16)"),
    ("--alpha", "alpha", float, "LoRA alpha; the update is scaled by alpha / rank (default 32)"),
    ("--dropout", "dropout", float, "dropout on the LoRA input (default 0)"),
    ("--autocast", "autocast", str, "auto (default: bfloat16 where the CPU has it), bfloat16 or off"),
    ("--seed", "seed", int, "seed for initialisation, data order and dropout (default 0)"),
    ("--eval-every", "eval_every", int, "steps between eval losses (default: at the end only)"),
    ("--save-every", "save_every", int, "steps between checkpoints for --resume (default: none)"),
]

TRAIN_CHOICES = {"autocast": ("auto", "bfloat16", "off")}  # the flags whose values are a closed set


def add_train_parsers(sub: Any) -> None:
    ft = add_command(sub, "finetune")
    add_model_argument(ft, role="the base model: ")
    ft.add_argument("--config", default=None, metavar="FILE", help="settings file (.toml, .yaml, .json); flags win")
    for flag, dest, kind, text in TRAIN_FLAGS:
        ft.add_argument(flag, dest=dest, type=kind, default=None, help=text, choices=TRAIN_CHOICES.get(dest))
    ft.add_argument(
        "--targets",
        default=None,
        help="comma-separated modules (default wq,wk,wv,wo,w1,w2,w3,gate: "
        "on Mixtral, w1-w3 are every expert's and gate the router)",
    )
    ft.add_argument(
        "--activation-checkpointing",
        action="store_true",
        default=None,
        help="recompute activations in the backward pass (less memory, slower)",
    )
    ft.add_argument(
        "--quantized-base",
        action="store_true",
        default=None,
        help="keep a GGUF base packed (QLoRA-style) instead of dequantizing it",
    )
    ft.add_argument("--validate", action="store_true", help="check the data files and estimate time; no training")
    ft.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    merge = add_command(sub, "merge")
    add_model_argument(merge, optional=False, role="the base model the adapter was trained on: ")
    merge.add_argument("adapter", metavar="ADAPTER", help="adapter folder (PEFT layout)")
    merge.add_argument("--out", required=True, help="output folder")


def _config(ns: argparse.Namespace):
    from ..train.config import FIELD_TYPES, build_config

    overrides = {k: getattr(ns, k, None) for k in FIELD_TYPES}
    overrides["model"] = ns.model
    if ns.targets is not None:
        overrides["targets"] = tuple(t.strip() for t in ns.targets.split(",") if t.strip())
    return build_config(ns.config, overrides)


def cmd_finetune(ns: argparse.Namespace) -> int:
    cfg = _config(ns)
    if ns.validate:
        return validate(cfg)
    from ..train.loop import finetune
    from ..train.worker import follow_server

    follow_server()  # a no-op unless the server started this run for a fine-tuning job
    history = finetune(cfg, resume=ns.resume, progress=sys.stderr.isatty())
    last = history.train[-1] if history.train else None
    if last:
        print(f"step {int(last['step'])}: loss {last['loss']:.4f}; adapter written to {cfg.out}")
    return 0


def validate(cfg: Any) -> int:
    """Report every bad line of the data files, the token counts, and a time per epoch measured here."""
    from ..api import load
    from ..train.data import read_dataset

    if not cfg.data:
        raise TramontaneError("--validate needs --data FILE")
    llm = load(cfg.model, dtype="float32", packed=cfg.quantized_base)
    reports = [read_dataset(path, llm.tokenizer, cfg.seq_len) for path in (cfg.data, cfg.eval) if path]
    for report in reports:
        print(report.summary())
    train = reports[0]
    if train.examples:
        seconds = _seconds_per_token(llm.model, train, cfg)
        print(
            f"estimated time per epoch on this machine: {_duration(seconds * train.tokens)} "
            f"({1 / seconds:.0f} tokens/s forward and backward)"
        )
    return 1 if any(r.problems for r in reports) else 0


def _seconds_per_token(model: Any, report: Any, cfg: Any) -> float:
    """Time one forward+backward of a real micro-batch (after one warm-up) with the adapter applied."""
    from ..lora.layers import LoraSpec, apply_lora
    from ..train.data import batches
    from ..train.loop import autocast_dtype, loss_sum

    apply_lora(model, LoraSpec(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=tuple(cfg.targets)))
    model.gradient_checkpointing = cfg.activation_checkpointing
    batch = batches(report.examples, cfg.seq_len, cfg.batch_size, cfg.seed, 0)[0]
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        loss, _ = loss_sum(model, batch, autocast_dtype(cfg))
        loss.backward()
        best = min(best, time.perf_counter() - start)
    return best / max(1, int((batch.positions >= 0).sum()))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _generation_config(tokenizer: Any, folder: Any) -> None:
    """A merged folder's generation_config.json (the stop ids transformers and vLLM stop at), where the
    base's did not come along (a Mistral native folder has none)."""
    import json

    path = folder / "generation_config.json"
    if path.exists():
        return
    stops = sorted(tokenizer.stop_ids)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops}
    path.write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def cmd_merge(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from ..api import load
    from ..hub.resolve import resolve_model
    from ..lora.layers import merge_lora
    from ..lora.peft import load_adapter
    from ..weights.hf_writer import write_hf

    path = resolve_model(ns.model)
    llm = load(path, dtype="float32", packed=False)
    load_adapter(llm.model, Path(ns.adapter), "default")
    merge_lora(llm.model, "default")
    source_folder = Path(path).is_dir()
    write_hf(llm.model, Path(ns.out), tokenizer_source=path if source_folder else None, progress=True)
    if not source_folder and hasattr(llm.tokenizer, "save_hf"):  # a GGUF file: its vocabulary as tokenizer.json
        llm.tokenizer.save_hf(Path(ns.out))
    _generation_config(llm.tokenizer, Path(ns.out))
    print(f"merged model written to {ns.out}")
    return 0
