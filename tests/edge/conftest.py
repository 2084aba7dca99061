"""Fixtures for the MQTT agent tests: a real mosquitto on a free loopback port, a probe client, test PKI."""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt

from blockskip.edge.agent import Agent, AgentConfig, BrokerConfig
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `predicate` until truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {getattr(predicate, '__name__', predicate)}")


class Broker:
    """A mosquitto process with persistence, restartable on the same port."""

    def __init__(self, workdir: Path, conf_text: str | None = None, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        (workdir / "persist").mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(conf_text or (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {workdir / 'persist'}/\n"
            f"user {getpass.getuser()}\nlog_dest file {workdir / 'mosquitto.log'}\n"
        ))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture
def broker(tmp_path: Path):
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


class Probe:
    """A test-side MQTT client: subscribes (persistent session, QoS 1) and records every message."""

    def __init__(self, port: int, topics: list[str], client_id: str = "probe", **connect: Any):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.topics = topics
        self.connected = threading.Event()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        wait_until(self.connected.is_set, 10)

    def _on_connect(self, client, userdata, flags, rc, props):
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self.topics])
            time.sleep(0.05)
            self.connected.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def on(self, suffix: str) -> list[dict]:
        """JSON payloads received on topics ending with `suffix`, in arrival order."""
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def send(self, topic: str, payload: bytes | str | dict, properties: Properties | None = None) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        self.client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(10)

    def request(self, device: str, command: dict, timeout: float = 10.0) -> dict:
        """Send a command and wait for its reply."""
        self.send(f"blockskip/{device}/cmd", command)
        return wait_until(lambda: next(iter(self.on(f"/reply/{command['id']}")), None), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probe_factory():
    made: list[Probe] = []

    def make(port: int, topics: list[str], client_id: str = "probe") -> Probe:
        p = Probe(port, topics, client_id)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# ---- test PKI --------------------------------------------------------------------------------

def _write_key_cert(dirpath: Path, name: str, subject_cn: str, issuer: tuple | None, ca: bool) -> tuple:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer_name, issuer_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (dirpath / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (dirpath / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """ca.crt/key, server.crt/key (CN localhost, SAN 127.0.0.1), client.crt/key, all signed by the CA."""
    d = tmp_path / "pki"
    d.mkdir()
    ca = _write_key_cert(d, "ca", "blockskip test CA", None, ca=True)
    _write_key_cert(d, "server", "localhost", ca, ca=False)
    _write_key_cert(d, "client", "dev-a", ca, ca=False)
    return d


def mosquitto_passwd(path: Path, users: dict[str, str]) -> None:
    """Write a mosquitto password file with the real mosquitto_passwd tool."""
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is needed"
    path.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True)
    os.chmod(path, 0o600)


# ---- the broker as deployed: TLS, passwords, the shipped ACL --------------------------------------

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
PASSWORDS = {"dev-a": "pa55-dev-a", "dev-b": "pa55-dev-b", "operator": "pa55-operator", "host-01": "pa55-host-01",
             "dev-a-cam-01": "pa55-cam-01", "dev-a-cam-02": "pa55-cam-02"}
# dev-a's two cameras, added to the shipped ACL as deploy/mosquitto/README.md says ("Adding a device").
CAMERA_ACL = "".join(f"\nuser dev-a-cam-{n}\ntopic write blockskip/dev-a/capture/cam-{n}\n"
                     f"topic read blockskip/dev-a/capture/ack\n" for n in ("01", "02"))


@pytest.fixture
def secure_broker(tmp_path, pki):
    """mosquitto running deploy/mosquitto/mosquitto.conf and acl.example, paths moved into tmp."""
    work = tmp_path / "secure"
    work.mkdir()
    (work / "blockskip.acl").write_text((DEPLOY / "acl.example").read_text() + CAMERA_ACL)
    mosquitto_passwd(work / "passwd", PASSWORDS)
    port = free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    for old, new in [("/etc/mosquitto/certs/", f"{pki}/"), ("/etc/mosquitto/", f"{work}/"),
                     ("/var/lib/mosquitto/", f"{work}/"), ("listener 8883", f"listener {port} 127.0.0.1"),
                     ("log_dest stderr", f"log_dest file {work}/log")]:
        assert old in conf, f"deploy/mosquitto/mosquitto.conf no longer has {old!r}"
        conf = conf.replace(old, new)
    broker = Broker(work, conf + f"\nuser {getpass.getuser()}\n", port=port)
    broker.start()
    yield broker
    broker.stop()


def settings(broker, pki: Path, user: str | None, password: str | None = None, tls: bool = True, **kw) -> BrokerConfig:
    return BrokerConfig(host="127.0.0.1", port=broker.port, keepalive=5, reconnect_min_s=0.2, reconnect_max_s=1,
                        ca_file=str(pki / "ca.crt") if tls else None, username=user,
                        password_env="TEST_MQTT_PASSWORD" if password else None, **kw)


def login(broker, pki: Path, user: str) -> BrokerConfig:
    """Settings for `user` with its own password (from a file next to the PKI, as on a device)."""
    password_file = pki / f"{user}.password"
    password_file.write_text(PASSWORDS[user] + "\n")
    return settings(broker, pki, user, None, password_file=str(password_file))


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    """`wait_until(predicate, timeout)` for the tests (tests/edge is not a package)."""
    return wait_until


@pytest.fixture
def mq():
    """The helpers of this file for tests that need more than the fixtures."""
    import types

    return types.SimpleNamespace(Broker=Broker, Probe=Probe, free_port=free_port, wait_until=wait_until,
                                 mosquitto_passwd=mosquitto_passwd, PASSWORDS=PASSWORDS, settings=settings,
                                 login=login)


# ---- the agent under test ------------------------------------------------------------------

def make_config(tmp_path: Path, broker, **kw) -> AgentConfig:
    fields = dict(device_id="dev-a", data_dir=str(tmp_path / "data"), progress_interval_s=0.0,
                  broker=BrokerConfig(host="127.0.0.1", port=broker.port, keepalive=5,
                                      reconnect_min_s=0.1, reconnect_max_s=0.5))
    fields.update(kw)
    return AgentConfig(**fields)


@pytest.fixture
def start_agent(tmp_path: Path, broker):
    """start_agent(jobs=None, **config) -> a started Agent for device dev-a on the test broker."""
    agents: list[Agent] = []

    def start(jobs=None, **kw) -> Agent:
        agent = Agent(make_config(tmp_path, broker, **kw), jobs=jobs)
        (agent.data_dir / "model").mkdir(exist_ok=True)
        agent.start()
        wait_until(agent.connected.is_set)
        agents.append(agent)
        return agent

    yield start
    for a in agents:
        if a.client.is_connected() or a._dispatcher.is_alive():
            a.stop(flush_timeout_s=1)


