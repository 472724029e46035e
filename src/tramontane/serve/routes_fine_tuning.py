"""Mistral's fine-tuning API: jobs (`/v1/fine_tuning/jobs`: create, list, get, start, cancel) and the
models they make (`/v1/fine_tuning/models/{id}`: rename and describe, archive, unarchive).

A job trains a LoRA adapter on the served model from files uploaded with purpose "fine-tune"
(checked at upload, and again here against the job's `seq_len`); finetune_runner.py runs it in a
worker process. Its model, `ft:BASE:SUFFIX:ID`, is served next to the base model once it succeeds.
Created with `auto_start: false`, a job waits VALIDATED until started."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ..errors import TramontaneError
from ..parallel.dist import is_parallel
from .common import engine_for, parse_body, server_state
from .errors import APIError, bad_request
from .fine_tuning import (
    FINE_TUNING,
    STATUSES,
    CreateFineTuningJob,
    detailed,
    event,
    filled,
    model_card,
    new_job,
    refused_fields,
    steps_for,
    summary,
    train_settings,
)
from .finetune_runner import FineTuneRunner, job_folder, write_inputs
from .routes_files import check_page

router = APIRouter(prefix="/v1/fine_tuning")

MAX_WAITING = 100  # jobs queued or waiting to be started, at most
MAX_REPEATS = 100  # copies of the training files the weights make, in all
BATCH_SIZE = 4  # packed rows per step (train/config.py's default)
DEFAULT_SEQ_LEN = 1024


class UpdateModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    description: str | None = None


def runner(request: Request) -> FineTuneRunner:
    state = server_state(request)
    if state.fine_tuning is None:
        engine_for(request, None)  # 503 while the model loads
        state.fine_tuning = FineTuneRunner(state, state.file_limits.fine_tuning_workers)
        state.fine_tuning.start()
    return state.fine_tuning


def _job(request: Request, job_id: str) -> dict[str, Any]:
    job = server_state(request).jobs.get(FINE_TUNING, job_id)
    if job is None:
        raise APIError(404, f"no fine-tuning job {job_id[:100]!r}", param="job_id", code="job_not_found")
    return job


def _files(request: Request, ids: list[str], field: str) -> list[Path]:
    files = server_state(request).files
    paths = []
    for file_id in ids:
        record = files.get(file_id)
        if record is None or record.purpose != "fine-tune":
            raise bad_request(f"{file_id[:100]!r} is not a file uploaded with purpose fine-tune", field)
        paths.append(files.path(record))
    return paths


def _read(request: Request, path: Path, seq_len: int, field: str) -> tuple[int, int]:
    """(packed rows, tokens) of a training file at the job's seq_len; a 400 with its bad lines."""
    from ..train.data import pack, read_dataset

    engine = engine_for(request, None)
    try:
        report = read_dataset(path, engine.tokenizer, seq_len)
    except TramontaneError as exc:
        raise bad_request(str(exc), field) from None
    if report.problems:
        reasons = "\n".join(f"line {p.line}: {p.reason}" for p in report.problems[:20])
        raise bad_request(f"{len(report.problems)} line(s) do not fit seq_len {seq_len}:\n{reasons}", field)
    return len(pack(report.examples, seq_len)), report.tokens


def _prepare(request: Request, body: CreateFineTuningJob) -> dict[str, Any]:
    """Check everything (a 400 naming the field), write the job's inputs, and store it."""
    state = server_state(request)
    refused = refused_fields(body)
    if refused:
        raise bad_request(refused[1], refused[0])
    engine = engine_for(request, None)
    if body.model != state.model_name:
        raise APIError(
            404,
            f"fine-tuning trains the served model {state.model_name!r}, not {body.model[:100]!r}",
            param="model",
            code="model_not_found",
        )
    if state.model_path is None or is_parallel():
        raise bad_request("this server cannot fine-tune: its model has no file here, or is split over ranks", "model")
    if not body.training_files:
        raise bad_request("training_files must name at least one file", "training_files")
    waiting = state.jobs.list(FINE_TUNING, status=["QUEUED", "VALIDATED", "RUNNING"], page_size=1)[1]
    if waiting >= MAX_WAITING:
        raise APIError(429, f"{waiting} fine-tuning jobs already wait; try again later", code="too_many_jobs")
    seq_len = body.hyperparameters.seq_len or min(DEFAULT_SEQ_LEN, engine.max_model_len)
    if seq_len > engine.max_model_len:
        raise bad_request(f"seq_len must be at most the model's context, {engine.max_model_len}", "hyperparameters")
    train = _files(request, [f.file_id for f in body.training_files], "training_files")
    valid = _files(request, body.validation_files or [], "validation_files")
    lightest = min(f.weight for f in body.training_files)
    repeats = [max(1, round(f.weight / lightest)) for f in body.training_files]
    if sum(repeats) > MAX_REPEATS:
        raise bad_request(
            f"the weights repeat the training files {sum(repeats)} times in all; at most {MAX_REPEATS}",
            "training_files",
        )
    rows, tokens = 0, 0
    for path, repeat in zip(train, repeats, strict=True):
        r, t = _read(request, path, seq_len, "training_files")
        rows, tokens = rows + r * repeat, tokens + t * repeat
    for path in valid:
        _read(request, path, seq_len, "validation_files")
    hyper = filled(body.hyperparameters, steps_for(body.hyperparameters, rows, BATCH_SIZE), seq_len)
    job = new_job(body, hyper, tokens, seq_len * BATCH_SIZE)
    status = job["status"]
    job = state.jobs.add(FINE_TUNING, {**job, "status": "VALIDATING"})  # no worker takes it before its inputs
    folder = job_folder(state, job["id"])
    settings = train_settings(hyper, model=str(state.model_path), folder=folder, validation=bool(valid))
    try:
        write_inputs(folder, settings, list(zip(train, repeats, strict=True)), valid)
    except OSError as exc:
        state.jobs.update(
            job["id"], append={"events": event("FAILED_VALIDATION", {"error": str(exc)})}, status="FAILED_VALIDATION"
        )
        raise APIError(507, f"the job's training data could not be written: {exc}", code="storage_error") from None
    return state.jobs.update(job["id"], status=status)


@router.post("/jobs")
async def create_job(request: Request) -> JSONResponse:
    body = await parse_body(request, CreateFineTuningJob)
    job = await asyncio.to_thread(_prepare, request, body)
    runner(request).wake()
    return JSONResponse(summary(job))


@router.get("/jobs")
async def list_jobs(
    request: Request,
    page: int = 0,
    page_size: int = 100,
    model: str | None = None,
    status: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
    suffix: str | None = None,
) -> JSONResponse:
    check_page(page, page_size)
    if status is not None and status not in STATUSES:
        raise bad_request(f"status must be one of {', '.join(STATUSES)}", "status")
    jobs, total = await asyncio.to_thread(
        server_state(request).jobs.list, FINE_TUNING, status=[status] if status else None, model=model, page_size=10_000
    )
    jobs = [
        j for j in jobs if _within(j, created_after, created_before) and (suffix is None or j.get("suffix") == suffix)
    ]
    page_jobs = jobs[page * page_size : (page + 1) * page_size]
    return JSONResponse({"data": [summary(j) for j in page_jobs], "object": "list", "total": len(jobs)})


def _within(job: dict[str, Any], after: str | None, before: str | None) -> bool:
    from datetime import datetime

    def stamp(text: str | None, field: str) -> float | None:
        if text is None:
            return None
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise bad_request(f"{field} must be an ISO 8601 date-time, got {text[:60]!r}", field) from None

    low, high = stamp(after, "created_after"), stamp(before, "created_before")
    return (low is None or job["created_at"] >= low) and (high is None or job["created_at"] <= high)


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> JSONResponse:
    job = await asyncio.to_thread(_job, request, job_id)
    state = server_state(request)
    return JSONResponse(await asyncio.to_thread(detailed, job, job_folder(state, job_id)))


@router.post("/jobs/{job_id}/start")
async def start_job(request: Request, job_id: str) -> JSONResponse:
    job = await asyncio.to_thread(_job, request, job_id)
    if job["status"] != "VALIDATED":
        raise bad_request(f"only a job waiting VALIDATED can be started; this one is {job['status']}", "job_id")
    jobs = server_state(request).jobs
    job = await asyncio.to_thread(
        jobs.update, job_id, when=("VALIDATED",), append={"events": event("QUEUED")}, status="QUEUED"
    )
    runner(request).wake()
    return JSONResponse(await asyncio.to_thread(detailed, job, job_folder(server_state(request), job_id)))


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    """A job no worker runs yet ends CANCELLED at once; a running one when its worker has stopped."""
    jobs = server_state(request).jobs
    await asyncio.to_thread(_job, request, job_id)
    job = await asyncio.to_thread(
        jobs.update, job_id, when=("QUEUED", "VALIDATED"), append={"events": event("CANCELLED")}, status="CANCELLED"
    )
    if job["status"] == "RUNNING":
        job = await asyncio.to_thread(
            jobs.update,
            job_id,
            when=("RUNNING",),
            append={"events": event("CANCELLATION_REQUESTED")},
            status="CANCELLATION_REQUESTED",
        )
        if server_state(request).fine_tuning is not None:
            server_state(request).fine_tuning.wake()  # its worker stops, or, if it has none, it ends at once
    return JSONResponse(await asyncio.to_thread(detailed, job, job_folder(server_state(request), job_id)))


# ---- the models jobs made ------------------------------------------------------------------------
def fine_tuned_job(request: Request, model_id: str) -> dict[str, Any]:
    state = server_state(request)
    jobs, _ = state.jobs.list(FINE_TUNING, status=["SUCCESS"], page_size=10_000)
    for job in jobs:
        if job.get("fine_tuned_model") == model_id:
            return job
    raise APIError(404, f"no fine-tuned model {model_id[:100]!r}", param="model_id", code="model_not_found")


def fine_tuned_cards(request: Request) -> list[dict[str, Any]]:
    """Every fine-tuned model of this server's base model, archived ones too."""
    state = server_state(request)
    jobs, _ = state.jobs.list(FINE_TUNING, status=["SUCCESS"], model=state.model_name, page_size=10_000)
    return [_card(request, job) for job in jobs]


def _card(request: Request, job: dict[str, Any]) -> dict[str, Any]:
    engine = engine_for(request, None)
    card = model_card(job)
    return {**card, "max_context_length": engine.max_model_len}


def _set_card(request: Request, model_id: str, **changes: Any) -> dict[str, Any]:
    state = server_state(request)
    job = fine_tuned_job(request, model_id)
    job = state.jobs.update(job["id"], merge={"model_card": changes})  # in one transaction: no update lost
    if "archived" in changes:
        (state.archived.add if changes["archived"] else state.archived.discard)(model_id)
    return job


@router.patch("/models/{model_id:path}")
async def update_model(request: Request, model_id: str) -> JSONResponse:
    body = await parse_body(request, UpdateModel)
    changes = body.model_dump(exclude_unset=True)
    for name, value in changes.items():
        if value is not None and len(value) > 4096:
            raise bad_request(f"{name} must be at most 4096 characters", name)
    job = await asyncio.to_thread(_set_card, request, model_id, **changes)
    return JSONResponse(_card(request, job))


@router.post("/models/{model_id:path}/archive")
async def archive_model(request: Request, model_id: str) -> JSONResponse:
    await asyncio.to_thread(_set_card, request, model_id, archived=True)
    return JSONResponse({"id": model_id, "object": "model", "archived": True})


@router.delete("/models/{model_id:path}/archive")
async def unarchive_model(request: Request, model_id: str) -> JSONResponse:
    await asyncio.to_thread(_set_card, request, model_id, archived=False)
    return JSONResponse({"id": model_id, "object": "model", "archived": False})
