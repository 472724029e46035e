"""Issue 20: Mistral's fine-tuning jobs against `tramontane serve`, through the official SDKs unchanged:
mistralai 1.12.4 (the last SDK with `fine_tuning.jobs`, in its own environment: `sdk1_python`) for the
jobs, the current SDK for files, chat and the fine-tuned-model routes.

The served model is a tiny random model with SmolLM2's vocabulary and chat template (a Q8_0 GGUF); a
job trains a LoRA adapter on it in a worker process, and its `ft:` model then answers with the
adapter's effect: its logprobs equal those of the same adapter loaded offline, and differ from the
base model's. Jobs resume after a server restart, cancel, wait VALIDATED until started, and refuse
what they cannot do with the field named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving import running_server

import tramontane
from tramontane.weights.gguf import open_gguf
from tramontane.weights.random import random_config
from tramontane.weights.random_gguf import write_random_gguf

SDK1 = "mistralai==1.12.4"
QUESTION = [{"role": "user", "content": "What is the colour of the sky?"}]


@pytest.fixture(scope="session")
def sdk1_python() -> Path:
    """Python of an environment holding mistralai 1.12.4 (made by `make test`; made here if missing)."""
    folder = Path(sys.prefix) / "sdk1"
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", SDK1], check=True)
    return python


@pytest.fixture(scope="module")
def tiny_gguf(smollm2_path, tmp_path_factory) -> Path:
    """A 2-layer random model (Q8_0) speaking SmolLM2's vocabulary and chat template."""
    with open_gguf(smollm2_path) as source:
        tokenizer = {k: v for k, v in source.metadata.items() if k.startswith("tokenizer.")}
    config = random_config("mistral-7b").with_(
        n_layers=2, dim=64, hidden_dim=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=49152, max_seq_len=1024
    )
    return write_random_gguf(config, "Q8_0", tmp_path_factory.mktemp("tiny") / "tiny.gguf", tokenizer, seed=3)


def training_lines(n: int = 24) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say the word number {k}."},
                {"role": "assistant", "content": "blue"},
            ]
        }
        for k in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def sdk3(base: str):
    try:
        from mistralai import Mistral
    except ImportError:
        from mistralai.client import Mistral
    return Mistral(api_key="none", server_url=base)


JOB_SCRIPT = """
import json, sys, time
from mistralai import Mistral

base, model, train, steps, action = sys.argv[1:6]
client = Mistral(api_key="none", server_url=base)
up = client.files.upload(file={"file_name": "train.jsonl", "content": open(train, "rb").read()})
created = client.fine_tuning.jobs.create(
    model=model,
    training_files=[{"file_id": up.id, "weight": 1}],
    validation_files=[up.id],
    hyperparameters={"training_steps": int(steps), "learning_rate": 0.02, "seq_len": 64},
    suffix="sky",
    auto_start=action != "start",
)
report = {"created": created.model_dump(mode="json")}
if action == "start":
    report["started"] = client.fine_tuning.jobs.start(job_id=created.id).model_dump(mode="json")
if action == "cancel":
    while client.fine_tuning.jobs.get(job_id=created.id).status != "RUNNING":
        time.sleep(0.2)
    report["cancelled"] = client.fine_tuning.jobs.cancel(job_id=created.id).model_dump(mode="json")
end = time.monotonic() + 600
while time.monotonic() < end:
    job = client.fine_tuning.jobs.get(job_id=created.id)
    if job.status in ("SUCCESS", "FAILED", "CANCELLED") or action == "detach":
        break
    time.sleep(0.3)
report["final"] = job.model_dump(mode="json")
report["list"] = client.fine_tuning.jobs.list(suffix="sky").model_dump(mode="json")
print(json.dumps(report))
"""


def run_sdk1(python: Path, tmp_path: Path, base: str, steps: int, action: str = "wait") -> dict:
    script, train = tmp_path / "job.py", tmp_path / "train.jsonl"
    script.write_text(JOB_SCRIPT)
    train.write_bytes(training_lines())
    done = subprocess.run(
        [str(python), str(script), base, "tiny", str(train), str(steps), action],
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def serve(path: Path, home: Path, log: Path):
    return running_server(
        log, str(path), "--served-model-name", "tiny", "--kv-cache-memory", "16M", env={"TRAMONTANE_HOME": str(home)}
    )


@pytest.fixture(scope="module")
def server(tiny_gguf, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with serve(tiny_gguf, home, tmp_path_factory.mktemp("log") / "stderr.txt") as (base, _):
        yield base, home


def logprobs(base: str, model: str) -> list[float]:
    answer = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": model, "messages": QUESTION, "max_tokens": 6, "temperature": 0, "logprobs": True},
        timeout=120,
    ).json()
    return [t["logprob"] for t in answer["choices"][0]["logprobs"]["content"]]


def offline_logprobs(path: Path, adapter: Path | None) -> list[float]:
    llm = tramontane.load(path)
    if adapter is not None:
        llm.load_adapter("ft", adapter)
        llm.use_adapter("ft")
    out = llm.chat(QUESTION, max_tokens=6, temperature=0, logprobs=0)
    return [t.logprob for t in out.logprobs]


def test_a_job_trains_and_its_model_answers_with_the_adapter(server, sdk1_python, tiny_gguf, tmp_path):
    base, home = server
    report = run_sdk1(sdk1_python, tmp_path, base, steps=10)
    created, final = report["created"], report["final"]
    assert created["status"] == "QUEUED" and created["job_type"] == "completion" and created["model"] == "tiny"
    assert created["hyperparameters"]["training_steps"] == 10 and created["hyperparameters"]["seq_len"] == 64
    assert final["status"] == "SUCCESS", final["events"]
    name = final["fine_tuned_model"]
    assert name == f"ft:tiny:sky:{created['id'][:8]}"
    assert [e["data"]["status"] for e in final["events"]] == ["QUEUED", "RUNNING", "SUCCESS"]
    steps = [c["step_number"] for c in final["checkpoints"]]
    assert steps == list(range(10, 0, -1))  # one per tenth of the steps, newest first
    assert all(c["metrics"]["train_loss"] > 0 and c["metrics"]["valid_loss"] > 0 for c in final["checkpoints"])
    assert final["checkpoints"][0]["metrics"]["valid_loss"] < final["checkpoints"][-1]["metrics"]["valid_loss"]
    assert final["trained_tokens"] == 10 * 64 * 4
    assert report["list"]["total"] >= 1 and created["id"] in [j["id"] for j in report["list"]["data"]]

    listed = [m.id for m in sdk3(base).models.list().data]
    assert name in listed
    folder = home / "platform" / "fine_tuning" / created["id"] / "out"
    served, offline = logprobs(base, name), offline_logprobs(tiny_gguf, folder)
    served_base, offline_base = logprobs(base, "tiny"), offline_logprobs(tiny_gguf, None)
    assert served == pytest.approx(offline, abs=2e-3)
    assert served_base == pytest.approx(offline_base, abs=2e-3)
    assert max(abs(a - b) for a, b in zip(served, served_base, strict=False)) > 0.05
    answer = sdk3(base).chat.complete(model=name, messages=QUESTION, max_tokens=6, temperature=0)
    assert answer.model == name and answer.choices[0].message.content


def test_fine_tuned_model_routes_with_the_current_sdk(server, sdk1_python, tmp_path):
    base, _ = server
    jobs, _ = httpx.get(f"{base}/v1/fine_tuning/jobs", params={"status": "SUCCESS"}, timeout=30).json(), None
    name = (
        jobs["data"][0]["fine_tuned_model"]
        if jobs["data"]
        else run_sdk1(sdk1_python, tmp_path, base, 2)["final"]["fine_tuned_model"]
    )
    client = sdk3(base)
    updated = client.models.update(model_id=name, name="Sky", description="knows the sky's colour")
    assert (updated.id, updated.name, updated.description, updated.archived) == (
        name,
        "Sky",
        "knows the sky's colour",
        False,
    )
    card = client.models.retrieve(model_id=name)
    assert (card.name, card.root, card.archived) == ("Sky", "tiny", False)
    assert client.models.archive(model_id=name).archived is True
    refused = httpx.post(f"{base}/v1/chat/completions", json={"model": name, "messages": QUESTION, "max_tokens": 2})
    assert refused.status_code == 404 and "archived" in refused.json()["error"]["message"]
    assert client.models.retrieve(model_id=name).archived is True
    assert client.models.unarchive(model_id=name).archived is False
    assert len(logprobs(base, name)) == 6
    missing = httpx.post(f"{base}/v1/fine_tuning/models/ft:tiny:nope:00000000/archive")
    assert missing.status_code == 404


def test_start_waits_and_cancel_stops_a_running_job(server, sdk1_python, tmp_path):
    base, _ = server
    started = run_sdk1(sdk1_python, tmp_path, base, steps=2, action="start")
    assert started["created"]["status"] == "VALIDATED" and started["started"]["status"] == "QUEUED"
    assert started["final"]["status"] == "SUCCESS"
    cancelled = run_sdk1(sdk1_python, tmp_path, base, steps=100_000, action="cancel")
    assert cancelled["cancelled"]["status"] == "CANCELLATION_REQUESTED"
    assert cancelled["final"]["status"] == "CANCELLED" and cancelled["final"]["fine_tuned_model"] is None
    again = httpx.post(f"{base}/v1/fine_tuning/jobs/{cancelled['final']['id']}/start", timeout=30)
    assert again.status_code == 400 and "VALIDATED" in again.json()["error"]["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": "other"}, "model"),
        ({"hyperparameters": {"training_steps": 2, "fim_ratio": 0.5}}, "hyperparameters.fim_ratio"),
        ({"hyperparameters": {"learning_rate": 1e-4}}, "hyperparameters.training_steps"),
        ({"integrations": [{"type": "wandb", "project": "p"}]}, "integrations"),
        ({"suffix": "has spaces"}, "suffix"),
        ({"training_files": [{"file_id": "00000000-0000-0000-0000-000000000000"}]}, "training_files"),
        ({"hyperparameters": {"training_steps": 2, "seq_len": 4096}}, "hyperparameters"),
    ],
)
def test_bad_jobs_are_refused_with_the_field_named(server, change, field):
    base, _ = server
    up = httpx.post(
        f"{base}/v1/files", files={"file": ("t.jsonl", training_lines(2))}, data={"purpose": "fine-tune"}, timeout=60
    ).json()
    body = {"model": "tiny", "training_files": [{"file_id": up["id"]}], "hyperparameters": {"training_steps": 2}}
    r = httpx.post(f"{base}/v1/fine_tuning/jobs", json={**body, **change}, timeout=60)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == field, r.json()


def test_a_job_resumes_after_a_server_restart(tiny_gguf, sdk1_python, tmp_path):
    home = tmp_path / "home"
    with serve(tiny_gguf, home, tmp_path / "log1") as (base, _):
        job = run_sdk1(sdk1_python, tmp_path, base, steps=200, action="detach")["created"]  # a checkpoint every 20
        end = time.monotonic() + 600
        while not httpx.get(f"{base}/v1/fine_tuning/jobs/{job['id']}", timeout=30).json()["checkpoints"]:
            assert time.monotonic() < end, "no checkpoint after 600 s"
            time.sleep(0.2)
    stopped = json.loads(json.dumps(_job(home, job["id"])))
    assert stopped["status"] == "RUNNING"
    with serve(tiny_gguf, home, tmp_path / "log2") as (base, _):
        end = time.monotonic() + 900
        while (now := httpx.get(f"{base}/v1/fine_tuning/jobs/{job['id']}", timeout=30).json())["status"] == "RUNNING":
            assert time.monotonic() < end, "the job did not finish after the restart"
            time.sleep(0.5)
        assert now["status"] == "SUCCESS", now["events"]
        resumed = [e for e in now["events"] if e["data"].get("resumed_from_step")]
        assert len(resumed) == 1 and resumed[0]["data"]["resumed_from_step"] >= 20
        assert now["fine_tuned_model"] in [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]]
    log = (home / "platform" / "fine_tuning" / job["id"] / "worker.log").read_text()
    assert log.count("adapter written to") == 1


def _job(home: Path, job_id: str) -> dict:
    from tramontane.hub.jobs import JobStore

    return JobStore(home / "platform").get("fine_tuning", job_id)


def test_a_failed_job_keeps_its_error_in_its_events(server, tmp_path):
    """The worker fails (its training data went missing): the job ends FAILED, the worker's error in
    its events, and the server goes on serving."""
    base, home = server
    up = httpx.post(
        f"{base}/v1/files", files={"file": ("t.jsonl", training_lines(4))}, data={"purpose": "fine-tune"}, timeout=60
    ).json()
    body = {"model": "tiny", "training_files": [{"file_id": up["id"]}], "hyperparameters": {"training_steps": 2}}
    job = httpx.post(f"{base}/v1/fine_tuning/jobs", json={**body, "auto_start": False}, timeout=60).json()
    assert job["status"] == "VALIDATED"
    (home / "platform" / "fine_tuning" / job["id"] / "train.jsonl").unlink()
    httpx.post(f"{base}/v1/fine_tuning/jobs/{job['id']}/start", timeout=30).raise_for_status()
    end = time.monotonic() + 600
    while (now := httpx.get(f"{base}/v1/fine_tuning/jobs/{job['id']}", timeout=30).json())["status"] != "FAILED":
        assert time.monotonic() < end and now["status"] in ("QUEUED", "RUNNING"), now
        time.sleep(0.3)
    failed = now["events"][-1]["data"]
    assert failed["status"] == "FAILED" and failed["exit_code"] != 0 and "train.jsonl" in failed["error"]
    assert now["fine_tuned_model"] is None and len(logprobs(base, "tiny")) == 6


def test_the_api_key_guards_jobs_and_models(tmp_path):
    from fake_engine import FakeEngine
    from fastapi.testclient import TestClient

    from tramontane.serve import create_app

    api = TestClient(create_app(FakeEngine(), api_key="s3cret", platform_root=tmp_path / "platform"))
    for method, path in [
        ("GET", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", "/v1/fine_tuning/jobs/00000000-0000-0000-0000-000000000000"),
        ("POST", "/v1/fine_tuning/jobs/00000000-0000-0000-0000-000000000000/cancel"),
        ("PATCH", "/v1/fine_tuning/models/ft:x:y"),
        ("POST", "/v1/fine_tuning/models/ft:x:y/archive"),
    ]:
        assert api.request(method, path, json={}).status_code == 401, path
    keyed = {"Authorization": "Bearer s3cret"}
    assert api.get("/v1/fine_tuning/jobs", headers=keyed).json() == {"data": [], "object": "list", "total": 0}


def test_one_job_trains_at_a_time(server):
    """--fine-tuning-workers 1 (the default): a second job waits QUEUED while the first trains."""
    base, _ = server
    up = httpx.post(
        f"{base}/v1/files", files={"file": ("t.jsonl", training_lines(4))}, data={"purpose": "fine-tune"}, timeout=60
    ).json()

    def create(steps: int) -> str:
        body = {
            "model": "tiny",
            "training_files": [{"file_id": up["id"]}],
            "hyperparameters": {"training_steps": steps},
        }
        return httpx.post(f"{base}/v1/fine_tuning/jobs", json=body, timeout=60).json()["id"]

    def status(job_id: str) -> str:
        return httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", timeout=30).json()["status"]

    first = create(100_000)
    end = time.monotonic() + 600
    while status(first) != "RUNNING":
        assert time.monotonic() < end
        time.sleep(0.2)
    second = create(2)
    for _ in range(10):
        assert (status(first), status(second)) == ("RUNNING", "QUEUED")
        time.sleep(0.2)
    httpx.post(f"{base}/v1/fine_tuning/jobs/{first}/cancel", timeout=30).raise_for_status()
    while (now := status(second)) != "SUCCESS":
        assert time.monotonic() < end and now in ("QUEUED", "RUNNING"), now
        time.sleep(0.3)
    assert status(first) == "CANCELLED"


def test_epochs_become_steps_over_the_packed_rows(server):
    """8 conversations of 33..64 tokens (SmolLM2's template adds its system prompt) fill one 64-token
    row each: 1.5 epochs at 4 rows a step are 3 steps."""
    base, _ = server
    lines = training_lines(8)
    for line in lines.decode().splitlines():
        messages = json.loads(line)["messages"]
        ids = httpx.post(
            f"{base}/tokenize", json={"messages": messages, "add_generation_prompt": False}, timeout=30
        ).json()["tokens"]
        assert 32 < len(ids) <= 64
    up = httpx.post(
        f"{base}/v1/files", files={"file": ("t.jsonl", lines)}, data={"purpose": "fine-tune"}, timeout=60
    ).json()
    body = {
        "model": "tiny",
        "training_files": [{"file_id": up["id"]}],
        "hyperparameters": {"epochs": 1.5, "seq_len": 64},
        "auto_start": False,
    }
    job = httpx.post(f"{base}/v1/fine_tuning/jobs", json=body, timeout=60).json()
    assert job["hyperparameters"]["training_steps"] == 3 and job["status"] == "VALIDATED"
    assert job["metadata"]["train_tokens_per_step"] == 64 * 4


def test_weights_that_would_copy_the_data_without_end_are_refused(server):
    base, _ = server
    up = httpx.post(
        f"{base}/v1/files", files={"file": ("t.jsonl", training_lines(2))}, data={"purpose": "fine-tune"}, timeout=60
    ).json()
    files = [{"file_id": up["id"], "weight": 1e-6}, {"file_id": up["id"], "weight": 100}]
    body = {"model": "tiny", "training_files": files, "hyperparameters": {"training_steps": 2}}
    r = httpx.post(f"{base}/v1/fine_tuning/jobs", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "training_files", r.text
    assert "at most 100" in r.json()["error"]["message"]
