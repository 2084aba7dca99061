"""`blockskip capture`: the field-camera client that publishes a folder of images to a device's agent.

Each image goes to `blockskip/<device_id>/capture/<camera_id>` at QoS 1 with MQTT v5 user
properties `capture_time` (ISO 8601 UTC, from the file's mtime), `camera_id`, `sha256` and, when
configured, `gps`. The client waits for the agent's ack on `capture/ack` (matched by camera id and
sha256); whatever is not acked within `ack_timeout_s` is sent again, for up to `rounds` rounds.
An image is done when an ack says `stored: true`; an ack with `stored: false` is a refusal
(not an image, too large, ...) and is reported, not retried.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockskip.edge import messages
from blockskip.config import load_yaml
from blockskip.mqtt import BrokerConfig, connect_properties, device_prefix, make_client
from blockskip.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


@dataclass
class CaptureConfig:
    """The camera client's YAML configuration."""

    device_id: str  # the agent to send to
    camera_id: str  # this camera; part of the topic and of every ack
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    gps: str | None = None  # optional "lat,lon[,alt]" sent with every image
    ack_timeout_s: float = 30.0  # resend an image when its ack takes longer than this
    rounds: int = 5  # how many times an unacked image is sent at most
    window: int = 16  # images sent but not yet acked, at most
    session_expiry_s: int = 3600  # broker queues acks for us this long while we are offline

    def __post_init__(self) -> None:
        for name in ("device_id", "camera_id"):
            if not isinstance(getattr(self, name), str) or not messages.ID_PATTERN.match(getattr(self, name)):
                raise ConfigError(f"{name} must be 1-64 characters of [A-Za-z0-9_.:-]")
        if self.camera_id == "ack":
            raise ConfigError("camera_id `ack` is reserved (capture/ack is the ack topic)")
        if isinstance(self.broker, dict):
            self.broker = BrokerConfig(**self.broker)
        if self.ack_timeout_s <= 0 or self.rounds < 1 or self.window < 1:
            raise ConfigError("ack_timeout_s must be > 0, rounds and window >= 1")


@dataclass
class CaptureReport:
    """What happened to each image of the folder."""

    stored: list[Path] = field(default_factory=list)  # acked stored=true
    refused: dict[Path, dict[str, Any]] = field(default_factory=dict)  # acked stored=false: the error
    unacked: list[Path] = field(default_factory=list)  # no ack after every round

    @property
    def ok(self) -> bool:
        return not self.refused and not self.unacked


def list_images(folder: Path) -> list[Path]:
    """JPEG and PNG files of a folder (not recursive), sorted by name."""
    if not folder.is_dir():
        raise InputError(f"{folder} is not a directory")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def capture_properties(path: Path, data: bytes, config: CaptureConfig) -> tuple[str, Properties]:
    """(sha256, the PUBLISH properties of one image)."""
    sha = hashlib.sha256(data).hexdigest()
    taken = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).isoformat()
    props = Properties(PacketTypes.PUBLISH)
    user = [("capture_time", taken), ("camera_id", config.camera_id), ("sha256", sha)]
    if config.gps:
        user.append(("gps", config.gps))
    props.UserProperty = user
    props.ContentType = IMAGE_SUFFIXES[path.suffix.lower()]
    return sha, props


class _Acks:
    """Acks for this camera, keyed by sha256, filled by the network thread."""

    def __init__(self, camera_id: str):
        self.camera_id = camera_id
        self.by_sha: dict[str, dict[str, Any]] = {}
        self.cond = threading.Condition()

    def on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            ack = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(ack, dict) or ack.get("camera_id") != self.camera_id or not isinstance(ack.get("sha256"), str):
            return
        with self.cond:
            self.by_sha[ack["sha256"]] = ack
            self.cond.notify_all()


def _send_round(client: mqtt.Client, topic: str, todo: dict[str, tuple[Path, bytes, Properties]],
                acks: _Acks, config: CaptureConfig) -> None:
    """Publish every image of `todo` (window-limited) and wait for acks until each one times out."""
    sent_at: dict[str, float] = {}

    def waiting(now: float) -> list[str]:
        return [s for s, t in sent_at.items() if s not in acks.by_sha and now - t < config.ack_timeout_s]

    for sha, (path, data, props) in todo.items():
        with acks.cond:
            while len(waiting(time.monotonic())) >= config.window:
                acks.cond.wait(0.1)
        sent_at[sha] = time.monotonic()
        client.publish(topic, data, qos=1, properties=props)  # queued by paho while offline, resent after
    with acks.cond:
        while waiting(time.monotonic()):
            acks.cond.wait(0.1)


def publish_folder(config: CaptureConfig, folder: Path) -> CaptureReport:
    """Send every image of `folder`, resending unacked ones; return what was stored/refused/unacked."""
    files = list_images(folder)
    acks = _Acks(config.camera_id)
    prefix = device_prefix(config.device_id)
    connected = threading.Event()
    client = make_client(config.broker, client_id=f"{config.device_id}-cam-{config.camera_id}")

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            logger.error("broker refused the connection: %s", reason_code)
            return
        client.subscribe(prefix + "capture/ack", qos=1)
        connected.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *a: connected.clear()
    client.on_message = acks.on_message
    broker = config.broker
    client.connect_async(broker.host, broker.port, broker.keepalive, clean_start=False,
                         properties=connect_properties(config.session_expiry_s))
    client.loop_start()
    try:
        if not connected.wait(timeout=config.ack_timeout_s):
            logger.warning("not connected yet; images are queued and sent once the broker answers")
        items = {}
        for path in files:
            data = path.read_bytes()
            sha, props = capture_properties(path, data, config)
            items.setdefault(sha, (path, data, props))
        topic = prefix + f"capture/{config.camera_id}"
        for round_no in range(1, config.rounds + 1):
            todo = {s: v for s, v in items.items() if s not in acks.by_sha}
            if not todo:
                break
            logger.info("round %d: sending %d images", round_no, len(todo))
            _send_round(client, topic, todo, acks, config)
    finally:
        client.disconnect()
        client.loop_stop()
    return _report(files, acks)


def _report(files: list[Path], acks: _Acks) -> CaptureReport:
    report = CaptureReport()
    for path in files:
        ack = acks.by_sha.get(hashlib.sha256(path.read_bytes()).hexdigest())
        if ack is None:
            report.unacked.append(path)
        elif ack.get("stored"):
            report.stored.append(path)
        else:
            report.refused[path] = ack.get("error") or {}
    return report


def run(args: argparse.Namespace) -> int:
    """Publish a folder; exit 0 when every image is stored, 1 otherwise."""
    try:
        config = CaptureConfig(**load_yaml(Path(args.config)))
    except TypeError as err:
        raise ConfigError(f"config {args.config}: {err}") from err
    report = publish_folder(config, Path(args.folder))
    for path, error in report.refused.items():
        print(f"refused {path.name}: {error.get('code')}: {error.get('message')}")
    for path in report.unacked:
        print(f"not acknowledged: {path.name}")
    print(f"{len(report.stored)} stored, {len(report.refused)} refused, {len(report.unacked)} not acknowledged")
    return 0 if report.ok else 1


def register(subparsers: Any) -> None:
    """Add `blockskip capture`."""
    parser = subparsers.add_parser(
        "capture",
        help="camera side: publish a folder of images to a device's agent and wait for acks",
        description=(
            "Publish every JPEG/PNG of FOLDER to blockskip/<device_id>/capture/<camera_id> with QoS 1 and "
            "MQTT v5 user properties (capture_time, camera_id, sha256, gps). Waits for the agent's ack on "
            "capture/ack and resends what was not acknowledged. Exit code 0 when every image was stored."
        ),
        epilog="Config keys: device_id, camera_id, broker (as for `blockskip agent`), gps, ack_timeout_s, rounds, window.",
    )
    parser.add_argument("--config", required=True, metavar="YAML", help="camera configuration")
    parser.add_argument("folder", metavar="FOLDER", help="folder of .jpg/.jpeg/.png images")
    parser.set_defaults(func=run)
