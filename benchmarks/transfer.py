"""File transfer over MQTT (blockskip.transfer) on loopback: throughput and chunks re-sent.

Starts its own mosquitto (persistence on) on a free loopback port, writes a random file of
--size-mb, and sends it from a FileSender to a FileReceiver, each behind its own paho MQTT v5
client with a persistent session (both in this process, as a host worker and an agent would each
run one). For every chunk size x window it reports MB/s (10^6 bytes, from `receive` to the renamed
file, fsyncs included) and chunks re-sent (sender publishes - chunks); then again with the broker
restarted (SIGTERM, start on the same port) when half the chunks are sent.

    python benchmarks/transfer.py                      # 200 MB, writes benchmarks/results/transfer.md
    python benchmarks/transfer.py --size-mb 20 --out /tmp/t.md
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockskip.transfer import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, FileReceiver, FileSender

PREFIX = "blockskip/bench/"


class Mosquitto:
    """A mosquitto with persistence on a free loopback port, restartable on the same port."""

    def __init__(self, workdir: Path, nodelay: bool):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (workdir / "persist").mkdir(parents=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {workdir / 'persist'}/\nuser {getpass.getuser()}\n"
                             f"set_tcp_nodelay {'true' if nodelay else 'false'}\n"
                             f"log_dest file {workdir / 'mosquitto.log'}\n")
        self.exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: mosquitto writes its persistence file
            self.proc.wait(timeout=10)
            self.proc = None

    def version(self) -> str:
        out = subprocess.run([self.exe, "-h"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else "mosquitto"


class Client:
    """A paho v5 client with a persistent session that feeds `self.end` (a FileSender or FileReceiver)."""

    def __init__(self, port: int, client_id: str):
        self.end = None
        self.ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, 30, clean_start=False, properties=props)

    def publish(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        self.client.publish(topic, payload, qos=1, properties=properties)

    def _on_connect(self, client, userdata, flags, rc, props):
        if isinstance(self.end, FileReceiver):
            self.end.on_connect()
        client.subscribe([(t, 1) for t in self.end.subscriptions(PREFIX)])

    def _on_disconnect(self, *args):
        if isinstance(self.end, FileReceiver):
            self.end.on_disconnect()

    def _on_message(self, client, userdata, msg):
        if isinstance(self.end, FileReceiver):
            self.end.handle(msg.topic, msg.payload, msg.properties)
        else:
            self.end.handle(msg.topic, msg.payload)

    def start(self) -> None:
        self.client.loop_start()
        assert self.ready.wait(10), "no SUBACK"


def run_one(broker: Mosquitto, host: Client, board: Client, src: Path, work: Path, run_id: str, chunk_size: int,
            window: int, restart: bool, retry_s: float) -> dict:
    sender = host.end
    offer = sender.offer(PREFIX, src, run_id, chunk_size)
    receiver = FileReceiver(board.publish, work / f"recv-{run_id}", window=window, retry_s=retry_s)
    board.end = receiver
    dest = work / f"dest-{run_id}.bin"
    start = time.perf_counter()
    receiver.receive(PREFIX, offer, dest)
    restarted_at = None
    if restart:
        while sender.sent(run_id) < offer.chunks // 2:
            time.sleep(0.002)
        restarted_at = sender.sent(run_id)
        broker.stop()
        broker.start()
    receiver.wait(run_id, timeout=1800)
    seconds = time.perf_counter() - start
    sender.wait(run_id, timeout=60)
    ok = hashlib.sha256(dest.read_bytes()).hexdigest() == offer.sha256
    resent = sender.sent(run_id) - offer.chunks
    receiver.close()
    dest.unlink()
    sender.forget(run_id)
    return {"chunk_kib": chunk_size // 1024, "window": window, "restart": restart, "seconds": seconds,
            "mb_s": offer.size / seconds / 1e6, "resent": resent, "chunks": offer.chunks, "ok": ok,
            "restarted_at": restarted_at}


def phase(work: Path, src: Path, nodelay: bool, settings: list[tuple[int, int, bool]], retry_s: float,
          rows: list[dict]) -> str:
    """Run `settings` (chunk KiB, window, restart) through one broker; return its version line."""
    broker = Mosquitto(work / f"broker-{'nodelay' if nodelay else 'nagle'}", nodelay)
    broker.start()
    tag = "nodelay" if nodelay else "nagle"
    host, board = Client(broker.port, f"bench-host-{tag}"), Client(broker.port, f"bench-board-{tag}")
    host.end = FileSender(host.publish, work / f"send-{tag}")
    board.end = FileReceiver(board.publish, work / f"recv-init-{tag}")
    host.start()
    board.start()
    try:
        for n, (chunk_kib, window, restart) in enumerate(settings):
            row = run_one(broker, host, board, src, work, f"{tag}{n}", chunk_kib * 1024, window, restart, retry_s)
            row["nodelay"] = nodelay
            rows.append(row)
            print(f"set_tcp_nodelay {'true ' if nodelay else 'false'}  chunk {chunk_kib:5d} KiB  window {window}  "
                  f"restart {'yes' if restart else 'no ':3s}  {row['mb_s']:6.1f} MB/s  {row['seconds']:6.2f} s  "
                  f"re-sent {row['resent']}  sha256 {'ok' if row['ok'] else 'MISMATCH'}", flush=True)
    finally:
        for c in (host, board):
            c.client.disconnect()
            c.client.loop_stop()
        board.end.close()
        broker.stop()
    return broker.version()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200, help="file size in MiB (default 200)")
    parser.add_argument("--chunk-kib", type=int, nargs="+", default=[256, 1024, 4096], help="chunk sizes")
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4], help="receiver windows")
    parser.add_argument("--restart-chunk-kib", type=int, nargs="+", default=[256, 1024],
                        help="chunk sizes of the broker-restart runs")
    parser.add_argument("--restart-windows", type=int, nargs="+", default=[2, 4], help="windows of the restart runs")
    parser.add_argument("--restart-repeats", type=int, default=3, help="runs per restart setting")
    parser.add_argument("--nagle-chunk-kib", type=int, nargs="*", default=[256, 1024],
                        help="chunk sizes (window 2) also run through a broker without set_tcp_nodelay")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting without a restart (median shown)")
    parser.add_argument("--retry-s", type=float, default=5.0, help="the receiver's retry_s")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the broker and remove the files on kill

    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        work = Path(tmp)
        src = work / "file.bin"
        with open(src, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        t0 = time.perf_counter()
        hashlib.sha256(src.read_bytes())
        hash_s = time.perf_counter() - t0
        rows: list[dict] = []
        load = os.getloadavg()[0]
        settings = [(c, w, False) for _ in range(args.repeats) for c in args.chunk_kib for w in args.windows]
        settings += [(c, w, True) for c in args.restart_chunk_kib for w in args.restart_windows
                     for _ in range(args.restart_repeats)]
        version = phase(work, src, True, settings, args.retry_s, rows)
        if args.nagle_chunk_kib:
            phase(work, src, False, [(c, 2, False) for _ in range(args.repeats) for c in args.nagle_chunk_kib],
                  args.retry_s, rows)
        load = (load, os.getloadavg()[0])
    write_report(args, rows, hash_s, version, load)


def write_report(args: argparse.Namespace, rows: list[dict], hash_s: float, version: str,
                 load: tuple[float, float]) -> None:
    from importlib.metadata import version as package_version

    command = "python benchmarks/transfer.py" + ("" if sys.argv[1:] == [] else " " + " ".join(sys.argv[1:]))
    lines = [
        "# File transfer over MQTT: throughput and chunks re-sent",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}: a {args.size_mb} MiB random file from a `FileSender` to a "
        f"`FileReceiver` (`blockskip.transfer`), each behind its own paho-mqtt {package_version('paho-mqtt')} "
        f"MQTT v5 client "
        f"(persistent session, QoS 1) in one Python {platform.python_version()} process, through {version} "
        f"with persistence on a loopback port; {os.cpu_count()} shared CPU cores, the receiver's state_dir on the "
        f"local disk. MB/s is 10^6 bytes per second from `receive` to the file renamed into place (every "
        f"chunk fdatasynced and recorded in the state json before the next is asked for; the whole-file "
        f"sha256 computed as chunks arrive). Re-sent = sender publishes - chunks. Hashing the file once "
        f"for the offer took {hash_s:.2f} s ({args.size_mb * 1.048576 / hash_s:.0f} MB/s), not counted. "
        f"The machine is shared (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end), "
        f"so single runs vary by up to 2x: each setting without a restart ran {args.repeats} times, interleaved.",
        "",
        "## Without a broker restart",
        "",
        "The broker runs with `set_tcp_nodelay true` (as deploy/mosquitto/mosquitto.conf) unless the row says "
        "`false`: then Nagle's algorithm holds back the small `want` and PUBACK packets.",
        "",
        "| chunk KiB | window | set_tcp_nodelay | MB/s, median | MB/s, each run | re-sent | sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r["restart"]:
            groups.setdefault((not r["nodelay"], r["chunk_kib"], r["window"]), []).append(r)
    for (nagle, chunk_kib, window), runs in sorted(groups.items()):
        speeds = [r["mb_s"] for r in runs]
        lines.append(f"| {chunk_kib} | {window} | {'false' if nagle else 'true'} | {statistics.median(speeds):.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in speeds)} | {max(r['resent'] for r in runs)} | "
                     f"{'ok' if all(r['ok'] for r in runs) else 'MISMATCH'} |")
    lines += [
        "",
        f"## Broker restarted at half the chunks (SIGTERM, start again on the same port; retry_s {args.retry_s:g})",
        "",
        "| chunk KiB | window | MB/s (restart included) | seconds | re-sent | restarted after chunk publishes "
        "| sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["restart"]:
            lines.append(f"| {r['chunk_kib']} | {r['window']} | {r['mb_s']:.1f} | {r['seconds']:.2f} | {r['resent']} | "
                         f"{r['restarted_at']} of {r['chunks']} | {'ok' if r['ok'] else 'MISMATCH'} |")
    lines += ["", f"Defaults in `blockskip.transfer`: chunk {DEFAULT_CHUNK_SIZE // 1024} KiB, "
                  f"window {DEFAULT_WINDOW}.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
