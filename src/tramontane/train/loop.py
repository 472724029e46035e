"""The fine-tuning loop: LoRA adapters on a frozen base model.

AdamW on the adapter parameters only, linear warm-up then cosine decay, gradient accumulation (the loss
is the mean over every target token of the optimizer step, so accumulation does not change it),
gradient clipping, optional activation checkpointing and bfloat16 autocast, packed rows whose
sequences attend only within themselves, an eval loss every N steps, checkpoints every N steps that
`resume` continues exactly (same data order, optimizer and RNG state), and at the end the adapter in
PEFT's layout, metrics.jsonl and a loss plot in the output folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError, TramontaneError
from ..model.transformer import Transformer
from ..text.tokenizer import Tokenizer
from .config import TrainConfig
from .data import Batch, DataReport, batches, read_dataset

CHECKPOINT = "checkpoint"  # folder inside `out` holding the last checkpoint
CHECKPOINT_METRICS = "checkpoints.jsonl"  # in `out`: one line per checkpoint (step, train and eval loss)


class DataError(TramontaneError):
    """A training or eval file has bad lines; the message lists every one (training does not start)."""


@dataclass
class History:
    train: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr", "tokens_per_s"}
    eval: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss"}


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of cfg.lr for optimizer step `s` (0-based): linear warm-up, then cosine to min_lr_ratio."""

    def factor(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        progress = (s - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return factor


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    if cfg.autocast == "off":
        return None
    if cfg.autocast == "bfloat16":
        return torch.bfloat16
    from ..device import cpu_supports_bf16

    return torch.bfloat16 if cpu_supports_bf16() else None


def loss_sum(model: Transformer, batch: Batch, dtype: torch.dtype | None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the batch's targets, and their count."""
    context = torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with context:
        h = model.hidden_states(batch.tokens, batch.positions, None, batch.segments)  # [B,T,dim]
    keep = batch.targets != -100  # [B,T]
    logits = model.logits(h[keep].float())  # [N,V]: only the positions that carry a loss
    return F.cross_entropy(logits, batch.targets[keep], reduction="sum"), int(keep.sum())


def micro_batches(examples: list, cfg: TrainConfig, epoch: int, index: int) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, index, batch) from the cursor on, epoch after epoch, in the seeded order."""
    while True:
        for i, batch in enumerate(batches(examples, cfg.seq_len, cfg.batch_size, cfg.seed, epoch)):
            if i >= index:
                yield epoch, i, batch
        epoch, index = epoch + 1, 0


def evaluate(model: Transformer, report: DataReport, cfg: TrainConfig) -> float:
    """Mean token loss over the eval data."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(report.examples, cfg.seq_len, cfg.batch_size, cfg.seed, 0):
            s, n = loss_sum(model, batch, autocast_dtype(cfg))
            total, count = total + s.item(), count + n
    model.train(was_training)
    return total / max(1, count)


def read_checked(path: str, tokenizer: Tokenizer, cfg: TrainConfig) -> DataReport:
    report = read_dataset(path, tokenizer, cfg.seq_len)
    if report.problems:
        raise DataError(f"{path}: {len(report.problems)} bad line(s); nothing was trained\n{report.summary()}")
    if not report.examples:
        raise DataError(f"{path}: no examples")
    return report


class Trainer:
    """One fine-tuning run: model with LoRA applied, optimizer, schedule, data cursor and history."""

    def __init__(self, cfg: TrainConfig, model: Transformer, tokenizer: Tokenizer) -> None:
        from ..lora.layers import LoraSpec, apply_lora

        if not cfg.data or not cfg.out:
            raise ConfigError("fine-tuning needs data (--data FILE) and an output folder (--out DIR)")
        self.cfg, self.model, self.out = cfg, model, Path(cfg.out)
        self.train_data = read_checked(cfg.data, tokenizer, cfg)
        self.eval_data = read_checked(cfg.eval, tokenizer, cfg) if cfg.eval else None
        self.spec = LoraSpec(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=tuple(cfg.targets))
        apply_lora(model, self.spec, seed=cfg.seed)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        model.gradient_checkpointing = cfg.activation_checkpointing
        self.optimizer = torch.optim.AdamW([p for _, p in self.named], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        self.step, self.epoch, self.index = 0, 0, 0
        self.history = History()
        torch.manual_seed(cfg.seed)  # adapter dropout draws from the global generator (saved in checkpoints)

    def one_step(self, stream: Iterator[tuple[int, int, Batch]]) -> dict[str, float]:
        """One optimizer step over cfg.grad_accum micro-batches."""
        cfg, dtype = self.cfg, autocast_dtype(self.cfg)
        group = [next(stream) for _ in range(cfg.grad_accum)]
        targets = sum(int((b.targets != -100).sum()) for _, _, b in group)
        start, total, tokens = time.perf_counter(), 0.0, 0
        self.model.train()
        for _, _, batch in group:
            s, _ = loss_sum(self.model, batch, dtype)
            (s / max(1, targets)).backward()
            total, tokens = total + s.item(), tokens + int((batch.positions >= 0).sum())
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.epoch, self.index = group[-1][0], group[-1][1] + 1
        seconds = time.perf_counter() - start
        return {"step": self.step, "loss": total / max(1, targets), "lr": lr, "tokens_per_s": tokens / seconds}

    def run(self, progress: bool = True, stop_after: int | None = None) -> History:
        """Train up to cfg.max_steps (or stop_after steps of this call: a test's interruption)."""
        from tqdm import tqdm

        cfg = self.cfg
        stream = micro_batches(self.train_data.examples, cfg, self.epoch, self.index)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="fine-tuning", unit="step", disable=not progress)
        done = 0
        while self.step < cfg.max_steps and (stop_after is None or done < stop_after):
            record = self.one_step(stream)
            self.history.train.append(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            bar.update(1)
            done += 1
            if self.eval_data and cfg.eval_every and self.step % cfg.eval_every == 0:
                self.history.eval.append({"step": self.step, "loss": evaluate(self.model, self.eval_data, cfg)})
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.step >= cfg.max_steps:
            self.finish()
        return self.history

    def finish(self) -> None:
        """The adapter (PEFT layout), settings, metrics and loss plot in the output folder."""
        from ..lora.peft import save_adapter
        from .plot import plot_losses

        cfg = self.cfg
        if self.eval_data and not any(e["step"] == self.step for e in self.history.eval):
            self.history.eval.append({"step": self.step, "loss": evaluate(self.model, self.eval_data, cfg)})
        self.out.mkdir(parents=True, exist_ok=True)
        save_adapter(self.model, self.out, "default", self.spec, base_model=str(cfg.model or "default"))
        (self.out / "training_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
        with open(self.out / "metrics.jsonl", "w") as f:
            for kind, rows in (("train", self.history.train), ("eval", self.history.eval)):
                for row in rows:
                    f.write(json.dumps({"kind": kind, **row}) + "\n")
        plot_losses(self.history, self.out / "loss.png")

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        folder = self.out / CHECKPOINT
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "index": self.index,
            "lora": {n: p.detach().clone() for n, p in self.named},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": json.dumps(self.history.__dict__),
            "config": json.dumps(self.cfg.to_json()),
        }
        tmp = folder / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / "state.pt")  # a crash while saving leaves the previous checkpoint whole
        self._log_checkpoint()  # listed once it is on disk: a job stopped between the two resumes from it
        return folder

    def _log_checkpoint(self) -> None:
        """A line in out/checkpoints.jsonl: the mean train loss since the previous checkpoint and the eval
        loss at this step (None without eval data). Written before the state, so a crash in between
        leaves a line that the resumed run writes again (readers keep the last line of each step)."""
        since = [r["loss"] for r in self.history.train if r["step"] > self.step - self.cfg.save_every]
        valid = [e["loss"] for e in self.history.eval if e["step"] == self.step]
        line = {
            "step": self.step,
            "train_loss": sum(since) / len(since) if since else None,
            "valid_loss": valid[-1] if valid else None,
            "created_at": int(time.time()),
        }
        with open(self.out / CHECKPOINT_METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def resume(self) -> None:
        path = self.out / CHECKPOINT / "state.pt"
        if not path.is_file():
            raise ConfigError(f"{path}: no checkpoint to resume from (run with --save-every N first)")
        try:
            state = torch.load(path, weights_only=True)
        except Exception as exc:
            raise ConfigError(f"{path}: unreadable checkpoint: {exc}") from None
        self._check_compatible(path, json.loads(state["config"]))
        params = dict(self.named)
        with torch.no_grad():
            for name, tensor in state["lora"].items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self.history = History(**json.loads(state["history"]))
        self.step, self.epoch, self.index = state["step"], state["epoch"], state["index"]

    def _check_compatible(self, path: Path, saved: dict[str, Any]) -> None:
        keys = ("seq_len", "batch_size", "grad_accum", "seed", "rank", "alpha", "targets", "data")
        now = self.cfg.to_json()
        changed = [k for k in keys if saved.get(k) != now.get(k)]
        if changed:
            raise ConfigError(
                f"{path}: the checkpoint was made with other settings for "
                f"{', '.join(f'{k} ({saved.get(k)!r} -> {now.get(k)!r})' for k in changed)}"
            )


def finetune(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None
) -> History:
    """Load cfg.model in float32 (or packed, cfg.quantized_base) and train a LoRA adapter into cfg.out."""
    from ..api import load

    llm = load(cfg.model, dtype="float32", packed=cfg.quantized_base, progress=progress)
    trainer = Trainer(cfg, llm.model, llm.tokenizer)
    if resume:
        trainer.resume()
    return trainer.run(progress=progress, stop_after=stop_after)
