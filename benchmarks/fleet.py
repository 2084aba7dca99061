"""Host workers sharing jobs: jobs per minute with 1 and with 2 workers, measured in one run.

Starts its own mosquitto on a loopback port and `blockskip host serve` workers as processes
(OMP_NUM_THREADS=1 each, so that two workers use two cores), submits host-only jobs (photos from
a folder, profile / plan / cache / signed bundle: `stop_after: prepare`) through the shared
subscription and times them until every job's retained status says `done`. Prints jobs per
minute, the speed-up of 2 workers over 1, and how the jobs split; writes
benchmarks/results/fleet.md.

    python benchmarks/fleet.py [--jobs 8] [--samples 60] [--model builtin]
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(work: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (work / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                                         f"user {getpass.getuser()}\nlog_dest file {work / 'mosquitto.log'}\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(work / "mosquitto.conf")])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


class Watcher:
    """Collects the retained statuses of jobs and workers."""

    def __init__(self, port: int):
        self.jobs: dict[str, dict] = {}
        self.workers: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="bench",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("blockskip-jobs/+/status", 1), ("blockskip-workers/+/status", 1)])
        self.client.loop_start()

    def _message(self, client, userdata, msg) -> None:
        body = json.loads(msg.payload)
        with self.lock:
            if msg.topic.startswith("blockskip-jobs/"):
                self.jobs[body["job"]] = body
            else:
                self.workers[body["worker"]] = body

    def submit(self, job: dict) -> None:
        self.client.publish("blockskip-jobs/submit", json.dumps(job), qos=1).wait_for_publish(10)


def run(workers: int, jobs: int, args, work: Path, port: int, watcher: Watcher, photos: Path, tag: str) -> dict:
    procs = []
    for i in range(workers):
        config = {"worker_id": f"{tag}-{i}", "work_dir": str(work / f"{tag}-{i}"), "group": tag,
                  "broker": {"host": "127.0.0.1", "port": port},
                  "models": {"m": {"path": args.model, "board_model": "unused", "samples": args.samples,
                                   "shard_size": 10, "skip_ratio": 0.5}}}
        path = work / f"{tag}-{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        procs.append(subprocess.Popen([sys.executable, "-m", "blockskip", "host", "serve", "--config", str(path)],
                                      stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    try:
        while sum(1 for w in watcher.workers.values() if w["group"] == tag and w["state"] == "online") < workers:
            time.sleep(0.1)
        def submit_and_wait(ids: list[str]) -> dict:
            for job_id in ids:
                watcher.submit({"id": job_id, "device": "board-x", "model": "m", "subject": "a photo of sks leaf",
                                "prompts": ["a photo of sks leaf on soil"], "photos_dir": str(photos),
                                "stop_after": "prepare"})
            while True:
                with watcher.lock:
                    ended = {j: watcher.jobs[j] for j in ids
                             if watcher.jobs.get(j, {}).get("state") in ("done", "failed")}
                if len(ended) == len(ids):
                    return ended
                time.sleep(0.2)

        # one warm-up job per worker (round-robin gives each one): imports, model load, profile
        submit_and_wait([f"{tag}-warm-{n}" for n in range(workers)])
        ids = [f"{tag}-job-{n}" for n in range(jobs)]
        started = time.perf_counter()
        ended = submit_and_wait(ids)
        seconds = time.perf_counter() - started
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    failed = [j for j, s in ended.items() if s["state"] != "done"]
    if failed:
        raise SystemExit(f"jobs failed: {[(j, ended[j].get('error')) for j in failed]}")
    split = {}
    for status in ended.values():
        split[status["worker"]] = split.get(status["worker"], 0) + 1
    return {"workers": workers, "seconds": seconds, "jobs_per_min": 60 * jobs / seconds, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=60, help="draws cached per job")
    parser.add_argument("--model", default="builtin", help="host model: builtin, tiny-flux or a folder")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fleet.md"))
    args = parser.parse_args()
    from blockskip.demo import subject_photos

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker, port = start_broker(work)
        try:
            watcher = Watcher(port)
            photos = work / "photos"
            subject_photos(photos, 32, 0)
            load = os.getloadavg()[0]
            one = run(1, args.jobs, args, work, port, watcher, photos, "one")
            two = run(2, args.jobs, args, work, port, watcher, photos, "two")
            load = max(load, os.getloadavg()[0])
        finally:
            broker.terminate()
            broker.wait(10)
    speedup = two["jobs_per_min"] / one["jobs_per_min"]
    lines = [f"{r['workers']} worker(s): {args.jobs} jobs in {r['seconds']:.1f} s = {r['jobs_per_min']:.2f} jobs/min, "
             f"split {dict(sorted(r['split'].items()))}" for r in (one, two)]
    lines.append(f"2 workers / 1 worker: {speedup:.2f}x jobs per minute")
    print("\n".join(lines))
    Path(args.out).write_text(
        "# Host workers sharing jobs (MQTT v5 shared subscription)\n\n"
        f"Command: `python benchmarks/fleet.py --jobs {args.jobs} --samples {args.samples} --model {args.model}`\n\n"
        f"Host-only jobs (photos from a folder, then profile / plan / cache of {args.samples} draws / single bundle, "
        f"unsigned; `stop_after: prepare`) of the {args.model} model through `$share/<group>/blockskip-jobs/submit`, "
        f"each worker a `blockskip host serve` process with OMP_NUM_THREADS=1, mosquitto on loopback. Machine: "
        f"{os.cpu_count()} cores shared with other work (1-minute load average up to {load:.1f} during the run); "
        f"both rows measured in the same run, after one warm-up job per worker (imports, model load).\n\n```\n" + "\n".join(lines) + "\n```\n\n"
        "A CPU-bound worker adds throughput only with a free core (or, on a real host, its own GPU): the load "
        "average above counts what else ran. The split line is the shared subscription at work: the broker "
        "hands the group's jobs round-robin, and each job ran once.\n")


if __name__ == "__main__":
    main()
