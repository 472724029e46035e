"""Mistral's batch API (`/v1/batch/jobs`): create, list, get, cancel. The jobs run in the server at low
priority (batch_runner.py); their records persist in the platform database (hub/jobs.py).

A job's requests come from input files uploaded with purpose "batch", or inline (`requests`), which
are written to such a file first, so both run the same way. `endpoint` is one of the generating or
embedding routes; `model`, when given, goes into each request that names none."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .batch_runner import BATCH, ENDPOINTS, BatchRunner
from .common import engine_for, parse_body, server_state
from .errors import APIError, bad_request
from .routes_files import check_batch_lines, check_page

router = APIRouter(prefix="/v1/batch")

MAX_INLINE = 10_000
MAX_TIMEOUT_HOURS = 7 * 24


class BatchRequestLine(BaseModel):
    model_config = ConfigDict(extra="ignore")
    custom_id: str | None = None
    body: dict[str, Any]


class CreateBatchJob(BaseModel):
    model_config = ConfigDict(extra="ignore")
    endpoint: str
    input_files: list[str] | None = None
    requests: list[BatchRequestLine] | None = None
    model: str | None = None
    agent_id: str | None = None
    metadata: dict[str, str] | None = None
    timeout_hours: int = 24


def runner(request: Request) -> BatchRunner:
    """The app's batch runner, started on first use in the running event loop."""
    state = server_state(request)
    if state.batches is None:
        engine = engine_for(request, None)
        state.batches = BatchRunner(request.app, state.jobs, state.files, state.api_key, engine.queued)
        state.batches.start()
    return state.batches


def _job(request: Request, job_id: str) -> dict[str, Any]:
    job = server_state(request).jobs.get(BATCH, job_id)
    if job is None:
        raise APIError(404, f"no batch job {job_id[:100]!r}", param="job_id", code="job_not_found")
    return job


def _inline_file(request: Request, lines: list[BatchRequestLine]) -> str:
    """Inline requests as a batch input file (checked as an upload is)."""
    files = server_state(request).files
    path = files.new_path()
    try:
        path.write_text("".join(line.model_dump_json(exclude_none=True) + "\n" for line in lines), encoding="utf-8")
        count = check_batch_lines(path, "requests")
        return files.add(path, "inline-requests.jsonl", "batch", sample_type="batch_request", num_lines=count).id
    finally:
        path.unlink(missing_ok=True)


def _check(request: Request, body: CreateBatchJob) -> list[str]:
    """The job's input file ids, every field checked (a 400 naming the field)."""
    if body.endpoint not in ENDPOINTS:
        raise bad_request(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {body.endpoint[:60]!r}", "endpoint")
    if body.agent_id is not None:
        raise bad_request("agents are not available here: give a model", "agent_id")
    if not 1 <= body.timeout_hours <= MAX_TIMEOUT_HOURS:
        raise bad_request(f"timeout_hours must be in 1..{MAX_TIMEOUT_HOURS}", "timeout_hours")
    engine_for(request, body.model, adapters=True)  # a 404 for a model this server does not serve
    if (body.input_files is None) == (body.requests is None):
        raise bad_request("give either input_files or requests", "input_files")
    if body.requests is not None:
        if not 0 < len(body.requests) <= MAX_INLINE:
            raise bad_request(f"requests must hold 1..{MAX_INLINE} requests", "requests")
        return [_inline_file(request, body.requests)]
    files = server_state(request).files
    for file_id in body.input_files or []:
        record = files.get(file_id)
        if record is None or record.purpose != "batch":
            raise bad_request(f"input file {file_id[:100]!r} is not a file uploaded with purpose batch", "input_files")
    if not body.input_files:
        raise bad_request("input_files must name at least one file", "input_files")
    return body.input_files


@router.post("/jobs")
async def create_job(request: Request) -> JSONResponse:
    body = await parse_body(request, CreateBatchJob)
    inputs = await asyncio.to_thread(_check, request, body)
    files = server_state(request).files
    records = [files.get(i) for i in inputs]
    total = sum(r.num_lines or 0 for r in records if r is not None)
    job = {
        "object": "batch",
        "input_files": inputs,
        "endpoint": body.endpoint,
        "model": body.model,
        "agent_id": None,
        "metadata": body.metadata,
        "status": "QUEUED",
        "created_at": int(time.time()),
        "timeout_hours": body.timeout_hours,
        "total_requests": total,
        "completed_requests": 0,
        "succeeded_requests": 0,
        "failed_requests": 0,
        "output_file": None,
        "error_file": None,
        "errors": [],
        "outputs": None,
        "started_at": None,
        "completed_at": None,
    }
    job = await asyncio.to_thread(server_state(request).jobs.add, BATCH, job)
    runner(request).wake()
    return JSONResponse(job)


@router.get("/jobs")
async def list_jobs(
    request: Request, page: int = 0, page_size: int = 100, model: str | None = None, status: str | None = None
) -> JSONResponse:
    check_page(page, page_size)
    statuses = request.query_params.getlist("status") or None
    jobs, total = await asyncio.to_thread(
        server_state(request).jobs.list, BATCH, status=statuses, model=model, page=page, page_size=page_size
    )
    return JSONResponse({"data": jobs, "object": "list", "total": total})


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str, inline: bool = False) -> JSONResponse:
    job = await asyncio.to_thread(_job, request, job_id)
    if inline and job.get("output_file"):
        files = server_state(request).files
        record = files.get(job["output_file"])
        if record is not None:
            text = await asyncio.to_thread(files.path(record).read_text, encoding="utf-8")
            job["outputs"] = [json.loads(line) for line in text.splitlines() if line]
    return JSONResponse(job)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    jobs = server_state(request).jobs
    job = await asyncio.to_thread(_job, request, job_id)
    if job["status"] in ("QUEUED", "RUNNING"):
        job = await asyncio.to_thread(jobs.update, job_id, status="CANCELLATION_REQUESTED")
        runner(request).wake()
    return JSONResponse(job)
