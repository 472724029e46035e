"""Fine-tuning jobs run `tramontane finetune` in worker processes, never inside the server: at most
`workers` at once (one by default), oldest first, each at a lower CPU priority than serving. A job
that finishes registers its adapter as model `ft:BASE:SUFFIX:ID` and loads it into the running engine
(engine.load_adapter, between two steps): requests name it at once.

    runner = FineTuneRunner(state)
    runner.start()   # in the server's event loop: serves the finished jobs' models, resumes the others
    runner.wake()    # a job was queued

Restarts: a job's record (status and events) lives in the platform database and its files in
platform/fine_tuning/<job id>/ (the training data, config.json, the worker's log, out/ with the
checkpoint). A job found RUNNING at start-up was interrupted: it goes on from its last checkpoint
(`--resume`). Stopping the server stops the workers (they also exit when the server dies; they run in
their own session, so a Ctrl-C reaches only the server, which stops them); cancelling a job stops its
worker and ends it CANCELLED. A worker that fails ends its job FAILED, the end of its log in the
job's events; one killed by a signal while the server stops (a service manager stopping them all)
leaves its job RUNNING, to resume.

Servers sharing one $TRAMONTANE_HOME: a job is touched only under its folder's lock file, which the
server and its worker hold while the job runs (the worker too, so a killed server's orphan keeps it
until it exits), so two servers of one model never run or end the same job; the other one looks
again every RESCAN_SECONDS. The loop survives a failing database (locked, full disk): it logs, waits
and looks again; a job whose folder cannot be used fails alone. No worker starts once the server
is stopping."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from ..train.worker import WORKER_ENV
from .common import ServerState
from .fine_tuning import FINE_TUNING, adapter_name, event, fine_tuned_id, has_checkpoint, read_checkpoints

log = logging.getLogger("tramontane.serve")

RUNNABLE = ["QUEUED", "RUNNING", "CANCELLATION_REQUESTED"]
POLL_SECONDS = 0.5  # how often a running job's record is read for a cancel
STOP_SECONDS = 10.0  # a stopped worker's time to exit before it is killed
LOG_TAIL = 2000  # characters of a failed worker's log in the job's events
RESCAN_SECONDS = 30.0  # how often jobs are looked for without a wake-up (another server's, a failed read)
SIGNAL_GRACE = 3.0  # a worker killed by a signal: time for the server's own stop to show it was that
LOCK = ".lock"


def job_folder(state: ServerState, job_id: str) -> Path:
    return state.files.root / FINE_TUNING / job_id


class FineTuneRunner:
    def __init__(self, state: ServerState, workers: int = 1) -> None:
        self.state, self.jobs, self.workers = state, state.jobs, workers
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, IO[bytes]] = {}  # job id -> its folder's lock, while this server runs it
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Stop the workers (their jobs stay RUNNING and resume at the next start) and the loop."""
        self._stopping = True
        self._wake.set()
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        served = False
        while not self._stopping:  # (also ends a loop whose cancel asyncio.wait_for swallowed, as 3.11's can)
            self._wake.clear()
            try:
                if not served:
                    await self._serve_finished()
                    served = True
                await self._schedule()
            except Exception:  # noqa: BLE001 - a locked or failing database: look again later
                log.exception("fine-tuning jobs could not be read; trying again in %g s", RESCAN_SECONDS)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESCAN_SECONDS)

    async def _schedule(self) -> None:
        """Start the oldest waiting jobs on the free workers; end at once the cancelled ones no worker runs."""
        jobs, _ = await asyncio.to_thread(
            self.jobs.list, FINE_TUNING, status=RUNNABLE, model=self.state.model_name, oldest_first=True
        )
        for job in jobs:
            if self._stopping or self.state.draining:
                return
            cancelled = job["status"] == "CANCELLATION_REQUESTED"
            if job["id"] in self._running or (len(self._running) >= self.workers and not cancelled):
                continue
            try:
                await self._take(job, cancelled)
            except Exception as exc:  # noqa: BLE001 - this job cannot run (its folder, the database): the others can
                log.exception("fine-tuning job %s could not start", job["id"])
                with contextlib.suppress(Exception):
                    await self._end(job["id"], "FAILED", error=f"{type(exc).__name__}: {exc}", when=tuple(RUNNABLE))

    async def _take(self, job: dict[str, Any], cancelled: bool) -> None:
        """Under the job folder's lock (else another server has the job): end a cancelled job, start another."""
        lock = _lock(job_folder(self.state, job["id"]))
        if lock is None:
            return
        if cancelled:  # asked while no worker ran it
            with lock:
                await self._end(job["id"], "CANCELLED", when=("CANCELLATION_REQUESTED",))
            return
        self._locks[job["id"]] = lock
        task = asyncio.ensure_future(self._guarded(job))
        self._running[job["id"]] = task
        task.add_done_callback(functools.partial(self._ended, job["id"]))

    def _ended(self, job_id: str, _: object = None) -> None:
        """A job's task is over, however (cancelled before it began too): free its lock and worker slot."""
        lock = self._locks.pop(job_id, None)
        if lock is not None:
            lock.close()
        self._running.pop(job_id, None)
        self._wake.set()

    async def _serve_finished(self) -> None:
        """The models of the jobs that finished before this start, into the engine."""
        jobs, _ = await asyncio.to_thread(
            self.jobs.list, FINE_TUNING, status=["SUCCESS"], model=self.state.model_name, page_size=10_000
        )
        for job in jobs:
            try:
                await self.serve_model(job)
            except Exception:  # noqa: BLE001 - one adapter that no longer loads does not stop the others
                log.exception("fine-tuned model %s could not be loaded", job.get("fine_tuned_model"))

    async def serve_model(self, job: dict[str, Any]) -> None:
        name, engine = adapter_name(job["id"]), self.state.engine
        if engine is None:
            return
        if name not in engine.adapters:
            await engine.load_adapter(name, str(job_folder(self.state, job["id"]) / "out"))
        self.state.fine_tuned[job["fine_tuned_model"]] = name
        if (job.get("model_card") or {}).get("archived"):
            self.state.archived.add(job["fine_tuned_model"])

    async def _guarded(self, job: dict[str, Any]) -> None:
        try:
            await self._run(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the job fails, the runner goes on with the next
            log.exception("fine-tuning job %s failed", job["id"])
            try:
                await self._end(job["id"], "FAILED", error=f"{type(exc).__name__}: {exc}", when=_OWN)
            except Exception:  # noqa: BLE001 - the database fails too: the job is tried again later
                log.exception("fine-tuning job %s: its failure could not be recorded", job["id"])

    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["id"]
        folder = job_folder(self.state, job_id)
        resumed = last_checkpoint(folder) if job["status"] == "RUNNING" else None
        job = await asyncio.to_thread(
            self.jobs.update,
            job_id,
            when=("QUEUED", "RUNNING"),
            append={"events": event("RUNNING", {"resumed_from_step": resumed} if resumed else None)},
            status="RUNNING",
            modified_at=int(time.time()),
        )
        if job["status"] != "RUNNING":
            return None
        code, cancelled = await self._work(job_id, folder)
        if cancelled:
            return await self._end(job_id, "CANCELLED", when=_OWN)
        if code < 0 and await self._stopped_by_signal():
            return None  # stopped with the server: it resumes at the next start
        if code != 0:
            return await self._end(job_id, "FAILED", error=_failure(folder, code), exit_code=code, when=_OWN)
        return await self._succeed(job)

    async def _stopped_by_signal(self) -> bool:
        """A worker killed by a signal: whether the server is stopping too (a service manager signals every
        process at once, and the worker may be seen gone before the server's own stop begins)."""
        deadline = time.monotonic() + SIGNAL_GRACE
        while not (self._stopping or self.state.draining) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self._stopping or self.state.draining

    async def _work(self, job_id: str, folder: Path) -> tuple[int, bool]:
        """Run the worker to its end: (exit code, whether a cancel stopped it)."""
        command = [sys.executable, "-m", "tramontane", "finetune", "--config", str(folder / "config.json")]
        if has_checkpoint(folder):
            command.append("--resume")
        env = {**os.environ, WORKER_ENV: str(os.getpid())}
        lock = self._locks.get(job_id)
        with open(folder / "worker.log", "ab") as out:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,  # a Ctrl-C in the server's terminal reaches the server only
                pass_fds=(lock.fileno(),) if lock is not None else (),  # the worker holds the job's lock too
            )
        try:
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    return await asyncio.wait_for(process.wait(), POLL_SECONDS), False
                current = await asyncio.to_thread(self.jobs.get, FINE_TUNING, job_id)
                if current is None or current["status"] != "RUNNING":  # cancelled (or ended elsewhere)
                    await _stop(process)
                    return -1, True
        finally:
            await _stop(process)  # the server is stopping: the job resumes at the next start

    async def _succeed(self, job: dict[str, Any]) -> None:
        job = {**job, "fine_tuned_model": fine_tuned_id(job["model"], job.get("suffix"), job["id"])}
        await self.serve_model(job)
        steps = job["hyperparameters"]["training_steps"]
        await self._end(
            job["id"],
            "SUCCESS",
            when=_OWN,  # a cancel asked as the worker finished: the model is made, the job succeeded
            fine_tuned_model=job["fine_tuned_model"],
            trained_tokens=job["metadata"]["train_tokens_per_step"] * steps,
        )

    async def _end(
        self, job_id: str, status: str, error: str | None = None, when: tuple[str, ...] | None = None, **fields: Any
    ) -> None:
        data: dict[str, Any] = {"error": error} if error else {}
        if "exit_code" in fields:
            data["exit_code"] = fields.pop("exit_code")
        await asyncio.to_thread(
            self.jobs.update,
            job_id,
            when=when,
            append={"events": event(status, data)},
            status=status,
            modified_at=int(time.time()),
            **fields,
        )


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


_OWN = ("RUNNING", "CANCELLATION_REQUESTED")  # a job this server's worker runs: what ending it may change


def _lock(folder: Path) -> IO[bytes] | None:
    """The job folder's lock (None: another process holds it). OSError when the folder is unusable."""
    try:
        import fcntl
    except ImportError:  # no flock here: one server per $TRAMONTANE_HOME
        return open(os.devnull, "rb")
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "ab")  # noqa: SIM115 - held by the job's task, closed when it ends
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError:
        handle.close()
        raise
    return handle


def _failure(folder: Path, code: int) -> str:
    """Why a worker failed: the end of its log, and the signal that killed it if one did."""
    tail = _tail(folder / "worker.log")
    if code >= 0:
        return tail
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
    return f"the worker was killed by {name}{hint}\n{tail}"


def last_checkpoint(folder: Path) -> int | None:
    """The step a restarted job resumes from (None: it starts over)."""
    if not has_checkpoint(folder):
        return None
    steps = [c["step_number"] for c in read_checkpoints(folder)]
    return max(steps) if steps else None


def _tail(path: Path) -> str:
    """The end of a worker's log: the error `tramontane finetune` printed."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL))
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"the worker failed and its log is unreadable: {exc}"
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-10:]) or "the worker failed without a message"


def write_inputs(folder: Path, settings: dict[str, Any], train: list[tuple[Path, int]], valid: list[Path]) -> None:
    """A job's training data (each file repeated by its weight), validation data and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "wb") as out:
        for path, repeat in train:
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                data += b"\n"
            out.write(data * repeat)
    if valid:
        with open(folder / "valid.jsonl", "wb") as out:
            for path in valid:
                data = path.read_bytes()
                out.write(data if data.endswith(b"\n") or not data else data + b"\n")
    (folder / "config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
