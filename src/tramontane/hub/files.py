"""Uploaded files of the local La Plateforme (`/v1/files`): training data and batch requests and
results, kept under `$TRAMONTANE_HOME/platform/`.

    store = FileStore()
    record = store.add(temp_path, "train.jsonl", "fine-tune", sample_type="instruct", num_lines=120)
    store.path(record.id)        # the content: platform/files/<uuid>

A file's content lives at `files/<id>`, where the id is a UUID the store made: no name a client sends
ever becomes a path (the file name is a column, nothing more). Records are rows of one SQLite
database (`platform.sqlite3`, shared with the job records, jobs.py), so they survive restarts and
concurrent server processes; every operation opens its own short connection (WAL mode, 30 s busy
timeout). sqlite3 is the standard library's: no service to run."""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import home

FILE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PURPOSES = ("fine-tune", "batch")
DATABASE = "platform.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, sample_type TEXT NOT NULL, source TEXT NOT NULL,
    num_lines INTEGER, mimetype TEXT
)"""


def platform_dir() -> Path:
    return home() / "platform"


@contextlib.contextmanager
def connect(root: Path, schema: str) -> Iterator[sqlite3.Connection]:
    """A connection to `root`/platform.sqlite3 with `schema` applied, committed on success."""
    root.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root / DATABASE, timeout=30.0)
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(schema)
        with db:
            yield db
    finally:
        db.close()


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    sample_type: str  # "instruct" / "pretrain" (fine-tune), "batch_request", "batch_result", "batch_error"
    source: str  # "upload", or "mistral" for what the server wrote (batch results)
    num_lines: int | None = None
    mimetype: str | None = None

    def api(self) -> dict[str, Any]:
        """As Mistral's API describes a file."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "sample_type": self.sample_type,
            "source": self.source,
            "num_lines": self.num_lines,
            "mimetype": self.mimetype,
            "signature": None,
        }


class FileStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or platform_dir()
        self.folder = self.root / "files"

    def _db(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.root, _SCHEMA)

    def _exists(self) -> bool:
        """Whether anything was ever stored (reading makes no database)."""
        return (self.root / DATABASE).exists()

    def new_path(self) -> Path:
        """A temporary path in the store's folder, for content on its way in (then `add` moves it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f".incoming-{uuid.uuid4()}"

    def add(
        self,
        content: Path,
        filename: str,
        purpose: str,
        *,
        sample_type: str,
        source: str = "upload",
        num_lines: int | None = None,
        mimetype: str | None = None,
    ) -> StoredFile:
        """Move `content` (a path from `new_path`) in as a new file."""
        record = StoredFile(
            str(uuid.uuid4()),
            filename,
            purpose,
            content.stat().st_size,
            int(time.time()),
            sample_type,
            source,
            num_lines,
            mimetype,
        )
        os.replace(content, self.folder / record.id)
        with self._db() as db:
            db.execute(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.filename,
                    record.purpose,
                    record.bytes,
                    record.created_at,
                    record.sample_type,
                    record.source,
                    record.num_lines,
                    record.mimetype,
                ),
            )
        return record

    def get(self, file_id: str) -> StoredFile | None:
        if not FILE_ID.fullmatch(file_id) or not self._exists():
            return None
        with self._db() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return StoredFile(**dict(row)) if row else None

    def path(self, record: StoredFile) -> Path:
        return self.folder / record.id

    def list(
        self, *, purpose: str | None = None, search: str | None = None, page: int = 0, page_size: int = 100
    ) -> tuple[list[StoredFile], int]:
        """A page of files, newest first, and how many match in all."""
        if not self._exists():
            return [], 0
        where, args = ["1 = 1"], []
        if purpose:
            where.append("purpose = ?")
            args.append(purpose)
        if search:
            where.append("instr(filename, ?) > 0")
            args.append(search)
        clause = " AND ".join(where)
        with self._db() as db:
            total = db.execute(f"SELECT count(*) FROM files WHERE {clause}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT * FROM files WHERE {clause} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                [*args, page_size, page * page_size],
            ).fetchall()
        return [StoredFile(**dict(r)) for r in rows], total

    def count(self) -> int:
        if not self._exists():
            return 0
        with self._db() as db:
            return int(db.execute("SELECT count(*) FROM files").fetchone()[0])

    def delete(self, record: StoredFile) -> None:
        with self._db() as db:
            db.execute("DELETE FROM files WHERE id = ?", (record.id,))
        with contextlib.suppress(FileNotFoundError):
            (self.folder / record.id).unlink()
