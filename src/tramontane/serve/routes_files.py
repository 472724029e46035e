"""Mistral's files API (`/v1/files`): upload (multipart), list, retrieve, download, delete.

Files are training data (purpose "fine-tune") or batch requests (purpose "batch"), checked at upload
so that a bad file is refused at once, with its line numbers, rather than failing a job later:

- fine-tune: every line through the fine-tuning data reader (train/data.py) with the served model's
  tokenizer and context, as `tramontane finetune` reads it; its kind ("instruct" or "pretrain") is the
  file's `sample_type`.
- batch: every line a JSON object with an object `body` (and, if any, a string `custom_id`, unique).

Limits: `max_file_bytes` per file (the body limit of this route; other routes keep --max-body-bytes)
and `max_files` in the store. Stored by hub/files.py, where no client-sent name becomes a path."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from ..errors import TramontaneError
from ..hub.files import PURPOSES, FileStore, StoredFile
from .common import engine_for, server_state
from .errors import APIError, bad_request

router = APIRouter(prefix="/v1")

MAX_FILENAME = 256
MAX_REPORTED = 20  # problem lines named in a refusal


def file_store(request: Request) -> FileStore:
    return server_state(request).files


def _not_found(file_id: str) -> APIError:
    return APIError(404, f"no file {file_id[:100]!r} (see GET /v1/files)", param="file_id", code="file_not_found")


def _record(request: Request, file_id: str) -> StoredFile:
    record = file_store(request).get(file_id)
    if record is None:
        raise _not_found(file_id)
    return record


def _refusal(filename: str, lines: int, problems: list[tuple[int, str]]) -> APIError:
    named = "\n".join(f"line {n}: {reason}" for n, reason in problems[:MAX_REPORTED])
    more = f"\n(and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
    return APIError(
        422,
        f"{filename}: {len(problems)} of {lines} lines cannot be used:\n{named}{more}",
        param="file",
        code="invalid_file",
    )


def check_batch_lines(path: Path, filename: str) -> int:
    """The number of requests in a batch input file; a 422 naming the bad lines otherwise."""
    problems: list[tuple[int, str]] = []
    ids: set[str] = set()
    count = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            count += 1
            try:
                line = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                problems.append((number, f"not JSON: {str(exc)[:100]}"))
                continue
            if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
                problems.append((number, 'each line must be an object with a "body" object (the request)'))
                continue
            custom = line.get("custom_id")
            if custom is not None and not isinstance(custom, str):
                problems.append((number, "custom_id must be a string"))
            elif custom is not None and custom in ids:
                problems.append((number, f"custom_id {custom[:60]!r} is used twice"))
            elif custom is not None:
                ids.add(custom)
    if count == 0:
        raise APIError(422, f"{filename}: the file holds no requests", param="file", code="invalid_file")
    if problems:
        raise _refusal(filename, count, problems)
    return count


def check_training_lines(request: Request, path: Path, filename: str) -> tuple[str, int]:
    """(sample type, lines) of a training file, read as `tramontane finetune` reads it."""
    from ..train.data import read_dataset

    engine = engine_for(request, None)
    try:
        report = read_dataset(path, engine.tokenizer, engine.max_model_len)
    except TramontaneError as exc:
        raise APIError(422, f"{filename}: {exc}", param="file", code="invalid_file") from None
    lines = len(report.examples) + len(report.problems)
    if report.problems:
        raise _refusal(filename, lines, [(p.line, p.reason) for p in report.problems])
    if report.kind not in ("instruct", "pretrain"):
        raise APIError(422, f"{filename}: lines must all be instruct or all pretrain, not {report.kind}", param="file")
    return report.kind, lines


async def _form_file(request: Request) -> tuple[UploadFile, str]:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # noqa: BLE001 - python-multipart's and Starlette's parse errors
        raise bad_request(f"the body must be multipart/form-data with a file: {str(exc)[:200]}", "file") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise bad_request('the form needs a "file" part holding the file', "file")
    purpose = form.get("purpose") or "fine-tune"
    if purpose not in PURPOSES:
        raise bad_request(f"purpose must be one of {', '.join(PURPOSES)}, got {str(purpose)[:60]!r}", "purpose")
    return upload, str(purpose)


def _copy_in(upload: UploadFile, target: Path, limit: int) -> int:
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
    size = target.stat().st_size
    if size > limit:
        raise APIError(413, f"the file holds {size} bytes, more than the limit of {limit}", param="file")
    if size == 0:
        raise bad_request("the file is empty", "file")
    return size


@router.post("/files")
async def upload_file(request: Request) -> JSONResponse:
    state = server_state(request)
    store = state.files
    upload, purpose = await _form_file(request)
    filename = (upload.filename or "upload.jsonl")[:MAX_FILENAME]
    if await asyncio.to_thread(store.count) >= state.file_limits.max_files:
        raise APIError(
            400,
            f"the store holds {state.file_limits.max_files} files, its limit: delete some first",
            code="too_many_files",
        )
    incoming = store.new_path()
    try:
        await asyncio.to_thread(_copy_in, upload, incoming, state.file_limits.max_file_bytes)
        if purpose == "batch":
            lines = await asyncio.to_thread(check_batch_lines, incoming, filename)
            kind = "batch_request"
        else:
            kind, lines = await asyncio.to_thread(check_training_lines, request, incoming, filename)
        record = await asyncio.to_thread(
            store.add, incoming, filename, purpose, sample_type=kind, num_lines=lines, mimetype=upload.content_type
        )
    finally:
        incoming.unlink(missing_ok=True)
        await upload.close()
    return JSONResponse(record.api())


def check_page(page: int, page_size: int) -> None:
    if page < 0 or not 1 <= page_size <= 1000:
        raise bad_request("page must be >= 0 and page_size in 1..1000", "page_size")


@router.get("/files")
async def list_files(
    request: Request, page: int = 0, page_size: int = 100, purpose: str | None = None, search: str | None = None
) -> JSONResponse:
    check_page(page, page_size)
    records, total = await asyncio.to_thread(
        file_store(request).list, purpose=purpose, search=search, page=page, page_size=page_size
    )
    return JSONResponse({"data": [r.api() for r in records], "object": "list", "total": total})


@router.get("/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> JSONResponse:
    record = await asyncio.to_thread(_record, request, file_id)
    return JSONResponse(record.api() | {"deleted": False})


@router.delete("/files/{file_id}")
async def delete_file(request: Request, file_id: str) -> JSONResponse:
    store = file_store(request)
    record = await asyncio.to_thread(_record, request, file_id)
    await asyncio.to_thread(store.delete, record)
    return JSONResponse({"id": record.id, "object": "file", "deleted": True})


@router.get("/files/{file_id}/content")
async def download_file(request: Request, file_id: str) -> FileResponse:
    record = await asyncio.to_thread(_record, request, file_id)
    return FileResponse(
        file_store(request).path(record), media_type="application/octet-stream", filename=record.filename
    )


@router.get("/files/{file_id}/url")
async def file_url(request: Request, file_id: str) -> dict[str, Any]:
    """Mistral's signed URL; here the content route itself (it takes the same API key)."""
    record = await asyncio.to_thread(_record, request, file_id)
    return {"url": str(request.url_for("download_file", file_id=record.id))}
