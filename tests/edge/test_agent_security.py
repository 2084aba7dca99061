"""TLS, passwords and the per-device ACL, with the broker configured from deploy/mosquitto/ itself."""

from __future__ import annotations

import getpass
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest

from blockskip.edge.agent import Agent, AgentConfig, BrokerConfig, make_client

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
PASSWORDS = {"dev-a": "pa55-dev-a", "dev-b": "pa55-dev-b", "operator": "pa55-operator"}


@pytest.fixture
def secure_broker(tmp_path, pki, mq):
    """mosquitto running deploy/mosquitto/mosquitto.conf and acl.example, paths moved into tmp."""
    work = tmp_path / "secure"
    work.mkdir()
    shutil.copy(DEPLOY / "acl.example", work / "blockskip.acl")
    mq.mosquitto_passwd(work / "passwd", PASSWORDS)
    port = mq.free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    for old, new in [("/etc/mosquitto/certs/", f"{pki}/"), ("/etc/mosquitto/", f"{work}/"),
                     ("/var/lib/mosquitto/", f"{work}/"), ("listener 8883", f"listener {port} 127.0.0.1"),
                     ("log_dest stderr", f"log_dest file {work}/log")]:
        assert old in conf, f"deploy/mosquitto/mosquitto.conf no longer has {old!r}"
        conf = conf.replace(old, new)
    broker = mq.Broker(work, conf + f"\nuser {getpass.getuser()}\n", port=port)
    broker.start()
    yield broker
    broker.stop()


def settings(broker, pki: Path, user: str | None, password: str | None = None, tls: bool = True, **kw) -> BrokerConfig:
    return BrokerConfig(host="127.0.0.1", port=broker.port, keepalive=5, reconnect_min_s=0.2, reconnect_max_s=1,
                        ca_file=str(pki / "ca.crt") if tls else None, username=user,
                        password_env="TEST_MQTT_PASSWORD" if password else None, **kw)


class Client:
    """A test client built with the agent's own make_client; records the CONNACK, SUBACK and messages."""

    def __init__(self, config: BrokerConfig, client_id: str):
        self.connack: list = []
        self.suback: list = []
        self.messages: list[tuple[str, bytes]] = []
        self.event = threading.Event()
        self.client = make_client(config, client_id)
        self.client.on_connect = lambda c, u, f, rc, p: (self.connack.append(rc), self.event.set())
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.suback.extend(rcs)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect_async(config.host, config.port, config.keepalive)
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

    def make(config: BrokerConfig, client_id: str) -> Client:
        made.append(Client(config, client_id))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_wrong_password_and_plain_tcp_cannot_connect(secure_broker, pki, clients, monkeypatch):
    monkeypatch.setenv("TEST_MQTT_PASSWORD", "not-the-password")
    wrong = clients(settings(secure_broker, pki, "dev-a", "x"), "wrong")
    assert not wrong.connected() and wrong.connack and wrong.connack[0].is_failure
    monkeypatch.setenv("TEST_MQTT_PASSWORD", PASSWORDS["dev-a"])
    plain = clients(settings(secure_broker, pki, "dev-a", "x", tls=False), "plain")
    assert not plain.connected(2.0)
    anonymous = clients(settings(secure_broker, pki, None), "anon")
    assert not anonymous.connected()
    good = clients(settings(secure_broker, pki, "dev-a", "x"), "good")
    assert good.connected()


def test_device_credentials_are_confined_to_their_own_prefix(secure_broker, pki, clients, monkeypatch, mq):
    monkeypatch.setenv("TEST_MQTT_PASSWORD", PASSWORDS["dev-b"])
    dev_b = clients(settings(secure_broker, pki, "dev-b", "x"), "dev-b")
    assert dev_b.connected()
    dev_b.client.subscribe("blockskip/dev-b/#", qos=1)
    monkeypatch.setenv("TEST_MQTT_PASSWORD", PASSWORDS["dev-a"])
    dev_a = clients(settings(secure_broker, pki, "dev-a", "x"), "dev-a")
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
    password_file.write_text(PASSWORDS["dev-a"] + "\n")
    broker_config = settings(secure_broker, pki, "dev-a", None, cert_file=str(pki / "client.crt"),
                             key_file=str(pki / "client.key"))
    broker_config.password_file = str(password_file)
    caplog.set_level(logging.DEBUG)
    agent = Agent(AgentConfig(device_id="dev-a", data_dir=str(tmp_path / "data"), broker=broker_config))
    agent.client.enable_logger(logging.getLogger("paho.agent"))
    agent.start()
    try:
        mq.wait_until(agent.connected.is_set)
        monkeypatch.setenv("TEST_MQTT_PASSWORD", PASSWORDS["operator"])
        op = clients(settings(secure_broker, pki, "operator", "x"), "operator")
        assert op.connected()
        op.client.subscribe("blockskip/dev-a/#", qos=1)
        mq.wait_until(lambda: op.suback)
        op.client.publish("blockskip/dev-a/cmd", json.dumps({"id": "s", "action": "status"}), qos=1)
        reply = mq.wait_until(lambda: [json.loads(p) for t, p in op.messages if t.endswith("/reply/s")])
        assert reply[0]["ok"] and reply[0]["result"]["state"] == "online"
    finally:
        agent.stop(flush_timeout_s=1)
    assert caplog.records and PASSWORDS["dev-a"] not in caplog.text
