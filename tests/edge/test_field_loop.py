"""The field loop over MQTT on real mosquitto: a camera's captures in, a personalize job from the
operator CLI, host workers making and signing the subject bundle, the bundle (and the base pack
the board lacks) sent in chunks and verified on the board, training and generation there, the
images back at the operator; then the same with a worker killed mid-job and a broker restart
mid-transfer; and two workers splitting jobs through the shared subscription."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from blockskip.cli import main
from blockskip.edge.agent import BrokerConfig, make_client
from blockskip.edge.capture import CaptureConfig, publish_folder
from blockskip.errors import ConfigError
from blockskip.host.basepack import build_base_pack
from blockskip.host.bundle import generate_keypair
from blockskip.host.cache import build_cache
from blockskip.host.jobs import SUBMIT_TOPIC, status_topic, worker_topic
from blockskip.host.patches import PatchSchedule
from blockskip.host.plan import LoraSettings, make_plan
from blockskip.host.serve import HostConfig, HostWorker
from blockskip.models.pipeline import save_model, tiny_model

DEV = "dev-a"
PROMPTS = ["a photo of sks leaf on soil", "a photo of sks leaf in the rain"]


def subject_photos(folder: Path, count: int = 3) -> list[Path]:
    """A blocky subject seen a few times (distinct bytes), as a field camera would send it."""
    folder.mkdir(parents=True, exist_ok=True)
    base = (np.random.default_rng(1).random((8, 8, 3)) * 255).astype("uint8")
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(np.kron(base, np.ones((6, 6, 1), dtype="uint8"))[i:]).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def host_side(tmp_path: Path) -> dict:
    """What an operator prepares once per model: the host key, a plan and its signed base pack."""
    generate_keypair(tmp_path / "host.key", tmp_path / "host.pub")
    model = tiny_model("flux")
    size = model.family.num_blocks
    profile = {"model": {"config_hash": model.family.config_hash()},
               "d_pre": [0.0 if i <= 1 else 9.0 for i in range(size + 1)],
               "d_suf": [0.0 if i <= 1 else 9.0 for i in range(size + 1)]}
    plan = make_plan(profile, model, 2, PatchSchedule(s_min=16, s_max=32, granularity=model.granularity),
                     LoraSettings(rank=4, alpha=8), 8)
    plan.save(tmp_path / "plan.json")
    stage = build_cache(model, plan, subject_photos(tmp_path / "any-photos", 1), ["a photo"], tmp_path / "bp-stage",
                        samples=1, progress=False)
    build_base_pack(stage, tmp_path / "base-pack", json.loads((stage / "bundle.json").read_text()),
                    signing_key=tmp_path / "host.key")
    return {"key": tmp_path / "host.key", "pub": tmp_path / "host.pub", "plan": tmp_path / "plan.json",
            "base_pack": tmp_path / "base-pack"}


def host_config(tmp_path: Path, broker, host_side: dict, index: int, **kw) -> dict:
    config = dict(worker_id=f"host-{index}", work_dir=str(tmp_path / f"host-{index}"), signing_key=str(host_side["key"]),
                  broker=dict(host="127.0.0.1", port=broker.port, keepalive=5, reconnect_min_s=0.1,
                              reconnect_max_s=0.5),
                  models={"flux": {"path": "tiny-flux", "board_model": "flux-model", "plan": str(host_side["plan"]),
                                   "base_pack": str(host_side["base_pack"]), "samples": 8, "shard_size": 4}},
                  device_timeout_s=180, command_resend_s=5, busy_retry_s=0.5, progress_interval_s=0.0,
                  transfer_retry_s=1.0)
    config.update(kw)
    return config


def board(start_agent, host_side: dict, **kw):
    agent = start_agent(trusted_keys=[str(host_side["pub"])], thumbnails=True, transfer_retry_s=1.0, **kw)
    save_model(tiny_model("flux"), agent.data_dir / "flux-model")
    return agent


def send_captures(broker, folder: Path) -> None:
    report = publish_folder(CaptureConfig(device_id=DEV, camera_id="cam-01", ack_timeout_s=5, broker=BrokerConfig(
        host="127.0.0.1", port=broker.port, keepalive=5, reconnect_min_s=0.1, reconnect_max_s=0.5)), folder)
    assert report.ok, report


def operator_config(tmp_path: Path, broker) -> Path:
    path = tmp_path / "operator.yaml"
    path.write_text(yaml.safe_dump({"client_id": "operator", "broker": {"host": "127.0.0.1", "port": broker.port}}))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_captures_to_images_through_two_host_workers(broker, start_agent, probe_factory, host_side, tmp_path,
                                                      wait_until, capsys):
    agent = board(start_agent, host_side)
    workers = [HostWorker(HostConfig(**host_config(tmp_path, broker, host_side, i))) for i in range(2)]
    for worker in workers:
        worker.start()
    try:
        wait_until(lambda: all(w.connected.is_set() for w in workers))
        photos = subject_photos(tmp_path / "camera")
        send_captures(broker, tmp_path / "camera")
        operator = operator_config(tmp_path, broker)

        code = main(["fleet", "--config", str(operator), "submit", "--device", DEV, "--model", "flux",
                     "--subject", "a photo of sks leaf", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                     "--camera", "cam-01", "--steps", "6", "--gen-steps", "2", "--backend", "torch", "--job-id", "leaf-1", "--follow",
                     "--timeout", "300"])
        out = capsys.readouterr().out
        assert code == 0, out
        for stage in ("photos", "prepare", "deliver", "train", "generate"):
            assert f"stage {stage}" in out
        assert "job leaf-1 done on dev-a: 2 images" in out

        # one worker ran it; the photos it trained on are the camera's, byte for byte
        ran = [w for w in workers if (w.jobs_dir / "leaf-1").is_dir()]
        assert len(ran) == 1
        job_dir = ran[0].jobs_dir / "leaf-1"
        assert sorted(sha256(p) for p in (job_dir / "photos").iterdir()) == sorted(sha256(p) for p in photos)
        # the base pack the board lacked went first; both arrived intact and verified, nothing partial left
        data = agent.data_dir
        assert sha256(data / "bundles" / "leaf-1.tar") == sha256(job_dir / "leaf-1.tar")
        assert (data / "bundles" / "leaf-1" / "manifest.sig").is_file()
        assert len(agent._installed_base_packs()) == 1
        assert not list((data / "transfers" / "receive").glob("*.part"))
        assert (data / "adapters" / "leaf-1" / "pytorch_lora_weights.safetensors").is_file()

        fetched = tmp_path / "fetched"
        assert main(["fleet", "--config", str(operator), "fetch", "leaf-1", "--out", str(fetched)]) == 0
        images = sorted(p for p in fetched.iterdir() if p.suffix == ".png")
        assert len(images) == 2 and (fetched / "index.html").is_file()
        state = json.loads((job_dir / "state.json").read_text())
        assert sorted(sha256(p) for p in images) == sorted(r["sha256"] for r in state["results"])
        assert all(r.get("thumbnail_png_b64") for r in state["results"])
        assert (fetched / "index.html").read_text().count("data:image/png;base64,") == 2
        thumbs = tmp_path / "thumbs"
        assert main(["fleet", "--config", str(operator), "fetch", "leaf-1", "--out", str(thumbs),
                     "--thumbnails-only"]) == 0
        assert len(list(thumbs.glob("thumb-*.png"))) == 2 and (thumbs / "index.html").is_file()

        assert main(["fleet", "--config", str(operator), "jobs", "--wait", "0.5"]) == 0
        listing = capsys.readouterr().out
        assert "leaf-1" in listing and "done" in listing
        assert main(["fleet", "--config", str(operator), "devices", "--wait", "0.5"]) == 0
        assert DEV in capsys.readouterr().out
    finally:
        for worker in workers:
            worker.stop()


def start_worker_process(tmp_path: Path, config: dict) -> subprocess.Popen:
    path = tmp_path / f"{config['worker_id']}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / f"{config['worker_id']}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "blockskip", "-v", "host", "serve", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_a_killed_worker_and_a_broker_restart_mid_transfer_still_end_the_job_once(
        broker, start_agent, probe_factory, host_side, tmp_path, wait_until):
    """Two workers; the broker restarts while the board receives the base pack in 1 KiB chunks,
    the worker running the job is SIGKILLed while the board trains; restarted, it finishes the
    job: one training, one generation, the bundle intact, every capture that was acked still
    there, and the other worker never ran it."""
    agent = board(start_agent, host_side)
    watch = probe_factory(broker.port, [f"blockskip/{DEV}/progress", status_topic("leaf-2"), worker_topic("host-0")],
                          "watcher")
    photos = subject_photos(tmp_path / "camera", 4)
    send_captures(broker, tmp_path / "camera")
    config = host_config(tmp_path, broker, host_side, 0, chunk_size=1024)
    worker = start_worker_process(tmp_path, config)
    try:
        wait_until(lambda: [s for s in watch.on(worker_topic("host-0")) if s["state"] == "online"], 60)
        watch.send(SUBMIT_TOPIC, {"id": "leaf-2", "device": DEV, "model": "flux", "subject": "a photo of sks leaf",
                                  "prompts": PROMPTS, "captures": {"camera_id": "cam-01"},
                                  "train": {"steps": 40, "checkpoint_every": 10},
                                  "generate": {"steps": 2, "backend": "torch"}})
        wait_until(lambda: watch.on(status_topic("leaf-2")), 60)  # host-0 has it; now the second worker joins
        other = HostWorker(HostConfig(**host_config(tmp_path, broker, host_side, 1)))
        other.start()
        receiving = agent.data_dir / "transfers" / "receive"
        wait_until(lambda: list(receiving.glob("*.part")), 120, interval=0.005)  # the base pack is on its way
        broker.restart(down_s=1.0)
        started = wait_until(lambda: [e for e in watch.on("/progress") if e.get("job") == "leaf-2.train"
                                      and e.get("type") == "progress"], 120)
        worker.send_signal(signal.SIGKILL)  # mid-training: the board goes on, the worker is gone
        worker.wait(10)
        assert started
        worker = start_worker_process(tmp_path, config)
        status = wait_until(lambda: [s for s in watch.on(status_topic("leaf-2")) if s["state"] in ("done", "failed")],
                            180)
        assert status[-1]["state"] == "done", status[-1]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        if "other" in locals():
            other.stop()
    assert not (other.jobs_dir / "leaf-2").exists()
    events = watch.on("/progress")
    for command in ("leaf-2.train", "leaf-2.generate"):  # each ran once and ended once
        assert [e["type"] for e in events if e.get("job") == command and e["type"] in ("done", "cancelled", "failed")] \
            == ["done"], command
    assert len([e for e in events if e.get("job") == "leaf-2.train" and e["type"] == "start"]) == 1
    data = agent.data_dir
    job_dir = tmp_path / "host-0" / "jobs" / "leaf-2"
    assert sha256(data / "bundles" / "leaf-2.tar") == sha256(job_dir / "leaf-2.tar")
    assert not list((data / "transfers" / "receive").glob("*.part"))
    assert sorted(sha256(p) for p in (job_dir / "photos").iterdir()) == sorted(sha256(p) for p in photos)
    assert agent.spool.count() == len(photos)
    results = status[-1]["results"]
    assert len(results) == 2 and all(sha256(data / r["path"]) == r["sha256"] for r in results)
    log = (tmp_path / "host-0.log").read_text()
    assert "resumes" in log


@pytest.mark.slow
def test_two_workers_split_the_jobs_and_run_each_once(broker, probe_factory, host_side, tmp_path, wait_until):
    """Eight host-only jobs (photos from a folder, ending after the bundle) through the shared
    subscription: each ends once, and each worker takes about half."""
    photos = tmp_path / "photos"
    subject_photos(photos)
    workers = [HostWorker(HostConfig(**host_config(tmp_path, broker, host_side, i))) for i in range(2)]
    for worker in workers:
        worker.start()
    watch = probe_factory(broker.port, ["blockskip-jobs/+/status"], "watcher")
    try:
        wait_until(lambda: all(w.connected.is_set() for w in workers))
        ids = [f"job-{i}" for i in range(8)]
        for job_id in ids:
            watch.send(SUBMIT_TOPIC, {"id": job_id, "device": DEV, "model": "flux", "subject": "a photo of sks leaf",
                                      "prompts": PROMPTS[:1], "photos_dir": str(photos), "stop_after": "prepare"})

        def ended() -> dict:
            final = {}
            for status in watch.on("/status"):
                if status["state"] in ("done", "failed"):
                    final.setdefault(status["job"], []).append(status)
            return final if len(final) == len(ids) else {}

        final = wait_until(ended, 300)
    finally:
        for worker in workers:
            worker.stop()
    assert all(len(v) == 1 and v[0]["state"] == "done" for v in final.values()), final
    taken = [sorted(p.name for p in w.jobs_dir.iterdir()) for w in workers]
    assert sorted(taken[0] + taken[1]) == ids  # each job ran on exactly one worker
    assert all(2 <= len(t) <= 6 for t in taken), taken
    assert {final[j][0]["worker"] for j in taken[0]} == {"host-0"}


@pytest.mark.slow
def test_bad_jobs_end_with_a_reason_and_the_worker_keeps_serving(broker, start_agent, probe_factory, host_side,
                                                                  tmp_path, wait_until):
    board(start_agent, host_side)
    worker = HostWorker(HostConfig(**host_config(tmp_path, broker, host_side, 0)))
    worker.start()
    watch = probe_factory(broker.port, ["blockskip-jobs/+/status"], "watcher")
    good = {"device": DEV, "model": "flux", "subject": "a photo of sks leaf", "prompts": PROMPTS[:1],
            "photos_dir": str(tmp_path / "photos"), "stop_after": "prepare"}
    subject_photos(tmp_path / "photos")
    try:
        wait_until(worker.connected.is_set)
        watch.send(SUBMIT_TOPIC, b"\xff not json")
        watch.send(SUBMIT_TOPIC, {"id": "../x", **good})
        for dots in (".", ".."):  # ids a folder name would misread: refused with a status, like any bad id
            watch.send(SUBMIT_TOPIC, {"id": dots, **good})
        watch.send(SUBMIT_TOPIC, b'{"id": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        cases = {
            "no-prompts": {**good, "prompts": []},
            "two-sources": {**good, "captures": {"camera_id": "cam-01"}},
            "bad-time": {**{k: v for k, v in good.items() if k != "photos_dir"}, "captures": {"since": "yesterday"}},
            "bad-key": {**good, "priority": 1},
            "other-model": {**good, "model": "sdxl"},
            "no-folder": {**good, "photos_dir": str(tmp_path / "missing")},
            "no-match": {**{k: v for k, v in good.items() if k != "photos_dir"}, "captures": {"camera_id": "cam-9"}},
        }
        for job_id, job in cases.items():
            watch.send(SUBMIT_TOPIC, {"id": job_id, **job})
        watch.send(SUBMIT_TOPIC, {"id": "fine", **good})

        def final(job_id: str) -> dict | None:
            ended = [s for s in watch.on(status_topic(job_id)) if s["state"] in ("done", "failed")]
            return ended[-1] if ended else None

        wait_until(lambda: final("fine"), 120)
        errors = {job_id: wait_until(lambda: final(job_id), 60)["error"] for job_id in cases}
    finally:
        worker.stop()
    assert final("fine")["state"] == "done"
    assert "prompts" in errors["no-prompts"] and "exactly one of `captures`" in errors["two-sources"]
    assert "ISO 8601" in errors["bad-time"] and "priority" in errors["bad-key"]
    assert "'sdxl' is not one this worker serves" in errors["other-model"]
    assert "does not exist" in errors["no-folder"]
    assert "no capture on dev-a matches" in errors["no-match"] and "0 captures in its spool" in errors["no-match"]
    for dots in (".", ".."):
        assert "the first a letter, digit or _" in wait_until(lambda: final(dots), 10)["error"]
    assert "nested too deeply" in wait_until(lambda: final("deep"), 10)["error"]
    assert not (worker.jobs_dir.parent / "job.json").exists()


@pytest.mark.slow
def test_the_example_host_and_operator_configs_load(tmp_path, host_side):
    from blockskip.host import fleet, serve

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    text = (deploy / "host.example.yaml").read_text()
    for old, new in (("/etc/blockskip/host.key", host_side["key"]), ("/var/lib/blockskip-host/flux-50.plan.json",
                     host_side["plan"]), ("/var/lib/blockskip-host/flux-50.base", host_side["base_pack"])):
        assert old in text
        text = text.replace(old, str(new))
    (tmp_path / "host.yaml").write_text(text)
    config = serve.load_config(tmp_path / "host.yaml")
    assert config.worker_id == config.broker.username and set(config.models) == {"flux", "crop"}
    assert config.models["flux"].base_pack and config.models["crop"].path == "builtin"
    operator = fleet.load_config(deploy / "operator.example.yaml")
    assert operator.client_id == operator.broker.username == "operator"
    (tmp_path / "bad.yaml").write_text(text.replace("username: host-01", "username: host-02"))
    with pytest.raises(ConfigError, match="must equal worker_id"):
        serve.load_config(tmp_path / "bad.yaml")


@pytest.mark.slow
def test_a_stopping_worker_hands_back_the_jobs_it_has_not_begun(broker, probe_factory, host_side, tmp_path,
                                                                 wait_until):
    """Worker A took three jobs; SIGTERM (stop) while it runs the first: the two it had not begun go
    back to the group and worker B runs them; A keeps no trace of them."""
    photos = tmp_path / "photos"
    subject_photos(photos)
    watch = probe_factory(broker.port, ["blockskip-jobs/+/status"], "watcher")
    a = HostWorker(HostConfig(**host_config(tmp_path, broker, host_side, 0)))
    a.start()
    b = None
    try:
        wait_until(a.connected.is_set)
        ids = ["first", "second", "third"]
        for job_id in ids:
            watch.send(SUBMIT_TOPIC, {"id": job_id, "device": DEV, "model": "flux", "subject": "a photo of sks leaf",
                                      "prompts": PROMPTS[:1], "photos_dir": str(photos), "stop_after": "prepare"})
        wait_until(lambda: all(watch.on(status_topic(j)) for j in ids), 30)  # all three taken by A
        b = HostWorker(HostConfig(**host_config(tmp_path, broker, host_side, 1)))
        b.start()
        wait_until(b.connected.is_set)
        a.stop()

        def final(job_id: str) -> dict | None:
            ended = [s for s in watch.on(status_topic(job_id)) if s["state"] in ("done", "failed")]
            return ended[-1] if ended else None

        wait_until(lambda: all(final(j) for j in ids), 120)
    finally:
        for worker in (a, b):
            if worker is not None and worker.connected.is_set():
                worker.stop()
    assert all(final(j)["state"] == "done" for j in ids)
    assert final("first")["worker"] == "host-0"
    assert final("second")["worker"] == final("third")["worker"] == "host-1"
    assert sorted(p.name for p in a.jobs_dir.iterdir()) == ["first"]


@pytest.mark.slow
def test_fleet_says_when_no_worker_took_a_job_and_follow_exits_1_on_a_failed_one(broker, host_side, tmp_path,
                                                                                  wait_until, capsys):
    operator = operator_config(tmp_path, broker)
    submit = ["fleet", "--config", str(operator), "submit", "--device", DEV, "--model", "flux", "--subject",
              "a photo of sks leaf", "--prompt", PROMPTS[0], "--photos-dir", str(tmp_path)]
    assert main(submit + ["--job-id", "lonely", "--taken-wait", "1"]) == 3  # no worker in the group yet
    assert "no host worker took job lonely within 1 s" in capsys.readouterr().err
    worker = HostWorker(HostConfig(**host_config(tmp_path, broker, host_side, 0)))
    worker.start()
    try:
        wait_until(worker.connected.is_set)
        assert main(submit[:7] + ["sdxl"] + submit[8:] + ["--job-id", "wrong-model"]) == 1
        assert "'sdxl' is not one this worker serves" in capsys.readouterr().err
        assert main(["fleet", "--config", str(operator), "follow", "wrong-model", "--timeout", "10"]) == 1
        assert "job wrong-model failed" in capsys.readouterr().out
    finally:
        worker.stop()


# ---- trust: a second board login attacks another board's job ----------------------------------------

def _forge(client, job: str, stop) -> None:
    """What dev-b publishes, on its own topics only, about dev-a's job: ok replies to every step,
    `done` and `failed` ends for train and generate, and image records of files it made up."""
    steps = ("captures", "upload", "status", "basepack", "bundle", "train", "generate")
    while not stop.is_set():
        for step in steps:
            client.publish(f"blockskip/dev-b/reply/{job}.{step}", json.dumps(
                {"id": f"{job}.{step}", "ok": True, "result": {"files": [], "state": "installed",
                                                              "path": "bundles/forged.tar", "base_packs": []}}), qos=1)
        for step, end in (("train", "failed"), ("generate", "done")):
            client.publish("blockskip/dev-b/progress", json.dumps(
                {"type": end, "job": f"{job}.{step}", "error": {"code": "forged", "message": "by dev-b"}}), qos=1)
        client.publish("blockskip/dev-b/result", json.dumps(
            {"job": f"{job}.generate", "path": "/FORGED/by-dev-b.png", "sha256": "f" * 64, "prompt": "x",
             "seed": 0}), qos=1)
        stop.wait(0.1)


@pytest.mark.slow
def test_a_second_board_cannot_finish_fail_or_fill_another_boards_job(secure_broker, pki, tmp_path, host_side, mq,
                                                                      caplog):
    """The broker as shipped (TLS, passwords, acl.example); dev-b holds a valid login of its own and
    publishes forged replies, ends and image records about dev-a's job on its own topics, all the
    while the job runs. The job ends `done` with dev-a's own images; the worker logs each kind of
    forgery once and keeps serving."""
    import threading

    from blockskip.edge.agent import Agent, AgentConfig

    caplog.set_level(logging.WARNING, logger="blockskip.host.serve")
    agent = Agent(AgentConfig(device_id=DEV, data_dir=str(tmp_path / "data"), progress_interval_s=0.0,
                              broker=mq.login(secure_broker, pki, DEV), trusted_keys=[str(host_side["pub"])],
                              thumbnails=True, transfer_retry_s=1.0))
    save_model(tiny_model("flux"), agent.data_dir / "flux-model")
    worker = HostWorker(HostConfig(**{**host_config(tmp_path, secure_broker, host_side, 1), "worker_id": "host-01",
                                      "broker": mq.login(secure_broker, pki, "host-01")}))
    watcher = make_client(mq.login(secure_broker, pki, "operator"), "operator")
    statuses: dict[str, dict] = {}
    watcher.on_message = lambda c, u, m: statuses.__setitem__(m.topic.split("/")[1], json.loads(m.payload))
    watcher.on_connect = lambda c, u, f, rc, p: c.subscribe("blockskip-jobs/+/status", qos=1)
    forger = make_client(mq.login(secure_broker, pki, "dev-b"), "dev-b")
    stop = threading.Event()
    for client in (watcher, forger):
        client.connect("127.0.0.1", secure_broker.port, 5)
        client.loop_start()
    agent.start()
    worker.start()
    forging = threading.Thread(target=_forge, args=(forger, "leaf-1", stop), daemon=True)
    try:
        mq.wait_until(lambda: agent.connected.is_set() and worker.connected.is_set(), 20)
        send_captures_as(mq.login(secure_broker, pki, "dev-a-cam-01"), tmp_path / "camera")
        job = {"model": "flux", "subject": "a photo of sks leaf", "prompts": PROMPTS,
               "train": {"steps": 4}, "generate": {"steps": 2, "backend": "torch"}}
        # dev-b's own job first: the worker then listens on dev-b's topics too
        (tmp_path / "empty").mkdir()
        watcher.publish(SUBMIT_TOPIC, json.dumps({"id": "b-1", "device": "dev-b", "photos_dir": str(tmp_path / "empty"),
                                                  **job}), qos=1).wait_for_publish(5)
        mq.wait_until(lambda: statuses.get("b-1", {}).get("state") == "failed", 60)
        forging.start()
        watcher.publish(SUBMIT_TOPIC, json.dumps({"id": "leaf-1", "device": DEV, "captures": {"camera_id": "cam-01"},
                                                  **job}), qos=1).wait_for_publish(5)
        final = mq.wait_until(lambda: statuses.get("leaf-1", {}).get("state") in ("done", "failed")
                              and statuses["leaf-1"], 240)
    finally:
        stop.set()
        worker.stop()
        agent.stop(flush_timeout_s=1)
        for client in (watcher, forger):
            client.disconnect()
            client.loop_stop()
    assert final["state"] == "done", final.get("error")
    assert len(final["results"]) == len(PROMPTS)
    for record in final["results"]:
        path = Path(record["path"])
        assert path.parent == agent.data_dir / "generated" / "leaf-1"
        assert record["sha256"] == sha256(path)
    assert "FORGED" not in json.dumps(final)
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped a")]
    assert sorted(m.split(" about ")[0] for m in dropped) == ["dropped a event", "dropped a reply", "dropped a result"]
    assert all("from dev-b" in m and "job leaf-1" in m for m in dropped)


def send_captures_as(login, folder: Path) -> None:
    subject_photos(folder)
    report = publish_folder(CaptureConfig(device_id=DEV, camera_id="cam-01", ack_timeout_s=5, broker=login), folder)
    assert report.ok, report


class HostileBoard:
    """dev-a's login in an attacker's hands: answers the worker's `captures` and `upload` with
    offers of its choosing and serves (or starves) them with a real FileSender."""

    def __init__(self, port: int, tmp: Path, offers: list[tuple[Path | None, int]], serve: bool = True,
                 garbage: bool = False):
        import threading

        from blockskip.transfer import FileOffer, FileSender

        self.client = mqtt_client(port, DEV)
        self.sender = FileSender(lambda t, p, props=None: self.client.publish(t, p, qos=1, properties=props),
                                 tmp / "send")
        self.offers, self.serve, self.garbage, self.FileOffer = offers, serve, garbage, FileOffer
        self.wants: list[str] = []
        self.done: list[dict] = []
        self.lock = threading.Lock()
        self.client.on_message = self._message
        self.client.subscribe([(f"blockskip/{DEV}/cmd", 1), (f"blockskip/{DEV}/files/+/want", 1),
                               (f"blockskip/{DEV}/files/+/done", 1)])

    def _message(self, client, userdata, msg) -> None:
        if "/files/" in msg.topic:
            with self.lock:
                (self.wants if msg.topic.endswith("/want") else self.done).append(msg.topic)
            if msg.topic.endswith("/done"):
                self.done[-1] = json.loads(msg.payload)
            if self.serve:
                self.sender.handle(msg.topic, msg.payload)
            return
        cmd = json.loads(msg.payload)
        if self.garbage:  # replies of the right ids in shapes no agent sends
            result = {"captures": {"total": 1, "captures": [1, "x", {"sha256": "0" * 64, "camera_id": "cam-01"}]},
                      "upload": {"files": [{"path": "../..", "offer": {"transfer": "x"}}, 7]}}.get(cmd["action"], [])
        elif cmd["action"] == "captures":
            result = {"total": len(self.offers), "captures": [
                {"sha256": f"{i:064x}", "camera_id": "cam-01", "received": i, "file": f"{i}.png"}
                for i in range(len(self.offers))]}
        elif cmd["action"] == "upload":
            files = []
            for i, (path, size) in enumerate(self.offers):
                transfer = f"{cmd['id'][:54]}.{i}"
                if path is not None:
                    offer = self.sender.offer(f"blockskip/{DEV}/", path, transfer, 64 * 1024)
                else:  # a file it does not have: only the offer
                    offer = self.FileOffer(transfer, f"{i}.png", size, "0" * 64, 16 * 1024 * 1024)
                files.append({"path": f"spool/{i}.png", "offer": offer.to_dict()})
            result = {"files": files}
        else:
            result = {}
        client.publish(f"blockskip/{DEV}/reply/{cmd['id']}", json.dumps({"id": cmd["id"], "ok": True,
                                                                          "result": result}), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_client(port: int, client_id: str):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def bomb_png(path: Path, side: int = 12000) -> Path:
    """A PNG of side x side black pixels: a few hundred KB on disk, side*side*3 bytes decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compress(b"\0" * ((side * 3 + 1) * side), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["huge-offers", "pixel-bomb", "trickle", "garbage"])
def test_a_hostile_board_cannot_fill_the_workers_disk_or_memory(case, broker, host_side, tmp_path, wait_until):
    """Five 40 GiB photo offers are refused before a byte (too_large); three 12000 x 12000 PNGs of a
    few hundred KB are refused from their header (too_many_pixels); a photo that stops coming ends
    at the idle timeout; replies in shapes no agent sends are refused. Each time the job fails
    saying why, no partial file stays, and the worker goes on to run the next job."""
    offers = {"huge-offers": [(None, 40 * 1024**3)] * 5,
              "pixel-bomb": [(bomb_png(tmp_path / f"bomb-{i}.png"), 0) for i in range(3)],
              "trickle": [(subject_photos(tmp_path / "real", 1)[0], 0)], "garbage": []}[case]
    hostile = HostileBoard(broker.port, tmp_path / "hostile", offers, serve=case != "trickle",
                           garbage=case == "garbage")
    worker = HostWorker(HostConfig(**host_config(tmp_path, broker, host_side, 0, transfer_idle_timeout_s=2.0)))
    worker.start()
    watch = mqtt_client(broker.port, "watcher")
    statuses: dict[str, dict] = {}
    watch.on_message = lambda c, u, m: statuses.__setitem__(m.topic.split("/")[1], json.loads(m.payload))
    watch.subscribe("blockskip-jobs/+/status", qos=1)
    try:
        wait_until(worker.connected.is_set)
        job = {"device": DEV, "model": "flux", "subject": "a photo of sks leaf", "prompts": PROMPTS[:1]}
        watch.publish(SUBMIT_TOPIC, json.dumps({"id": "attack", "captures": {"camera_id": "cam-01"}, **job}), qos=1)
        failed = wait_until(lambda: statuses.get("attack", {}).get("state") == "failed" and statuses["attack"], 60)
        subject_photos(tmp_path / "photos")
        watch.publish(SUBMIT_TOPIC, json.dumps({"id": "next", "photos_dir": str(tmp_path / "photos"),
                                                "stop_after": "photos", **job}), qos=1)
        assert wait_until(lambda: statuses.get("next", {}).get("state") in ("done", "failed")
                          and statuses["next"], 60)["state"] == "done"
    finally:
        worker.stop()
        hostile.close()
        watch.disconnect()
        watch.loop_stop()
    reason = {"huge-offers": "(too_large)", "pixel-bomb": "(too_many_pixels)", "trickle": "(idle_timeout)",
              "garbage": "is not a valid offer"}[case]
    assert reason in failed["error"], failed["error"]
    leftovers = [p for p in worker.work.rglob("*") if p.is_file() and (p.suffix == ".part" or p.stat().st_size > 1e6)]
    assert leftovers == []
    assert not list((worker.jobs_dir / "attack" / "photos").iterdir())
    if case == "huge-offers":
        assert hostile.wants == []  # not one chunk was asked for
    if case == "trickle":  # the board heard that the worker gave up
        wait_until(lambda: any(d.get("error", {}).get("code") in ("idle_timeout", "cancelled") for d in hostile.done), 10)
