"""`blockskip host serve`: a host worker that runs personalize jobs for the boards, over MQTT.

A worker connects to the fleet's broker with its own login, takes jobs from
`$share/<group>/blockskip-jobs/submit` (MQTT v5 shared subscription: each job goes to one worker
of the group, so more workers take more jobs), and runs each job through its stages:

1. photos   -- from the board's capture spool (`captures` then `upload`: files in checksummed
               chunks over MQTT, blockskip.transfer) or from a folder on the host;
2. prepare  -- profile (once per model, kept in the work folder), plan, cache, subject bundle
               (against the model's base pack) or single bundle, signed with the host key;
3. deliver  -- the bundle's tar to the board over MQTT (`receive`); the board verifies it under
               its own trust policy before it says it has it; a base pack the board lacks goes first;
4. train    -- `train` on the board, its progress forwarded;
5. generate -- `generate` with the job's prompts; each image's record (path on the board,
               sha256, prompt, seed, thumbnail when the agent sends them) lands in the job's status.

Every job lives in `<work_dir>/jobs/<id>/` (job.json, state.json, device.jsonl: the board's
replies and events for it, written before the broker's message is acknowledged). A worker that
is killed resumes its jobs where they stood when it starts again: the device commands carry ids
derived from the job, and the agent answers a repeated id with its first reply and runs nothing,
so no step runs twice. On SIGTERM the worker hands the jobs it has not started back to the group
and keeps the running one for its restart. Topics and payloads: host/SERVE.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from blockskip import __version__
from blockskip.config import load_yaml
from blockskip.errors import BlockskipError, ConfigError
from blockskip.files import write_json_atomic
from blockskip.host.bundle import MANIFEST, _write_tar, verify_bundle
from blockskip.host.plan import (DEFAULT_FEATURE_DTYPE, DEFAULT_SAMPLES, default_s_max, default_s_min, default_text_len,
                                 make_plan, skip_budget)
from blockskip.images import CaptureError, image_format
from blockskip.models.crops import MODEL_DIR, cached_profile, profile_key
from blockskip.mqtt import (ID_PATTERN, JOB_ACTIONS, BrokerConfig, check_receive_maximum, connect_properties,
                            device_prefix, login_for, make_client)
from blockskip.host.cache import list_images
from blockskip.host.jobs import (DEFAULT_GROUP, MAX_JOB_BYTES, SHA256_PATTERN, STAGES, SUBMIT_TOPIC, events_topic,
                                 JobError, parse_job, select_captures, share_topic, status_topic, worker_topic)
from blockskip.host.prepare import PrepareSettings, prepare
from blockskip.host.prior import PriorSettings
from blockskip.plan import LoraSettings, PatchSchedule, PlanDocument
from blockskip.transfer import (DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, FileOffer, FileReceiver, FileSender, ReceivePolicy,
                                TransferError)

logger = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job that cannot go on; the message says why (it ends the job as `failed`)."""


class Stopping(Exception):
    """The worker is shutting down; the running job stays on disk and resumes on restart."""


@dataclass
class ModelConfig:
    """One model the workers personalize (an entry of host.yaml `models`)."""

    path: str  # the model on the host: a diffusers folder, 'builtin' (the crop model) or 'tiny-flux' / 'tiny-sana'
    board_model: str  # the same model on the boards, relative to the agent's data_dir (for `generate`)
    base_pack: str | None = None  # its base pack (folder or .tar, from `blockskip bundle --base-pack-out`)
    plan: str | None = None  # the plan JSON that base pack was made with; default: made from the profile
    profile: str | None = None  # a profile JSON (`blockskip profile`); default: measured once, kept in work_dir
    skip_ratio: float = 0.5  # when the worker makes the plan
    samples: int | None = None  # draws cached per subject (default: the plan's)
    seed: int = 0  # seed of the cache draws
    shard_size: int = 32
    prior_prompt: str | None = None  # class prompt for prior preservation ('a photo of a leaf'; host/prior.py)
    prior_images: int = 8  # class images generated per subject when prior_prompt is set
    prior_samples: int | None = None  # prior draws cached (default: as many as the subject's)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("models.<name>.path must be the model's folder on the host")
        if not isinstance(self.board_model, str) or not self.board_model:
            raise ConfigError("models.<name>.board_model must be the model's path on the boards (inside data_dir)")
        for name in ("base_pack", "plan", "profile"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"models.<name>.{name} {value} does not exist")
        if self.base_pack is not None and self.plan is None:
            raise ConfigError("a model with a base_pack needs the plan it was made with (models.<name>.plan)")


@dataclass
class HostConfig:
    """host.yaml (deploy/host.example.yaml documents every key)."""

    worker_id: str  # the worker's MQTT login and client id (one login per worker)
    work_dir: str  # jobs, staging folders, bundles, profiles, transfer state
    models: dict[str, Any]  # name -> ModelConfig
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    signing_key: str | None = None  # ed25519 private key (`blockskip keygen`): bundles are signed with it
    group: str = DEFAULT_GROUP  # the shared subscription group of the workers that split the jobs
    session_expiry_s: int = 7 * 86_400  # the broker keeps our subscriptions and queued messages this long
    device_timeout_s: float = 3600.0  # a device step that shows no sign of life this long fails the job
    command_resend_s: float = 60.0  # a command without a reply is sent again (same id) this often
    busy_retry_s: float = 10.0  # a board busy with another job is asked again after this
    chunk_size: int = DEFAULT_CHUNK_SIZE  # bytes per file chunk over MQTT
    transfer_window: int = DEFAULT_WINDOW  # chunks asked for at a time when receiving photos
    transfer_retry_s: float = 5.0
    progress_interval_s: float = 2.0  # at most one progress event per job per interval
    max_photo_bytes: int = 64 * 1024**2  # a photo offered larger than this is refused (too_large)
    max_pending_photo_bytes: int = 2 * 1024**3  # photos under way together (pending_limit)
    max_photo_pixels: int = 64_000_000  # a received photo with more pixels (read from its header): too_many_pixels
    receive_disk_margin_bytes: int = 1024**3  # free space photo receives must leave in work_dir (no_space)
    transfer_idle_timeout_s: float = 600.0  # a photo with no chunk this long (while connected) fails the job
    transfer_deadline_s: float = 6 * 3600.0  # a photo not complete this long after it began fails the job
    receive_maximum: int = 16  # MQTT v5 Receive Maximum: unacknowledged messages the broker sends (and redelivers)
    send_base_pack: bool = True  # send the model's base pack to a board that does not have it

    def __post_init__(self) -> None:
        self.broker = login_for("worker_id", self.worker_id, self.broker)
        if not isinstance(self.models, dict) or not self.models:
            raise ConfigError("models must name at least one model (name: {path, board_model, ...})")
        models = {}
        for name, entry in self.models.items():
            if isinstance(entry, ModelConfig):
                models[name] = entry
                continue
            if not isinstance(entry, dict):
                raise ConfigError(f"models.{name} must be a mapping")
            try:
                models[name] = ModelConfig(**entry)
            except TypeError as err:
                raise ConfigError(f"models.{name}: {err}") from err
        self.models = models
        if self.signing_key is not None and not Path(self.signing_key).is_file():
            raise ConfigError(f"signing_key {self.signing_key} does not exist")
        if not isinstance(self.group, str) or not ID_PATTERN.match(self.group):
            raise ConfigError("group must be 1-64 characters of [A-Za-z0-9_.:-]")
        for name in ("device_timeout_s", "command_resend_s", "busy_retry_s", "transfer_retry_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.chunk_size < 1024 or self.transfer_window < 1:
            raise ConfigError("chunk_size must be >= 1024 and transfer_window >= 1")
        for name in ("max_photo_bytes", "max_pending_photo_bytes", "max_photo_pixels", "transfer_idle_timeout_s",
                     "transfer_deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.receive_disk_margin_bytes < 0:
            raise ConfigError("receive_disk_margin_bytes must be >= 0")
        check_receive_maximum(self.receive_maximum)


def load_config(path: Path) -> HostConfig:
    try:
        return HostConfig(**load_yaml(path))
    except TypeError as err:
        raise ConfigError(f"config {path}: {err}") from err


@dataclass
class JobState:
    """What a job has done: state.json in its folder, rewritten atomically after every change, so a
    killed worker resumes where it stopped. Keys it does not know are kept as they were (`other`)."""

    state: str = "queued"  # queued, running, done, failed
    stage: str | None = None  # the stage running (or that failed)
    stages_done: list[str] = field(default_factory=list)
    received: float = 0.0  # when this worker took the job (resumed jobs run oldest first)
    commands: dict[str, dict] = field(default_factory=dict)  # step -> {"n", "id", "action", "out"}
    bundle: str | None = None  # the sealed subject bundle (tar) on the host
    size: int | None = None  # the plan's largest training crop: the default generation side
    board_bundle: str | None = None  # where the board installed the bundle
    adapter: str | None = None  # the adapter folder on the board
    results: list[dict] = field(default_factory=list)  # image records of the generated images
    error: str | None = None  # why the job failed
    other: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "JobState":
        names = {f.name for f in fields(cls)} - {"other"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   other={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict:
        data = asdict(self)
        return {**data.pop("other"), **data}


class DeviceLog:
    """What a board said about one job (replies, events, results), kept in memory and appended to
    the job's device.jsonl before the broker's message is acknowledged."""

    def __init__(self, path: Path, device: str, issued: dict[str, dict] | None = None):
        self.path = path
        self.device = device  # the board the job was submitted for: only its topics speak for the job
        self.issued = dict(issued or {})  # command id -> its state record ({"action", "out"}), for this job
        self.replies: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self.results: dict[str, list[dict]] = {}
        self.status: dict | None = None
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self._apply(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a kill

    def _apply(self, record: dict) -> None:
        kind, body = record["kind"], record["body"]
        if kind == "reply":
            self.replies.setdefault(body["id"], body)
        elif kind == "event":
            self.events.setdefault(body["job"], []).append(body)
        elif kind == "result":
            self.results.setdefault(body["job"], []).append(body)

    def accepts(self, device: str, kind: str, body: dict) -> str | None:
        """Why a board's message cannot be about this job (None: it can). A message speaks for the
        job only from the job's own device, about a command the worker issued for it; an image
        record only from the generate command, for a file inside the folder it was told to write."""
        if device != self.device:
            return f"it came from {device}, the job runs on {self.device}"
        key = body.get("id") if kind == "reply" else body.get("job")
        command = self.issued.get(key) if isinstance(key, str) else None
        if command is None:
            return f"{str(key)[:80]!r} is not a command this worker issued for the job"
        action = command["action"]
        if kind == "event" and action not in JOB_ACTIONS:
            return f"{action} is not a job with events"
        if kind == "result":
            if action != "generate":
                return f"an image record must come from generate, not {action}"
            return _image_record_problem(body, command.get("out"))
        return None

    def add(self, kind: str, body: dict) -> None:
        record = {"kind": kind, "body": body}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._apply(record)


class HostWorker:
    """One worker: its MQTT client, a runner thread doing one job at a time, file transfers."""

    def __init__(self, config: HostConfig, say: Callable[[str], None] | None = None):
        self.config = config
        self.say = say or (lambda line: None)  # one line per job stage, for a person watching the worker
        self.work = Path(config.work_dir).resolve()
        self.jobs_dir = self.work / "jobs"
        # the stages a job runs through, in order (host/jobs.py STAGES), each a step over the job's state
        self.stages: dict[str, Callable[[dict, JobState, DeviceLog], None]] = {
            "photos": self._stage_photos, "prepare": self._stage_prepare, "deliver": self._stage_deliver,
            "train": self._stage_train, "generate": self._stage_generate}
        assert tuple(self.stages) == STAGES, "a worker stage is missing from the table or out of order"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.client = make_client(config.broker, client_id=config.worker_id)
        self.file_sender = FileSender(self._publish_file, self.work / "transfers" / "send")
        self.file_receiver = FileReceiver(self._publish_file, self.work / "transfers" / "receive",
                                          window=config.transfer_window, retry_s=config.transfer_retry_s,
                                          policy=ReceivePolicy(config.max_photo_bytes, config.max_pending_photo_bytes,
                                                               config.receive_disk_margin_bytes,
                                                               config.transfer_idle_timeout_s,
                                                               config.transfer_deadline_s))
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Condition()
        self._logs: dict[str, DeviceLog] = {}  # active job id -> its device log
        self._devices: set[str] = set()  # devices whose topics we subscribed to
        self._running: str | None = None
        self._last_progress: dict[str, float] = {}
        self._last_chunk = 0.0  # when the last photo chunk arrived
        self._dropped: set[tuple[str, str, str]] = set()  # (device, job, kind) of refused messages, logged once
        self._models: dict[str, Any] = {}
        self._runner = threading.Thread(target=self._run_loop, name="host-runner", daemon=True)
        self.client.will_set(worker_topic(config.worker_id), self._presence("offline"), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _presence(self, state: str) -> bytes:
        return json.dumps({"worker": self.config.worker_id, "state": state, "group": self.config.group,
                           "job": self._running, "queued": self._queue.qsize(), "version": __version__,
                           "ts": time.time()}, sort_keys=True).encode()

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Queue the jobs found on disk (a restart resumes them), connect, start the runner."""
        pending = []
        for folder in self.jobs_dir.iterdir():
            state = self._read_state(folder.name)
            if state and state.state in ("queued", "running"):
                pending.append((state.received, folder.name))
        for _, job_id in sorted(pending):
            logger.info("job %s was not finished when the worker stopped; it resumes", job_id)
            self._queue.put(job_id)
        broker = self.config.broker
        logger.info("host worker %s connecting to %s:%d (group %s)", self.config.worker_id, broker.host, broker.port,
                    self.config.group)
        self.client.connect_async(broker.host, broker.port, broker.keepalive, clean_start=False,
                                  properties=connect_properties(self.config.session_expiry_s,
                                                                self.config.receive_maximum))
        self.client.loop_start()
        self._runner.start()

    def stop(self, hand_back: bool = True) -> None:
        """Stop taking jobs; hand back the ones not started; the running one resumes on restart."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        self._runner.join(timeout=30)
        if hand_back and self.connected.is_set():
            self._hand_back()
        if self.connected.is_set():
            self.client.publish(worker_topic(self.config.worker_id), self._presence("offline"), qos=1,
                                retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()
        self.file_receiver.close()

    def _hand_back(self) -> None:
        # Leave the group first: a job handed back while still subscribed could come straight back here.
        left = threading.Event()
        self.client.on_unsubscribe = lambda *args: left.set()
        self.client.unsubscribe(share_topic(self.config.group))
        if not left.wait(5.0):
            logger.warning("the broker did not confirm leaving the group; handing back anyway")
        while True:
            try:
                job_id = self._queue.get_nowait()
            except queue.Empty:
                return
            state = self._read_state(job_id)
            if not state or state.state != "queued" or state.stages_done:
                continue  # begun here: it resumes when this worker starts again
            job = json.loads((self.jobs_dir / job_id / "job.json").read_text())
            info = self.client.publish(SUBMIT_TOPIC, json.dumps(job), qos=1)
            info.wait_for_publish(10)
            shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
            logger.info("handed job %s back to the group", job_id)

    # ---- MQTT ------------------------------------------------------------------------------
    def _publish_file(self, topic: str, payload: bytes, properties: Any = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=properties)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            logger.error("broker refused the connection: %s", reason_code)
            return
        logger.info("connected (session present: %s)", flags.session_present)
        topics = [(share_topic(self.config.group), SubscribeOptions(qos=1))]
        with self._lock:
            devices = set(self._devices)
        for device in devices:
            topics += [(t, SubscribeOptions(qos=1, noLocal=True)) for t in self._device_topics(device)]
        client.subscribe(topics)
        # after the subscription on the same connection: `online` means jobs reach this worker
        client.publish(worker_topic(self.config.worker_id), self._presence("online"), qos=1, retain=True)
        self.connected.set()
        self.file_receiver.on_connect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        self.file_receiver.on_disconnect()  # no chunk is asked again until the link is back
        if not self._stop.is_set():
            logger.warning("disconnected from broker (%s); reconnecting with backoff", reason_code)

    def _device_topics(self, device: str) -> list[str]:
        prefix = device_prefix(device)
        return [prefix + "reply/+", prefix + "progress", prefix + "result", *self.file_sender.subscriptions(prefix),
                *self.file_receiver.subscriptions(prefix)]

    def _watch(self, device: str) -> None:
        with self._lock:
            if device in self._devices:
                return
            self._devices.add(device)
        self.client.subscribe([(t, SubscribeOptions(qos=1, noLocal=True)) for t in self._device_topics(device)])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Network thread. What must survive a kill is on disk before this returns (paho then acks)."""
        try:
            if msg.topic == SUBMIT_TOPIC:
                self._accept(msg.payload)
            elif msg.topic.startswith("blockskip/"):
                self._device_message(msg)
        except Exception:  # the callback boundary: log and keep serving
            logger.exception("error handling a message on %s", msg.topic)

    def _accept(self, payload: bytes) -> None:
        try:
            job = parse_job(payload)
        except JobError as err:
            job_id = _readable_id(payload)
            logger.warning("refused a job%s: %s", f" {job_id}" if job_id else "", err)
            if job_id:
                self._publish_status(job_id, {"job": job_id, "state": "failed", "error": f"bad job: {err}",
                                              "worker": self.config.worker_id})
            return
        folder = self.jobs_dir / job["id"]
        if folder.exists():
            logger.info("job %s is already known here; ignoring the repeat", job["id"])
            return
        if job["model"] not in self.config.models:
            self._publish_status(job["id"], {"job": job["id"], "state": "failed", "device": job["device"],
                                             "worker": self.config.worker_id,
                                             "error": f"model {job['model']!r} is not one this worker serves "
                                                      f"({', '.join(self.config.models)})"})
            return
        tmp = self.jobs_dir / f".{job['id']}.new"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_json_atomic(tmp / "job.json", job, indent=2)
        write_json_atomic(tmp / "state.json", JobState(received=time.time()).to_dict())
        os.replace(tmp, folder)
        logger.info("job %s taken (device %s)", job["id"], job["device"])
        self._publish_status(job["id"], self._status_body(job, self._read_state(job["id"])))
        self._queue.put(job["id"])

    def _device_message(self, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 3:
            return
        rest = "/".join(parts[2:])
        if rest.startswith("files/"):
            if self.file_receiver.handle(msg.topic, msg.payload, msg.properties):
                return
            self.file_sender.handle(msg.topic, msg.payload)
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if rest.startswith("reply/"):
            kind, key = "reply", body.get("id")
        elif rest == "progress":
            kind, key = "event", body.get("job")
        elif rest == "result":
            kind, key = "result", body.get("job")
        else:
            return
        if not isinstance(key, str):
            return
        device = parts[1]
        with self._lock:
            for job_id, log in self._logs.items():
                if key.startswith(job_id + "."):
                    problem = log.accepts(device, kind, body)
                    if problem is not None:
                        self._drop_once(device, job_id, kind, problem)
                        return
                    log.add(kind, body)
                    self._lock.notify_all()
                    break

    def _drop_once(self, device: str, job_id: str, kind: str, problem: str) -> None:
        """Log a refused board message once per (device, job, kind); a flood adds no more lines."""
        if (device, job_id, kind) in self._dropped:
            return
        self._dropped.add((device, job_id, kind))
        logger.warning("dropped a %s about job %s from %s: %s (further ones are dropped silently)", kind, job_id,
                       device, problem)

    # ---- job status ------------------------------------------------------------------------
    def _read_state(self, job_id: str) -> JobState | None:
        try:
            data = json.loads((self.jobs_dir / job_id / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return JobState.from_dict(data) if isinstance(data, dict) else None

    def _save_state(self, job_id: str, state: JobState) -> None:
        write_json_atomic(self.jobs_dir / job_id / "state.json", state.to_dict(), indent=2)

    def _status_body(self, job: dict, state: JobState, **extra: Any) -> dict:
        return {"job": job["id"], "device": job["device"], "model": job["model"], "worker": self.config.worker_id,
                "state": state.state, "stage": state.stage, "stages_done": state.stages_done,
                "results": state.results, "error": state.error, "version": __version__,
                "ts": time.time(), **extra}

    def _publish_status(self, job_id: str, body: dict) -> None:
        self.client.publish(status_topic(job_id), json.dumps(body, sort_keys=True), qos=1, retain=True)

    def _event(self, job_id: str, event: dict) -> None:
        event = {"job": job_id, "ts": time.time(), **event}
        if event.get("type") == "progress":
            now = time.monotonic()
            if now - self._last_progress.get(job_id, 0.0) < self.config.progress_interval_s and not event.get("last"):
                return
            self._last_progress[job_id] = now
        self.client.publish(events_topic(job_id), json.dumps(event, sort_keys=True), qos=1)

    # ---- the runner ------------------------------------------------------------------------
    def _run_loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if self._stop.is_set():
                self._queue.put(job_id)  # handed back (or kept) by stop()
                return
            try:
                self._run_job(job_id)
            except Stopping:
                logger.info("job %s stops here; it resumes when the worker starts again", job_id)
                return
            except Exception:  # the job boundary: a bug ends the job, not the worker
                logger.exception("job %s crashed", job_id)

    def _run_job(self, job_id: str) -> None:
        folder = self.jobs_dir / job_id
        job = json.loads((folder / "job.json").read_text())
        state = self._read_state(job_id)
        log = DeviceLog(folder / "device.jsonl", job["device"], _issued(state.commands, f"generated/{job_id}"))
        with self._lock:
            self._logs[job_id] = log
            self._running = job_id
        self._watch(job["device"])
        last = STAGES.index(job.get("stop_after", "generate"))
        try:
            state.state = "running"
            for stage in STAGES[: last + 1]:
                if stage in state.stages_done:
                    continue
                if self._stop.is_set():
                    raise Stopping()  # SIGTERM: the next stage runs when this worker starts again
                state.stage = stage
                self._save_state(job_id, state)
                self._publish_status(job_id, self._status_body(job, state))
                self._event(job_id, {"type": "stage", "stage": stage})
                logger.info("job %s: %s", job_id, stage)
                self.say(f"job {job_id} ({job['device']}): {stage}")
                self.stages[stage](job, state, log)
                state.stages_done.append(stage)
                self._save_state(job_id, state)
            state.state, state.stage = "done", None
            self._event(job_id, {"type": "done", "results": len(state.results)})
            logger.info("job %s done", job_id)
            self.say(f"job {job_id} ({job['device']}): done, {len(state.results)} images")
        except Stopping:
            self._save_state(job_id, state)
            raise
        except Exception as err:  # the job boundary: it ends `failed`, saying why, and the worker goes on
            if not isinstance(err, (JobFailed, JobError, TransferError, BlockskipError)):
                logger.exception("job %s crashed", job_id)
                err = JobFailed(f"internal error: {type(err).__name__}: {err}")
            state.state, state.error = "failed", str(err)
            self._event(job_id, {"type": "failed", "stage": state.stage, "error": str(err)})
            logger.error("job %s failed in %s: %s", job_id, state.stage, err)
            self.say(f"job {job_id} ({job['device']}): failed in {state.stage}: {err}")
        finally:
            with self._lock:
                self._logs.pop(job_id, None)
                self._running = None
        for transfer in self.file_receiver.active():  # a failed job's photos still coming: stop them, drop the parts
            if transfer.startswith(job_id + "."):
                self.file_receiver.abort(transfer, "cancelled", f"job {job_id} ended {state.state}")
        self._save_state(job_id, state)
        self._publish_status(job_id, self._status_body(job, state))

    # ---- talking to the board ----------------------------------------------------------------
    def _wait(self, what: str, ready: Callable[[], Any], timeout: float, tick: Callable[[], None] | None = None,
              tick_s: float = 0.0, activity: Callable[[], Any] | None = None) -> Any:
        """Wait until `ready()` is truthy; `tick` runs every `tick_s` (resends). Gives up after
        `timeout` seconds without a sign of life: a change of `activity()` (events, chunks) starts
        the count again. Woken by each message from the board, and twice a second anyway."""
        deadline = time.monotonic() + timeout
        next_tick = time.monotonic() + tick_s
        seen = activity() if activity else None
        while True:
            value = ready()
            if value:
                return value
            if self._stop.is_set():
                raise Stopping()
            now = time.monotonic()
            if activity is not None and activity() != seen:
                seen, deadline = activity(), now + timeout
            if now >= deadline:
                raise JobFailed(f"{what}: no sign of life from the board for {timeout:.0f} s")
            if tick and now >= next_tick:
                tick()
                next_tick = now + tick_s
            with self._lock:
                self._lock.wait(timeout=min(0.5, max(0.01, deadline - now)))

    def _command(self, job: dict, state: JobState, log: DeviceLog, step: str, action: str, args: dict,
                 fresh: bool = False) -> Any:
        """Send a command to the job's board and return its reply's result. The id is derived from
        the job and the step and recorded before sending, so a restarted worker sends the same id
        and the agent answers it from its journal without running anything again. A board busy
        with another job is asked again (with a new id) every busy_retry_s; `fresh` takes a new id
        for a command that is safe to repeat."""
        attempts = state.commands.get(step, {"n": 0})
        if fresh and attempts.get("id"):
            attempts["n"] += 1
            attempts.pop("id")
        while True:
            command_id = attempts.get("id") or (f"{job['id']}.{step}" + (f"-{attempts['n']}" if attempts["n"] else ""))
            attempts["id"], attempts["action"] = command_id, action
            if action == "generate":
                attempts["out"] = args.get("out")
            state.commands[step] = attempts
            self._save_state(job["id"], state)
            with self._lock:  # recorded before it is sent: its reply can only come after
                log.issued.update(_issued({step: attempts}))
            topic = device_prefix(job["device"]) + "cmd"
            payload = json.dumps({"id": command_id, "action": action, "args": args})

            def send() -> None:
                self.client.publish(topic, payload, qos=1)

            send()
            reply = self._wait(f"{action} on {job['device']}", lambda: log.replies.get(command_id),
                               self.config.device_timeout_s, send, self.config.command_resend_s)
            if reply.get("ok") is True:
                result = reply.get("result")
                return result if isinstance(result, dict) else {}
            error = reply.get("error") or {}
            if error.get("code") != "busy":
                raise JobFailed(f"{action} on {job['device']} refused ({error.get('code')}): {error.get('message')}")
            self._event(job["id"], {"type": "waiting", "stage": state.stage,
                                    "message": f"{job['device']} is busy: {error.get('message')}"})
            deadline = time.monotonic() + self.config.busy_retry_s
            while time.monotonic() < deadline:
                if self._stop.wait(0.2):
                    raise Stopping()
            attempts = {"n": attempts["n"] + 1}

    def _job_end(self, job: dict, log: DeviceLog, command_id: str, stage: str) -> dict:
        """Wait for the end event of the board job `command_id`, forwarding its progress."""
        seen = [0]

        def ended() -> dict | None:
            events = log.events.get(command_id, [])
            for event in events[seen[0]:]:
                if event.get("type") == "progress":
                    self._event(job["id"], {"type": "progress", "stage": stage, **{
                        k: event.get(k) for k in ("step", "total", "loss", "eta_s") if k in event},
                        "last": event.get("step") == event.get("total")})
            seen[0] = len(events)
            return next((e for e in events if e.get("type") in ("done", "cancelled", "failed")), None)

        end = self._wait(f"{stage} on {job['device']}", ended, self.config.device_timeout_s,
                         activity=lambda: len(log.events.get(command_id, [])))
        if end["type"] != "done":
            error = end.get("error") or {}
            raise JobFailed(f"{stage} on {job['device']} ended {end['type']}"
                            + (f" ({error.get('code')}): {error.get('message')}" if error else ""))
        return end

    # ---- stages ----------------------------------------------------------------------------
    def _stage_photos(self, job: dict, state: JobState, log: DeviceLog) -> None:
        photos = self.jobs_dir / job["id"] / "photos"
        photos.mkdir(exist_ok=True)
        if "photos_dir" in job:
            try:
                sources = list_images(job["photos_dir"])
            except BlockskipError as err:
                raise JobFailed(f"photos_dir: {err}") from err
            for source in sources:
                data = source.read_bytes()
                try:
                    image_format(data, self.config.max_photo_pixels)
                except CaptureError as err:
                    raise JobFailed(f"photo {source}: {err.message}") from err
                shutil.copyfile(source, photos / source.name)
            self._event(job["id"], {"type": "photos", "count": len(sources), "source": job["photos_dir"]})
            return
        selection = job["captures"]
        listing = self._command(job, state, log, "captures", "captures",
                                {"limit": 1000, **({"camera_id": selection["camera_id"]}
                                                   if "camera_id" in selection else {})})
        records = listing.get("captures")
        chosen = select_captures([r for r in records if isinstance(r, dict)] if isinstance(records, list) else [],
                                 selection)
        if not chosen:
            raise JobFailed(f"no capture on {job['device']} matches {json.dumps(selection, sort_keys=True)} "
                            f"({listing.get('total', 0)} captures in its spool)")
        offered = self._command(job, state, log, "upload", "upload",
                                {"captures": [r["sha256"] for r in chosen], "chunk_size": self.config.chunk_size})
        self._receive_files(job, _upload_offers(offered, photos, job["device"]), "photos")

    def _receive_files(self, job: dict, files: list[tuple[FileOffer, Path]], stage: str) -> None:
        prefix = device_prefix(job["device"])
        total = sum(offer.size for offer, _ in files)
        done_bytes = {offer.transfer: 0 for offer, _ in files}

        def progress(info: dict) -> None:
            done_bytes[info["transfer"]] = info["bytes"]
            self._last_chunk = time.monotonic()
            self._event(job["id"], {"type": "progress", "stage": stage, "bytes": sum(done_bytes.values()),
                                    "total_bytes": total, "last": sum(done_bytes.values()) == total})

        for offer, dest in files:
            if dest.exists():
                done_bytes[offer.transfer] = offer.size
                continue
            try:
                self.file_receiver.receive(prefix, offer, dest, on_progress=progress, on_complete=self._check_photo)
            except TransferError as err:
                raise JobFailed(f"{stage} from {job['device']}: refused ({err.code}): {err.message}") from err
        self._last_chunk = time.monotonic()
        for offer, dest in files:
            while not dest.exists():  # no deadline while chunks keep coming (progress reports them)
                try:
                    self.file_receiver.wait(offer.transfer, timeout=5.0, should_stop=self._stop.is_set)
                except TransferError as err:
                    if self._stop.is_set():
                        raise Stopping() from err
                    if err.code != "timeout":
                        raise JobFailed(f"{stage} from {job['device']}: {offer.name} failed ({err.code}): "
                                        f"{err.message}") from err
                    if time.monotonic() - self._last_chunk > self.config.device_timeout_s:
                        raise JobFailed(f"photos from {job['device']}: no chunk for "
                                        f"{self.config.device_timeout_s:.0f} s") from err
        self._event(job["id"], {"type": "photos", "count": len(files), "bytes": total, "source": job["device"]})

    def _check_photo(self, path: Path) -> None:
        """A received photo must be a JPEG or PNG within max_photo_pixels (from its header, before
        any pixel is decoded); the transfer fails with the refusal's code otherwise."""
        try:
            image_format(path.read_bytes(), self.config.max_photo_pixels)
        except CaptureError as err:
            code = "too_many_pixels" if err.code == "too_large" else "bad_image"
            raise TransferError(code, f"photo {path.name}: {err.message}") from err

    def _model(self, name: str):
        with _MODEL_LOCK:  # building a model seeds torch's global RNG: one at a time per process
            return self._load_model(name)

    def _load_model(self, name: str):
        if name not in self._models:
            from blockskip.host.profile import resolve_model

            path = self.config.models[name].path
            if path == "builtin":
                path = str(MODEL_DIR)
            self._models[name] = resolve_model(path)
        return self._models[name]

    def _plan(self, name: str, model) -> PlanDocument:
        settings = self.config.models[name]
        if settings.plan:
            return PlanDocument.load(settings.plan)

        profile = self._profile(name, model)
        s_max, _ = default_s_max(model, profile)
        schedule = PatchSchedule(s_min=default_s_min(s_max, model.granularity), s_max=s_max,
                                 granularity=model.granularity)
        return make_plan(profile, model, skip_budget(model.family.num_blocks, settings.skip_ratio), schedule,
                         LoraSettings.for_model(model)[0], settings.samples or DEFAULT_SAMPLES, text_len=default_text_len(model)[0],
                         feature_dtype=DEFAULT_FEATURE_DTYPE)

    def _profile(self, name: str, model) -> dict:
        """The model's profile: the configured file, or measured once and kept in work_dir/profiles."""
        settings = self.config.models[name]
        if settings.profile:
            return json.loads(Path(settings.profile).read_text())
        kept = self.work / "profiles" / f"{name}-{model.family.config_hash()}.json"
        if kept.is_file():
            return json.loads(kept.read_text())
        if settings.path == "builtin":  # the built-in model's committed profile, while its weights match

            profile = cached_profile(profile_key(MODEL_DIR, int(model.meta.get("image_size", 32))))
            if profile is not None:
                return profile
        from blockskip.host.encoders import EfficientNetLite0
        from blockskip.host.profile import DEFAULT_PROMPTS, default_profile_size, masking_profile

        size, _ = default_profile_size(model)
        logger.info("measuring the profile of %s once (kept in %s)", name, kept)
        profile = masking_profile(model, EfficientNetLite0(), DEFAULT_PROMPTS, [0, 1], 8, size, progress=False)
        profile.update(kind="blockskip-profile", model=model.describe(), size=size)
        kept.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(kept, profile, indent=2)
        return profile

    def _stage_prepare(self, job: dict, state: JobState, log: DeviceLog) -> None:
        settings = self.config.models[job["model"]]
        folder = self.jobs_dir / job["id"]
        model = self._model(job["model"])
        plan = self._plan(job["model"], model)
        self._event(job["id"], {"type": "plan", "kept": plan.kept, "why": plan.choice.get("why")})
        photos = list_images(folder / "photos")
        staging = folder / "staging"
        samples = settings.samples or plan.samples
        key = Path(self.config.signing_key) if self.config.signing_key else None
        watcher = _ShardWatcher(staging / "features", samples, settings.shard_size,
                                lambda done: self._event(job["id"], {"type": "progress", "stage": "prepare",
                                                                     "step": done, "total": samples,
                                                                     "last": done == samples}))
        prior = None
        if settings.prior_prompt:
            prior = PriorSettings(prompt=settings.prior_prompt, images=settings.prior_images,
                                  samples=settings.prior_samples, seed=settings.seed)
        watcher.start()
        try:
            done = prepare(model, plan, photos, [job["subject"]], folder / job["id"], staging=staging,
                           bank_prompts=job["prompts"], extra={"job": job["id"]},
                           base_pack=Path(settings.base_pack) if settings.base_pack else None,
                           single=not settings.base_pack, progress=False,
                           settings=PrepareSettings(seed=settings.seed, samples=samples,
                                                    shard_size=settings.shard_size, signing_key=key, tar=True,
                                                    overwrite=True, prior=prior))
        finally:
            watcher.stop()
        tar = done.subject.with_name(done.subject.name + ".tar")
        state.bundle = str(tar)
        state.size = plan.schedule.s_max
        self._event(job["id"], {"type": "bundle", "bytes": tar.stat().st_size, "signed": key is not None,
                                "photos": len(photos), "draws": samples})

    def _send(self, job: dict, state: JobState, log: DeviceLog, tar: Path, kind: str, step: str) -> str:
        """Offer a tar to the board and wait until it has it, verified; returns its path there."""
        prefix = device_prefix(job["device"])
        transfer = f"{job['id']}.{step}"
        offer = self.file_sender.offer(prefix, tar, transfer, self.config.chunk_size)
        result = self._command(job, state, log, step, "receive", {"offer": offer.to_dict(), "kind": kind},
                               fresh=True)  # receive is idempotent by content: a repeat answers `installed`
        if not isinstance(result.get("path"), str):
            raise JobFailed(f"{job['device']} answered receive without the path of {tar.name}")
        if result.get("state") != "installed":
            done = self._wait(f"sending {tar.name} to {job['device']}", lambda: self.file_sender.result(transfer),
                              self.config.device_timeout_s, activity=lambda: self.file_sender.sent(transfer))
            if not done.get("ok"):
                error = done.get("error") or {}
                raise JobFailed(f"{job['device']} refused {tar.name} ({error.get('code')}): {error.get('message')}")
        self.file_sender.forget(transfer)
        self._event(job["id"], {"type": "delivered", "kind": kind, "path": result["path"], "bytes": offer.size})
        return result["path"]

    def _stage_deliver(self, job: dict, state: JobState, log: DeviceLog) -> None:
        settings = self.config.models[job["model"]]
        if settings.base_pack and self.config.send_base_pack:
            pack = Path(settings.base_pack)
            content = verify_bundle(pack)["content_sha256"]
            status = self._command(job, state, log, "status", "status", {}, fresh=True)
            if not isinstance(status.get("base_packs"), list) or content not in status["base_packs"]:
                self._send(job, state, log, _as_tar(pack, self.work / "base-packs"), "base-pack", "basepack")
        state.board_bundle = self._send(job, state, log, Path(state.bundle), "bundle", "bundle")

    def _stage_train(self, job: dict, state: JobState, log: DeviceLog) -> None:
        args = {"bundle": state.board_bundle, "out": f"adapters/{job['id']}", **job.get("train", {})}
        self._command(job, state, log, "train", "train", args)
        end = self._job_end(job, log, state.commands["train"]["id"], "train")
        state.adapter = f"adapters/{job['id']}"
        self._event(job["id"], {"type": "trained", "result": end.get("result")})

    def _stage_generate(self, job: dict, state: JobState, log: DeviceLog) -> None:
        settings = self.config.models[job["model"]]
        side = state.size  # default: the plan's largest training crop, the size the subject was seen at
        args = {"model": settings.board_model, "prompts": job["prompts"], "adapter": state.adapter,
                "bundle": state.board_bundle, "out": f"generated/{job['id']}",
                **({"height": side, "width": side} if side else {}), **job.get("generate", {})}
        self._command(job, state, log, "generate", "generate", args)
        command_id = state.commands["generate"]["id"]
        self._job_end(job, log, command_id, "generate")
        state.results = [{k: r.get(k) for k in ("path", "sha256", "prompt", "seed", "thumbnail_png_b64")
                             if r.get(k) is not None} for r in log.results.get(command_id, [])]


_MODEL_LOCK = threading.Lock()


class _ShardWatcher:
    """Progress of a running cache: counts its finished shards once a second."""

    def __init__(self, folder: Path, samples: int, shard_size: int, report: Callable[[int], None]):
        self.folder, self.samples, self.shard_size, self.report = folder, samples, shard_size, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.report(self.samples)

    def _run(self) -> None:
        last = -1
        while not self._stop.wait(1.0):
            shards = len(list(self.folder.glob("shard-*.safetensors"))) if self.folder.is_dir() else 0
            done = min(self.samples, shards * self.shard_size)
            if done != last:
                self.report(done)
                last = done


def _as_tar(pack: Path, where: Path) -> Path:
    """A base pack as one tar file (its own, or one written from its folder)."""
    if pack.is_file():
        return pack

    manifest = json.loads((pack / MANIFEST).read_text())
    tar = where / f"{pack.name}-{manifest['content_sha256'][:12]}.tar"
    if not tar.exists():
        where.mkdir(parents=True, exist_ok=True)
        _write_tar(pack, tar, sorted(manifest["files"]))  # the signature goes in when the pack has one
    return tar


def _upload_offers(offered: dict, photos: Path, device: str) -> list[tuple[FileOffer, Path]]:
    """The files a board's `upload` reply offers, each to a photo in `photos` (its own base name)."""
    files = offered.get("files")
    if not isinstance(files, list) or not files:
        raise JobFailed(f"{device} answered upload without a list of offered files")
    out = []
    for entry in files:
        try:
            offer = FileOffer.from_dict(entry.get("offer") if isinstance(entry, dict) else None)
        except TransferError as err:
            raise JobFailed(f"{device} offered a photo that is not a valid offer: {err.message}") from err
        out.append((offer, photos / offer.name))  # a base name FileOffer checked (no slashes, not . or ..)
    if len({dest for _, dest in out}) != len(out):
        raise JobFailed(f"{device} offered two photos under one name")
    return out


def _issued(commands: dict, default_out: str | None = None) -> dict[str, dict]:
    """command id -> {"action", "out"} of the commands recorded in a job's state (`default_out`: the
    generate folder of a state written before `out` was recorded)."""
    issued = {}
    for step, record in commands.items():
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            # a state written before `action` was recorded: the step names the action
            issued[record["id"]] = {"action": record.get("action", step), "out": record.get("out", default_out)}
    return issued


def _image_record_problem(body: dict, out: str | None) -> str | None:
    """Why a generate result is not an image record of the job's own output folder (None: it is)."""
    path, digest = body.get("path"), body.get("sha256")
    if not isinstance(digest, str) or not SHA256_PATTERN.match(digest):
        return "its sha256 is not 64 lowercase hex digits"
    if not isinstance(path, str) or not out or len(path) > 4096:
        return "it names no file"
    parts, want = PurePosixPath(path).parts, PurePosixPath(out).parts
    if ".." in parts or len(parts) <= len(want) or not any(
            parts[i:i + len(want)] == want and i + len(want) == len(parts) - 1 for i in range(len(parts))):
        return f"{path[:200]!r} is not a file in {out}/ (where the job told the board to write)"
    return None


_LEADING_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([^"\\]{1,64})"')


def _readable_id(payload: bytes) -> str | None:
    """The id a refused job names, to publish its refusal under: any string that is one plain MQTT
    topic level (an id parse_job refuses, such as `..`, still hears why). From a payload too deeply
    nested to parse, the id only when it is the first key."""
    value: Any = None
    try:
        if len(payload) <= MAX_JOB_BYTES:
            value = json.loads(payload).get("id")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    except RecursionError:
        pass
    if value is None:  # too deep or too large to parse whole: the leading id, if any
        match = _LEADING_ID.match(payload)
        value = match.group(1).decode("utf-8", "replace") if match else None
    ok = isinstance(value, str) and 0 < len(value) <= 64 and not any(c in value for c in "/+#\0")
    return value if ok and value.isprintable() else None


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT."""
    config = load_config(Path(args.config))
    worker = HostWorker(config, say=lambda line: print(line, flush=True))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    worker.start()
    print(f"host worker {config.worker_id}: taking jobs from {share_topic(config.group)} on "
          f"{config.broker.host}:{config.broker.port}; work folder {worker.work}", flush=True)
    while not done.wait(timeout=1.0):
        pass
    logger.info("shutting down")
    worker.stop()
    return 0


def register(subparsers: Any) -> None:
    """Add `blockskip host serve`."""
    parser = subparsers.add_parser(
        "host", help="host worker: take personalize jobs over MQTT (photos -> bundle -> board -> images)",
        description="Host-side programs that run on the GPU machines.")
    commands = parser.add_subparsers(dest="host_command", metavar="SUBCOMMAND", required=True)
    serve = commands.add_parser(
        "serve", help="run a host worker until SIGTERM",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example config: deploy/host.example.yaml. Topics and payloads: host/SERVE.md.")
    serve.add_argument("--config", required=True, metavar="YAML",
                       help="worker configuration (worker_id, work_dir, broker, models, signing_key)")
    serve.set_defaults(func=run)
