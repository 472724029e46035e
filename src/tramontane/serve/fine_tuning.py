"""Mistral's fine-tuning jobs in tramontane's terms: the request's shape, its hyperparameters as
`tramontane finetune` settings, a job's record as the API reports it (events, checkpoints, the
fine-tuned model's card), and where a job keeps its files. Pure: routes_fine_tuning.py checks
requests with it, finetune_runner.py runs the jobs.

    settings = train_settings(hyper, model="/models/smol.gguf", folder=job_folder, steps=40)
    job_folder / "config.json"   # those settings: `tramontane finetune --config` reads them
    job_folder / "out"           # the adapter, the checkpoint, checkpoints.jsonl, metrics.jsonl
    read_checkpoints(job_folder) # [{"metrics": {...}, "step_number": 40, "created_at": ...}, ...]

Hyperparameters map as Mistral documents them: `training_steps` (or `epochs`, turned into steps over
the packed training rows), `learning_rate`, `weight_decay` (default 0.1), `warmup_fraction` of the
steps (default 0.05), `seq_len`. A checkpoint (and an eval loss, with validation files) comes every
tenth of the steps; an interrupted job resumes from the last one."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..train.loop import CHECKPOINT, CHECKPOINT_METRICS

FINE_TUNING = "fine_tuning"  # the jobs' kind in the JobStore
STATUSES = (
    "QUEUED",
    "STARTED",
    "VALIDATING",
    "VALIDATED",
    "RUNNING",
    "FAILED_VALIDATION",
    "FAILED",
    "SUCCESS",
    "CANCELLED",
    "CANCELLATION_REQUESTED",
)
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,18}")
MAX_STEPS = 100_000
CHECKPOINTS = 10  # checkpoints (and eval losses) per job


class TrainingFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file_id: str
    weight: float = Field(default=1.0, gt=0, le=100)


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    training_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    weight_decay: float | None = Field(default=None, ge=0, le=10)
    warmup_fraction: float | None = Field(default=None, ge=0, le=1)
    epochs: float | None = Field(default=None, gt=0, le=1000)
    seq_len: int | None = Field(default=None, ge=8)
    fim_ratio: float | None = Field(default=None, ge=0, le=1)


class CreateFineTuningJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    hyperparameters: Hyperparameters
    training_files: list[TrainingFile] = Field(default_factory=list)
    validation_files: list[str] | None = None
    suffix: str | None = None
    integrations: list[dict[str, Any]] | None = None
    auto_start: bool | None = None
    invalid_sample_skip_percentage: float | None = Field(default=None, ge=0, le=0.5)
    job_type: str | None = None
    repositories: list[dict[str, Any]] | None = None
    classifier_targets: list[dict[str, Any]] | None = None


def refused_fields(body: CreateFineTuningJob) -> tuple[str, str] | None:
    """(field, why) for a feature of Mistral's service this engine does not offer, else None."""
    if body.integrations:
        return "integrations", "integrations (Weights & Biases) need the internet; this server trains offline"
    if body.repositories:
        return "repositories", "GitHub repositories as training data are not available here: upload files"
    if body.job_type not in (None, "completion"):
        return "job_type", f"only completion fine-tuning is available here, not {body.job_type[:40]!r}"
    if body.classifier_targets:
        return "classifier_targets", "classifier fine-tuning is not available here"
    if body.hyperparameters.fim_ratio:
        return "hyperparameters.fim_ratio", "fill-in-the-middle training is not available here: give 0 or none"
    if body.suffix is not None and not SUFFIX.fullmatch(body.suffix):
        return "suffix", "suffix must be 1 to 18 letters, digits, '_' or '-'"
    if body.hyperparameters.training_steps is None and body.hyperparameters.epochs is None:
        return "hyperparameters.training_steps", "give training_steps or epochs"
    return None


def steps_for(hyper: Hyperparameters, rows: int, batch_size: int) -> int:
    """Optimizer steps: training_steps as given, else epochs over `rows` packed rows."""
    if hyper.training_steps is not None:
        return hyper.training_steps
    per_epoch = math.ceil(rows / batch_size)
    return max(1, min(MAX_STEPS, math.ceil((hyper.epochs or 1.0) * per_epoch)))


def filled(hyper: Hyperparameters, steps: int, seq_len: int) -> dict[str, Any]:
    """The hyperparameters as the job reports them: Mistral's defaults filled in."""
    return {
        "training_steps": steps,
        "learning_rate": hyper.learning_rate,
        "weight_decay": 0.1 if hyper.weight_decay is None else hyper.weight_decay,
        "warmup_fraction": 0.05 if hyper.warmup_fraction is None else hyper.warmup_fraction,
        "epochs": hyper.epochs,
        "seq_len": seq_len,
        "fim_ratio": hyper.fim_ratio,
    }


def train_settings(hyper: dict[str, Any], *, model: str, folder: Path, validation: bool) -> dict[str, Any]:
    """`tramontane finetune` settings (train/config.py) for a job's filled hyperparameters."""
    steps = hyper["training_steps"]
    every = max(1, steps // CHECKPOINTS)
    return {
        "model": model,
        "data": str(folder / "train.jsonl"),
        "eval": str(folder / "valid.jsonl") if validation else None,
        "out": str(folder / "out"),
        "seq_len": hyper["seq_len"],
        "max_steps": steps,
        "lr": hyper["learning_rate"],
        "weight_decay": hyper["weight_decay"],
        "warmup_steps": round(hyper["warmup_fraction"] * steps),
        "save_every": every,
        "eval_every": every if validation else 0,
        "quantized_base": model.endswith(".gguf"),  # a GGUF base stays packed (a 7B in f32 needs 28 GB)
    }


def fine_tuned_id(base: str, suffix: str | None, job_id: str) -> str:
    """The model a finished job registers: ft:BASE:SUFFIX:ID (ft:BASE:ID without a suffix)."""
    return ":".join(["ft", base, *([suffix] if suffix else []), job_id[:8]])


def adapter_name(job_id: str) -> str:
    """The engine's name for a job's adapter (engine adapter names hold no '.' or ':')."""
    return "ft-" + job_id


def new_job(body: CreateFineTuningJob, hyper: dict[str, Any], data_tokens: int, tokens_per_step: int) -> dict[str, Any]:
    now = int(time.time())
    auto_start = body.auto_start is not False
    status = "QUEUED" if auto_start else "VALIDATED"
    return {
        "object": "job",
        "job_type": "completion",
        "model": body.model,
        "status": status,
        "created_at": now,
        "modified_at": now,
        "auto_start": auto_start,
        "training_files": [f.file_id for f in body.training_files],
        "validation_files": body.validation_files or [],
        "hyperparameters": hyper,
        "suffix": body.suffix,
        "fine_tuned_model": None,
        "integrations": [],
        "repositories": [],
        "trained_tokens": None,
        "metadata": {
            "expected_duration_seconds": None,
            "cost": 0.0,
            "cost_currency": "EUR",
            "train_tokens_per_step": tokens_per_step,
            "train_tokens": tokens_per_step * hyper["training_steps"],
            "data_tokens": data_tokens,
            "estimated_start_time": None,
        },
        "events": [event(status, when=now)],
        "model_card": {"name": None, "description": None, "archived": False},
    }


def event(status: str, data: dict[str, Any] | None = None, when: int | None = None) -> dict[str, Any]:
    """A job's event as Mistral's API reports one: a change of status, with what goes with it."""
    return {
        "name": "status-updated",
        "created_at": when or int(time.time()),
        "data": {"status": status, **(data or {})},
    }


def summary(job: dict[str, Any]) -> dict[str, Any]:
    """A job as lists and create report it: without events, checkpoints and our own bookkeeping."""
    return {k: v for k, v in job.items() if k not in ("events", "checkpoints", "model_card")}


def detailed(job: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A job as get reports it: with its events and its checkpoints' metrics, newest first."""
    return {**summary(job), "events": job.get("events", []), "checkpoints": read_checkpoints(folder)}


def read_checkpoints(folder: Path) -> list[dict[str, Any]]:
    path = folder / "out" / CHECKPOINT_METRICS
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
            by_step[int(line["step"])] = line  # the last line of a step: a resumed run wrote it again
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash
    return [
        {
            "metrics": {
                "train_loss": line.get("train_loss"),
                "valid_loss": line.get("valid_loss"),
                "valid_mean_token_accuracy": None,
            },
            "step_number": step,
            "created_at": line.get("created_at", 0),
        }
        for step, line in sorted(by_step.items(), reverse=True)
    ]


def has_checkpoint(folder: Path) -> bool:
    return (folder / "out" / CHECKPOINT / "state.pt").is_file()


def model_card(job: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuned model as /v1/fine_tuning/models/{id} reports it (Mistral's completion card)."""
    card = job.get("model_card") or {}
    return {
        "id": job["fine_tuned_model"],
        "object": "model",
        "created": job.get("modified_at") or job["created_at"],
        "owned_by": "tramontane",
        "workspace_id": "local",
        "root": job["model"],
        "root_version": "local",
        "archived": bool(card.get("archived")),
        "name": card.get("name"),
        "description": card.get("description"),
        "capabilities": {"completion_chat": True, "completion_fim": False, "function_calling": False},
        "max_context_length": card.get("max_context_length", 32768),
        "aliases": [],
        "job": job["id"],
        "model_type": "completion",
    }
