"""Batch jobs run inside the server, at low priority: each request of a job's input files goes through
the server's own routes (in process, over ASGI), so it is checked and answered exactly as the same
request sent by a client would be; the answers become the job's output file (and the failures its
error file) in the files store.

    runner = BatchRunner(app, jobs, files, api_key)
    runner.start()    # in the server's event loop; resumes the jobs a previous run left
    runner.wake()     # a job was created or cancelled

Priority: at most `concurrency` requests of batch jobs run at once, and a new one is sent only while no
interactive request waits in the engine's queue, so clients keep their latency; the batch requests
fill the batch the engine decodes anyway. Jobs run one at a time, oldest first.

Restarts: every answer is appended to `platform/batch/<job id>.partial` (its line index, status and
body) as it comes; a job found RUNNING at start-up goes on from the lines not in it. Cancelling stops
sending, aborts what runs, and still writes what was answered (status CANCELLED). A job past its
`timeout_hours` ends as TIMEOUT_EXCEEDED the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ..hub.files import FileStore
from ..hub.jobs import JobStore

log = logging.getLogger("tramontane.serve")

BATCH = "batch"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/fim/completions", "/v1/embeddings")
ACTIVE = ["QUEUED", "RUNNING", "CANCELLATION_REQUESTED"]


def read_requests(files: FileStore, file_ids: list[str]) -> list[tuple[str | None, dict[str, Any]]]:
    """(custom_id, body) of every request in the input files, in order (checked at upload)."""
    out = []
    for file_id in file_ids:
        record = files.get(file_id)
        if record is None:
            raise LookupError(f"input file {file_id} was deleted")
        with files.path(record).open("rb") as f:
            for raw in f:
                if raw.strip():
                    line = json.loads(raw)
                    out.append((line.get("custom_id"), line["body"]))
    return out


def counts(done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A job's request counts from its answers so far."""
    ok = sum(1 for e in done.values() if e["status_code"] == 200)
    return {"completed_requests": len(done), "succeeded_requests": ok, "failed_requests": len(done) - ok}


class BatchRunner:
    def __init__(
        self,
        app: Any,
        jobs: JobStore,
        files: FileStore,
        api_key: str | None,
        queued: Callable[[], int],
        concurrency: int = 4,
    ) -> None:
        self.app, self.jobs, self.files, self.queued = app, jobs, files, queued
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = concurrency
        self._wake = asyncio.Event()
        self._counting = asyncio.Lock()  # one count update at a time: they land in order
        self._task: asyncio.Task[None] | None = None
        self.folder = files.root / "batch"

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            waiting, _ = await asyncio.to_thread(self.jobs.list, BATCH, status=ACTIVE, page_size=1, oldest_first=True)
            if not waiting:
                await self._wake.wait()
                continue
            try:
                await self._run(waiting[0])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the job fails, the runner goes on with the next
                log.exception("batch job %s failed", waiting[0]["id"])
                await asyncio.to_thread(self._end, waiting[0]["id"], "FAILED", f"{type(exc).__name__}: {exc}")

    def _partial(self, job_id: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"{job_id}.partial"

    def _answered(self, job_id: str) -> dict[int, dict[str, Any]]:
        path = self._partial(job_id)
        if not path.exists():
            return {}
        done = {}
        for raw in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError, KeyError):  # a line cut by a crash is asked again
                entry = json.loads(raw)
                done[entry["index"]] = entry
        return done

    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        requests = await asyncio.to_thread(read_requests, self.files, job["input_files"])
        done = await asyncio.to_thread(self._answered, job_id)
        started = job.get("started_at") or int(time.time())
        job = await asyncio.to_thread(
            self.jobs.update,
            job_id,
            when=("QUEUED", "RUNNING"),  # a cancel that came since holds
            status="RUNNING",
            started_at=started,
            total_requests=len(requests),
        )
        if job["status"] != "RUNNING":  # cancelled: what an earlier run answered is still written
            return await asyncio.to_thread(self._finish, job, requests, done, "CANCELLED")
        deadline = started + 3600 * job.get("timeout_hours", 24)
        gate = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task[None]] = set()
        ending = None
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=None) as client:
            with self._partial(job_id).open("a", encoding="utf-8") as log_file:
                try:
                    for index, (custom_id, body) in enumerate(requests):
                        if index in done:
                            continue
                        ending = await self._interrupted(job_id, deadline)
                        if ending:
                            break
                        await gate.acquire()
                        await self._polite()
                        task = asyncio.ensure_future(
                            self._one(client, job, index, custom_id, body, log_file, done, gate)
                        )
                        running.add(task)
                        task.add_done_callback(running.discard)
                    if not ending:
                        await asyncio.gather(*running, return_exceptions=True)
                finally:  # cancelled, stopped or timed out: what runs stops before the log closes
                    for task in list(running):
                        task.cancel()
                    await asyncio.gather(*running, return_exceptions=True)
        await asyncio.to_thread(self._finish, job, requests, done, ending)

    async def _interrupted(self, job_id: str, deadline: float) -> str | None:
        current = await asyncio.to_thread(self.jobs.get, BATCH, job_id)
        if current is None or current["status"] == "CANCELLATION_REQUESTED":
            return "CANCELLED"
        return "TIMEOUT_EXCEEDED" if time.time() > deadline else None

    async def _polite(self) -> None:
        """Wait while interactive requests queue in the engine (they go first)."""
        while self.queued() > 0:
            await asyncio.sleep(0.05)

    async def _one(
        self,
        client: httpx.AsyncClient,
        job: dict[str, Any],
        index: int,
        custom_id: str | None,
        body: dict[str, Any],
        log_file: Any,
        done: dict[int, dict[str, Any]],
        gate: asyncio.Semaphore,
    ) -> None:
        try:
            body = {**body, "stream": False}
            if job.get("model"):
                body.setdefault("model", job["model"])
            try:
                r = await client.post(job["endpoint"], json=body, headers=self.headers)
                status, answer = r.status_code, r.json()
            except Exception as exc:  # noqa: BLE001 - no answer, not JSON, or the route raised: this request failed
                status, answer = 500, {"error": {"message": f"{type(exc).__name__}: {str(exc)[:300]}"}}
            entry = {"index": index, "custom_id": custom_id, "status_code": status, "body": answer}
            done[index] = entry
            log_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            log_file.flush()
            async with self._counting:  # counted under the lock: a later answer's counts are never overwritten
                await asyncio.to_thread(self.jobs.update, job["id"], **counts(done))
        finally:
            gate.release()

    def _write(self, job_id: str, name: str, kind: str, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        path = self.files.new_path()
        path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
        record = self.files.add(
            path, f"{job_id}.{name}.jsonl", "batch", sample_type=kind, source="mistral", num_lines=len(lines)
        )
        return record.id

    def _finish(
        self, job: dict[str, Any], requests: list[Any], done: dict[int, dict[str, Any]], ending: str | None
    ) -> None:
        """The output and error files, in the input's order, and the job's end."""
        outputs, errors = [], []
        for index in sorted(done):
            entry = done[index]
            line = {
                "id": f"batch-{job['id'][:8]}-{index}",
                "custom_id": entry["custom_id"],
                "response": {"status_code": entry["status_code"], "body": entry["body"]},
                "error": None,
            }
            if entry["status_code"] == 200:
                outputs.append(line)
            else:
                message = (entry["body"].get("error") or {}).get("message") if isinstance(entry["body"], dict) else None
                errors.append(
                    line | {"error": {"message": message or "the request failed", "code": entry["status_code"]}}
                )
        output = self._write(job["id"], "output", "batch_result", outputs)
        error = self._write(job["id"], "error", "batch_error", errors)
        self._end(job["id"], ending or "SUCCESS", None, output_file=output, error_file=error, **counts(done))

    def _end(self, job_id: str, status: str, problem: str | None = None, **fields: Any) -> None:
        errors = [{"message": problem, "count": 1}] if problem else []
        self.jobs.update(job_id, status=status, completed_at=int(time.time()), errors=errors, **fields)
        with contextlib.suppress(FileNotFoundError):
            self._partial(job_id).unlink()
