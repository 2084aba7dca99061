"""The personalize job payload: what `blockskip fleet submit` and the host workers accept, and
which captures a job's selection picks."""

from __future__ import annotations

import json

import pytest

from blockskip.host.jobs import JobError, parse_job, select_captures

JOB = {"id": "leaf-1", "device": "jetson-01", "model": "crop", "subject": "a photo of sks leaf",
       "prompts": ["a photo of sks leaf on soil"], "captures": {"camera_id": "cam-01"}}


def test_a_job_round_trips_and_bad_ones_say_what_is_wrong():
    assert parse_job(json.dumps(JOB).encode()) == JOB
    bad = [
        (b"\xff", "not UTF-8 JSON"), (b"[1]", "JSON object"), (b"x" * 300_000, "limit"),
        ({**JOB, "id": "a" * 41}, "1-40"), ({**JOB, "id": "a/b"}, "1-40"),
        ({**JOB, "device": "jetson/01"}, "device id"), ({**JOB, "model": ""}, "model"),
        ({**JOB, "subject": " "}, "training prompt"), ({**JOB, "prompts": ["ok", ""]}, "prompts"),
        ({**JOB, "prompts": ["p"] * 65}, "1-64"), ({**JOB, "photos_dir": "/x"}, "exactly one"),
        ({k: v for k, v in JOB.items() if k != "captures"}, "exactly one"),
        ({**JOB, "captures": {"since": "2026-06-02T00:00:00Z", "until": "2026-06-01T00:00:00Z"}}, "after"),
        ({**JOB, "captures": {"since": "June"}}, "ISO 8601"), ({**JOB, "captures": {"sha256": ["ABC"]}}, "hex"),
        ({**JOB, "captures": {"limit": 5000}}, "1-1000"), ({**JOB, "captures": {"lens": 1}}, "unknown"),
        ({**JOB, "train": {"steps": "many"}}, "wrong type"), ({**JOB, "train": {"steps": True}}, "wrong type"),
        ({**JOB, "generate": {"guidance": 3}}, "unknown"), ({**JOB, "stop_after": "export"}, "stop_after"),
        ({**JOB, "priority": 1}, "unknown job keys"),
    ]
    for payload, message in bad:
        with pytest.raises(JobError, match=message):
            parse_job(payload if isinstance(payload, bytes) else json.dumps(payload).encode())


def test_the_selection_picks_by_camera_time_and_sha256_oldest_first():
    records = [{"sha256": f"{i:064x}", "camera_id": "cam-01" if i % 2 else "cam-02",
                "capture_time": f"2026-06-0{i}T10:00:00Z", "received": i} for i in range(1, 8)]
    records.append({"sha256": "f" * 64, "camera_id": "cam-01", "capture_time": None, "received": 9})
    pick = lambda **sel: [r["sha256"][-1] for r in select_captures(records, sel)]  # noqa: E731
    assert pick(camera_id="cam-01") == ["f", "1", "3", "5", "7"]  # no capture time sorts first
    assert pick(since="2026-06-03T00:00:00Z", until="2026-06-05T10:00:00+00:00") == ["3", "4", "5"]
    assert pick(camera_id="cam-02", since="2026-06-03T00:00:00Z") == ["4", "6"]
    assert pick(sha256=[f"{2:064x}", f"{7:064x}", "0" * 64]) == ["2", "7"]
    assert pick(limit=2) == ["f", "1"]
    assert pick(since="2026-06-03") == ["3", "4", "5", "6", "7"]  # a bare date is midnight UTC
