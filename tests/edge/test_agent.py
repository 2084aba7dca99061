"""The MQTT agent against a real mosquitto: every action, retained status, will, reconnect."""

from __future__ import annotations

import base64
import hashlib
import io
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from blockskip.edge.agent import AgentConfig, _import_job, load_config
from helpers import gen, png_job


DEV = "dev-a"  # the device id of the start_agent fixture


def test_status_is_retained_and_every_action_round_trips(broker, start_agent, probe_factory, wait_until):
    agent = start_agent(jobs={"generate": png_job(), "train": lambda: _import_job("blockskip.edge.no_such", "training")},
                        thumbnails=True)
    late = probe_factory(broker.port, [f"blockskip/{DEV}/#"], "late")
    status = wait_until(lambda: late.on("/status"))[-1]
    assert status["state"] == "online" and status["version"] and status["ts"] > 0
    assert any(t.endswith("/status") and retained for t, _, retained in late.messages)

    reply = late.request(DEV, {"id": "s1", "action": "status"})
    assert reply == {"id": "s1", "ok": True, "result": reply["result"]} and reply["result"]["state"] == "online"

    reply = late.request(DEV, gen("g1", seed=7, steps=3))
    assert reply["ok"] and reply["result"]["job"] == "g1"
    done = wait_until(lambda: [e for e in late.on("/progress") if e.get("type") == "done"])
    assert done[0]["job"] == "g1" and done[0]["result"] == {"images": 1}
    steps = [e["step"] for e in late.on("/progress") if e.get("type") == "progress"]
    assert steps == [1, 2, 3]
    result = wait_until(lambda: late.on("/result"))[0]
    assert result["job"] == "g1" and result["seed"] == 7 and result["prompt"].startswith("a photo")
    assert Path(result["path"]).is_relative_to(agent.data_dir)
    assert hashlib.sha256(Path(result["path"]).read_bytes()).hexdigest() == result["sha256"]
    assert Image.open(io.BytesIO(base64.b64decode(result["thumbnail_png_b64"]))).format == "PNG"

    reply = late.request(DEV, {"id": "c1", "action": "captures", "args": {"limit": 5}})
    assert reply["ok"] and reply["result"] == {"total": 0, "captures": []}

    reply = late.request(DEV, {"id": "x1", "action": "cancel"})
    assert reply["error"]["code"] == "no_job"

    reply = late.request(DEV, {"id": "t1", "action": "train", "args": {"bundle": "model"}})
    assert reply["ok"] is False and reply["error"]["code"] == "not_available"
    assert "not available in this build" in reply["error"]["message"]
    assert len(late.on("/reply/t1")) == 1 and len(late.on("/reply/g1")) == 1


def test_default_train_and_generate_never_fake_success(broker, start_agent, probe_factory, wait_until):
    start_agent()  # the real job table: blockskip.edge.train / generate, imported lazily
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    for action, module in (("train", "blockskip.edge.train"), ("generate", "blockskip.edge.generate")):
        cmd = gen(f"{action}1") if action == "generate" else {"id": "train1", "action": "train", "args": {"bundle": "model"}}
        reply = probe.request(DEV, cmd)
        if importlib.util.find_spec(module) is None:
            assert reply["error"]["code"] == "not_available", reply
        else:  # the module exists in this build: a tiny empty model dir must fail, not succeed
            if reply["ok"]:
                events = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") in ("done", "failed")], 60)
                assert events[-1]["type"] == "failed", events
            probe.request(DEV, {"id": f"wait-{action}", "action": "status"})


def test_busy_cancel_and_status_during_a_job(broker, start_agent, probe_factory, wait_until):
    start_agent(jobs={"generate": png_job(delay=0.05)})
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    assert probe.request(DEV, gen("long", steps=200))["ok"]
    wait_until(lambda: probe.on("/progress"))
    busy = probe.request(DEV, gen("second"))
    assert busy["error"]["code"] == "busy" and "long" in busy["error"]["message"]
    status = probe.request(DEV, {"id": "st", "action": "status"})["result"]
    assert status["state"] == "busy" and status["job"]["id"] == "long"
    assert wait_until(lambda: [s for s in probe.on("/status") if s["state"] == "busy"])
    assert probe.request(DEV, {"id": "cx", "action": "cancel", "args": {"job": "long"}})["result"] == {"cancelled": "long"}
    ended = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "cancelled"])
    assert ended[0]["job"] == "long" and ended[0]["result"]["step"] < 200
    wait_until(lambda: probe.on("/status")[-1]["state"] == "online")
    assert probe.request(DEV, gen("after", steps=1))["ok"]  # serving jobs again


def test_progress_is_rate_limited_but_keeps_the_last_step(broker, start_agent, probe_factory, wait_until):
    start_agent(jobs={"generate": png_job(delay=0.002)}, progress_interval_s=10.0)
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    probe.request(DEV, gen("rl", steps=50))
    wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "done"])
    steps = [e["step"] for e in probe.on("/progress") if e.get("type") == "progress"]
    assert steps == [1, 50]
    assert {"loss", "steps_per_s", "peak_mem_bytes", "eta_s", "total"} <= set(probe.on("/progress")[0])


def test_clean_shutdown_stops_the_job_then_publishes_offline(broker, start_agent, probe_factory, wait_until):
    agent = start_agent(jobs={"generate": png_job(delay=0.05)})
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    probe.request(DEV, gen("run", steps=500))
    wait_until(lambda: probe.on("/progress"))
    agent.stop()
    events = [e.get("type") for e in probe.on("/progress")]
    wait_until(lambda: probe.on("/status")[-1]["state"] == "offline", 5)
    assert "cancelled" in [e.get("type") for e in probe.on("/progress")], events


@pytest.mark.slow
def test_messages_produced_while_the_broker_is_down_arrive_after_reconnect(broker, start_agent, probe_factory, wait_until):
    agent = start_agent(jobs={"generate": png_job(delay=0.01)})
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    total = 150
    assert probe.request(DEV, gen("outage", steps=total))["ok"]
    wait_until(lambda: len(probe.on("/progress")) >= 5)
    broker.stop()
    wait_until(lambda: not agent.connected.is_set())
    time.sleep(1.0)  # the job keeps producing into the outbox
    assert len(agent.outbox) > 0
    broker.start()
    done = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "done"], 20)
    assert done[0]["job"] == "outage"
    steps = [e["step"] for e in probe.on("/progress") if e.get("type") == "progress"]
    assert set(steps) == set(range(1, total + 1))  # none lost
    first_seen = list(dict.fromkeys(steps))
    assert first_seen == sorted(first_seen)  # delivered in order
    assert len(steps) - total <= agent.sender.window  # duplicates only from QoS 1 resends in flight
    assert len(wait_until(lambda: probe.on("/result"))) >= 1
    wait_until(lambda: agent.sender.idle())
    assert probe.request(DEV, {"id": "alive", "action": "status"})["result"]["state"] == "online"


@pytest.mark.slow
def test_outbox_survives_an_agent_restart_while_the_broker_is_down(broker, start_agent, probe_factory, wait_until):
    agent = start_agent(jobs={"generate": png_job(delay=0.02)})
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    assert probe.request(DEV, gen("offline-run", steps=40))["ok"]
    wait_until(lambda: probe.on("/progress"))
    broker.stop()
    wait_until(lambda: not agent._job_thread.is_alive(), 20)
    assert len(agent.outbox) > 10  # the done event, a result and most progress are still undelivered
    agent.stop(flush_timeout_s=0.2)  # broker gone: everything stays in data_dir/outbox.sqlite3
    broker.start()
    restarted = start_agent(jobs={})  # same data_dir: the new process sends what the old one could not
    done = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "done"], 20)
    assert done[0]["job"] == "offline-run"
    assert {e["step"] for e in probe.on("/progress") if e.get("type") == "progress"} == set(range(1, 41))
    wait_until(lambda: restarted.sender.idle())
    # the broker acked the last status; the probe may see it a moment later on a loaded machine
    wait_until(lambda: probe.on("/status")[-1]["state"] == "online", 10)


def test_will_fires_when_the_agent_is_killed(broker, tmp_path, probe_factory, wait_until):
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "device_id": DEV, "data_dir": str(tmp_path / "data"),
        "broker": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5, "reconnect_min_s": 0.1},
    }))
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "blockskip", "agent", "--config", str(config)], env=env)
    try:
        wait_until(lambda: [s for s in probe.on("/status") if s["state"] == "online"], 60)
        assert probe.request(DEV, {"id": "p", "action": "status"})["ok"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        offline = wait_until(lambda: [s for s in probe.on("/status") if s["state"] == "offline"], 10)
        online = [s for s in probe.on("/status") if s["state"] == "online"]
        assert offline[-1]["job"] is None
        assert offline[-1]["ts"] < online[-1]["ts"]  # the will (made before connecting), not a clean offline
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_publishes_offline_and_exits_zero(broker, tmp_path, probe_factory, wait_until):
    config = tmp_path / "agent.yaml"
    config.write_text(f"device_id: {DEV}\ndata_dir: {tmp_path / 'data'}\nbroker:\n  host: 127.0.0.1\n  port: {broker.port}\n")
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    proc = subprocess.Popen([sys.executable, "-m", "blockskip", "agent", "--config", str(config)])
    try:
        online = wait_until(lambda: [s for s in probe.on("/status") if s["state"] == "online"], 60)[-1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        offline = wait_until(lambda: [s for s in probe.on("/status") if s["state"] == "offline"], 5)[-1]
        assert offline["ts"] > online["ts"]  # published by the agent on shutdown, not its will
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_example_config_loads(tmp_path):
    from blockskip.host.bundle import generate_keypair

    text = (Path(__file__).resolve().parents[2] / "deploy" / "agent.example.yaml").read_text()
    assert "/etc/blockskip/host.pub" in text, "the example trusts the host's key"
    generate_keypair(tmp_path / "host.key", tmp_path / "host.pub")
    (tmp_path / "agent.yaml").write_text(text.replace("/etc/blockskip/host.pub", str(tmp_path / "host.pub")))
    config = load_config(tmp_path / "agent.yaml")
    assert config.trust_policy().keys and not config.allow_unsigned_bundles
    assert isinstance(config, AgentConfig) and config.broker.ca_file and config.broker.password_file
    assert config.broker.reconnect_max_s > config.broker.reconnect_min_s


def test_every_action_of_the_schema_has_one_handler(tmp_path):
    """The agent's actions are a table: each action the command schema accepts is answered at once
    (`control_actions`) or run as a job (`DEFAULT_JOBS`), never both, and nothing else is handled."""
    from blockskip.edge.agent import DEFAULT_JOBS, Agent, AgentConfig
    from blockskip.edge.messages import ACTIONS, JOB_ACTIONS

    agent = Agent(AgentConfig(device_id="dev-a", data_dir=str(tmp_path / "data")))
    control = set(agent.control_actions())
    assert control.isdisjoint(DEFAULT_JOBS) and set(DEFAULT_JOBS) == set(JOB_ACTIONS)
    assert control | set(DEFAULT_JOBS) == set(ACTIONS)
