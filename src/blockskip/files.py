"""Files written so that a crash leaves the old version or the new one, never a torn one, and the
sha256 of a file: one copy each for the whole project (bundles, transfers, the spool, job state,
the cache)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # hash in 1 MiB blocks: feature shards and bundles can be many GiB


def sha256_file(path: Path, block: int = CHUNK) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while data := handle.read(block):
            digest.update(data)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write `data` to `path`: a temporary file beside it (named for this process), fsync, rename,
    then (`sync_dir`) fsync the folder so the rename itself survives a power loss."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:  # os.write may write less than asked
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any, sync_dir: bool = True, indent: int | None = None) -> None:
    """JSON (keys sorted) written with write_atomic."""
    write_atomic(path, json.dumps(data, sort_keys=True, indent=indent).encode(), sync_dir=sync_dir)
