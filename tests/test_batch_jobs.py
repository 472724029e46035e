"""Issue 20: Mistral's batch API through the official `mistralai` SDK (3.x) against `tramontane serve`
on SmolLM2: 20 requests in a batch file give an output file of 20 answers equal to the same requests
sent one by one; a job survives a server restart (it resumes from what was answered); cancelling stops
it; bad jobs are refused."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from serving import running_server

QUESTIONS = [f"Write the number {k} in words." for k in range(20)]


def body(question: str, max_tokens: int = 8) -> dict:
    return {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens}


def batch_file(bodies: list[dict]) -> bytes:
    return "".join(json.dumps({"custom_id": f"q{k}", "body": b}) + "\n" for k, b in enumerate(bodies)).encode()


def sdk(base: str):
    try:
        from mistralai import Mistral
    except ImportError:
        from mistralai.client import Mistral
    return Mistral(api_key="none", server_url=base)


def wait_for(client, job_id: str, statuses: tuple[str, ...], deadline: float = 600):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        job = client.batch.jobs.get(job_id=job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} still {job.status} after {deadline} s")


def outputs(client, file_id: str) -> dict[str, str]:
    lines = client.files.download(file_id=file_id).read().decode().splitlines()
    found = {}
    for line in lines:
        entry = json.loads(line)
        assert entry["response"]["status_code"] == 200 and entry["error"] is None
        found[entry["custom_id"]] = entry["response"]["body"]["choices"][0]["message"]["content"]
    return found


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("platform-home")


def serve(home, log):
    return running_server(log, "--kv-cache-memory", "64M", env={"TRAMONTANE_HOME": str(home)})


def test_twenty_requests_answer_as_sent_one_by_one(smollm2_path, home, tmp_path):
    with serve(home, tmp_path / "log") as (base, _):
        client = sdk(base)
        direct = {
            f"q{k}": httpx.post(f"{base}/v1/chat/completions", json=body(q), timeout=120).json()["choices"][0][
                "message"
            ]["content"]
            for k, q in enumerate(QUESTIONS)
        }
        up = client.files.upload(
            file={"file_name": "batch.jsonl", "content": batch_file([body(q) for q in QUESTIONS])}, purpose="batch"
        )
        job = client.batch.jobs.create(input_files=[up.id], endpoint="/v1/chat/completions")
        assert job.status == "QUEUED" and job.total_requests == 20
        done = wait_for(client, job.id, ("SUCCESS", "FAILED"))
        assert (done.status, done.succeeded_requests, done.failed_requests) == ("SUCCESS", 20, 0)
        assert outputs(client, done.output_file) == direct and done.error_file is None
        listed = client.batch.jobs.list()
        assert listed.total == 1 and listed.data[0].id == job.id
        inline = client.batch.jobs.create(
            requests=[{"custom_id": "x", "body": {"messages": []}}, {"custom_id": "y", "body": body(QUESTIONS[0])}],
            endpoint="/v1/chat/completions",
        )
        ended = wait_for(client, inline.id, ("SUCCESS", "FAILED"))
        assert (ended.succeeded_requests, ended.failed_requests) == (1, 1)
        (error,) = [json.loads(line) for line in client.files.download(file_id=ended.error_file).read().splitlines()]
        assert (
            error["custom_id"] == "x"
            and error["response"]["status_code"] == 400
            and "messages" in error["error"]["message"]
        )


def test_a_job_resumes_after_a_restart_and_cancelling_stops_one(smollm2_path, home, tmp_path):
    bodies = [body(q, max_tokens=24) for q in QUESTIONS]
    with serve(home, tmp_path / "log1") as (base, proc):
        client = sdk(base)
        direct = {
            f"q{k}": httpx.post(f"{base}/v1/chat/completions", json=b, timeout=120).json()["choices"][0]["message"][
                "content"
            ]
            for k, b in enumerate(bodies)
        }
        up = client.files.upload(file={"file_name": "long.jsonl", "content": batch_file(bodies)}, purpose="batch")
        job = client.batch.jobs.create(input_files=[up.id], endpoint="/v1/chat/completions")
        end = time.monotonic() + 600
        while client.batch.jobs.get(job_id=job.id).completed_requests < 2 and time.monotonic() < end:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # drains: the runner stops, its answers so far are kept
        proc.wait(120)
    kept = (home / "platform" / "batch" / f"{job.id}.partial").read_text().splitlines()
    assert 2 <= len(kept) < 20  # stopped midway: the next start goes on from here
    assert "Traceback" not in (tmp_path / "log1").read_text()
    with serve(home, tmp_path / "log2") as (base, _):
        client = sdk(base)
        midway = client.batch.jobs.get(job_id=job.id)
        assert midway.status in ("RUNNING", "SUCCESS") and midway.completed_requests >= 2
        done = wait_for(client, job.id, ("SUCCESS", "FAILED"))
        assert done.status == "SUCCESS" and outputs(client, done.output_file) == direct
        slow = client.batch.jobs.create(
            input_files=[
                client.files.upload(
                    file={"file_name": "slow.jsonl", "content": batch_file([body(q, 200) for q in QUESTIONS])},
                    purpose="batch",
                ).id
            ],
            endpoint="/v1/chat/completions",
        )
        client.batch.jobs.cancel(job_id=slow.id)
        cancelled = wait_for(client, slow.id, ("CANCELLED", "SUCCESS", "FAILED"))
        assert cancelled.status == "CANCELLED"
        assert cancelled.completed_requests < 20
        bad = httpx.post(f"{base}/v1/batch/jobs", json={"endpoint": "/v1/ocr", "input_files": [up.id]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "endpoint"
        bad = httpx.post(f"{base}/v1/batch/jobs", json={"endpoint": "/v1/chat/completions", "input_files": ["nope"]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input_files"


def test_a_cancel_that_came_first_holds(tmp_path):
    """The runner's move to RUNNING must not overwrite a cancel made after it picked the job (the race
    that once let a cancelled job run to SUCCESS)."""
    from tramontane.hub.jobs import JobStore

    jobs = JobStore(tmp_path)
    job = jobs.add("batch", {"status": "QUEUED", "created_at": 1})
    jobs.update(job["id"], status="CANCELLATION_REQUESTED")
    after = jobs.update(job["id"], when=("QUEUED", "RUNNING"), status="RUNNING")
    assert after["status"] == "CANCELLATION_REQUESTED" == jobs.get("batch", job["id"])["status"]
    assert jobs.update(job["id"], status="CANCELLED")["status"] == "CANCELLED"
    assert jobs.list("batch", status=["CANCELLED"]) == ([jobs.get("batch", job["id"])], 1)


def test_a_job_ends_with_the_counts_of_every_answer(tmp_path):
    """Each answer's count update runs in a worker thread; one sent earlier can land later (here the
    store is slowest for the earliest counts). The job must still end with all 20 counted (the race
    that once ended a job of 20 answers at SUCCESS with 19 succeeded), the request whose route raised
    among them as failed, with its error in the error file (not lost)."""
    import asyncio

    from tramontane.hub.files import FileStore
    from tramontane.hub.jobs import JobStore
    from tramontane.serve.batch_runner import BatchRunner

    class EarliestLast(JobStore):
        def update(self, job_id, when=None, append=None, merge=None, **changes):
            if "completed_requests" in changes and "status" not in changes:
                time.sleep(0.01 * (20 - changes["completed_requests"]))
            return super().update(job_id, when, append, merge, **changes)

    async def app(scope, receive, send):  # an ASGI app that answers every request but one, where it raises
        message = await receive()
        sent = message.get("body", b"")
        while message.get("more_body"):
            message = await receive()
            sent += message.get("body", b"")
        if b"number 7 " in sent:
            raise RuntimeError("a route's bug")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"choices": []}'})

    files, jobs = FileStore(tmp_path / "files"), EarliestLast(tmp_path / "jobs")
    path = files.new_path()
    path.write_bytes(batch_file([body(q) for q in QUESTIONS]))
    record = files.add(path, "batch.jsonl", "batch", sample_type="batch_request")
    fields = {"status": "QUEUED", "created_at": 1, "input_files": [record.id], "endpoint": "/v1/chat/completions"}
    job = jobs.add("batch", fields)
    asyncio.run(BatchRunner(app, jobs, files, None, queued=lambda: 0)._run(job))
    done = jobs.get("batch", job["id"])
    assert (done["status"], done["completed_requests"], done["succeeded_requests"], done["failed_requests"]) == (
        "SUCCESS",
        20,
        19,
        1,
    )
    (error,) = [json.loads(line) for line in files.path(files.get(done["error_file"])).read_text().splitlines()]
    assert error["custom_id"] == "q7" and "a route's bug" in error["error"]["message"]
