"""MQTT payload schemas of the edge agent: command parsing, replies, status and path confinement.

Everything that arrives on `blockskip/<device_id>/cmd` goes through `parse_command`, which either
returns a validated `Command` or raises `CommandError` with a stable error `code` (the codes are
listed in `ERROR_CODES` and documented in edge/AGENT.md). Plain code, no schema library: the
argument specs below are the schema.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockskip.mqtt import ID_PATTERN, JOB_ACTIONS  # noqa: F401 (part of the schema here too)

# Largest command payload accepted, in bytes (a command is a small JSON object).
MAX_COMMAND_BYTES = 64 * 1024

# A file `receive` installs: a bundle or base pack tar with a plain name.
TAR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,123}\.tar$")

# Command ids become part of a topic (`reply/<id>`): no wildcards, no separators (blockskip.mqtt).

ERROR_CODES = {
    "too_large": "the payload (or the file a `receive` is offered) is over the size limit",
    "bad_json": "the payload is not a JSON object (or not UTF-8)",
    "bad_request": "the command lacks `id`/`action` or has extra top-level keys",
    "unknown_action": "the action is not one the agent knows",
    "bad_args": "an argument is missing, unknown, or of the wrong type or range",
    "bad_path": "a path is outside the agent's data directory",
    "not_found": "a path inside the data directory does not exist",
    "busy": "a job is already running (one job at a time; cancel it or wait)",
    "no_job": "cancel was asked but no job is running",
    "not_available": "the feature is not part of this build",
    "job_failed": "the job raised an error",
    "bad_bundle": "the job's bundle failed verification or is not signed by a key the board trusts",
    "exists": "the file a `receive` would write exists and holds other bytes",
    "pending_limit": "a `receive` with the receives under way would pass max_pending_receive_bytes",
    "no_space": "a `receive` with the receives under way would leave less than receive_disk_margin_bytes free",
    "expired": "a `receive` of a transfer the agent dropped as past transfer_deadline_s",
    "interrupted": "the agent stopped (killed, power loss) while the job ran; reported when it restarts",
    "internal": "an unexpected error in the agent (logged); the agent keeps serving",
}


class CommandError(Exception):
    """A command that cannot be served; becomes an error reply (or an error event without id)."""

    def __init__(self, code: str, message: str, command_id: str | None = None):
        assert code in ERROR_CODES, f"undocumented error code {code}"
        super().__init__(message)
        self.code = code
        self.message = message
        self.command_id = command_id


@dataclass(frozen=True)
class Arg:
    """One argument of an action: its JSON type(s), whether required, and an allowed range."""

    types: tuple[type, ...]  # accepted Python types after json.loads (bool is never an int here)
    required: bool = False  # must be present
    min: float | None = None  # inclusive lower bound for numbers, minimum length for str/list
    max: float | None = None  # inclusive upper bound for numbers, maximum length for str/list
    choices: tuple[str, ...] | None = None  # allowed values for a str
    items: type | None = None  # element type of a list


_PATH = Arg((str,), min=1, max=4096)
_BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")

# action -> argument spec. Paths are relative to (or inside) the agent's data directory.
ACTIONS: dict[str, dict[str, Arg]] = {
    "train": {
        "bundle": Arg((str,), required=True, min=1, max=4096),
        "out": _PATH,
        "steps": Arg((int,), min=1, max=1_000_000),
        "grad_accum": Arg((int,), min=1, max=1024),
        "lr": Arg((float, int), min=0, max=1),
        "seed": Arg((int,), min=0, max=2**63 - 1),
        "checkpoint_every": Arg((int,), min=1, max=1_000_000),
        "resume": Arg((bool,)),
        "prior_weight": Arg((float, int), min=0, max=100),
    },
    "generate": {
        "model": Arg((str,), required=True, min=1, max=4096),
        "prompts": Arg((list,), required=True, min=1, max=64, items=str),
        "out": _PATH,
        "adapter": _PATH,
        "bundle": _PATH,
        "seed": Arg((int,), min=0, max=2**63 - 1),
        "steps": Arg((int,), min=1, max=1000),
        "height": Arg((int,), min=16, max=4096),
        "width": Arg((int,), min=16, max=4096),
        "count": Arg((int,), min=1, max=64),
        "backend": Arg((str,), choices=_BACKENDS),
        "precision": Arg((str,), choices=("fp32", "fp16", "int8", "nf4")),
    },
    # `generate --dataset` on the board: `spec` is the SPEC as a JSON object (edge/dataset_spec.py)
    "dataset": {
        "model": Arg((str,), required=True, min=1, max=4096),
        "spec": Arg((dict,), required=True),
        "out": _PATH,
        "adapter": _PATH,
        "bundle": _PATH,
        "steps": Arg((int,), min=1, max=1000),
        "height": Arg((int,), min=16, max=4096),
        "width": Arg((int,), min=16, max=4096),
        "backend": Arg((str,), choices=_BACKENDS),
        "precision": Arg((str,), choices=("fp32", "fp16", "int8", "nf4")),
    },
    "cancel": {"job": Arg((str,), min=1, max=64)},
    "status": {},
    "captures": {"limit": Arg((int,), min=1, max=1000), "camera_id": Arg((str,), min=1, max=64)},
    # Files over MQTT (blockskip.transfer): offer files for a receiver to fetch in chunks ...
    "upload": {"captures": Arg((list,), min=1, max=1000, items=str), "paths": Arg((list,), min=1, max=1000, items=str),
               "chunk_size": Arg((int,), min=1024, max=16 * 1024 * 1024)},
    # ... or fetch a file offered by a sender (a bundle or a base pack from a host worker).
    "receive": {"offer": Arg((dict,), required=True), "kind": Arg((str,), required=True,
                                                                  choices=("bundle", "base-pack"))},
}

# Arguments that name files and must stay inside the data directory.
PATH_ARGS = ("bundle", "out", "model", "adapter")


@dataclass
class Command:
    """A validated command."""

    id: str  # matches ID_PATTERN; replies go to reply/<id>
    action: str  # a key of ACTIONS
    args: dict[str, Any] = field(default_factory=dict)  # validated against ACTIONS[action]


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join({str: "string", int: "integer", float: "number", bool: "boolean", list: "list",
                              dict: "object"}[t] for t in types)


def _check_arg(name: str, value: Any, spec: Arg) -> None:
    """Raise CommandError(bad_args) unless `value` fits `spec`."""
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in spec.types) or not isinstance(value, spec.types):
        raise CommandError("bad_args", f"argument `{name}` must be a {_type_name(spec.types)}, got {type(value).__name__}")
    if isinstance(value, float) and value != value:
        raise CommandError("bad_args", f"argument `{name}` must be a finite number")
    size = len(value) if isinstance(value, (str, list)) else (None if is_bool else value)
    if size is not None and spec.min is not None and size < spec.min:
        raise CommandError("bad_args", f"argument `{name}` is below its minimum {spec.min}")
    if size is not None and spec.max is not None and size > spec.max:
        raise CommandError("bad_args", f"argument `{name}` is above its maximum {spec.max}")
    if spec.choices is not None and value not in spec.choices:
        raise CommandError("bad_args", f"argument `{name}` must be one of {', '.join(spec.choices)}")
    if spec.items is not None and not all(isinstance(v, spec.items) and v for v in value):
        raise CommandError("bad_args", f"argument `{name}` must be a list of non-empty strings")
    if isinstance(value, str) and "\x00" in value:
        raise CommandError("bad_args", f"argument `{name}` contains a NUL character")


def parse_command(payload: bytes, max_bytes: int = MAX_COMMAND_BYTES) -> Command:
    """Validate a raw `cmd` payload; raise CommandError (with `command_id` when one was readable)."""
    if len(payload) > max_bytes:
        raise CommandError("too_large", f"command is {len(payload)} bytes; the limit is {max_bytes}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CommandError("bad_json", f"command is not valid UTF-8 JSON: {err}") from err
    except RecursionError as err:
        raise CommandError("bad_json", "command is nested too deeply to be a command") from err
    if not isinstance(obj, dict):
        raise CommandError("bad_json", "command must be a JSON object")
    cid = obj.get("id")
    if not isinstance(cid, str) or not ID_PATTERN.match(cid):
        raise CommandError("bad_request", "`id` must be a string of 1-64 characters [A-Za-z0-9_.:-]")
    try:
        return _parse_body(obj, cid)
    except CommandError as err:
        err.command_id = cid
        raise


def _parse_body(obj: dict[str, Any], cid: str) -> Command:
    extra = set(obj) - {"id", "action", "args"}
    if extra:
        raise CommandError("bad_request", f"unknown top-level keys: {', '.join(sorted(extra))}")
    action = obj.get("action")
    if not isinstance(action, str):
        raise CommandError("bad_request", "`action` must be a string")
    if action not in ACTIONS:
        raise CommandError("unknown_action", f"unknown action {action[:64]!r}; known: {', '.join(ACTIONS)}")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise CommandError("bad_args", "`args` must be a JSON object")
    spec = ACTIONS[action]
    unknown = set(args) - set(spec)
    if unknown:
        raise CommandError("bad_args", f"unknown arguments for {action}: {', '.join(sorted(map(str, unknown)))[:200]}")
    for name, arg in spec.items():
        if name in args:
            _check_arg(name, args[name], arg)
        elif arg.required:
            raise CommandError("bad_args", f"argument `{name}` is required for {action}")
    return Command(id=cid, action=action, args=dict(args))


def resolve_in(data_dir: Path, value: str, must_exist: bool = False) -> Path:
    """Resolve `value` (relative to, or absolute inside, `data_dir`); refuse anything that escapes.

    `..` components are refused outright; symlinks are resolved before the containment check, so a
    link pointing outside the data directory is refused too.
    """
    raw = Path(value)
    if ".." in raw.parts:
        raise CommandError("bad_path", f"path {value[:200]!r} contains `..`")
    root = data_dir.resolve()
    resolved = (raw if raw.is_absolute() else root / raw).resolve()
    if resolved != root and root not in resolved.parents:
        raise CommandError("bad_path", f"path {value[:200]!r} is outside the agent's data directory")
    if must_exist and not resolved.exists():
        raise CommandError("not_found", f"path {value[:200]!r} does not exist in the data directory")
    return resolved


def dumps(obj: dict[str, Any]) -> bytes:
    """The wire form of every payload the agent publishes."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def reply_ok(command_id: str, result: Any) -> bytes:
    """Payload of a successful reply on reply/<id>."""
    return dumps({"id": command_id, "ok": True, "result": result})


def reply_error(command_id: str | None, code: str, message: str) -> bytes:
    """Payload of an error reply on reply/<id> (or an error event when `command_id` is None)."""
    body: dict[str, Any] = {"ok": False, "error": {"code": code, "message": message}}
    if command_id is None:
        body["type"] = "error"
    else:
        body["id"] = command_id
    return dumps(body)


def status_payload(state: str, job: dict[str, Any] | None, version: str) -> bytes:
    """Payload of the retained `status` message."""
    assert state in ("online", "busy", "offline"), state
    return dumps({"state": state, "job": job, "version": version, "ts": time.time()})
