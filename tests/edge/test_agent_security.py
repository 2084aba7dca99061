"""TLS, passwords and the per-device ACL, with the broker configured from deploy/mosquitto/ itself."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from blockskip.edge.agent import Agent, AgentConfig, BrokerConfig, connect_properties, make_client

class Client:
    """A test client built with the agent's own make_client; records the CONNACK, SUBACK and messages."""

    def __init__(self, config: BrokerConfig, client_id: str, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                 session_expiry_s: int | None = None):
        self.connack: list = []
        self.suback: list = []
        self.messages: list[tuple[str, bytes]] = []
        self.disconnects: list = []  # reason codes of every lost connection (e.g. "Session taken over")
        self.event = threading.Event()
        self.client = make_client(config, client_id)
        self.client.on_connect = lambda c, u, f, rc, p: (self.connack.append(rc), self.event.set())
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnects.append(rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.suback.extend(rcs)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        properties = None if session_expiry_s is None else connect_properties(session_expiry_s)
        self.client.connect_async(config.host, config.port, config.keepalive, clean_start=clean_start,
                                  properties=properties)
        self.client.loop_start()

    def connected(self, timeout: float = 5.0) -> bool:
        self.event.wait(timeout)
        return bool(self.connack) and not self.connack[0].is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients():
    made: list[Client] = []

    def make(config: BrokerConfig, client_id: str, **kw) -> Client:
        made.append(Client(config, client_id, **kw))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.mark.slow
def test_wrong_password_and_plain_tcp_cannot_connect(secure_broker, pki, clients, monkeypatch, mq):
    monkeypatch.setenv("TEST_MQTT_PASSWORD", "not-the-password")
    wrong = clients(mq.settings(secure_broker, pki, "dev-a", "x"), "wrong")
    assert not wrong.connected() and wrong.connack and wrong.connack[0].is_failure
    monkeypatch.setenv("TEST_MQTT_PASSWORD", mq.PASSWORDS["dev-a"])
    plain = clients(mq.settings(secure_broker, pki, "dev-a", "x", tls=False), "plain")
    assert not plain.connected(2.0)
    anonymous = clients(mq.settings(secure_broker, pki, None), "anon")
    assert not anonymous.connected()
    good = clients(mq.settings(secure_broker, pki, "dev-a", "x"), "good")
    assert good.connected()


def test_device_credentials_are_confined_to_their_own_prefix(secure_broker, pki, clients, monkeypatch, mq):
    monkeypatch.setenv("TEST_MQTT_PASSWORD", mq.PASSWORDS["dev-b"])
    dev_b = clients(mq.settings(secure_broker, pki, "dev-b", "x"), "dev-b")
    assert dev_b.connected()
    dev_b.client.subscribe("blockskip/dev-b/#", qos=1)
    monkeypatch.setenv("TEST_MQTT_PASSWORD", mq.PASSWORDS["dev-a"])
    dev_a = clients(mq.settings(secure_broker, pki, "dev-a", "x"), "dev-a")
    assert dev_a.connected()
    dev_a.client.subscribe([("blockskip/dev-b/#", 1), ("blockskip/dev-a/#", 1)])
    mq.wait_until(lambda: len(dev_a.suback) == 2 and dev_b.suback)
    assert not dev_a.suback[1].is_failure  # (mosquitto 2.0 may grant the foreign wildcard; it delivers nothing)
    dev_b.client.publish("blockskip/dev-b/status", b"secret", qos=1).wait_for_publish(5)
    dev_a.client.publish("blockskip/dev-b/cmd", b'{"id":"x","action":"cancel"}', qos=1).wait_for_publish(5)
    dev_a.client.publish("blockskip/dev-a/status", b"mine", qos=1).wait_for_publish(5)
    mq.wait_until(lambda: dev_a.messages)
    time.sleep(0.3)
    assert dev_a.messages == [("blockskip/dev-a/status", b"mine")]  # nothing of dev-b
    assert [t for t, _ in dev_b.messages] == ["blockskip/dev-b/status"]  # dev-a's write was dropped


def test_agent_serves_over_tls_with_a_password_it_never_logs(secure_broker, pki, clients, tmp_path, monkeypatch, mq,
                                                             caplog):
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(mq.PASSWORDS["dev-a"] + "\n")
    broker_config = mq.settings(secure_broker, pki, "dev-a", None, cert_file=str(pki / "client.crt"),
                             key_file=str(pki / "client.key"))
    broker_config.password_file = str(password_file)
    caplog.set_level(logging.DEBUG)
    agent = Agent(AgentConfig(device_id="dev-a", data_dir=str(tmp_path / "data"), broker=broker_config))
    agent.client.enable_logger(logging.getLogger("paho.agent"))
    agent.start()
    try:
        mq.wait_until(agent.connected.is_set)
        monkeypatch.setenv("TEST_MQTT_PASSWORD", mq.PASSWORDS["operator"])
        op = clients(mq.settings(secure_broker, pki, "operator", "x"), "operator")
        assert op.connected()
        op.client.subscribe("blockskip/dev-a/#", qos=1)
        mq.wait_until(lambda: op.suback)
        op.client.publish("blockskip/dev-a/cmd", json.dumps({"id": "s", "action": "status"}), qos=1)
        reply = mq.wait_until(lambda: [json.loads(p) for t, p in op.messages if t.endswith("/reply/s")])
        assert reply[0]["ok"] and reply[0]["result"]["state"] == "online"
    finally:
        agent.stop(flush_timeout_s=1)
    assert caplog.records and mq.PASSWORDS["dev-a"] not in caplog.text


# ---- client ids are bound to logins -------------------------------------------------------------
# A valid login of another device or of a camera asks the broker for someone else's client id. Bound
# (use_username_as_clientid), it gets its own id instead, so the owner is neither kicked off nor has
# its persistent session (what is queued for it while it is offline) replaced.

def secure_agent(broker, pki: Path, tmp_path: Path, mq) -> Agent:
    """The agent of dev-a (client id dev-a), logged in as dev-a over TLS; started."""
    config = AgentConfig(device_id="dev-a", data_dir=str(tmp_path / "data"), broker=mq.login(broker, pki, "dev-a"))
    agent = Agent(config)
    agent.start()
    return agent


def replies(client: Client) -> set[str]:
    return {topic.rsplit("/", 1)[1] for topic, _ in client.messages if "/reply/" in topic}


def within(seconds: float, predicate) -> bool:
    """True as soon as predicate() holds; False after `seconds` (the assertion after it says what was missed)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("intruder", ["dev-b", "dev-a-cam-01"])
def test_another_login_cannot_kick_the_running_agent(intruder, secure_broker, pki, clients, tmp_path, mq):
    agent = secure_agent(secure_broker, pki, tmp_path, mq)
    try:
        mq.wait_until(agent.connected.is_set)
        drops = []
        on_disconnect = agent.client.on_disconnect
        agent.client.on_disconnect = lambda *a: (drops.append(a[3]), on_disconnect(*a))
        op = clients(mq.login(secure_broker, pki, "operator"), "operator")
        assert op.connected()
        op.client.subscribe("blockskip/dev-a/reply/+", qos=1)
        mq.wait_until(lambda: op.suback)
        # The intruder asks for client id dev-a; its paho loop reconnects whenever it is dropped.
        intruding = clients(mq.login(secure_broker, pki, intruder), "dev-a")
        assert intruding.connected()
        sent = {f"c{i}" for i in range(30)}
        for command_id in sorted(sent):
            op.client.publish("blockskip/dev-a/cmd", json.dumps({"id": command_id, "action": "status"}), qos=1)
            time.sleep(0.1)
        within(10, lambda: replies(op) >= sent)
        assert not sent - replies(op), f"{len(sent - replies(op))} of {len(sent)} commands never answered"
        assert drops == [], f"the agent was disconnected {len(drops)} times: {drops[:3]}"
        assert intruding.connected() and not intruding.disconnects  # its own session, left alone
    finally:
        agent.stop(flush_timeout_s=1)


@pytest.mark.parametrize("intruder", ["dev-b", "dev-a-cam-01"])
def test_another_login_cannot_wipe_the_commands_queued_for_the_offline_agent(intruder, secure_broker, pki, clients,
                                                                             tmp_path, mq):
    agent = secure_agent(secure_broker, pki, tmp_path, mq)
    mq.wait_until(agent.connected.is_set)
    agent.stop(flush_timeout_s=1)  # offline; its persistent session (subscribed to cmd) stays on the broker
    op = clients(mq.login(secure_broker, pki, "operator"), "operator")
    assert op.connected()
    op.client.subscribe("blockskip/dev-a/reply/+", qos=1)
    mq.wait_until(lambda: op.suback)
    queued = json.dumps({"id": "queued", "action": "status"})
    op.client.publish("blockskip/dev-a/cmd", queued, qos=1).wait_for_publish(5)
    wiping = clients(mq.login(secure_broker, pki, intruder), "dev-a", clean_start=True)  # a fresh session for "dev-a"
    assert wiping.connected()
    wiping.close()
    agent = secure_agent(secure_broker, pki, tmp_path, mq)  # back online: the queued command is delivered
    try:
        mq.wait_until(lambda: "queued" in replies(op), 10)
    finally:
        agent.stop(flush_timeout_s=1)


@pytest.mark.slow
@pytest.mark.parametrize("intruder", ["dev-a-cam-02", "dev-b"])
def test_another_login_cannot_take_over_a_cameras_session(intruder, secure_broker, pki, clients, mq):
    camera_login = mq.login(secure_broker, pki, "dev-a-cam-01")
    op = clients(mq.login(secure_broker, pki, "operator"), "operator")
    assert op.connected()
    camera = clients(camera_login, "dev-a-cam-01", clean_start=False, session_expiry_s=3600)
    assert camera.connected()
    camera.client.subscribe("blockskip/dev-a/capture/ack", qos=1)
    mq.wait_until(lambda: camera.suback)

    # Online: another login asking for the camera's client id does not drop the camera.
    intruding = clients(mq.login(secure_broker, pki, intruder), "dev-a-cam-01")
    assert intruding.connected()
    time.sleep(1.0)  # time for the intruder's paho loop to come back if it gets dropped
    op.client.publish("blockskip/dev-a/capture/ack", b"ack-1", qos=1).wait_for_publish(5)
    within(5, lambda: camera.messages)
    intruding.close()
    assert camera.disconnects == [], f"the camera was disconnected: {camera.disconnects[:3]}"
    assert camera.messages == [("blockskip/dev-a/capture/ack", b"ack-1")]

    # Offline: an ack queued for the camera survives another login's clean start with the camera's id.
    camera.close()
    op.client.publish("blockskip/dev-a/capture/ack", b"ack-2", qos=1).wait_for_publish(5)
    wiping = clients(mq.login(secure_broker, pki, intruder), "dev-a-cam-01", clean_start=True)
    assert wiping.connected()
    wiping.close()
    camera = clients(camera_login, "dev-a-cam-01", clean_start=False, session_expiry_s=3600)
    assert camera.connected()
    mq.wait_until(lambda: ("blockskip/dev-a/capture/ack", b"ack-2") in camera.messages, 5)


def test_the_field_loop_logins_from_the_shipped_acl(secure_broker, pki, clients, monkeypatch, mq):
    """A host worker's login (acl.example `host-01`) takes jobs through the shared subscription and
    publishes job statuses; a device's login can neither submit a job nor forge a job's status,
    and a camera's cannot either."""
    from blockskip.host.jobs import SUBMIT_TOPIC, share_topic, status_topic

    worker = clients(mq.login(secure_broker, pki, "host-01"), "host-01")
    operator = clients(mq.login(secure_broker, pki, "operator"), "operator")
    device = clients(mq.login(secure_broker, pki, "dev-a"), "dev-a")
    camera = clients(mq.login(secure_broker, pki, "dev-a-cam-01"), "dev-a-cam-01")
    assert all(c.connected() for c in (worker, operator, device, camera))
    worker.client.subscribe(share_topic("blockskip-host"), qos=1)
    operator.client.subscribe(status_topic("+"), qos=1)
    mq.wait_until(lambda: worker.suback and operator.suback)
    for intruder in (device, camera):
        intruder.client.publish(SUBMIT_TOPIC, b'{"id": "forged"}', qos=1).wait_for_publish(5)
        intruder.client.publish(status_topic("real"), b'{"state": "done"}', qos=1, retain=True).wait_for_publish(5)
    operator.client.publish(SUBMIT_TOPIC, b'{"id": "real"}', qos=1).wait_for_publish(5)
    worker.client.publish(status_topic("real"), b'{"state": "queued"}', qos=1, retain=True).wait_for_publish(5)
    mq.wait_until(lambda: worker.messages and operator.messages)
    time.sleep(0.3)
    assert worker.messages == [(SUBMIT_TOPIC, b'{"id": "real"}')]  # the forged jobs were dropped
    assert operator.messages == [(status_topic("real"), b'{"state": "queued"}')]  # only the worker's status
