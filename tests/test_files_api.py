"""Issue 20: Mistral's files API (/v1/files) through the official `mistralai` SDK (3.x) against the
ASGI app and the fake engine: upload, list, retrieve, download, delete; training and batch files
checked at upload, with the reader's line-numbered reasons; the size and count limits; no file name or
id ever reaching the file system."""

from __future__ import annotations

import json

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from tramontane.serve import create_app
from tramontane.serve.common import FileLimits

TRAIN = [
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]},
    {"messages": [{"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "Bye!"}]},
]


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def api(tmp_path):
    return TestClient(create_app(FakeEngine(), platform_root=tmp_path / "platform"))


@pytest.fixture
def mistral(api):
    try:
        from mistralai import Mistral
    except ImportError:
        from mistralai.client import Mistral
    return Mistral(api_key="none", server_url=str(api.base_url), client=api)


def test_upload_list_retrieve_download_delete_through_the_sdk(mistral, tmp_path):
    up = mistral.files.upload(file={"file_name": "train.jsonl", "content": jsonl(TRAIN)}, purpose="fine-tune")
    assert (up.filename, up.purpose, up.sample_type, up.num_lines, up.source) == (
        "train.jsonl",
        "fine-tune",
        "instruct",
        2,
        "upload",
    )
    assert up.size_bytes == len(jsonl(TRAIN))
    batch = mistral.files.upload(
        file={"file_name": "requests.jsonl", "content": jsonl([{"custom_id": "a", "body": {"messages": []}}])},
        purpose="batch",
    )
    assert batch.sample_type == "batch_request" and batch.num_lines == 1
    listed = mistral.files.list()
    assert listed.total == 2 and [f.id for f in listed.data] == [batch.id, up.id]  # newest first
    assert [f.id for f in mistral.files.list(purpose="fine-tune").data] == [up.id]
    got = mistral.files.retrieve(file_id=up.id)
    assert got.id == up.id and got.deleted is False
    assert mistral.files.download(file_id=up.id).read() == jsonl(TRAIN)
    assert mistral.files.delete(file_id=up.id).deleted is True
    assert mistral.files.list().total == 1
    assert list((tmp_path / "platform" / "files").iterdir()) == [tmp_path / "platform" / "files" / batch.id]


def test_a_malformed_training_file_is_refused_with_its_line_numbers(api):
    rows = [TRAIN[0], {"messages": [{"role": "user", "content": "no answer"}]}, "not an object", {"text": 5}]
    body = "".join(json.dumps(r) + "\n" for r in rows) + "{broken\n"
    r = api.post("/v1/files", files={"file": ("bad.jsonl", body.encode())}, data={"purpose": "fine-tune"})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("bad.jsonl: 4 of 5 lines cannot be used:")
    assert [line.split(":")[0] for line in message.splitlines()[1:]] == ["line 2", "line 3", "line 4", "line 5"]
    assert api.get("/v1/files").json()["total"] == 0  # nothing kept


@pytest.mark.parametrize(
    ("lines", "words"),
    [
        ([{"body": {}}, {"custom_id": "x"}], 'line 2: each line must be an object with a "body" object'),
        ([{"custom_id": "x", "body": {}}, {"custom_id": "x", "body": {}}], "line 2: custom_id 'x' is used twice"),
        ([{"custom_id": 3, "body": {}}], "line 1: custom_id must be a string"),
    ],
)
def test_batch_files_are_checked_line_by_line(api, lines, words):
    r = api.post("/v1/files", files={"file": ("b.jsonl", jsonl(lines))}, data={"purpose": "batch"})
    assert r.status_code == 422 and words in r.json()["error"]["message"]


def test_limits_and_names_that_never_become_paths(tmp_path):
    api = TestClient(
        create_app(FakeEngine(), platform_root=tmp_path / "p", file_limits=FileLimits(max_file_bytes=300, max_files=1))
    )
    big = jsonl(TRAIN * 5)
    r = api.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413, r.text
    r = api.post("/v1/files", files={"file": ("../../escape.jsonl", jsonl(TRAIN[:1]))}, data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["filename"] == "../../escape.jsonl"
    assert not (tmp_path / "escape.jsonl").exists() and not list(tmp_path.glob("**/escape.jsonl"))
    r = api.post("/v1/files", files={"file": ("t.jsonl", jsonl(TRAIN[:1]))}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and "its limit" in r.json()["error"]["message"]
    for bad in ("../p/platform.sqlite3", "%2e%2e", "0" * 36):
        assert api.get(f"/v1/files/{bad}").status_code == 404
    assert api.post("/v1/files", data={"purpose": "fine-tune"}).status_code == 400  # no file part
    r = api.post("/v1/files", files={"file": ("t.jsonl", b"x")}, data={"purpose": "ocr"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
