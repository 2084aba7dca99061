"""Holes found by driving the agent from outside (issue 16): job output confined to job folders,
idempotent command ids, captures that cannot stall or bloat the agent, cancel at the next step,
deeply nested JSON, and jobs cut off by a kill."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from blockskip.edge.agent import JobContext
from blockskip.edge.messages import parse_command, CommandError
from helpers import gen, png_job

DEV = "dev-a"


def capture_props(**user) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = list(user.items())
    return props


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


# ---- 3. job output only in job folders ------------------------------------------------------

@pytest.mark.slow
def test_jobs_cannot_write_into_the_agents_own_state(broker, start_agent, probe_factory):
    agent = start_agent(jobs={"generate": png_job(), "train": png_job()})
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    targets = ["spool", ".", "outbox.sqlite3", "journal.sqlite3", "engines", "spool/x", "adapters/../spool",
               "adapters", "generated"]
    for i, out in enumerate(targets):
        reply = probe.request(DEV, gen(f"g{i}", out=out))
        assert reply["ok"] is False and reply["error"]["code"] == "bad_path", (out, reply)
    reply = probe.request(DEV, {"id": "t-gen", "action": "train", "args": {"bundle": "model", "out": "generated/x"}})
    assert reply["error"]["code"] == "bad_path" and "adapters/" in reply["error"]["message"], reply
    captures = probe.request(DEV, {"id": "caps", "action": "captures"})["result"]
    assert captures["total"] == 0 and not list((agent.data_dir / "spool").iterdir())
    assert probe.request(DEV, gen("ok", out="generated/mine"))["ok"]


# ---- 4. a reused command id runs nothing ----------------------------------------------------

@pytest.mark.slow
def test_a_repeated_command_id_gets_the_first_reply_and_runs_nothing(broker, start_agent, probe_factory, wait_until):
    runs = []

    def counting():
        inner = png_job()()

        def run(ctx: JobContext):
            runs.append(ctx.id)
            return inner(ctx)
        return run

    agent = start_agent(jobs={"generate": counting})
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    first = probe.request(DEV, gen("once", steps=2))
    wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "done"])
    probe.send(f"blockskip/{DEV}/cmd", gen("once", steps=2))
    probe.send(f"blockskip/{DEV}/cmd", gen("once", steps=9, seed=3))  # same id, other args: still a repeat
    replies = wait_until(lambda: len(probe.on("/reply/once")) == 3 and probe.on("/reply/once"))
    assert replies == [first] * 3 and runs == ["once"]
    refused = probe.request(DEV, {"id": "bad", "action": "captures", "args": {"limit": 0}})
    probe.send(f"blockskip/{DEV}/cmd", {"id": "bad", "action": "captures", "args": {"limit": 5}})
    assert wait_until(lambda: len(probe.on("/reply/bad")) == 2 and probe.on("/reply/bad")) == [refused] * 2

    agent.stop(flush_timeout_s=1)  # the window survives a restart
    start_agent(jobs={"generate": counting})
    probe.send(f"blockskip/{DEV}/cmd", gen("once", steps=2))
    wait_until(lambda: len(probe.on("/reply/once")) == 4)
    time.sleep(0.5)
    assert runs == ["once"] and len([e for e in probe.on("/progress") if e.get("type") == "done"]) == 1


@pytest.mark.slow
def test_a_command_id_is_forgotten_after_its_window(broker, start_agent, probe_factory, wait_until):
    runs = []

    def counting():
        inner = png_job()()
        return lambda ctx: (runs.append(ctx.id), inner(ctx))[1]

    start_agent(jobs={"generate": counting}, command_id_window_s=1.0)
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    assert probe.request(DEV, gen("g", steps=1))["ok"]
    wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "done"])
    time.sleep(1.2)
    probe.send(f"blockskip/{DEV}/cmd", gen("g", steps=1))
    wait_until(lambda: len([e for e in probe.on("/progress") if e.get("type") == "done"]) == 2)
    assert runs == ["g", "g"]


# ---- 5. captures ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_huge_image_in_a_small_file_is_refused_before_decoding(broker, start_agent, probe_factory, wait_until):
    agent = start_agent(max_capture_pixels=10_000_000)
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    bomb = png_bytes(12_000, 12_000)  # 144 megapixels in well under a megabyte
    assert len(bomb) < 1_000_000
    probe.send(f"blockskip/{DEV}/capture/cam-1", bomb, properties=capture_props(camera_id="cam-1"))
    ack = wait_until(lambda: probe.on("/capture/ack"))[0]
    assert ack["stored"] is False and ack["error"]["code"] == "too_large" and "pixels" in ack["error"]["message"]
    assert agent.spool.count() == 0


def test_commands_are_answered_while_a_capture_decodes(broker, start_agent, probe_factory, wait_until):
    start_agent(max_capture_pixels=80_000_000)
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    big = png_bytes(7_000, 7_000)  # 49 megapixels: accepted, but slow to decode
    probe.send(f"blockskip/{DEV}/capture/cam-1", big, properties=capture_props(camera_id="cam-1"))
    probe.send(f"blockskip/{DEV}/cmd", {"id": "quick", "action": "status"})
    wait_until(lambda: probe.on("/capture/ack"), 60)
    order = [t.rsplit("/", 1)[-1] for t, _, _ in probe.messages if t.endswith(("/reply/quick", "/capture/ack"))]
    assert order == ["quick", "ack"], f"the status command waited for the capture: {order}"


@pytest.mark.slow
@pytest.mark.parametrize("props, stored", [
    ({"capture_time": "2026-06-01T10:15:00Z", "gps": "52.37,4.89,3.5"}, True),
    ({"capture_time": "2026-06-01T10:15:00+02:00"}, True),
    ({"capture_time": "yesterday"}, False),
    ({"capture_time": "<script>alert(1)</script>"}, False),
    ({"gps": "52.37"}, False),
    ({"gps": "95,4.89"}, False),
    ({"gps": "52.37,4.89,nan"}, False),
    ({"gps": "lat,lon"}, False),
])
def test_capture_time_and_gps_are_validated(broker, start_agent, probe_factory, wait_until, props, stored):
    agent = start_agent()
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    probe.send(f"blockskip/{DEV}/capture/cam-1", png_bytes(8, 8), properties=capture_props(camera_id="cam-1", **props))
    ack = wait_until(lambda: probe.on("/capture/ack"))[0]
    assert ack["stored"] is stored, ack
    if stored:
        record = agent.spool.list()[1][0]
        assert {k: record[k] for k in props} == props
    else:
        assert ack["error"]["code"] == "bad_properties" and agent.spool.count() == 0


# ---- 6. cancel stops a generate at the next step ----------------------------------------------

def test_cancel_stops_a_real_generate_at_the_next_step(broker, start_agent, probe_factory, wait_until):
    from blockskip.models.pipeline import save_model, tiny_model

    agent = start_agent()
    save_model(tiny_model("flux"), agent.data_dir / "flux-model")
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    reply = probe.request(DEV, {"id": "long", "action": "generate", "args": {
        "model": "flux-model", "prompts": ["a photo of sks leaf"], "steps": 1000, "height": 16, "width": 16,
        "backend": "torch"}})
    assert reply["ok"], reply
    wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "progress" and e["step"] >= 5], 60)
    assert probe.request(DEV, {"id": "stop", "action": "cancel"})["ok"]
    end = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") in ("done", "cancelled")], 30)[-1]
    assert end["type"] == "cancelled" and end["result"] == {"images": 0}, end
    last = max(e["step"] for e in probe.on("/progress") if e.get("type") == "progress")
    assert last < 1000, "the image being sampled was finished anyway"
    assert not probe.on("/result")


# ---- 7. deeply nested JSON ----------------------------------------------------------------------

def test_deeply_nested_json_is_bad_json_not_internal(broker, start_agent, probe_factory, wait_until):
    payload = b"[" * 30_000 + b"]" * 30_000  # under the 64 KiB limit, too deep for the parser
    with pytest.raises(CommandError) as err:
        parse_command(payload)
    assert err.value.code == "bad_json"
    nested_args = b'{"id": "deep", "action": "status", "args": ' + b'{"a":' * 9_000 + b"1" + b"}" * 9_001
    start_agent()
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    probe.send(f"blockskip/{DEV}/cmd", payload)
    probe.send(f"blockskip/{DEV}/cmd", nested_args)
    events = wait_until(lambda: len(probe.on("/error")) == 2 and probe.on("/error"))
    assert [e["error"]["code"] for e in events] == ["bad_json", "bad_json"]
    assert probe.request(DEV, {"id": "alive", "action": "status"})["ok"]


# ---- 8. a job cut off by a kill gets its end on restart -----------------------------------------

def _agent_process(config):
    return subprocess.Popen([sys.executable, "-m", "blockskip", "agent", "--config", str(config)],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_training_job_killed_with_the_agent_ends_as_interrupted_or_resumes(broker, tmp_path, probe_factory,
                                                                           wait_until):
    from helpers import make_bundle

    data = tmp_path / "data"
    make_bundle(data / "work", "flux", 2, 1, samples=4)
    config = tmp_path / "agent.yaml"
    settings = {"device_id": DEV, "data_dir": str(data), "allow_unsigned_bundles": True, "progress_interval_s": 0,
                "broker": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5, "reconnect_min_s": 0.1}}
    config.write_text(json.dumps(settings))
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])

    def kill_during_training(proc, cid):
        reply = probe.request(DEV, {"id": cid, "action": "train", "args": {
            "bundle": "work/bundle", "out": f"adapters/{cid}", "steps": 100_000, "checkpoint_every": 1}}, 60)
        assert reply["ok"], reply
        wait_until(lambda: [e for e in probe.on("/progress") if e.get("job") == cid and e.get("step", 0) >= 2], 120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    proc = _agent_process(config)
    try:
        wait_until(lambda: [s for s in probe.on("/status") if s["state"] == "online"], 120)
        kill_during_training(proc, "tr")
        assert not [e for e in probe.on("/progress") if e.get("type") in ("done", "failed", "cancelled")]
        proc = _agent_process(config)
        end = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "failed"], 120)[-1]
        assert end["job"] == "tr" and end["error"]["code"] == "interrupted", end
        assert "resume" in end["error"]["message"] and "adapters/tr" in end["error"]["message"]
        assert probe.request(DEV, {"id": "st", "action": "status"}, 60)["result"]["job"] is None

        kill_during_training(proc, "tr2")  # now with resume_interrupted: the restart continues the job
        config.write_text(json.dumps({**settings, "resume_interrupted": True}))
        proc = _agent_process(config)
        wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "resumed" and e["job"] == "tr2"], 120)
        starts = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") == "start"
                                     and e.get("job") == "tr2"] [1:], 120)
        assert starts[0]["step"] >= 1, "training resumed from its checkpoint, not from step 0"
        assert probe.request(DEV, {"id": "cx", "action": "cancel"}, 60)["ok"]
        end = wait_until(lambda: [e for e in probe.on("/progress") if e.get("job") == "tr2"
                                  and e.get("type") in ("cancelled", "failed", "done")], 120)[-1]
        assert end["type"] == "cancelled", end
    finally:
        proc.kill()
        proc.wait()


def test_the_agents_login_must_be_its_device_id(tmp_path):
    from blockskip.edge.agent import AgentConfig, BrokerConfig
    from blockskip.errors import ConfigError

    with pytest.raises(ConfigError, match="must equal device_id"):
        AgentConfig(device_id=DEV, data_dir=str(tmp_path), broker=BrokerConfig(username="dev-b"))
    assert AgentConfig(device_id=DEV, data_dir=str(tmp_path), broker=BrokerConfig(username=DEV))


@pytest.mark.slow
@pytest.mark.parametrize("receive_maximum", [4, 16])
def test_a_broker_restart_under_load_redelivers_at_most_receive_maximum_and_loses_nothing(
        receive_maximum, broker, start_agent, wait_until):
    """1000 commands at ~400/s to an agent that handles ~200/s, the broker restarted halfway: every
    command is answered, and the agent sees few deliveries again: the `receive_maximum` it held
    unacknowledged, the one the sender may resend (it has one in flight), and what mosquitto 2.0.11
    (Debian 12) had pushed past the limit into the socket before it went. That broker honours the
    client's Receive Maximum only for the first window (measured: limit 4, 9 acks, 40 delivered),
    so the agent also holds to it itself. Measured here: limit 4: 2-22 again over 6 runs; limit 16:
    17-19 over 4 runs; without either: 256-313, the whole backlog."""
    import collections

    import paho.mqtt.client as mqtt

    agent = start_agent(receive_maximum=receive_maximum)
    seen: collections.Counter[str] = collections.Counter()
    handler = agent.client.on_message

    def count(client, userdata, msg):
        if msg.topic.endswith("/cmd"):
            seen[json.loads(msg.payload)["id"]] += 1
        handler(client, userdata, msg)

    agent.client.on_message = count
    handle_command = agent._handle_command

    def slow(payload: bytes) -> None:  # a board whose disk is slow: a backlog builds up behind it
        time.sleep(0.005)
        handle_command(payload)

    agent._handle_command = slow
    replies: set[str] = set()
    sender = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="load",
                         protocol=mqtt.MQTTv5)
    sender.max_inflight_messages_set(1)
    sender.reconnect_delay_set(0.05, 0.2)
    sender.on_message = lambda c, u, m: replies.add(m.topic.rsplit("/", 1)[1])
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    sender.on_connect = lambda c, u, f, rc, p: c.subscribe("blockskip/dev-a/reply/+", qos=1)
    sender.connect("127.0.0.1", broker.port, 5, clean_start=False, properties=props)
    sender.loop_start()
    try:
        wait_until(sender.is_connected)
        time.sleep(0.2)
        start = time.monotonic()
        for i in range(1000):
            sender.publish("blockskip/dev-a/cmd", json.dumps({"id": f"load-{i}", "action": "status"}), qos=1)
            if i == 500:
                broker.restart(down_s=0.3)
            time.sleep(max(0.0, start + (i + 1) / 400 - time.monotonic()))
        wait_until(lambda: len(replies) == 1000, 180, interval=0.2)
    finally:
        sender.disconnect()
        sender.loop_stop()
    assert set(seen) == {f"load-{i}" for i in range(1000)}
    duplicates = sum(n - 1 for n in seen.values())
    assert duplicates <= receive_maximum + 32, (duplicates, receive_maximum)
