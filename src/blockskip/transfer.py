"""File transfer over MQTT in both directions: chunked, resumable, sha256 per chunk and per file.

Host -> board (bundles) and board -> host (captures, generated images) use this one module. It
owns no MQTT client: its owner connects a paho 2.x MQTT v5 client (persistent session), subscribes
to the filters `subscriptions(...)` gives, feeds incoming messages to `handle(...)`, calls the
receiver's `on_connect()` on every (re)connect, and passes a `publish(topic, payload, properties)`
that publishes at QoS 1 (never retained).

Topics under a device prefix `blockskip/<device_id>/`:
  `<prefix>files/<transfer>/chunk`  sender -> receiver: the raw chunk bytes, user properties
                                    `index` (decimal) and `sha256` (hex of the chunk)
  `<prefix>files/<transfer>/want`   receiver -> sender: `{"chunks": [i, ...]}`
  `<prefix>files/<transfer>/done`   receiver -> sender: `{"ok": true, "sha256": ...}` or
                                    `{"ok": false, "error": {"code", "message"}}`

The receiver drives: it asks for at most `window` chunks it lacks; each chunk that arrives with
the right size and sha256 is written at its offset into a partial file in its state_dir, made
durable (fdatasync), and only then recorded in the transfer's state json; then the next missing
chunk is asked for. When all are in, the whole file's sha256 (computed as the chunks arrive in
order) is compared with the offer's, and the partial file is renamed to `dest`. A chunk missing
for `retry_s` while connected is asked for again; after a reconnect the receiver first waits
`retry_s`, because chunks the broker kept in the persistent session arrive then, so a broker
restart re-sends at most `window` chunks. The sender keeps no per-chunk state, only its offers
(persisted in its state_dir), so either side can restart and the transfer continues.
Protocol description for operators: edge/AGENT.md, "Files over MQTT".
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockskip.mqtt import ID_PATTERN
from blockskip.errors import BlockskipError
from blockskip.files import fsync_dir, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

# From benchmarks/transfer.py (benchmarks/results/transfer.md, 200 MiB on loopback): 1 MiB chunks
# run at 40 MB/s with a window of 2 (256 KiB: 20 MB/s; window 4 or 4 MiB chunks: 48-50 MB/s), and
# the window bounds what a lost message costs in resends: 2 keeps a broker restart at <= 2 chunks.
DEFAULT_CHUNK_SIZE = 1024 * 1024
DEFAULT_WINDOW = 2
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 16 * 1024 * 1024  # the broker's max_packet_size (deploy/mosquitto) is 17 MB
MAX_CHUNKS = 1_000_000  # a larger file needs a larger chunk size
MAX_CONTROL_BYTES = 64 * 1024  # largest want/done payload accepted
MAX_WANT = 1024  # most chunks one want may ask for
PROGRESS_INTERVAL_S = 1.0  # at most one progress callback per interval, plus the final one
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
INDEX_PATTERN = re.compile(r"^[0-9]{1,7}$")

Publish = Callable[[str, bytes, "Properties | None"], None]  # the owner publishes at QoS 1

ERROR_CODES = {
    "bad_offer": "an offer field is missing, of the wrong type or out of range, or the transfer id is in use",
    "bad_prefix": "a topic prefix is not '<...>/' without wildcards",
    "too_large": "the offered file is larger than the receiver's max_file_bytes",
    "pending_limit": "the file with the receives already under way is over the receiver's max_pending_bytes",
    "no_space": "the file with the receives already under way would leave less than disk_margin_bytes free",
    "idle_timeout": "no chunk arrived for idle_timeout_s while connected; the partial file was removed",
    "deadline": "the transfer ran past deadline_s; the partial file was removed",
    "expired": "an unfinished receive found at start was older than deadline_s; it was dropped",
    "too_many_pixels": "a received image has more pixels than the receiver's limit (read from its header)",
    "bad_image": "a received file that must be an image does not decode as JPEG or PNG",
    "cancelled": "the receiver's owner gave the transfer up (its job ended); the partial file was removed",
    "not_found": "the file to send cannot be read",
    "source_changed": "the file being sent changed size or time since it was offered",
    "sha_mismatch": "the received file's sha256 differs from the offer's",
    "io_error": "reading or writing a file failed",
    "unknown": "no such transfer here",
    "timeout": "the transfer did not end within the time given",
    "stopped": "waiting was stopped by the caller",
    "failed": "the receiver reported a failure without a usable code",
}


@dataclass(frozen=True)
class ReceivePolicy:
    """What a receiver accepts: one policy for the board's agent and the host worker (their
    configs set it; SECURITY.md lists the defaults). Each refusal has its own code."""

    max_file_bytes: int = 32 * 1024**3  # one offer larger than this: too_large
    max_pending_bytes: int = 64 * 1024**3  # unfinished receives together, with the new one: pending_limit
    disk_margin_bytes: int = 1024**3  # free space every receive under way must leave when complete: no_space
    idle_timeout_s: float = 600.0  # no chunk for this long while connected: idle_timeout
    deadline_s: float = 86_400.0  # the whole transfer, across restarts: deadline (expired when found at start)

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_pending_bytes", "disk_margin_bytes"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("idle_timeout_s", "deadline_s"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


class TransferError(BlockskipError):
    """A transfer that cannot go on; `code` is one of ERROR_CODES (or the receiver's, for a sender)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _check_id(transfer: Any) -> str:
    if not isinstance(transfer, str) or not ID_PATTERN.match(transfer):
        raise TransferError("bad_offer", f"transfer id {str(transfer)[:80]!r} must be 1-64 of [A-Za-z0-9_.:-]")
    return transfer


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str) or not prefix.endswith("/") or any(c in prefix for c in "+#\0") \
            or len(prefix) > 1024:
        raise TransferError("bad_prefix", f"topic prefix {str(prefix)[:80]!r} must end with '/' and have no "
                                          f"wildcards (e.g. 'blockskip/dev-a/')")
    return prefix


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FileOffer:
    """What a receiver needs to know before the first chunk; sent by the owner (e.g. in a command)."""

    transfer: str  # transfer id (1-64 of [A-Za-z0-9_.:-]): part of the topics
    name: str  # the file's base name (no slashes), for display and the destination
    size: int  # bytes
    sha256: str  # hex of the whole file
    chunk_size: int  # bytes per chunk (the last one is shorter)

    def __post_init__(self) -> None:
        _check_id(self.transfer)
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 255 or self.name in (".", "..") \
                or any(c in self.name for c in "/\\\0"):
            raise TransferError("bad_offer", f"name {str(self.name)[:80]!r} must be a file's base name "
                                             f"(1-255 characters, no slashes)")
        if not _is_int(self.size) or self.size < 0:
            raise TransferError("bad_offer", f"size must be an integer >= 0, got {self.size!r}")
        if not isinstance(self.sha256, str) or not SHA256_PATTERN.match(self.sha256):
            raise TransferError("bad_offer", "sha256 must be 64 lowercase hex digits")
        if not _is_int(self.chunk_size) or not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise TransferError("bad_offer", f"chunk_size must be an integer in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}, "
                                             f"got {self.chunk_size!r}")
        if self.chunks > MAX_CHUNKS:
            raise TransferError("bad_offer", f"{self.chunks} chunks is over {MAX_CHUNKS}: use a larger chunk_size")

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_len(self, index: int) -> int:
        """Bytes in chunk `index` (the last one is shorter)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "FileOffer":
        """An offer from JSON; every field is checked (TransferError `bad_offer`)."""
        if not isinstance(d, dict):
            raise TransferError("bad_offer", "an offer must be a JSON object")
        names = {"transfer", "name", "size", "sha256", "chunk_size"}
        if set(d) != names:
            unknown = sorted(map(str, set(d) - names))[:8]
            raise TransferError("bad_offer", f"an offer has exactly the keys {sorted(names)}; missing "
                                             f"{sorted(names - set(d))}, unknown {unknown}")
        return cls(**d)


def offer_for(path: Path, transfer: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileOffer:
    """The offer of a file (reads it once for its sha256)."""
    path = Path(path)
    try:
        return FileOffer(transfer, path.name, path.stat().st_size, sha256_file(path), chunk_size)
    except OSError as err:
        raise TransferError("not_found", f"cannot read {path}: {err}") from err


def topics(prefix: str, transfer: str = "+") -> dict[str, str]:
    """The three topics of a transfer ("+": the filters for all transfers under the prefix)."""
    _check_prefix(prefix)
    if transfer != "+":
        _check_id(transfer)
    return {kind: f"{prefix}files/{transfer}/{kind}" for kind in ("chunk", "want", "done")}


def _parse_topic(topic: str) -> tuple[str, str, str] | None:
    """(prefix, transfer, kind) of a file topic, None for any other topic."""
    parts = topic.rsplit("/", 3)
    if len(parts) != 4 or parts[1] != "files" or parts[3] not in ("chunk", "want", "done"):
        return None
    if not ID_PATTERN.match(parts[2]):
        return None
    return parts[0] + "/", parts[2], parts[3]


def _control_json(payload: bytes) -> Any:
    """A want/done payload as JSON, or ValueError saying why not."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise ValueError(f"{len(payload)} bytes is over {MAX_CONTROL_BYTES}")
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as err:
        raise ValueError(f"not UTF-8 JSON: {err}") from err


def _ranges(indices: set[int]) -> list[list[int]]:
    """Sorted indices as [first, last] runs (the state file's compact form)."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _from_ranges(runs: Any, chunks: int) -> set[int]:
    if not isinstance(runs, list) or not all(isinstance(r, list) and len(r) == 2 and all(map(_is_int, r))
                                             and 0 <= r[0] <= r[1] < chunks for r in runs):
        raise ValueError("received must be a list of [first, last] chunk runs inside the file")
    return {i for first, last in runs for i in range(first, last + 1)}


def _publish(publish: Publish, topic: str, payload: bytes, properties: Properties | None) -> bool:
    """The owner's publish; a failure is logged, never raised into the thread that handles messages."""
    try:
        publish(topic, payload, properties)
        return True
    except Exception:  # the owner's boundary: its publish failed (queue full, client closed)
        logger.exception("publishing on %s failed", topic)
        return False


def _wait_event(event: threading.Event, what: str, timeout: float | None,
                should_stop: Callable[[], bool] | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while not event.is_set():
        if should_stop is not None and should_stop():
            raise TransferError("stopped", f"stopped waiting for {what}")
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TransferError("timeout", f"{what} did not end within {timeout} s")
        event.wait(0.2 if left is None else min(0.2, left))


# ---- sender --------------------------------------------------------------------------------

@dataclass
class _Outgoing:
    prefix: str
    path: Path
    offer: FileOffer
    mtime_ns: int  # the file's modification time when offered: a changed file is not served
    result: dict | None = None  # the receiver's done message
    sent: int = 0  # chunk publishes (resends counted)
    fd: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    asks: dict[str, None] = field(default_factory=dict)  # recent want ids served (QoS 1 duplicates are not)


class FileSender:
    """Serves offered files: publishes each chunk a receiver asks for. No per-chunk state."""

    def __init__(self, publish: Publish, state_dir: Path | None = None):
        self.publish = publish
        self.state_dir = None if state_dir is None else Path(state_dir)
        self._lock = threading.Lock()
        self._out: dict[str, _Outgoing] = {}
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            for state in sorted(self.state_dir.glob("*.json")):
                try:
                    d = json.loads(state.read_text())
                    out = _Outgoing(_check_prefix(d["prefix"]), Path(d["path"]), FileOffer.from_dict(d["offer"]),
                                    int(d["mtime_ns"]), d.get("result"))
                except (OSError, ValueError, KeyError, TypeError, TransferError) as err:
                    logger.warning("ignoring unreadable sender state %s: %s", state, err)
                    continue
                if out.result is not None:
                    out.done.set()
                self._out[out.offer.transfer] = out

    def offer(self, prefix: str, path: Path, transfer: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> FileOffer:
        """Offer a file (hashes it) and serve it from now on; the same file again is the same offer."""
        _check_prefix(prefix)
        path = Path(path).resolve()
        offer = offer_for(path, transfer, chunk_size)
        mtime_ns = path.stat().st_mtime_ns
        with self._lock:
            old = self._out.get(transfer)
            if old is not None:
                if (old.prefix, old.path, old.offer) != (prefix, path, offer):
                    raise TransferError("bad_offer", f"transfer {transfer} is already offered for another file; "
                                                     f"forget it first or use a new id")
                return old.offer
            out = _Outgoing(prefix, path, offer, mtime_ns)
            self._persist(out)
            self._out[transfer] = out
        logger.info("offering %s as transfer %s (%d bytes, %d chunks)", path, transfer, offer.size, offer.chunks)
        return offer

    def _persist(self, out: _Outgoing) -> None:
        if self.state_dir is not None:
            write_json_atomic(self.state_dir / f"{out.offer.transfer}.json",
                        {"prefix": out.prefix, "path": str(out.path), "offer": out.offer.to_dict(),
                         "mtime_ns": out.mtime_ns, "result": out.result})

    def handle(self, topic: str, payload: bytes) -> bool:
        """A want or done of one of its transfers: serve it (True); any other topic: False."""
        parsed = _parse_topic(topic)
        if parsed is None or parsed[2] == "chunk":
            return False
        prefix, transfer, kind = parsed
        with self._lock:
            out = self._out.get(transfer)
        if out is None or out.prefix != prefix:
            return False
        try:
            message = _control_json(payload)
            if kind == "want":
                self._serve(out, self._want(out, message))
            else:
                self._done(out, message)
        except ValueError as err:
            logger.warning("dropping a bad %s for transfer %s: %s", kind, transfer, err)
        return True

    def _want(self, out: _Outgoing, message: Any) -> list[int]:
        """The chunks a want asks for; none for a want already served (a QoS 1 duplicate)."""
        chunks = message.get("chunks") if isinstance(message, dict) else None
        if not isinstance(chunks, list) or not 0 < len(chunks) <= MAX_WANT:
            raise ValueError(f'a want is {{"chunks": [index, ...], "ask": id}} with 1-{MAX_WANT} indices')
        if not all(_is_int(i) and 0 <= i < out.offer.chunks for i in chunks):
            raise ValueError(f"chunk indices must be integers in 0..{out.offer.chunks - 1}")
        ask = message.get("ask")
        if ask is not None:
            if not isinstance(ask, str) or not ID_PATTERN.match(ask):
                raise ValueError("ask must be 1-64 of [A-Za-z0-9_.:-]")
            with self._lock:
                if ask in out.asks:
                    logger.debug("transfer %s: want %s again (a redelivery), not served twice", out.offer.transfer, ask)
                    return []
                out.asks[ask] = None
                if len(out.asks) > 256:
                    del out.asks[next(iter(out.asks))]
        return list(dict.fromkeys(chunks))

    def _serve(self, out: _Outgoing, indices: list[int]) -> None:
        topic = topics(out.prefix, out.offer.transfer)["chunk"]
        for index in indices:
            data = self._read(out, index)
            if data is None:
                return
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("index", str(index)), ("sha256", hashlib.sha256(data).hexdigest())]
            if not _publish(self.publish, topic, data, props):
                return  # the receiver asks again
            with self._lock:
                out.sent += 1

    def _read(self, out: _Outgoing, index: int) -> bytes | None:
        """Chunk `index` from the file, or None (and the transfer failed locally) when it changed."""
        offer = out.offer
        try:
            with self._lock:
                if out.fd is None:
                    fd = os.open(out.path, os.O_RDONLY)
                    st = os.fstat(fd)
                    if (st.st_size, st.st_mtime_ns) != (offer.size, out.mtime_ns):
                        os.close(fd)
                        raise TransferError("source_changed", f"{out.path} changed since it was offered as transfer "
                                                              f"{offer.transfer}; offer it again under a new id")
                    out.fd = fd
                fd = out.fd
            data = os.pread(fd, offer.chunk_len(index), index * offer.chunk_size)
            if len(data) != offer.chunk_len(index):
                raise TransferError("source_changed", f"{out.path} is shorter than when it was offered")
            return data
        except (OSError, TransferError) as err:
            code = err.code if isinstance(err, TransferError) else "not_found"
            logger.error("cannot serve transfer %s: %s", offer.transfer, err)
            self._finish(out, {"ok": False, "error": {"code": code, "message": str(err)}})
            return None

    def _done(self, out: _Outgoing, message: Any) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("ok"), bool):
            raise ValueError('a done is {"ok": true, "sha256": ...} or {"ok": false, "error": {...}}')
        if message["ok"]:
            if message.get("sha256") != out.offer.sha256:
                raise ValueError("done names another sha256 than the offer's")
            result = {"ok": True, "sha256": out.offer.sha256}
        else:
            error = message.get("error") if isinstance(message.get("error"), dict) else {}
            code = error.get("code")
            result = {"ok": False, "error": {
                "code": code if isinstance(code, str) and ID_PATTERN.match(code) else "failed",
                "message": str(error.get("message", "the receiver reported a failure"))[:1000]}}
        self._finish(out, result)

    def _finish(self, out: _Outgoing, result: dict) -> None:
        with self._lock:
            if out.result is not None:
                return
            out.result = result
            if out.fd is not None:
                os.close(out.fd)
                out.fd = None
            try:
                self._persist(out)
            except OSError as err:
                logger.warning("cannot record the result of transfer %s: %s", out.offer.transfer, err)
        out.done.set()
        logger.info("transfer %s ended: %s", out.offer.transfer, result)

    def result(self, transfer: str) -> dict | None:
        """The receiver's done message, None while pending (or unknown)."""
        with self._lock:
            out = self._out.get(transfer)
            return None if out is None else out.result

    def wait(self, transfer: str, timeout: float | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
        """Wait for the receiver's done; its message when ok, else TransferError (its code, timeout, stopped)."""
        with self._lock:
            out = self._out.get(transfer)
        if out is None:
            raise TransferError("unknown", f"transfer {transfer} is not offered here")
        _wait_event(out.done, f"transfer {transfer}", timeout, should_stop)
        result = out.result
        if not result["ok"]:
            raise TransferError(result["error"]["code"], f"transfer {transfer} failed: {result['error']['message']}")
        return result

    def sent(self, transfer: str) -> int:
        """Chunk publishes so far (resends counted; 0 for an unknown transfer)."""
        with self._lock:
            out = self._out.get(transfer)
            return 0 if out is None else out.sent

    def forget(self, transfer: str) -> None:
        """Stop serving a transfer and drop its state (a `wait` on it ends with `stopped`)."""
        with self._lock:
            out = self._out.pop(transfer, None)
            if out is not None:
                if out.fd is not None:
                    os.close(out.fd)
                    out.fd = None
                if out.result is None:
                    out.result = {"ok": False, "error": {"code": "stopped", "message": "the transfer was forgotten"}}
                out.done.set()
            if self.state_dir is not None:
                (self.state_dir / f"{transfer}.json").unlink(missing_ok=True)

    def subscriptions(self, prefix: str, transfer: str = "+") -> list[str]:
        """The filters its owner subscribes to (QoS 1): want and done."""
        t = topics(prefix, transfer)
        return [t["want"], t["done"]]

    def close(self) -> None:
        with self._lock:
            for out in self._out.values():
                if out.fd is not None:
                    os.close(out.fd)
                    out.fd = None


# ---- receiver ------------------------------------------------------------------------------

@dataclass
class _Incoming:
    prefix: str
    offer: FileOffer
    dest: Path
    part: Path  # the partial file (temporary name, in state_dir)
    state: Path  # the state json
    fd: int
    received: set[int]  # durable chunks
    asked: dict[int, float] = field(default_factory=dict)  # index -> monotonic time last asked
    on_progress: Callable[[dict], None] | None = None
    on_complete: Callable[[Path], None] | None = None  # the owner's check of the complete file (raises TransferError)
    started: float = 0.0  # wall-clock time of the offer's first receive (kept in the state json, across restarts)
    last_chunk: float = field(default_factory=time.monotonic)  # the last durable chunk (or start or reconnect)
    hasher: Any = field(default_factory=hashlib.sha256)  # over chunks [0, hashed)
    hashed: int = 0
    scan: int = 0  # no missing chunk below this index
    last_progress: float = 0.0


class FileReceiver:
    """Receives offered files into `dest` through a partial file and a state json in state_dir."""

    def __init__(self, publish: Publish, state_dir: Path, window: int = DEFAULT_WINDOW, retry_s: float = 5.0,
                 policy: ReceivePolicy | None = None):
        if not _is_int(window) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if not retry_s > 0:
            raise ValueError(f"retry_s must be > 0, got {retry_s!r}")
        self.publish = publish
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.window = window  # chunks asked for and not yet received, at most
        self.retry_s = retry_s  # a chunk missing this long (while connected) is asked for again
        self.policy = policy or ReceivePolicy()
        self._lock = threading.Lock()
        self._active: dict[str, _Incoming] = {}
        self._ended: dict[str, Path | TransferError] = {}
        self._events: dict[str, threading.Event] = {}
        self._connected = True  # until the owner says otherwise (on_disconnect)
        self._closed = threading.Event()
        self._ask_tag = secrets.token_hex(4)  # with a counter: each want's id, unique across restarts
        self._ask_count = 0
        self._timer = threading.Thread(target=self._retry_loop, name="transfer-retry", daemon=True)
        self._timer.start()

    # ---- starting and resuming -------------------------------------------------------------
    def receive(self, prefix: str, offer: FileOffer, dest: Path,
                on_progress: Callable[[dict], None] | None = None,
                on_complete: Callable[[Path], None] | None = None) -> None:
        """Start receiving `offer` into `dest`, or resume it from the state in state_dir.
        `on_progress({"transfer", "bytes", "size", "chunks_done", "chunks"})` is called at most once
        a second and once at the end (from the thread that calls `handle`). `on_complete(dest)` runs
        once the file is in place and its sha256 checked, before `done` goes out: a TransferError it
        raises removes `dest` and becomes the `done` message's error (the agent checks a received
        bundle's signature there)."""
        _check_prefix(prefix)
        if isinstance(offer, dict):
            offer = FileOffer.from_dict(offer)
        dest = Path(dest)
        transfer = offer.transfer
        with self._lock:
            t = self._active.get(transfer)
            if t is not None:
                if (t.prefix, t.offer, t.dest) != (prefix, offer, dest):
                    raise TransferError("bad_offer", f"transfer {transfer} is already receiving another file")
                t.on_progress = on_progress
                t.on_complete = on_complete
                return
        if self._already_here(prefix, offer, dest):
            return
        t, resumed = self._open(prefix, offer, dest)
        t.on_progress = on_progress
        t.on_complete = on_complete
        with self._lock:
            self._active[transfer] = t
            self._ended.pop(transfer, None)
            self._events[transfer] = threading.Event()
            now = time.monotonic()
            # Resuming: the chunks asked before the restart may still be queued for us; count them
            # as asked now, so they are asked again only if they do not come within retry_s.
            first = self._next_missing(t, self.window)
            t.asked.update((i, now) for i in first)
            if resumed:
                first = []
        logger.info("%s transfer %s: %s, %d of %d chunks here", "resuming" if resumed else "receiving", transfer,
                    offer.name, len(t.received), offer.chunks)
        self._ask(t, first)
        if len(t.received) == offer.chunks:
            self._complete(t)

    def _already_here(self, prefix: str, offer: FileOffer, dest: Path) -> bool:
        """A finished transfer offered again (a repeated command): `dest` holds the file, say done again."""
        if (self.state_dir / f"{offer.transfer}.json").exists() or not dest.is_file() \
                or dest.stat().st_size != offer.size or sha256_file(dest) != offer.sha256:
            return False
        with self._lock:
            self._ended[offer.transfer] = dest
            self._events[offer.transfer] = event = threading.Event()
        _publish(self.publish, topics(prefix, offer.transfer)["done"],
                 json.dumps({"ok": True, "sha256": offer.sha256}).encode(), None)
        event.set()
        logger.info("transfer %s: %s is already here", offer.transfer, dest)
        return True

    def _open(self, prefix: str, offer: FileOffer, dest: Path) -> tuple[_Incoming, bool]:
        """The transfer's state: resumed from state_dir when it holds this offer, else fresh."""
        state = self.state_dir / f"{offer.transfer}.json"
        part = self.state_dir / f"{offer.transfer}.part"
        started = time.time()
        received: set[int] | None = None
        if state.exists():
            try:
                old = json.loads(state.read_text())
                same = (FileOffer.from_dict(old["offer"]), old["prefix"], old["dest"]) == (offer, prefix, str(dest))
                if same:
                    received = _from_ranges(old["received"], offer.chunks)
                    started = float(old.get("started", started))
                    if part.stat().st_size != offer.size:
                        raise ValueError(f"{part.name} is not {offer.size} bytes")
            except (OSError, ValueError, KeyError, TypeError, TransferError) as err:
                logger.warning("starting transfer %s over: its state cannot be used (%s)", offer.transfer, err)
                same, received = True, None
            if not same:
                raise TransferError("bad_offer", f"{state} holds transfer {offer.transfer} for another file or "
                                                 f"destination; forget it first or use a new id")
            if received is not None and time.time() - started > self.policy.deadline_s:
                part.unlink(missing_ok=True)
                state.unlink(missing_ok=True)
                raise TransferError("expired", f"the receive of {offer.name} began {time.time() - started:.0f} s "
                                               f"ago, past the {self.policy.deadline_s:.0f} s deadline; offer it again")
        record = {"transfer": offer.transfer, "prefix": prefix, "offer": offer.to_dict(), "dest": str(dest),
                  "started": started}
        try:
            if received is None:
                self._admit(offer)
                fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, offer.size)
                os.fsync(fd)
                write_json_atomic(state, dict(record, received=[]))
            else:
                fd = os.open(part, os.O_RDWR)
        except OSError as err:
            raise TransferError("io_error", f"cannot create the partial file of {offer.transfer}: {err}") from err
        t = _Incoming(prefix, offer, dest, part, state, fd, received or set(), started=started)
        self._advance_hash(t, None, -1)  # resuming: hash the chunks already here, in order
        self._advance_scan(t)
        return t, received is not None

    def _admit(self, offer: FileOffer) -> None:
        """Refuse a new offer the policy does not allow: the file alone, all receives under way
        together, and the free space they would leave once complete."""
        policy = self.policy
        if offer.size > policy.max_file_bytes:
            raise TransferError("too_large", f"{offer.name} is {offer.size} bytes; the limit is "
                                             f"{policy.max_file_bytes} (max_file_bytes)")
        with self._lock:
            under_way = list(self._active.values())
            pending = sum(t.offer.size for t in under_way)
            remaining = sum(t.offer.size - self._progress_of(t)["bytes"] for t in under_way)
        if pending + offer.size > policy.max_pending_bytes:
            raise TransferError("pending_limit", f"{offer.name} ({offer.size} bytes) with the {len(under_way)} "
                                                 f"receives under way ({pending} bytes) is over the limit of "
                                                 f"{policy.max_pending_bytes} (max_pending_bytes); try again later")
        free = shutil.disk_usage(self.state_dir).free
        if remaining + offer.size + policy.disk_margin_bytes > free:
            raise TransferError("no_space", f"{offer.name} ({offer.size} bytes) with the {remaining} bytes still to "
                                            f"come for the receives under way would leave less than "
                                            f"{policy.disk_margin_bytes} bytes of the {free} free in "
                                            f"{self.state_dir} (disk_margin_bytes)")

    # ---- chunks --------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, properties: Any) -> bool:
        """A chunk of one of its transfers: check, store and ask for the next (True); else False."""
        parsed = _parse_topic(topic)
        if parsed is None or parsed[2] != "chunk":
            return False
        prefix, transfer, _ = parsed
        with self._lock:
            t = self._active.get(transfer)
            ended = transfer in self._ended
        if t is None or t.prefix != prefix:
            return ended
        user = dict(getattr(properties, "UserProperty", None) or [])
        index_s, sha = user.get("index"), user.get("sha256")
        if not isinstance(index_s, str) or not INDEX_PATTERN.match(index_s) or int(index_s) >= t.offer.chunks:
            logger.warning("dropping a chunk of transfer %s: index %r is not in 0..%d", transfer, index_s,
                           t.offer.chunks - 1)
            return True
        index = int(index_s)
        if len(payload) != t.offer.chunk_len(index) or sha != hashlib.sha256(payload).hexdigest():
            logger.warning("chunk %d of transfer %s is %d bytes with sha256 %r, not what was sent (%d bytes, its "
                           "sha256 property): dropped, asked again", index, transfer, len(payload), str(sha)[:64],
                           t.offer.chunk_len(index))
            with self._lock:
                again = index not in t.received and self._active.get(transfer) is t
                if again:
                    t.asked[index] = time.monotonic()
            if again:
                self._ask(t, [index])
            return True
        progress = self._store(t, index, payload)
        if progress is not None and t.on_progress is not None:
            self._progress(t, progress)
        return True

    def _store(self, t: _Incoming, index: int, data: bytes) -> dict | None:
        """Write a chunk durably, record it, ask for the next; the progress to report, if due."""
        with self._lock:
            if self._active.get(t.offer.transfer) is not t or index in t.received:
                return None  # a duplicate (QoS 1 redelivery or a re-ask that crossed the chunk)
            try:
                os.pwrite(t.fd, data, index * t.offer.chunk_size)
                os.fdatasync(t.fd)  # the bytes are durable before the state records them
                t.received.add(index)
                write_json_atomic(t.state, {"transfer": t.offer.transfer, "prefix": t.prefix, "offer": t.offer.to_dict(),
                                      "dest": str(t.dest), "started": t.started, "received": _ranges(t.received)},
                            sync_dir=False)
            except OSError as err:
                t.received.discard(index)
                error = TransferError("io_error", f"cannot write chunk {index} of {t.offer.transfer}: {err}")
                failed = True
            else:
                failed = False
                t.last_chunk = time.monotonic()
                t.asked.pop(index, None)
                self._advance_hash(t, data, index)
                self._advance_scan(t)
                wants = self._next_missing(t, self.window - len(t.asked))
                now = time.monotonic()
                t.asked.update((i, now) for i in wants)
                complete = len(t.received) == t.offer.chunks
                due = complete or now - t.last_progress >= PROGRESS_INTERVAL_S
                if due and not complete:
                    t.last_progress = now
                progress = self._progress_of(t) if due and not complete else None
        if failed:
            self._fail(t, error)
            return None
        self._ask(t, wants)
        if complete:
            self._complete(t)
        return progress

    def _advance_hash(self, t: _Incoming, data: bytes | None, index: int) -> None:
        """Feed the whole-file hash the chunks received in order (reading from disk past `index`)."""
        while t.hashed in t.received:
            chunk = data if t.hashed == index else os.pread(t.fd, t.offer.chunk_len(t.hashed),
                                                             t.hashed * t.offer.chunk_size)
            t.hasher.update(chunk)
            t.hashed += 1

    @staticmethod
    def _advance_scan(t: _Incoming) -> None:
        while t.scan in t.received:
            t.scan += 1

    @staticmethod
    def _next_missing(t: _Incoming, n: int) -> list[int]:
        out, i = [], t.scan
        while len(out) < n and i < t.offer.chunks:
            if i not in t.received and i not in t.asked:
                out.append(i)
            i += 1
        return out

    def _ask(self, t: _Incoming, indices: list[int]) -> None:
        if indices:
            with self._lock:
                self._ask_count += 1
                ask = f"{self._ask_tag}-{self._ask_count}"
            _publish(self.publish, topics(t.prefix, t.offer.transfer)["want"],
                     json.dumps({"chunks": indices, "ask": ask}).encode(), None)  # if it fails, the retry asks

    @staticmethod
    def _progress_of(t: _Incoming) -> dict:
        offer, done = t.offer, len(t.received)
        short = offer.chunk_size - offer.chunk_len(offer.chunks - 1) if offer.chunks - 1 in t.received else 0
        return {"transfer": offer.transfer, "bytes": done * offer.chunk_size - short, "size": offer.size,
                "chunks_done": done, "chunks": offer.chunks}

    def _progress(self, t: _Incoming, progress: dict) -> None:
        try:
            t.on_progress(progress)
        except Exception:  # the owner's callback must not stop the transfer
            logger.exception("progress callback of transfer %s failed", t.offer.transfer)

    # ---- the end -------------------------------------------------------------------------------
    def _complete(self, t: _Incoming) -> None:
        """Every chunk is in: check the file's sha256, rename it to dest, report done."""
        offer = t.offer
        digest = t.hasher.hexdigest() if t.hashed == offer.chunks else None
        if digest != offer.sha256:
            self._fail(t, TransferError("sha_mismatch", f"{offer.name}: the received file's sha256 is {digest}, "
                                                        f"the offer's {offer.sha256}"))
            return
        try:
            os.fsync(t.fd)
            os.close(t.fd)
            t.fd = -1
            t.dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(t.part, t.dest)
            except OSError as err:
                if err.errno != errno.EXDEV:
                    raise
                tmp = t.dest.with_name(f".{t.dest.name}.part")  # another file system: copy next to dest first
                shutil.copyfile(t.part, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, t.dest)
                t.part.unlink()
            fsync_dir(t.dest.parent)
            t.state.unlink(missing_ok=True)
        except OSError as err:
            self._fail(t, TransferError("io_error", f"cannot move {offer.name} to {t.dest}: {err}"))
            return
        if t.on_complete is not None:
            try:  # the owner's check of the complete file (a bundle's signature) before `done` says ok
                t.on_complete(t.dest)
            except TransferError as err:
                t.dest.unlink(missing_ok=True)
                self._end(t, err, {"ok": False, "error": {"code": err.code, "message": err.message}})
                return
        logger.info("transfer %s complete: %s (%d bytes)", offer.transfer, t.dest, offer.size)
        self._end(t, t.dest, {"ok": True, "sha256": offer.sha256})

    def _fail(self, t: _Incoming, error: TransferError) -> None:
        logger.error("transfer %s failed: %s", t.offer.transfer, error)
        if t.fd >= 0:
            os.close(t.fd)
            t.fd = -1
        t.part.unlink(missing_ok=True)
        t.state.unlink(missing_ok=True)
        self._end(t, error, {"ok": False, "error": {"code": error.code, "message": error.message}})

    def _end(self, t: _Incoming, outcome: Path | TransferError, done: dict) -> None:
        with self._lock:
            if self._active.get(t.offer.transfer) is not t:
                return
            del self._active[t.offer.transfer]
            self._ended[t.offer.transfer] = outcome
            event = self._events[t.offer.transfer]
        _publish(self.publish, topics(t.prefix, t.offer.transfer)["done"], json.dumps(done).encode(), None)
        if t.on_progress is not None:
            self._progress(t, self._progress_of(t))
        event.set()

    # ---- connection and retries ----------------------------------------------------------------
    def on_connect(self) -> None:
        """Call on every (re)connect: chunks kept in the broker's session get retry_s to arrive."""
        with self._lock:
            self._connected = True
            now = time.monotonic()
            for t in self._active.values():
                t.asked = {i: now for i in t.asked}
                t.last_chunk = now  # time without a link is not the sender's idleness

    def on_disconnect(self) -> None:
        """Optional: call on a disconnect; no chunk is asked for again until on_connect."""
        with self._lock:
            self._connected = False

    def _retry_loop(self) -> None:
        tick = min(0.5, self.retry_s / 4)
        while not self._closed.wait(tick):
            asks, ended = [], []
            with self._lock:
                now, wall = time.monotonic(), time.time()
                for t in self._active.values():
                    if wall - t.started > self.policy.deadline_s:
                        ended.append((t, TransferError("deadline", f"{t.offer.name}: not complete "
                                                                   f"{self.policy.deadline_s:.0f} s after it began "
                                                                   f"(deadline_s)")))
                    elif self._connected and now - t.last_chunk > self.policy.idle_timeout_s:
                        ended.append((t, TransferError("idle_timeout", f"{t.offer.name}: no chunk for "
                                                                       f"{self.policy.idle_timeout_s:.0f} s "
                                                                       f"(idle_timeout_s)")))
                for t in self._active.values() if self._connected else ():
                    late = [i for i, at in t.asked.items() if now - at >= self.retry_s]
                    t.asked.update((i, now) for i in late)
                    if late:
                        asks.append((t, late))
            for t, error in ended:
                self._fail(t, error)
            for t, late in asks:
                logger.info("transfer %s: asking again for chunks %s", t.offer.transfer, late[:8])
                self._ask(t, late)

    # ---- the owner's view ----------------------------------------------------------------------
    def wait(self, transfer: str, timeout: float | None = None, should_stop: Callable[[], bool] | None = None) -> Path:
        """The destination once the file is in; TransferError if it failed, timed out or was stopped."""
        with self._lock:
            event = self._events.get(transfer)
        if event is None:
            raise TransferError("unknown", f"transfer {transfer} is not being received here")
        _wait_event(event, f"transfer {transfer}", timeout, should_stop)
        with self._lock:
            outcome = self._ended[transfer]
        if isinstance(outcome, TransferError):
            raise outcome
        return outcome

    def pending(self) -> list[tuple[str, FileOffer, Path]]:
        """Unfinished transfers found in state_dir, as (prefix, offer, dest): `receive` resumes them.
        One past the policy's deadline is dropped here (partial file and state), and its sender is
        told (`done` with code `expired`), so an old offer is not asked for at every start."""
        found = []
        for state in sorted(self.state_dir.glob("*.json")):
            try:
                d = json.loads(state.read_text())
                prefix, offer = _check_prefix(d["prefix"]), FileOffer.from_dict(d["offer"])
                found.append((prefix, offer, Path(d["dest"])))
                age = time.time() - float(d.get("started", time.time()))
            except (OSError, ValueError, KeyError, TypeError, TransferError) as err:
                logger.warning("ignoring unreadable transfer state %s: %s", state, err)
                continue
            if age > self.policy.deadline_s:
                found.pop()
                self.forget(offer.transfer)
                logger.warning("dropped the receive of %s (transfer %s): it began %.0f s ago, past deadline_s",
                               offer.name, offer.transfer, age)
                _publish(self.publish, topics(prefix, offer.transfer)["done"], json.dumps(
                    {"ok": False, "error": {"code": "expired", "message": f"the receive began {age:.0f} s ago, past "
                                                                          f"the receiver's deadline"}}).encode(), None)
        return found

    def active(self) -> list[str]:
        """The transfers under way."""
        with self._lock:
            return list(self._active)

    def abort(self, transfer: str, code: str, message: str) -> None:
        """Give a transfer up and say so to its sender (`done` with `code`); its partial file and
        state go. Nothing happens for a transfer that is not under way."""
        with self._lock:
            t = self._active.get(transfer)
        if t is not None:
            self._fail(t, TransferError(code, message))

    def forget(self, transfer: str) -> None:
        """Give up a transfer: drop its partial file and state (a later `receive` starts over)."""
        _check_id(transfer)
        with self._lock:
            t = self._active.pop(transfer, None)
            if t is not None and t.fd >= 0:
                os.close(t.fd)
                t.fd = -1
            event = self._events.get(transfer)
            if event is not None and not event.is_set():  # a waiter learns it ended
                self._ended[transfer] = TransferError("stopped", f"transfer {transfer} was forgotten")
                event.set()
        (self.state_dir / f"{transfer}.part").unlink(missing_ok=True)
        (self.state_dir / f"{transfer}.json").unlink(missing_ok=True)

    def subscriptions(self, prefix: str, transfer: str = "+") -> list[str]:
        """The filter its owner subscribes to (QoS 1): chunk."""
        return [topics(prefix, transfer)["chunk"]]

    def close(self) -> None:
        """Stop the retry thread and close files; the state stays for a later resume."""
        self._closed.set()
        if self._timer.is_alive() and self._timer is not threading.current_thread():
            self._timer.join(timeout=5)
        with self._lock:
            for t in self._active.values():
                if t.fd >= 0:
                    os.close(t.fd)
                    t.fd = -1
            self._active.clear()
