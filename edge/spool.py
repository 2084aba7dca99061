"""Capture spool: validated field-camera images stored durably, one file per distinct sha256.

Layout under the spool directory: `<sha256>.<jpg|png>` (the exact bytes received) and
`<sha256>.json` (metadata: camera id, capture time, GPS, size, received time). Each file is
written to a temporary name, fsynced, renamed into place, and the directory is fsynced; the
metadata file is written last, so its presence means the capture is complete. Only after
`Spool.store` returns does the agent acknowledge the capture.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockskip.files import write_atomic
from blockskip.images import FORMATS, CaptureError, image_format  # noqa: F401 (the spool's own names too)

SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
@dataclass(frozen=True)
class Stored:
    """Outcome of a successful store."""

    sha256: str
    path: Path
    duplicate: bool  # the same bytes were already in the spool (stored once, acked again)


def capture_meta(camera_id: str, capture_time: str | None, gps: str | None) -> dict[str, Any]:
    """The metadata stored with a capture, from its MQTT user properties; malformed values are
    refused (`bad_properties`), never stored as given. `capture_time` is ISO 8601 (a time zone is
    recommended; it is kept as sent), `gps` is "lat,lon[,alt]" in degrees and metres."""
    if capture_time is not None:
        try:
            if len(capture_time) > 64:
                raise ValueError("too long")
            datetime.datetime.fromisoformat(capture_time.replace("Z", "+00:00"))
        except ValueError as err:
            raise CaptureError("bad_properties", f"capture_time {capture_time[:64]!r} is not an ISO 8601 time "
                                                 f"(e.g. 2026-06-01T10:15:00Z): {err}") from err
    if gps is not None:
        parts = gps.split(",") if len(gps) <= 96 else []
        try:
            values = [float(v) for v in parts]
        except ValueError:
            values = []
        if len(values) not in (2, 3) or not all(math.isfinite(v) for v in values) \
                or not -90 <= values[0] <= 90 or not -180 <= values[1] <= 180:
            raise CaptureError("bad_properties", f"gps {gps[:96]!r} is not \"lat,lon[,alt]\" "
                                                 f"(latitude -90..90, longitude -180..180, in degrees)")
    return {"camera_id": camera_id, "capture_time": capture_time, "gps": gps}


class Spool:
    """The spool directory. Stores are serialized by the caller (the agent's capture thread)."""

    def __init__(self, root: Path, max_bytes: int = 16 * 1024 * 1024, max_pixels: int = 64_000_000):
        self.root = root
        self.max_bytes = max_bytes  # largest accepted capture payload
        self.max_pixels = max_pixels  # largest accepted image, width x height, checked before decoding
        root.mkdir(parents=True, exist_ok=True)

    def store(self, data: bytes, meta: dict[str, Any], expected_sha256: str | None = None) -> Stored:
        """Validate and store one capture; raise CaptureError with a code when refused."""
        if len(data) > self.max_bytes:
            raise CaptureError("too_large", f"capture is {len(data)} bytes; the limit is {self.max_bytes}")
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and expected_sha256.lower() != digest:
            raise CaptureError("bad_sha256", f"sha256 of the payload is {digest}, not the {expected_sha256[:64]} sent")
        fmt = image_format(data, self.max_pixels)
        path = self.root / f"{digest}.{FORMATS[fmt]}"
        meta_path = self.root / f"{digest}.json"
        if meta_path.exists() and path.exists():
            return Stored(digest, path, duplicate=True)
        write_atomic(path, data)
        record = dict(meta, sha256=digest, size=len(data), format=fmt, file=path.name, received=time.time())
        write_atomic(meta_path, json.dumps(record, sort_keys=True).encode())
        return Stored(digest, path, duplicate=False)

    def list(self, limit: int = 100, camera_id: str | None = None) -> tuple[int, list[dict[str, Any]]]:
        """(total matching, newest `limit` metadata records)."""
        records = []
        for meta_path in self.root.glob("*.json"):
            try:
                record = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if camera_id is None or record.get("camera_id") == camera_id:
                records.append(record)
        records.sort(key=lambda r: r.get("received", 0), reverse=True)
        return len(records), records[:limit]

    def record(self, digest: str) -> dict[str, Any] | None:
        """The metadata of the capture with this sha256, or None."""
        if not SHA256_PATTERN.match(digest):
            return None
        try:
            record = json.loads((self.root / f"{digest}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if (self.root / str(record.get("file", ""))).is_file() else None

    def count(self) -> int:
        return sum(1 for _ in self.root.glob("*.json"))
