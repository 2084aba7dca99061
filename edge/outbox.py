"""Disk-backed outbox: every QoS 1 message the agent publishes goes through it.

A message is written to an sqlite3 table (WAL, synchronous=FULL) before it is handed to the MQTT
client, and deleted only when the broker's PUBACK arrives (`on_publish` with a success reason
code). A sender thread publishes in insertion order with a bounded in-flight window, only while
connected; paho itself resends its in-flight messages after a reconnect, and after an agent
restart the sender starts again from the oldest message still on disk. So a message that was put
here reaches the broker at least once (QoS 1), in order, across broker outages and agent restarts.

Bound and drop policy: at most `max_messages` messages and `max_bytes` payload bytes. When a new
message would exceed either, the oldest `progress` message is dropped first (progress is superseded
by later progress); only when no progress message is left is the oldest message of any kind
dropped. Every drop is logged as a warning and counted in `Outbox.dropped`.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutMessage:
    """One stored message."""

    seq: int  # insertion order; delivery order
    topic: str
    payload: bytes
    retain: bool
    kind: str  # "progress" messages are dropped first when the outbox is full


class Outbox:
    """The on-disk queue (thread-safe)."""

    def __init__(self, path: Path, max_messages: int = 10_000, max_bytes: int = 64 * 1024 * 1024):
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("outbox max_messages and max_bytes must be >= 1")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.dropped = 0
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
            " payload BLOB NOT NULL, retain INTEGER NOT NULL, kind TEXT NOT NULL)"
        )

    def put(self, topic: str, payload: bytes, retain: bool = False, kind: str = "event") -> int:
        """Store a message durably (dropping per the policy when full); return its sequence number."""
        if len(payload) > self.max_bytes:
            raise ValueError(f"message of {len(payload)} bytes is larger than the outbox ({self.max_bytes} bytes)")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._make_room(len(payload))
                cur = self._db.execute(
                    "INSERT INTO outbox (topic, payload, retain, kind) VALUES (?, ?, ?, ?)",
                    (topic, payload, int(retain), kind),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(cur.lastrowid)

    def _make_room(self, incoming: int) -> None:
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        while count >= self.max_messages or size + incoming > self.max_bytes:
            row = self._db.execute(
                "SELECT seq, topic, LENGTH(payload) FROM outbox ORDER BY kind != 'progress', seq LIMIT 1"
            ).fetchone()
            assert row is not None, "outbox accounting: full but empty"
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (row[0],))
            self.dropped += 1
            count, size = count - 1, size - row[2]
            logger.warning("outbox full (%d messages, %d bytes): dropped message %d on %s", count + 1, size + row[2], row[0], row[1])

    def pending(self, after: int = 0, limit: int = 100) -> list[OutMessage]:
        """Messages with seq > `after`, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, topic, payload, retain, kind FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [OutMessage(r[0], r[1], bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def delete(self, seq: int) -> None:
        """Forget a delivered message."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class OutboxSender:
    """Publishes the outbox through a paho client: in order, a bounded window in flight, while connected."""

    def __init__(self, outbox: Outbox, client: Any, window: int = 10):
        self.outbox = outbox
        self.client = client
        self.window = window
        self._acks: queue.Queue[tuple[int, bool]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq; touched by the sender thread only
        self._last_sent = 0
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, topic: str, payload: bytes, retain: bool = False, kind: str = "event") -> int:
        """Store and schedule a message."""
        seq = self.outbox.put(topic, payload, retain=retain, kind=kind)
        self._wake.set()
        return seq

    def set_connected(self, connected: bool) -> None:
        """Called from on_connect / on_disconnect."""
        if connected:
            self._connected.set()
        else:
            self._connected.clear()
        self._wake.set()

    def on_publish(self, mid: int, success: bool) -> None:
        """Called from paho's on_publish (network thread); never blocks."""
        self._acks.put((mid, success))
        self._wake.set()

    def idle(self) -> bool:
        """True when nothing is stored or in flight."""
        return not self._inflight and self._acks.empty() and len(self.outbox) == 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            try:
                self._drain_acks()
                if self._connected.is_set():
                    self._send_more()
            except Exception:  # the loop boundary: log and keep sending
                logger.exception("outbox sender error")

    def _drain_acks(self) -> None:
        while True:
            try:
                mid, success = self._acks.get_nowait()
            except queue.Empty:
                return
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue
            if not success:
                logger.error("broker refused outbox message %d; dropping it", seq)
            self.outbox.delete(seq)

    def _send_more(self) -> None:
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for msg in self.outbox.pending(after=self._last_sent, limit=room):
            info = self.client.publish(msg.topic, msg.payload, qos=1, retain=msg.retain)
            # Queued by paho even when the connection just dropped: it resends after reconnect.
            self._inflight[info.mid] = msg.seq
            self._last_sent = msg.seq
