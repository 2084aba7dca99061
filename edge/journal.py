"""The agent's durable memory of commands (`data_dir/journal.sqlite3`, sqlite WAL, synchronous=FULL).

Two things survive a restart here:
- the first reply to every command id for `window_s` seconds, so that a repeated id (a client
  retry, a QoS 1 redelivery after a crash) gets that same reply again and runs nothing;
- the job that is running, written in the same transaction as its `started` reply, so that an
  agent killed mid-job can report the job's end (`interrupted`) when it comes back.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any


class Journal:
    """Command replies by id and the running job (thread-safe)."""

    def __init__(self, path: Path, window_s: float):
        self.window_s = window_s  # how long a command id is remembered
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (id TEXT PRIMARY KEY, payload BLOB NOT NULL, ts REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS job (slot INTEGER PRIMARY KEY CHECK (slot = 0), id TEXT NOT NULL,"
                         " action TEXT NOT NULL, args TEXT NOT NULL, started REAL NOT NULL)")

    def reply_for(self, command_id: str) -> bytes | None:
        """The first reply sent for this id, if it is still inside the window."""
        with self._lock:
            row = self._db.execute("SELECT payload FROM replies WHERE id = ? AND ts >= ?",
                                   (command_id, time.time() - self.window_s)).fetchone()
        return bytes(row[0]) if row else None

    def remember(self, command_id: str, payload: bytes, job: dict[str, Any] | None = None) -> None:
        """Store the reply of a command; with `job` ({"id", "action", "args", "started"}) also record
        it as the running job, in the same transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM replies WHERE ts < ?", (time.time() - self.window_s,))
                self._db.execute("INSERT OR REPLACE INTO replies (id, payload, ts) VALUES (?, ?, ?)",
                                 (command_id, payload, time.time()))
                if job is not None:
                    self._db.execute("INSERT OR REPLACE INTO job (slot, id, action, args, started) VALUES (0, ?, ?, ?, ?)",
                                     (job["id"], job["action"], json.dumps(job["args"], default=str), job["started"]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def running_job(self) -> dict[str, Any] | None:
        """The job recorded as running ({"id", "action", "args", "started"}), or None."""
        with self._lock:
            row = self._db.execute("SELECT id, action, args, started FROM job WHERE slot = 0").fetchone()
        if row is None:
            return None
        return {"id": row[0], "action": row[1], "args": json.loads(row[2]), "started": row[3]}

    def job_ended(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM job")

    def close(self) -> None:
        with self._lock:
            self._db.close()
