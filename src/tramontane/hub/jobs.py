"""Job records of the local La Plateforme (batch and fine-tuning jobs; a job's whole description as one
JSON document), in the SQLite database files.py keeps its records in, so they survive restarts: a server
that starts again finds its queued and running jobs and resumes them (serve/batch_runner.py,
serve/finetune_runner.py).

    jobs = JobStore()
    job = jobs.add("batch", {"status": "QUEUED", "created_at": 1700000000, ...})
    jobs.update(job["id"], status="RUNNING")
    jobs.list("batch", status=["RUNNING"], page=0, page_size=100)"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from .files import DATABASE, connect, platform_dir

JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    model TEXT, data TEXT NOT NULL
)"""


class JobStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or platform_dir()

    def _db(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.root, _SCHEMA)

    def add(self, kind: str, job: dict[str, Any]) -> dict[str, Any]:
        """Store a new job (it gets its "id"); `job` needs "status" and "created_at"."""
        job = {**job, "id": str(uuid.uuid4())}
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                (job["id"], kind, job["status"], job["created_at"], job.get("model"), json.dumps(job)),
            )
        return job

    def get(self, kind: str, job_id: str) -> dict[str, Any] | None:
        if not JOB_ID.fullmatch(job_id) or not (self.root / DATABASE).exists():
            return None
        with self._db() as db:
            row = db.execute("SELECT data FROM jobs WHERE id = ? AND kind = ?", (job_id, kind)).fetchone()
        return json.loads(row["data"]) if row else None

    def update(
        self,
        job_id: str,
        when: tuple[str, ...] | None = None,
        append: dict[str, Any] | None = None,
        merge: dict[str, dict[str, Any]] | None = None,
        **changes: Any,
    ) -> dict[str, Any]:
        """Change some fields of a job (atomically: read, merge, write in one transaction); with `when`,
        only if its status is one of those (else it is returned unchanged: a cancel that came first holds);
        `append` adds an item to each of those list fields (a job's events); `merge` sets some keys of
        those dict fields (a model card's name, leaving its other keys as they are now)."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            current = json.loads(row["data"])
            if when is not None and current["status"] not in when:
                return current
            job = {**current, **changes}
            for key, item in (append or {}).items():
                job[key] = [*current.get(key, []), item]
            for key, values in (merge or {}).items():
                job[key] = {**(current.get(key) or {}), **values}
            db.execute("UPDATE jobs SET status = ?, data = ? WHERE id = ?", (job["status"], json.dumps(job), job_id))
        return job

    def list(
        self,
        kind: str,
        *,
        status: list[str] | None = None,
        model: str | None = None,
        page: int = 0,
        page_size: int = 100,
        oldest_first: bool = False,
    ) -> tuple[list[dict[str, Any]], int]:
        """A page of jobs (newest first unless `oldest_first`) and how many match in all."""
        if not (self.root / DATABASE).exists():  # nothing yet: reading makes no database
            return [], 0
        where, args = ["kind = ?"], [kind]
        if status:
            where.append(f"status IN ({', '.join('?' * len(status))})")
            args += status
        if model:
            where.append("model = ?")
            args.append(model)
        clause = " AND ".join(where)
        order = "ASC" if oldest_first else "DESC"
        with self._db() as db:
            total = db.execute(f"SELECT count(*) FROM jobs WHERE {clause}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT data FROM jobs WHERE {clause} ORDER BY created_at {order}, rowid {order} LIMIT ? OFFSET ?",
                [*args, page_size, page * page_size],
            ).fetchall()
        return [json.loads(r["data"]) for r in rows], total
