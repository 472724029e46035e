"""Issue 20: the fine-tuning runner's own decisions, without a model: a cancelled job no worker runs
ends at once even when every worker is busy; a job folder's lock keeps two servers sharing
$TRAMONTANE_HOME off one job (neither started nor ended by the other); no worker starts once the
server stops, and a job cancelled before it began frees its lock; a worker killed by a signal while
the server stops leaves its job to resume, one killed otherwise fails naming the signal; the loop
outlives a failing database and a job whose folder is unusable fails alone; a model card's
concurrent changes are all kept. (The jobs themselves, with real workers and the SDKs, are
test_fine_tuning_jobs.py's.)"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tramontane.hub.files import FileStore
from tramontane.hub.jobs import JobStore
from tramontane.serve import finetune_runner
from tramontane.serve.fine_tuning import FINE_TUNING, event
from tramontane.serve.finetune_runner import FineTuneRunner, job_folder

MODEL = "tiny"


def make_state(root: Path) -> SimpleNamespace:
    return SimpleNamespace(
        jobs=JobStore(root), files=FileStore(root), model_name=MODEL, engine=None, draining=False, fine_tuned={}
    )


def add_job(state: SimpleNamespace, status: str) -> dict[str, Any]:
    job = {"status": status, "created_at": int(time.time()), "model": MODEL, "events": [event(status)]}
    job.update(hyperparameters={"training_steps": 1}, metadata={"train_tokens_per_step": 1}, suffix=None)
    return state.jobs.add(FINE_TUNING, job)


def record_starts(runner: FineTuneRunner) -> list[str]:
    """The ids of the jobs `runner` starts, in order (no worker runs)."""
    started: list[str] = []

    async def fake_guarded(job: dict[str, Any]) -> None:
        started.append(job["id"])

    runner._guarded = fake_guarded  # type: ignore[method-assign]
    return started


def status(state: SimpleNamespace, job: dict[str, Any]) -> str:
    return state.jobs.get(FINE_TUNING, job["id"])["status"]


def test_a_cancelled_job_without_a_worker_ends_at_once_when_every_worker_is_busy(tmp_path):
    state = make_state(tmp_path)
    busy = add_job(state, "RUNNING")
    cancelled = add_job(state, "CANCELLATION_REQUESTED")  # a RUNNING job cancelled before it got a worker
    runner = FineTuneRunner(state, workers=1)
    started: list[str] = []

    async def fake_guarded(job: dict[str, Any]) -> None:
        started.append(job["id"])
        await asyncio.sleep(3600)  # the busy worker

    runner._guarded = fake_guarded  # type: ignore[method-assign]

    async def scenario() -> None:
        await runner._schedule()
        await asyncio.sleep(0)
        assert started == [busy["id"]]
        assert status(state, cancelled) == "CANCELLED"
        for task in runner._running.values():
            task.cancel()

    asyncio.run(scenario())
    events = state.jobs.get(FINE_TUNING, cancelled["id"])["events"]
    assert [e["data"]["status"] for e in events] == ["CANCELLATION_REQUESTED", "CANCELLED"]


def test_a_job_folders_lock_keeps_a_second_server_off_the_job(tmp_path):
    """Neither started nor, once cancelled, ended by a server that does not hold its lock."""
    state = make_state(tmp_path)
    job = add_job(state, "QUEUED")
    cancelled = add_job(state, "CANCELLATION_REQUESTED")
    held = finetune_runner._lock(job_folder(state, job["id"]))
    held_too = finetune_runner._lock(job_folder(state, cancelled["id"]))
    assert held is not None and held_too is not None
    other = FineTuneRunner(make_state(tmp_path), workers=1)  # a second server on the same home
    asyncio.run(other._schedule())
    assert other._running == {} and status(state, cancelled) == "CANCELLATION_REQUESTED"
    assert finetune_runner._lock(job_folder(state, job["id"])) is None
    held.close()  # the first server's worker ended
    again = finetune_runner._lock(job_folder(state, job["id"]))
    assert again is not None
    again.close()
    held_too.close()


def test_no_worker_starts_once_the_server_stops_and_locks_are_freed(tmp_path):
    state = make_state(tmp_path)
    job = add_job(state, "QUEUED")
    state.draining = True
    runner = FineTuneRunner(state)
    asyncio.run(runner._schedule())
    assert runner._running == {}
    state.draining = False

    async def scenario() -> None:
        await runner._schedule()  # starts the job's task...
        assert list(runner._running) == [job["id"]]
        await runner.stop()  # ...cancelled before its first step

    asyncio.run(scenario())
    assert runner._running == {} and runner._locks == {}
    lock = finetune_runner._lock(job_folder(state, job["id"]))
    assert lock is not None
    lock.close()


def test_a_job_whose_folder_is_unusable_fails_alone(tmp_path):
    state = make_state(tmp_path)
    broken, fine = add_job(state, "QUEUED"), add_job(state, "QUEUED")
    job_folder(state, broken["id"]).parent.mkdir(parents=True, exist_ok=True)
    job_folder(state, broken["id"]).write_text("a file where its folder goes")
    runner = FineTuneRunner(state)
    started = record_starts(runner)

    async def scenario() -> None:
        await runner._schedule()
        await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert started == [fine["id"]]
    record = state.jobs.get(FINE_TUNING, broken["id"])
    assert record["status"] == "FAILED" and "FileExistsError" in record["events"][-1]["data"]["error"]


@pytest.mark.parametrize(("stopping", "code", "expected"), [(True, -signal.SIGTERM, "RUNNING"), (False, -9, "FAILED")])
def test_a_worker_killed_by_a_signal(tmp_path, monkeypatch, stopping, code, expected):
    """Stopped together with the server (a service manager signals them all): the job stays RUNNING and
    resumes at the next start. Killed otherwise: the job fails, naming the signal."""
    monkeypatch.setattr(finetune_runner, "SIGNAL_GRACE", 0.2)
    state = make_state(tmp_path)
    job = add_job(state, "QUEUED")
    runner = FineTuneRunner(state)

    async def killed_worker(job_id: str, folder: Path) -> tuple[int, bool]:
        runner._stopping = stopping
        return code, False

    runner._work = killed_worker  # type: ignore[method-assign]
    asyncio.run(runner._run(job))
    record = state.jobs.get(FINE_TUNING, job["id"])
    assert record["status"] == expected
    if expected == "FAILED":
        assert "killed by SIGKILL (the system may have run out of memory)" in record["events"][-1]["data"]["error"]


def test_the_loop_outlives_a_failing_database(tmp_path, monkeypatch):
    monkeypatch.setattr(finetune_runner, "RESCAN_SECONDS", 0.05)
    state = make_state(tmp_path)
    job = add_job(state, "QUEUED")
    real_list, calls = state.jobs.list, []

    def flaky_list(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("database is locked")
        return real_list(*args, **kwargs)

    state.jobs.list = flaky_list
    runner = FineTuneRunner(state)
    started = record_starts(runner)

    async def scenario() -> None:
        runner.start()
        for _ in range(200):
            if started:
                break
            await asyncio.sleep(0.05)
        await runner.stop()

    asyncio.run(scenario())
    assert started and set(started) == {job["id"]}


def test_stop_ends_the_loop_when_a_wake_up_comes_with_it(tmp_path, monkeypatch):
    """A wake-up in the same tick as stop() (a job ending as the server stops): Python 3.11's
    asyncio.wait_for then returns the wake-up and drops the cancel, and the loop used to go on forever
    (a server that never finished stopping; this suite hung on it once). The loop must end anyway."""
    monkeypatch.setattr(finetune_runner, "RESCAN_SECONDS", 600.0)  # no rescan ends the wait meanwhile
    runner = FineTuneRunner(make_state(tmp_path))

    async def scenario() -> None:
        runner.start()
        for _ in range(400):  # until the loop waits for a wake-up
            if runner._wake._waiters:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        runner.wake()
        stopping = asyncio.ensure_future(runner.stop())
        done, _ = await asyncio.wait({stopping}, timeout=60)  # a hang guard, not a speed check
        stopping.cancel()
        assert stopping in done and runner._task is not None and runner._task.done()

    asyncio.run(scenario())


def test_model_card_changes_merge_in_one_transaction(tmp_path):
    jobs = JobStore(tmp_path)
    job = jobs.add(FINE_TUNING, {"status": "SUCCESS", "created_at": 1, "model_card": {"name": "old"}})
    stale = dict(job)  # what a second request read before the first one wrote
    jobs.update(job["id"], merge={"model_card": {"archived": True}})
    jobs.update(stale["id"], merge={"model_card": {"name": "new"}})
    assert jobs.get(FINE_TUNING, job["id"])["model_card"] == {"name": "new", "archived": True}
