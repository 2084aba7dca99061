"""`blockskip agent`: the edge board's MQTT agent (paho-mqtt 2.x, MQTT v5).

Topics live under `blockskip/<device_id>/`: retained `status` (with a last will), `cmd` ->
`reply/<id>`, `error` (errors for commands without a usable id), `progress`, `result`,
`capture/<camera_id>` -> `capture/ack`, and `files/<transfer>/{chunk,want,done}` (files in chunks,
blockskip.transfer: `upload` offers captures or generated images, `receive` fetches a bundle or a
base pack and installs it only after it verified under the board's trust policy). Every QoS 1
publish except file chunks goes through the disk outbox (edge/outbox.py); captures are stored by
the spool (edge/spool.py) before they are acked.
One job (train or generate) at a time, in a worker thread; a second one is refused with `busy`.
Payloads, error codes and configuration keys: edge/AGENT.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from blockskip import __version__
from blockskip.edge import messages
from blockskip.edge.messages import Command, CommandError
from blockskip.edge.outbox import Outbox, OutboxSender
from blockskip.edge.spool import CaptureError, Spool, capture_meta
from blockskip.edge.dataset_spec import spec_from_data
from blockskip.edge.journal import Journal
from blockskip.files import sha256_file
from blockskip.errors import BlockskipError, BundleError, ConfigError, InputError, NotAvailableError
from blockskip.basepack import installed_base_packs
from blockskip.bundle import TrustPolicy, open_bundle, trust_policy_from
from blockskip.config import load_yaml
from blockskip.mqtt import (BrokerConfig, check_receive_maximum, connect_properties, device_prefix, login_for,
                            make_client)
from blockskip.transfer import (DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, FileOffer, FileReceiver, FileSender, ReceivePolicy,
                                TransferError)

logger = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    """The agent's YAML configuration (deploy/agent.example.yaml documents every key)."""

    device_id: str  # topics live under blockskip/<device_id>/
    data_dir: str  # every path a command names must be inside it; spool and outbox live here
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    max_command_bytes: int = messages.MAX_COMMAND_BYTES  # larger commands get `too_large`
    max_capture_bytes: int = 16 * 1024 * 1024  # larger captures are acked stored=false, too_large
    progress_interval_s: float = 1.0  # at most one progress event per interval (first and last always)
    outbox_max_messages: int = 10_000  # outbox bound (oldest progress dropped first when full)
    outbox_max_bytes: int = 64 * 1024 * 1024
    session_expiry_s: int = 86_400  # broker keeps our subscriptions and queued commands this long
    job_stop_timeout_s: float = 300.0  # on SIGTERM, wait this long for the job to checkpoint
    thumbnails: bool = False  # add a small base64 PNG thumbnail to each `result`
    backend: str = "auto"  # generation backend when a command names none (Pi: onnxruntime)
    trusted_keys: list[str] = field(default_factory=list)  # ed25519 public keys (PEM) bundles must be signed by
    allow_unsigned_bundles: bool = False  # also use bundles whose signature is not checked (say so plainly)
    max_capture_pixels: int = 64_000_000  # larger images are refused from their header, before decoding
    command_id_window_s: float = 86_400.0  # a repeated command id within this window gets its first reply
    resume_interrupted: bool = False  # restart a training job the agent was killed in, from its checkpoint
    base_packs_dir: str = "base-packs"  # installed base packs, searched by hash (a relative path is in data_dir)
    board: str | None = None  # this board (blockskip.boards): train and generate refuse jobs that do not fit it
    memory_budget_gib: float | None = None  # or the GiB jobs may use (wins over the board's usable memory)
    transfer_window: int = DEFAULT_WINDOW  # file chunks asked for at a time when receiving (blockskip.transfer)
    transfer_retry_s: float = 5.0  # a chunk missing this long is asked for again
    max_receive_bytes: int = 32 * 1024**3  # largest file `receive` accepts (a bundle or a base pack): too_large
    max_pending_receive_bytes: int = 64 * 1024**3  # unfinished receives together: pending_limit
    receive_disk_margin_bytes: int = 1024**3  # free space receives must leave in data_dir once complete: no_space
    transfer_idle_timeout_s: float = 600.0  # a receive with no chunk this long (while connected) ends: idle_timeout
    transfer_deadline_s: float = 86_400.0  # a receive not complete this long after it began ends: deadline / expired
    receive_maximum: int = 16  # MQTT v5 Receive Maximum: unacknowledged messages the broker sends (and redelivers)

    def __post_init__(self) -> None:
        self.broker = login_for("device_id", self.device_id, self.broker)
        if self.backend not in ("auto", "tensorrt", "onnxruntime", "torch"):
            raise ConfigError(f"backend must be auto, tensorrt, onnxruntime or torch, got {self.backend!r}")
        for name in ("max_command_bytes", "max_capture_bytes", "outbox_max_messages", "outbox_max_bytes",
                     "max_capture_pixels", "transfer_window", "max_receive_bytes", "max_pending_receive_bytes",
                     "transfer_idle_timeout_s", "transfer_deadline_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not self.transfer_retry_s > 0:
            raise ConfigError("transfer_retry_s must be > 0")
        if self.receive_disk_margin_bytes < 0:
            raise ConfigError("receive_disk_margin_bytes must be >= 0")
        check_receive_maximum(self.receive_maximum)
        if not self.command_id_window_s > 0:
            raise ConfigError("command_id_window_s must be > 0")
        if not isinstance(self.base_packs_dir, str) or not self.base_packs_dir:
            raise ConfigError("base_packs_dir must be a folder path (relative to data_dir, or absolute)")
        if self.board is not None or self.memory_budget_gib is not None:
            from blockskip.boards import budget_from

            budget_from(self.board, self.memory_budget_gib)  # an unknown board is a config error now
        self.trust_policy()  # a missing or malformed key file is a config error now, not at the first bundle

    def trust_policy(self) -> TrustPolicy:
        """The board's bundle trust policy, applied to every bundle a command names."""
        return trust_policy_from(self.trusted_keys, self.allow_unsigned_bundles)

    def receive_policy(self) -> ReceivePolicy:
        """What `receive` accepts (blockskip.transfer.ReceivePolicy), from the config's limits."""
        return ReceivePolicy(self.max_receive_bytes, self.max_pending_receive_bytes, self.receive_disk_margin_bytes,
                             self.transfer_idle_timeout_s, self.transfer_deadline_s)

    def base_packs(self) -> Path:
        """The folder of installed base packs (base_packs_dir, relative to data_dir)."""
        return Path(self.data_dir) / self.base_packs_dir

    @property
    def prefix(self) -> str:
        return device_prefix(self.device_id)


def load_config(path: Path) -> AgentConfig:
    """AgentConfig from a YAML file; unknown keys are an error."""
    try:
        return AgentConfig(**load_yaml(path))
    except TypeError as err:
        raise ConfigError(f"config {path}: {err}") from err


JobFn = Callable[["JobContext"], Any]
JobFactory = Callable[[], JobFn]  # raises NotAvailableError when the job's module is missing


@dataclass
class JobContext:
    """What a running job sees: its validated args (paths resolved) and the agent's channels."""

    id: str
    action: str
    args: dict[str, Any]
    emit: Callable[[dict[str, Any]], None]  # a progress event (rate-limited when type == progress)
    publish_result: Callable[[dict[str, Any]], None]  # one generated image
    stop: threading.Event
    trust: TrustPolicy = field(default_factory=TrustPolicy)  # the board's bundle trust policy
    base_packs: Path | None = None  # folder of installed base packs (subject bundles name theirs by hash)
    budget: dict = field(default_factory=dict)  # the agent's {"board", "memory_budget_gib"}, for every job

    def should_stop(self) -> bool:
        return self.stop.is_set()


def _import_job(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            raise NotAvailableError(f"{what} is not available in this build ({module} is missing)") from err
        raise NotAvailableError(f"{what} is not available in this build: {err}") from err


def train_job() -> JobFn:
    """The `train` action over blockskip.edge.train (imported now, so a missing module is `not_available`)."""
    mod = _import_job("blockskip.edge.train", "training")

    def run(ctx: JobContext) -> Any:
        keys = ("steps", "grad_accum", "lr", "seed", "checkpoint_every", "resume", "prior_weight")
        config = mod.TrainConfig(**{k: ctx.args[k] for k in keys if k in ctx.args}, **ctx.budget)
        return mod.train(ctx.args["bundle"], ctx.args["out"], config, on_event=ctx.emit, should_stop=ctx.should_stop,
                         trust=ctx.trust, base_pack=ctx.base_packs)

    return run


def generate_job() -> JobFn:
    """The `generate` action over blockskip.edge.generate; each image is also published on `result`."""
    mod = _import_job("blockskip.edge.generate", "generation")

    def run(ctx: JobContext) -> Any:
        fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.args.items() if k != "out"}
        config = mod.GenerateConfig(out_dir=str(ctx.args["out"]), **fields, **ctx.budget)
        images = mod.generate(config, on_event=ctx.emit, should_stop=ctx.should_stop, trust=ctx.trust)
        for image in images:
            ctx.publish_result(image)
        return {"images": len(images)}

    return run


def dataset_job() -> JobFn:
    """The `dataset` action over blockskip.edge.dataset (`generate --dataset`): renders the spec into
    `out` (resumed when the same command id runs again), then publishes one `result` with the counts."""
    mod = _import_job("blockskip.edge.dataset", "dataset generation")

    def run(ctx: JobContext) -> Any:
        spec = spec_from_data(ctx.args["spec"])
        fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.args.items() if k not in ("out", "spec")}
        config = mod.GenerateConfig(out_dir=str(ctx.args["out"]), prompts=spec.prompts(), **fields, **ctx.budget)
        result = mod.generate_dataset(spec, config, on_event=lambda e: e["type"] != "image" and ctx.emit(e),
                                      should_stop=ctx.should_stop, trust=ctx.trust)  # per image: `progress` says it
        summary = {k: result[k] for k in ("out", "images", "made", "kept", "stopped", "classes")}
        ctx.publish_result({**summary, "metadata": str(Path(result["out"]) / mod.METADATA)})
        return summary

    return run


DEFAULT_JOBS: dict[str, JobFactory] = {"train": train_job, "generate": generate_job, "dataset": dataset_job}
# The only folders a job writes into (relative to the data directory): `out` must name a folder
# inside its action's root, and defaults to <root>/<command id>. The spool, the outbox, the
# journal, engines and config are never a job's output.
DEFAULT_OUT = {"train": "adapters", "generate": "generated", "dataset": "datasets"}


def thumbnail_b64(path: str, side: int = 64) -> str | None:
    """A small PNG thumbnail of an image file, base64 encoded (None when it cannot be read)."""
    import base64
    import io

    from PIL import Image

    try:
        with Image.open(path) as img:
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
    except OSError:
        return None
    return base64.b64encode(buf.getvalue()).decode()


class Agent:
    """One device's agent: MQTT client, outbox sender, dispatcher thread, at most one job thread."""

    def __init__(self, config: AgentConfig, jobs: Mapping[str, JobFactory] | None = None):
        self.config = config
        self.jobs = dict(DEFAULT_JOBS if jobs is None else jobs)
        self.data_dir = Path(config.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = config.prefix
        self.spool = Spool(self.data_dir / "spool", max_bytes=config.max_capture_bytes,
                           max_pixels=config.max_capture_pixels)
        self.outbox = Outbox(self.data_dir / "outbox.sqlite3", config.outbox_max_messages, config.outbox_max_bytes)
        self.journal = Journal(self.data_dir / "journal.sqlite3", config.command_id_window_s)
        self.trust = config.trust_policy()
        self.client = make_client(config.broker, client_id=config.device_id, manual_ack=True)
        self.client.will_set(self.prefix + "status", messages.status_payload("offline", None, __version__), qos=1, retain=True)
        self.sender = OutboxSender(self.outbox, self.client)
        transfers = self.data_dir / "transfers"
        _prune_offers(transfers / "send", config.command_id_window_s)
        self.file_sender = FileSender(self._publish_file, transfers / "send")
        self.file_receiver = FileReceiver(self._publish_file, transfers / "receive", window=config.transfer_window,
                                          retry_s=config.transfer_retry_s, policy=config.receive_policy())
        # Commands and captures are handled on two threads, so decoding a large capture never
        # holds up a command (or a cancel).
        self._inbox: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue()
        self._captures: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue()
        self._files: queue.Queue[mqtt.MQTTMessage | None] = queue.Queue()  # chunks, wants, dones
        self._dispatcher = threading.Thread(target=self._dispatch_loop, args=(self._inbox,), name="agent-dispatch",
                                            daemon=True)
        self._capture_worker = threading.Thread(target=self._dispatch_loop, args=(self._captures,),
                                                name="agent-captures", daemon=True)
        self._file_worker = threading.Thread(target=self._dispatch_loop, args=(self._files,), name="agent-files",
                                             daemon=True)
        self._job_lock = threading.Lock()
        self._job: dict[str, Any] | None = None  # {"id", "action", "started"} of the running job
        self._job_thread: threading.Thread | None = None
        self._job_stop = threading.Event()
        self._last_progress = 0.0
        # Messages handed to the dispatcher threads and not yet acknowledged: at most receive_maximum.
        # The broker is asked for that limit (Receive Maximum); the agent also holds to it itself,
        # because mosquitto 2.0.11 (Debian 12) sends past it once the first window is acknowledged.
        self._unacked = 0
        self._unacked_cond = threading.Condition()
        self._stopping = threading.Event()
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (retrying with backoff) and start serving."""
        self.sender.start()
        self._recover_interrupted_job()
        self._dispatcher.start()
        self._capture_worker.start()
        self._file_worker.start()
        for _prefix, offer, dest in self.file_receiver.pending():  # receives cut off by a restart go on
            logger.info("resuming the receive of %s (%s)", dest, offer.transfer)
            try:
                self.file_receiver.receive(self.prefix, offer, dest, on_complete=self._install_check(dest))
            except TransferError as err:  # the policy changed, or its state is unusable: its sender asks again
                logger.warning("cannot resume the receive of %s (%s): %s", dest, err.code, err.message)
        broker = self.config.broker
        logger.info("agent %s connecting to %s:%d", self.config.device_id, broker.host, broker.port)
        self.client.connect_async(
            broker.host, broker.port, broker.keepalive, clean_start=False,
            properties=connect_properties(self.config.session_expiry_s, self.config.receive_maximum),
        )
        self.client.loop_start()

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Clean shutdown: stop (checkpoint) the job, publish `offline`, flush the outbox, disconnect."""
        self._stopping.set()
        thread = self._job_thread
        if thread is not None and thread.is_alive():
            logger.info("stopping job %s before shutdown", (self._job or {}).get("id"))
            self._job_stop.set()
            thread.join(timeout=self.config.job_stop_timeout_s)
        self._inbox.put(None)
        self._captures.put(None)
        self._files.put(None)
        self._dispatcher.join(timeout=5)
        self._capture_worker.join(timeout=5)
        self._file_worker.join(timeout=5)
        self.file_receiver.close()
        self.sender.put(self.prefix + "status", messages.status_payload("offline", None, __version__), retain=True, kind="status")
        deadline = time.monotonic() + flush_timeout_s
        while self.connected.is_set() and not self.sender.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client.disconnect()
        self.client.loop_stop()
        self.sender.stop()
        self.outbox.close()
        self.journal.close()

    # ---- paho callbacks (network thread: never block) ---------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            logger.error("broker refused the connection: %s", reason_code)
            return
        logger.info("connected (session present: %s)", flags.session_present)
        options = SubscribeOptions(qos=1, noLocal=True)
        client.subscribe([(self.prefix + "cmd", options), (self.prefix + "capture/+", options)]
                         + [(topic, options) for topic in self.file_sender.subscriptions(self.prefix)
                            + self.file_receiver.subscriptions(self.prefix)])
        self.connected.set()
        self.sender.set_connected(True)
        self.file_receiver.on_connect()
        self._publish_status()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        self.sender.set_connected(False)
        self.file_receiver.on_disconnect()  # no chunk is asked again until the link is back
        logger.warning("disconnected from broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:  # hold the network thread (and so the socket) while receive_maximum are unacknowledged
            with self._unacked_cond:
                while self._unacked >= self.config.receive_maximum and not self._stopping.is_set():
                    self._unacked_cond.wait(0.5)
                self._unacked += 1
        if msg.topic.startswith(self.prefix + "capture/"):
            self._captures.put(msg)
        elif msg.topic.startswith(self.prefix + "files/"):
            self._files.put(msg)
        else:
            self._inbox.put(msg)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self.sender.on_publish(mid, not reason_code.is_failure)

    # ---- dispatcher -----------------------------------------------------------------------
    def _dispatch_loop(self, inbox: "queue.Queue[mqtt.MQTTMessage | None]") -> None:
        while True:
            msg = inbox.get()
            if msg is None:
                return
            try:
                self._handle(msg)
            except Exception:  # the loop boundary: log and keep serving
                logger.exception("error handling a message on %s", msg.topic)
            finally:
                if msg.qos > 0:
                    self.client.ack(msg.mid, msg.qos)  # only now: the capture is on disk
                    with self._unacked_cond:
                        self._unacked -= 1
                        self._unacked_cond.notify()

    def _handle(self, msg: mqtt.MQTTMessage) -> None:
        rest = msg.topic[len(self.prefix):]
        if rest == "cmd":
            self._handle_command(msg.payload)
        elif rest.startswith("capture/") and rest != "capture/ack":
            self._handle_capture(rest[len("capture/"):], msg)
        elif rest.startswith("files/"):
            if self.file_receiver.handle(msg.topic, msg.payload, msg.properties):
                return
            if self.file_sender.handle(msg.topic, msg.payload):
                transfer = rest.split("/")[1]
                if self.file_sender.result(transfer) is not None:  # the receiver has it (or gave up): done
                    self.file_sender.forget(transfer)

    def _reply(self, command_id: str | None, payload: bytes) -> None:
        topic = self.prefix + ("error" if command_id is None else f"reply/{command_id}")
        self.sender.put(topic, payload, kind="reply")

    def _handle_command(self, payload: bytes) -> None:
        cmd: Command | None = None
        cid: str | None = None
        try:
            try:
                cmd = messages.parse_command(payload, self.config.max_command_bytes)
            except CommandError as err:
                if err.command_id is None or not self._repeat(err.command_id):
                    raise
                return
            cid = cmd.id
            if self._repeat(cid):
                return
            result = self._execute(cmd)
            reply = messages.reply_ok(cmd.id, result)
            if cmd.action not in messages.JOB_ACTIONS:  # a job's reply was journaled with the job itself
                self.journal.remember(cmd.id, reply)
            self._reply(cmd.id, reply)
        except CommandError as err:
            cid = cmd.id if cmd else err.command_id
            logger.info("command %s refused (%s): %s", cid, err.code, err.message)
            self._reply_remembered(cid, messages.reply_error(cid, err.code, err.message))
        except Exception as err:
            logger.exception("command failed")
            self._reply_remembered(cid, messages.reply_error(cid, "internal", f"{type(err).__name__}: {err}"))

    def _repeat(self, command_id: str) -> bool:
        """A command id seen within the window: send its first reply again and run nothing."""
        first = self.journal.reply_for(command_id)
        if first is None:
            return False
        logger.info("command id %s was already answered; sending the same reply, running nothing", command_id)
        self._reply(command_id, first)
        return True

    def _reply_remembered(self, command_id: str | None, payload: bytes) -> None:
        if command_id is not None:
            self.journal.remember(command_id, payload)
        self._reply(command_id, payload)

    def control_actions(self) -> dict[str, Callable[[Command], Any]]:
        """Actions answered at once, by name (their argument schemas: edge/messages.py ACTIONS);
        every other action in ACTIONS is a job (`self.jobs`, run on the job thread)."""
        return {"status": lambda cmd: self._status_result(), "captures": self._list_captures,
                "cancel": lambda cmd: self._cancel(cmd.args.get("job")), "upload": self._upload,
                "receive": self._receive}

    def _execute(self, cmd: Command) -> Any:
        handler = self.control_actions().get(cmd.action, self._start_job)
        return handler(cmd)

    def _list_captures(self, cmd: Command) -> dict[str, Any]:
        total, records = self.spool.list(cmd.args.get("limit", 100), cmd.args.get("camera_id"))
        return {"total": total, "captures": records}

    def _status_result(self) -> dict[str, Any]:
        job = self._job
        return {
            "state": "busy" if job else "online", "job": job, "version": __version__,
            "outbox": len(self.outbox), "outbox_dropped": self.outbox.dropped, "captures": self.spool.count(),
            "base_packs": self._installed_base_packs(),
        }

    def _publish_status(self) -> None:
        job = self._job
        payload = messages.status_payload("busy" if job else "online", job, __version__)
        self.sender.put(self.prefix + "status", payload, retain=True, kind="status")

    def _installed_base_packs(self) -> list[str]:
        """Content hashes the installed base packs claim (checked in full when a job uses one)."""
        return installed_base_packs(self.config.base_packs())

    # ---- files over MQTT ----------------------------------------------------------------------
    def _publish_file(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        """File chunks and their control messages go straight to the client (QoS 1): a chunk lost
        with a connection is asked for again by the receiver, so they need no outbox."""
        self.client.publish(topic, payload, qos=1, properties=properties)

    def _upload(self, cmd: Command) -> dict[str, Any]:
        """Offer captures (by sha256) and files under generated/ or adapters/ for a receiver to fetch."""
        files: list[tuple[Path, dict[str, Any]]] = []
        for digest in cmd.args.get("captures", []):
            record = self.spool.record(digest)
            if record is None:
                raise CommandError("not_found", f"no capture {digest[:64]!r} in the spool")
            files.append((self.spool.root / record["file"], {"capture": record}))
        for value in cmd.args.get("paths", []):
            path = messages.resolve_in(self.data_dir, value, must_exist=True)
            if not any(self.data_dir / root in path.parents for root in DEFAULT_OUT.values()) or not path.is_file():
                raise CommandError("bad_path", f"upload sends files inside {' or '.join(DEFAULT_OUT.values())}/ "
                                               f"only; {value[:200]!r} is not one")
            files.append((path, {}))
        if not files:
            raise CommandError("bad_args", "upload needs `captures` (sha256 list) or `paths`")
        chunk = cmd.args.get("chunk_size", DEFAULT_CHUNK_SIZE)
        offers = []
        for index, (path, extra) in enumerate(files):
            offer = self.file_sender.offer(self.prefix, path, f"{cmd.id[:54]}.{index}", chunk)
            offers.append({"path": os.path.relpath(path, self.data_dir), "offer": offer.to_dict(), **extra})
        return {"files": offers}

    def _receive(self, cmd: Command) -> dict[str, Any]:
        """Fetch an offered bundle or base pack (a .tar) into bundles/ or the base packs folder."""
        try:
            offer = FileOffer.from_dict(cmd.args["offer"])
        except TransferError as err:
            raise CommandError("bad_args", f"offer: {err}") from err
        if not messages.TAR_NAME.match(offer.name):
            raise CommandError("bad_args", "a received bundle or base pack is a .tar named with [A-Za-z0-9_.-]")
        root = self.data_dir / "bundles" if cmd.args["kind"] == "bundle" else self.config.base_packs().resolve()
        dest = root / offer.name
        rel = os.path.relpath(dest, self.data_dir)
        if dest.exists():
            if dest.is_file() and sha256_file(dest) == offer.sha256:
                return {"transfer": offer.transfer, "state": "installed", "path": rel}
            raise CommandError("exists", f"{rel} exists and holds another file; send it under another name")
        try:
            self.file_receiver.receive(self.prefix, offer, dest, on_complete=self._install_check(dest))
        except TransferError as err:  # refused by the receive policy: its own code
            raise CommandError(err.code if err.code in messages.ERROR_CODES else "bad_args", err.message) from err
        return {"transfer": offer.transfer, "state": "receiving", "path": rel}

    def _install_check(self, dest: Path) -> Callable[[Path], None]:
        """What a received tar must pass before its `done` says ok: the board's trust policy and
        every checksum (open_bundle unpacks it beside itself, where train and generate find it)."""
        def check(path: Path) -> None:
            try:
                open_bundle(path, self.trust, max_bytes=self.config.max_receive_bytes)
            except (BundleError, InputError) as err:
                raise TransferError("bad_bundle", f"{dest.name} was received intact but refused: {err}") from err
            logger.info("received and verified %s", path)

        return check

    # ---- captures -------------------------------------------------------------------------
    def _handle_capture(self, camera_id: str, msg: mqtt.MQTTMessage) -> None:
        props = dict(getattr(msg.properties, "UserProperty", None) or [])
        expected = props.get("sha256")
        ack: dict[str, Any] = {"camera_id": camera_id, "sha256": expected}
        try:
            if not messages.ID_PATTERN.match(camera_id):
                raise CaptureError("bad_properties", "camera id in the topic must be 1-64 of [A-Za-z0-9_.:-]")
            if props.get("camera_id", camera_id) != camera_id:
                raise CaptureError("bad_properties", "camera_id property does not match the topic")
            if expected is not None and not isinstance(expected, str):
                raise CaptureError("bad_properties", "sha256 property must be a string")
            meta = capture_meta(camera_id, props.get("capture_time"), props.get("gps"))
            stored = self.spool.store(msg.payload, meta, expected)
            ack.update(sha256=stored.sha256, stored=True, duplicate=stored.duplicate)
        except CaptureError as err:
            logger.info("capture from %s refused (%s): %s", camera_id, err.code, err.message)
            if ack["sha256"] is None:
                import hashlib

                ack["sha256"] = hashlib.sha256(msg.payload).hexdigest()
            ack.update(stored=False, error={"code": err.code, "message": err.message})
        self.sender.put(self.prefix + "capture/ack", messages.dumps(ack), kind="ack")

    # ---- jobs -----------------------------------------------------------------------------
    def _cancel(self, job_id: str | None) -> dict[str, Any]:
        job = self._job
        if job is None or (job_id is not None and job_id != job["id"]):
            raise CommandError("no_job", "no job is running" if job is None else f"job {job_id} is not the running job")
        self._job_stop.set()
        return {"cancelled": job["id"]}

    def _resolve_paths(self, cmd: Command) -> dict[str, Any]:
        args = dict(cmd.args)
        for name in messages.PATH_ARGS:
            if name in args and name != "out":
                args[name] = messages.resolve_in(self.data_dir, args[name], must_exist=True)
        root = self.data_dir / DEFAULT_OUT[cmd.action]
        out = messages.resolve_in(self.data_dir, args.get("out") or f"{DEFAULT_OUT[cmd.action]}/{cmd.id}")
        if root not in out.parents:
            raise CommandError("bad_path", f"`out` of {cmd.action} must be a folder inside {DEFAULT_OUT[cmd.action]}/ "
                                           f"(e.g. {DEFAULT_OUT[cmd.action]}/{cmd.id}); jobs never write elsewhere")
        if out.exists() and not out.is_dir():
            raise CommandError("bad_path", f"`out` {args.get('out')!r} exists and is not a folder")
        args["out"] = out
        if cmd.action in ("generate", "dataset"):  # engines and exports stay in the data directory
            args.setdefault("backend", self.config.backend)
            args.setdefault("cache_dir", str(self.data_dir / "engines"))
        if cmd.action == "dataset":  # the spec is checked now (bad_args), its adapters kept inside the data dir
            try:
                spec = spec_from_data(args["spec"])
            except InputError as err:
                raise CommandError("bad_args", str(err)) from err
            classes = [dict(c) for c in args["spec"]["classes"]]
            for entry, checked in zip(classes, spec.classes):
                if checked.adapter is not None:
                    entry["adapter"] = str(messages.resolve_in(self.data_dir, checked.adapter, must_exist=True))
            args["spec"] = {**args["spec"], "classes": classes}
        return args

    def _start_job(self, cmd: Command) -> dict[str, Any]:
        with self._job_lock:
            if self._job is not None:
                raise CommandError("busy", f"job {self._job['id']} ({self._job['action']}) is running; cancel it or wait")
            if cmd.action not in self.jobs:
                raise CommandError("not_available", f"{cmd.action} is not available in this build")
            args = self._resolve_paths(cmd)
            try:
                fn = self.jobs[cmd.action]()
            except NotAvailableError as err:
                raise CommandError("not_available", str(err)) from err
            result = {"job": cmd.id, "action": cmd.action, "state": "started"}
            self._launch(fn, cmd.id, cmd.action, args, reply=messages.reply_ok(cmd.id, result))
        self._publish_status()
        return result

    def _launch(self, fn: JobFn, job_id: str, action: str, args: dict[str, Any], reply: bytes | None) -> None:
        """Record the job as running (with its reply, in one transaction) and start its thread.
        The caller holds the job lock."""
        started = time.time()
        record = {"id": job_id, "action": action, "args": _jsonable(args), "started": started}
        if reply is not None:
            self.journal.remember(job_id, reply, job=record)
        self._job = {"id": job_id, "action": action, "started": started}
        self._job_stop = threading.Event()
        self._last_progress = 0.0
        ctx = JobContext(job_id, action, args, self._emit, self._publish_result, self._job_stop, self.trust,
                         self.config.base_packs(),
                         {"board": self.config.board, "memory_budget_gib": self.config.memory_budget_gib})
        self._job_thread = threading.Thread(target=self._run_job, args=(fn, ctx), name=f"job-{job_id}", daemon=True)
        self._job_thread.start()

    def _run_job(self, fn: JobFn, ctx: JobContext) -> None:
        event: dict[str, Any] = {"job": ctx.id, "action": ctx.action}
        try:
            result = fn(ctx)
            stopped = ctx.should_stop() or (isinstance(result, dict) and bool(result.get("stopped")))
            event.update(type="cancelled" if stopped else "done", result=_jsonable(result))
        except BundleError as err:
            logger.error("job %s refused its bundle: %s", ctx.id, err)
            event.update(type="failed", error={"code": "bad_bundle", "message": str(err)})
        except BlockskipError as err:
            logger.error("job %s failed: %s", ctx.id, err)
            event.update(type="failed", error={"code": "job_failed", "message": f"{type(err).__name__}: {err}"})
        except Exception as err:  # the job boundary: report, keep serving
            logger.exception("job %s crashed", ctx.id)
            event.update(type="failed", error={"code": "internal", "message": f"{type(err).__name__}: {err}"})
        self.sender.put(self.prefix + "progress", messages.dumps(event), kind="job")
        self.journal.job_ended()  # after the end event is on disk: a crash in between repeats it, never loses it
        with self._job_lock:
            self._job = None
        self._publish_status()

    def _recover_interrupted_job(self) -> None:
        """A job recorded as running when the agent starts was cut off by a kill or a power loss:
        publish its end (`failed`, code `interrupted`), or, for training with `resume_interrupted`,
        start it again from its last checkpoint under the same id."""
        job = self.journal.running_job()
        if job is None:
            return
        fn = None
        if job["action"] == "train" and self.config.resume_interrupted and "train" in self.jobs:
            try:
                fn = self.jobs["train"]()
            except NotAvailableError as err:
                logger.error("cannot resume interrupted job %s: %s", job["id"], err)
        if fn is not None:
            args = {**job["args"], "resume": True}
            args.update({k: Path(v) for k, v in args.items() if k in messages.PATH_ARGS})
            logger.warning("training job %s was interrupted; resuming it from its last checkpoint", job["id"])
            with self._job_lock:
                self._launch(fn, job["id"], "train", args, reply=None)
            self.sender.put(self.prefix + "progress", messages.dumps(
                {"type": "resumed", "job": job["id"], "action": "train",
                 "message": "the agent restarted during this job; training continues from its last checkpoint"}),
                kind="job")
            return
        hint = ""
        if job["action"] == "train":
            out = os.path.relpath(job["args"].get("out", ""), self.data_dir)
            hint = (f"; send train again with the same bundle, out {out!r} and resume: true to continue from "
                    f"its last checkpoint (or set resume_interrupted: true in the agent config)")
        message = f"the agent stopped while this job was running (killed or power loss){hint}"
        logger.warning("job %s (%s) was interrupted: %s", job["id"], job["action"], message)
        self.sender.put(self.prefix + "progress", messages.dumps(
            {"type": "failed", "job": job["id"], "action": job["action"],
             "error": {"code": "interrupted", "message": message}}), kind="job")
        self.journal.job_ended()

    def _emit(self, event: dict[str, Any]) -> None:
        """Publish a job event on `progress`; progress events at most once per interval (first/last kept).
        A job's own end event is not forwarded: the agent publishes the one end of every job."""
        if event.get("type") in ("done", "cancelled", "failed"):
            return
        event = dict(event, job=self._job["id"] if self._job else None)
        if event.get("type", "progress") == "progress":
            now = time.monotonic()
            last = event.get("step") is not None and event.get("step") == event.get("total")
            if not last and self._last_progress and now - self._last_progress < self.config.progress_interval_s:
                return
            self._last_progress = now
        self.sender.put(self.prefix + "progress", messages.dumps(_jsonable(event)), kind="progress")

    def _publish_result(self, item: dict[str, Any]) -> None:
        body = dict(_jsonable(item), job=self._job["id"] if self._job else None)
        if self.config.thumbnails and "path" in item:
            body["thumbnail_png_b64"] = thumbnail_b64(str(item["path"]))
        self.sender.put(self.prefix + "result", messages.dumps(body), kind="result")


def _prune_offers(folder: Path, max_age_s: float) -> None:
    """Forget `upload` offers older than the command id window (a receiver that never finished):
    past it, a repeat of their command would run again and offer the files anew anyway."""
    if not folder.is_dir():
        return
    cutoff = time.time() - max_age_s
    for state in folder.glob("*.json"):
        try:
            if state.stat().st_mtime < cutoff:
                state.unlink()
                logger.info("forgot the stale upload offer %s", state.stem)
        except OSError:
            continue


def _jsonable(value: Any) -> Any:
    """Paths to strings, recursively; anything else JSON cannot hold to its repr."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then shut down cleanly."""
    config = load_config(Path(args.config))
    agent = Agent(config)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    agent.start()
    while not done.wait(timeout=1.0):
        pass
    logger.info("shutting down")
    agent.stop()
    return 0


def register(subparsers: Any) -> None:
    """Add `blockskip agent`."""
    parser = subparsers.add_parser(
        "agent",
        help="run the edge MQTT agent (commands, progress, captures, results)",
        description=(
            "Connect to an MQTT v5 broker as one device and serve until SIGTERM/SIGINT. Topics are under "
            "blockskip/<device_id>/: status (retained, last will 'offline'), cmd -> reply/<id> "
            "(actions: train, generate, cancel, status, captures, upload, receive), error, progress, "
            "result, capture/<camera_id> -> capture/ack, files/<transfer>/chunk|want|done (files in chunks). Everything published at QoS 1 goes through a disk outbox "
            "in the data directory and is delivered after a reconnect. See edge/AGENT.md."
        ),
        epilog="Example config: deploy/agent.example.yaml. Passwords come from a file or an environment variable.",
    )
    parser.add_argument("--config", required=True, metavar="YAML", help="agent configuration (device_id, data_dir, broker, limits)")
    parser.set_defaults(func=run)
