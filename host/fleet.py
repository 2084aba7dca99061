"""`blockskip fleet`: the operator's view of the boards and the personalize jobs, over MQTT.

    blockskip fleet --config operator.yaml devices
    blockskip fleet --config operator.yaml workers
    blockskip fleet --config operator.yaml submit --device jetson-01 --model crop \\
        --subject "a photo of sks leaf" --prompt "a photo of sks leaf on soil" --camera cam-01 --follow
    blockskip fleet --config operator.yaml jobs
    blockskip fleet --config operator.yaml follow JOB
    blockskip fleet --config operator.yaml fetch JOB --out images/

`devices` lists every board's retained status, `workers` every host worker's; `submit` publishes a job for the host workers
(host/serve.py; payload: host/SERVE.md) and prints its id; `jobs` lists the jobs' retained
statuses; `follow` prints a job's stages and progress until it ends (exit code 0 when done, 1
when failed); `fetch` copies a finished job's images from the board over MQTT (checksummed
chunks, blockskip.transfer) into a folder, with an index.html of thumbnails.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from blockskip.config import load_yaml
from blockskip.mqtt import BrokerConfig, device_prefix, login_for, make_client
from blockskip.errors import ConfigError, InputError
from blockskip.host.jobs import (JOBS_ROOT, SUBMIT_TOPIC, WORKERS_ROOT, JobError, events_topic, parse_job,
                                 status_topic)


@dataclass
class OperatorConfig:
    """operator.yaml: who the operator is on the broker."""

    client_id: str  # the operator's login and client id (its own: not a device's or a worker's)
    broker: BrokerConfig = field(default_factory=BrokerConfig)

    def __post_init__(self) -> None:
        self.broker = login_for("client_id", self.client_id, self.broker)


def load_config(path: Path) -> OperatorConfig:
    try:
        return OperatorConfig(**load_yaml(path))
    except TypeError as err:
        raise ConfigError(f"config {path}: {err}") from err


class Session:
    """A short-lived MQTT v5 connection that records what arrives on its topics."""

    def __init__(self, config: OperatorConfig, topics: list[str], timeout: float = 10.0):
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Condition()
        self.handlers: list[Any] = []  # callables(msg) -> bool, tried before recording
        self._subscribed = threading.Event()
        self._failed: str | None = None
        self.client = make_client(config.broker, client_id=config.client_id)
        self.client.on_connect = lambda c, u, f, rc, p: self._connected(rc, topics)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._message
        broker = config.broker
        try:
            self.client.connect(broker.host, broker.port, broker.keepalive)
        except OSError as err:
            raise InputError(f"cannot reach the broker at {broker.host}:{broker.port}: {err}") from err
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise InputError(self._failed or f"no answer from the broker at {broker.host}:{broker.port}")

    def _connected(self, reason_code: Any, topics: list[str]) -> None:
        if reason_code.is_failure:
            self._failed = f"the broker refused the connection: {reason_code}"
            return
        self.client.subscribe([(t, 1) for t in topics])

    def _message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        for handler in self.handlers:
            if handler(msg):
                return
        with self.lock:
            self.messages.append(msg)
            self.lock.notify_all()

    def json_on(self, predicate) -> list[dict]:
        """The JSON objects received on the topics `predicate` accepts (anything else is skipped)."""
        with self.lock:
            return [body for msg in self.messages if predicate(msg.topic)
                    if isinstance(body := _json_object(msg.payload), dict)]

    def wait_for(self, ready, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                self.lock.release()
                try:
                    value = ready()
                finally:
                    self.lock.acquire()
                if value or time.monotonic() >= deadline:
                    return value
                self.lock.wait(timeout=min(0.5, deadline - time.monotonic()))

    def subscribe(self, topics: list[str], timeout: float = 10.0) -> None:
        """Subscribe and wait for the broker's SUBACK (so nothing sent after this is missed)."""
        self._subscribed.clear()
        self.client.subscribe([(t, 1) for t in topics])
        if not self._subscribed.wait(timeout):
            raise InputError("the broker did not confirm the subscription")

    def publish(self, topic: str, payload: dict | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _json_object(payload: bytes) -> dict | None:
    """A payload as a JSON object, or None (not JSON, not an object, nested too deep)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _mib(value: Any, unit: int = 2**20, digits: int = 1) -> str:
    """A byte count in MiB (or another unit) for a line a person reads; '?' when it is no number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value / unit:.{digits}f}" if number else "?"


def _age(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    seconds = max(0, time.time() - ts)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header] + rows]
    return "\n".join(lines)


def run_devices(args: argparse.Namespace) -> int:
    session = Session(load_config(args.config), ["blockskip/+/status"])
    time.sleep(args.wait)  # retained statuses arrive right after the subscription
    session.close()
    rows = []
    for msg in session.messages:
        status = _json_object(msg.payload)  # a board writes its own status: anything may be there
        if status is None:
            continue
        job = status.get("job") or {}
        rows.append([msg.topic.split("/")[1], status.get("state", "?"), job.get("id", "") if isinstance(job, dict)
                     else "", status.get("version", ""), _age(status.get("ts"))])
    if not rows:
        print("no device has published a status on this broker")
        return 0
    print(_table(sorted(rows), ["DEVICE", "STATE", "JOB", "VERSION", "SINCE"]))
    return 0


def run_workers(args: argparse.Namespace) -> int:
    session = Session(load_config(args.config), [f"{WORKERS_ROOT}/+/status"])
    time.sleep(args.wait)
    session.close()
    rows = []
    for status in session.json_on(lambda t: t.startswith(WORKERS_ROOT + "/")):
        rows.append([status.get("worker", "?"), status.get("state", "?"), status.get("group", ""),
                     status.get("job") or "", status.get("version", ""), _age(status.get("ts"))])
    if not rows:
        print("no host worker has published a status on this broker (`blockskip host serve` starts one)")
        return 0
    print(_table(sorted(rows), ["WORKER", "STATE", "GROUP", "JOB", "VERSION", "SINCE"]))
    return 0


def _job_statuses(session: Session) -> dict[str, dict]:
    statuses = {}
    for msg in list(session.messages):
        parts = msg.topic.split("/")
        if len(parts) == 3 and parts[0] == JOBS_ROOT and parts[2] == "status":
            status = _json_object(msg.payload)
            if status is not None:
                statuses[parts[1]] = status
    return statuses


def run_jobs(args: argparse.Namespace) -> int:
    session = Session(load_config(args.config), [f"{JOBS_ROOT}/+/status"])
    time.sleep(args.wait)
    session.close()
    statuses = _job_statuses(session)
    if not statuses:
        print("no job status on this broker")
        return 0
    rows = [[job, s.get("device", ""), s.get("state", "?"), s.get("stage") or "", s.get("worker", ""),
             str(len(s.get("results") or [])), _age(s.get("ts"))] for job, s in sorted(statuses.items())]
    print(_table(rows, ["JOB", "DEVICE", "STATE", "STAGE", "WORKER", "IMAGES", "UPDATED"]))
    return 0


def build_job(args: argparse.Namespace) -> dict:
    job: dict[str, Any] = {"id": args.job_id or f"job-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
                           "device": args.device, "model": args.model, "subject": args.subject,
                           "prompts": args.prompt, "submitted": time.time()}
    if args.photos_dir:
        job["photos_dir"] = args.photos_dir
    else:
        selection = {k: v for k, v in (("camera_id", args.camera), ("since", args.since), ("until", args.until))
                     if v}
        if args.sha256:
            selection["sha256"] = args.sha256
        job["captures"] = selection
    job["train"] = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    job["generate"] = {k: v for k, v in (("count", args.count), ("steps", args.gen_steps), ("seed", args.seed),
                                         ("height", args.size), ("width", args.size), ("backend", args.backend))
                       if v is not None}
    if args.stop_after:
        job["stop_after"] = args.stop_after
    try:
        return parse_job(job)
    except JobError as err:
        raise InputError(f"job: {err}") from err


def run_submit(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    job = build_job(args)
    session = Session(config, [status_topic(job["id"]), events_topic(job["id"])])
    session.publish(SUBMIT_TOPIC, job)
    print(f"submitted job {job['id']} for {job['device']}")
    taken = session.wait_for(lambda: _job_statuses(session).get(job["id"]), args.taken_wait)
    if not taken:
        session.close()
        print(f"no host worker took job {job['id']} within {args.taken_wait:.0f} s: is one running "
              f"(`blockskip fleet workers`)? A job published while no worker of the group was ever subscribed is "
              f"not kept by the broker; submit it again once one is", file=sys.stderr)
        return 3
    print(f"job {job['id']} taken by {taken.get('worker')}")
    if taken.get("state") == "failed":
        session.close()
        print(f"job {job['id']} refused: {taken.get('error')}", file=sys.stderr)
        return 1
    if not args.follow:
        session.close()
        return 0
    return _follow(session, job["id"], args.timeout)


def run_follow(args: argparse.Namespace) -> int:
    session = Session(load_config(args.config), [status_topic(args.job), events_topic(args.job)])
    return _follow(session, args.job, args.timeout)


def _describe(event: dict) -> str | None:
    kind = event.get("type")
    if kind == "stage":
        return f"stage {event.get('stage')}"
    if kind == "progress":
        if "total_bytes" in event:
            return f"  {event.get('stage')}: {_mib(event.get('bytes', 0))} / {_mib(event['total_bytes'])} MiB"
        loss = f", loss {event['loss']:.4f}" if isinstance(event.get("loss"), (int, float)) else ""
        return f"  {event.get('stage')}: {event.get('step')} / {event.get('total')}{loss}"
    if kind in ("done", "failed"):
        return None  # the final status says it
    if kind == "photos":
        size = f" ({_mib(event['bytes'], 1024, 0)} KiB)" if "bytes" in event else ""
        return f"  photos: {event.get('count')} from {event.get('source')}{size}"
    if kind == "bundle":
        return (f"  bundle: {_mib(event.get('bytes', 0))} MiB, {event.get('draws')} draws from "
                f"{event.get('photos')} photos, {'signed' if event.get('signed') else 'NOT signed'}")
    if kind == "delivered":
        return f"  delivered {event.get('kind')} to {event.get('path')} ({_mib(event.get('bytes', 0))} MiB, verified there)"
    if kind == "trained":
        result = event.get("result") if isinstance(event.get("result"), dict) else {}
        loss = result.get("final_loss")
        return f"  trained: {result.get('steps')} steps" + (f", final loss {loss:.4f}" if isinstance(loss, float) else "")
    if kind == "plan":
        return f"  plan: {event.get('why') or 'kept blocks ' + str(event.get('kept'))}"
    if kind == "waiting":
        return f"  waiting: {event.get('message')}"
    return "  " + ", ".join(f"{k} {v}" for k, v in event.items() if k not in ("job", "ts"))


def _follow(session: Session, job_id: str, timeout: float) -> int:
    printed = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            events = session.json_on(lambda t: t == events_topic(job_id))
            for event in events[printed:]:
                line = _describe(event)
                if line:
                    print(line, flush=True)
            printed = len(events)
            status = _job_statuses(session).get(job_id)
            if status and status.get("state") in ("done", "failed"):
                if status["state"] == "failed":
                    print(f"job {job_id} failed in {status.get('stage') or 'submit'}: {status.get('error')}")
                    return 1
                results = [r for r in status.get("results") or [] if isinstance(r, dict)] \
                    if isinstance(status.get("results"), list) else []
                print(f"job {job_id} done on {status.get('device')}: {len(results)} images "
                      f"(`blockskip fleet fetch {job_id} --out DIR` copies them)")
                for result in results:
                    print(f"  {result.get('path')}  seed {result.get('seed')}  sha256 {str(result.get('sha256'))[:12]}  "
                          f"{result.get('prompt')!r}")
                return 0
            with session.lock:
                session.lock.wait(timeout=0.5)  # woken by the next message
        print(f"job {job_id} has not ended after {timeout:.0f} s (still followable)", file=sys.stderr)
        return 2
    finally:
        session.close()


def _write_index(out: Path, job: str, device: str, entries: list[tuple[dict, str]]) -> Path:
    """index.html: each image (its thumbnail when the job has one) under its prompt and seed."""
    cells = []
    for result, name in entries:
        thumb = result.get("thumbnail_png_b64")
        src = f"data:image/png;base64,{thumb}" if thumb else name
        cells.append(f'<figure><a href="{html.escape(name)}"><img src="{html.escape(src)}" alt=""></a>'
                     f"<figcaption>{html.escape(str(result.get('prompt')))} (seed {result.get('seed')})"
                     f"</figcaption></figure>")
    style = ("<style>body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;margin:0 1em 1em 0;"
             "width:160px;vertical-align:top}img{width:160px;height:160px;object-fit:contain;"
             "image-rendering:pixelated;background:#eee}figcaption{font-size:0.85em}</style>")
    page = out / "index.html"
    page.write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(job)}</title>{style}"
                    f"<h1>{html.escape(job)} on {html.escape(device)}</h1>"
                    f"<p>{len(entries)} images; the prompt and seed under each; click for the image.</p>"
                    + "".join(cells))
    return page


def run_fetch(args: argparse.Namespace) -> int:
    from blockskip.transfer import FileOffer, FileReceiver

    config = load_config(args.config)
    session = Session(config, [status_topic(args.job)])
    status = session.wait_for(lambda: _job_statuses(session).get(args.job), args.wait)
    if not status:
        session.close()
        raise InputError(f"no status for job {args.job} on this broker (`blockskip fleet jobs` lists them)")
    results = status.get("results") or []
    if status.get("state") != "done" or not results:
        session.close()
        raise InputError(f"job {args.job} is {status.get('state')} with {len(results)} images; nothing to fetch yet")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = status["device"]
    if args.thumbnails_only:
        session.close()
        entries = []
        for result in results:
            name = Path(result["path"]).name
            if result.get("thumbnail_png_b64"):
                (out / f"thumb-{name}").write_bytes(base64.b64decode(result["thumbnail_png_b64"]))
            entries.append((result, f"thumb-{name}"))
        if not any(r.get("thumbnail_png_b64") for r in results):
            raise InputError(f"job {args.job} has no thumbnails (the agent's `thumbnails: true` adds them); "
                             f"fetch the images without --thumbnails-only")
        print(f"{len(entries)} thumbnails of job {args.job} in {out} (index: {_write_index(out, args.job, device, entries)})")
        return 0
    prefix = device_prefix(device)
    receiver = FileReceiver(lambda t, p, props=None: session.client.publish(t, p, qos=1, properties=props),
                            out / ".transfers")
    session.handlers.append(lambda msg: receiver.handle(msg.topic, msg.payload, msg.properties))
    command_id = f"fetch-{secrets.token_hex(6)}"
    session.subscribe([f"{prefix}reply/{command_id}", *receiver.subscriptions(prefix)])
    session.publish(f"{prefix}cmd", {"id": command_id, "action": "upload",
                                     "args": {"paths": [r["path"] for r in results]}})
    reply = session.wait_for(lambda: next(iter(session.json_on(lambda t: t.endswith(f"/reply/{command_id}"))), None),
                             args.wait)
    if not reply:
        receiver.close()
        session.close()
        raise InputError(f"{device} did not answer within {args.wait:.0f} s (is it online? `blockskip fleet devices`)")
    if not reply.get("ok"):
        receiver.close()
        session.close()
        error = reply.get("error") or {}
        raise InputError(f"{device} refused the upload ({error.get('code')}): {error.get('message')}")
    entries = []
    try:
        for result, item in zip(results, reply["result"]["files"]):
            offer = FileOffer.from_dict(item["offer"])
            dest = out / Path(result["path"]).name  # the generator names them <index>-seed<seed>.png
            if offer.sha256 != result.get("sha256"):
                raise InputError(f"{result['path']} on {device} is not the image the job recorded (sha256 differs)")
            receiver.receive(prefix, offer, dest)
            entries.append((result, dest, offer))
        for result, dest, offer in entries:
            receiver.wait(offer.transfer, timeout=args.timeout)
            print(f"{dest}  ({offer.size / 1024:.0f} KiB, {result.get('prompt')!r}, seed {result.get('seed')})")
    finally:
        receiver.close()
        session.close()
    page = _write_index(out, args.job, device, [(result, dest.name) for result, dest, _ in entries])
    print(f"{len(entries)} images of job {args.job} in {out} (index: {page})")
    return 0


def register(subparsers: Any) -> None:
    """Add `blockskip fleet` and its subcommands."""
    parser = subparsers.add_parser(
        "fleet", help="operator: list boards and jobs, submit and follow personalize jobs, fetch their images",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, metavar="YAML",
                        help="operator configuration: client_id (its own MQTT login) and broker (as the agent's)")
    commands = parser.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)

    devices = commands.add_parser("devices", help="every board's retained status")
    devices.add_argument("--wait", type=float, default=2.0, help="seconds to collect statuses (default: %(default)s)")
    devices.set_defaults(func=run_devices)

    workers = commands.add_parser("workers", help="every host worker's retained status")
    workers.add_argument("--wait", type=float, default=2.0, help="seconds to collect statuses (default: %(default)s)")
    workers.set_defaults(func=run_workers)

    jobs = commands.add_parser("jobs", help="every job's retained status")
    jobs.add_argument("--wait", type=float, default=2.0, help="seconds to collect statuses (default: %(default)s)")
    jobs.set_defaults(func=run_jobs)

    submit = commands.add_parser("submit", help="start a personalize job on a board")
    submit.add_argument("--device", required=True, help="the board's device id")
    submit.add_argument("--model", required=True, help="a model name of the host workers' host.yaml")
    submit.add_argument("--subject", required=True, help='training prompt naming the subject, e.g. "a photo of sks leaf"')
    submit.add_argument("--prompt", action="append", required=True,
                        help="a prompt for the board to generate after training (repeatable; they go into the "
                             "bundle's prompt bank)")
    photos = submit.add_argument_group("photos (from the board's spool by default, or --photos-dir)")
    photos.add_argument("--camera", help="only captures of this camera id")
    photos.add_argument("--since", help="only captures taken at or after this ISO 8601 time")
    photos.add_argument("--until", help="only captures taken at or before this ISO 8601 time")
    photos.add_argument("--sha256", action="append", help="only these captures (repeatable)")
    photos.add_argument("--photos-dir", help="a folder of photos on the host workers' machines instead")
    submit.add_argument("--steps", type=int, help="training steps on the board (default: the trainer's)")
    submit.add_argument("--count", type=int, help="images per prompt (default: 1)")
    submit.add_argument("--gen-steps", type=int, help="sampling steps per image (default: the generator's)")
    submit.add_argument("--size", type=int, help="generated image side in pixels (default: the plan's largest "
                                                 "training crop)")
    submit.add_argument("--backend", choices=["auto", "tensorrt", "onnxruntime", "torch"],
                        help="generation backend on the board (default: the agent's `backend`)")
    submit.add_argument("--seed", type=int, help="seed of training and generation")
    submit.add_argument("--stop-after", choices=["photos", "prepare", "deliver", "train"],
                        help="end the job after this stage (e.g. deliver: the bundle is on the board, not trained)")
    submit.add_argument("--job-id", help="the job's id (default: job-<time>-<random>)")
    submit.add_argument("--follow", action="store_true", help="follow the job until it ends")
    submit.add_argument("--taken-wait", type=float, default=15.0,
                        help="seconds to wait for a worker to take the job (default: %(default)s; exit code 3 "
                             "when none did)")
    submit.add_argument("--timeout", type=float, default=24 * 3600, help="--follow gives up after this (s)")
    submit.set_defaults(func=run_submit)

    follow = commands.add_parser("follow", help="print a job's stages and progress until it ends")
    follow.add_argument("job", help="job id")
    follow.add_argument("--timeout", type=float, default=24 * 3600, help="give up after this many seconds")
    follow.set_defaults(func=run_follow)

    fetch = commands.add_parser("fetch", help="copy a finished job's images from its board (over MQTT)")
    fetch.add_argument("job", help="job id")
    fetch.add_argument("--out", required=True, help="folder for the images and index.html")
    fetch.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the status and the board's "
                                                                 "answer (default: %(default)s)")
    fetch.add_argument("--timeout", type=float, default=3600.0, help="seconds per image transfer")
    fetch.add_argument("--thumbnails-only", action="store_true",
                       help="write the job's thumbnails (from its status: no transfer, the board may be offline) "
                            "and index.html")
    fetch.set_defaults(func=run_fetch)
