"""The disk outbox: order, durability across reopen, bounded with progress dropped first."""

from __future__ import annotations

import logging

import pytest

from blockskip.edge.outbox import Outbox


def test_messages_survive_a_reopen_in_order(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3")
    seqs = [box.put(f"t/{i}", f"m{i}".encode(), retain=i == 0) for i in range(5)]
    box.delete(seqs[1])
    box.close()
    again = Outbox(tmp_path / "o.sqlite3")
    pending = again.pending()
    assert [m.payload for m in pending] == [b"m0", b"m2", b"m3", b"m4"]
    assert pending[0].retain and not pending[1].retain
    assert [m.topic for m in again.pending(after=pending[1].seq, limit=1)] == ["t/3"]


def test_when_full_the_oldest_progress_is_dropped_first_and_logged(tmp_path, caplog):
    box = Outbox(tmp_path / "o.sqlite3", max_messages=4)
    box.put("reply/1", b"r1", kind="reply")
    box.put("progress", b"p1", kind="progress")
    box.put("progress", b"p2", kind="progress")
    box.put("capture/ack", b"a1", kind="ack")
    with caplog.at_level(logging.WARNING, logger="blockskip.edge.outbox"):
        box.put("result", b"x1", kind="result")  # drops p1
        box.put("result", b"x2", kind="result")  # drops p2
        box.put("result", b"x3", kind="result")  # no progress left: drops the oldest (r1)
    assert [m.payload for m in box.pending()] == [b"a1", b"x1", b"x2", b"x3"]
    assert box.dropped == 3 and len(box) == 4
    assert sum("outbox full" in r.message for r in caplog.records) == 3


def test_byte_bound(tmp_path):
    box = Outbox(tmp_path / "o.sqlite3", max_bytes=10)
    box.put("a", b"12345")
    box.put("b", b"67890")
    box.put("c", b"xyz")
    assert [m.payload for m in box.pending()] == [b"67890", b"xyz"]
    with pytest.raises(ValueError):
        box.put("d", b"x" * 11)
