"""The MQTT test harness, one copy: a real mosquitto on free loopback ports (plain, or as deployed:
deploy/mosquitto/mosquitto.conf with TLS, passwords and the shipped ACL), test PKI, and test-side
clients. The fixtures that use it are in tests/conftest.py; `from mqtt_harness import ...` where a
test needs more than a fixture."""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockskip.mqtt import BrokerConfig

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

    def __init__(self, workdir: Path, conf_text: str | None = None, port: int | None = None,
                 also_ports: tuple[int, ...] = ()):
        self.workdir = workdir
        self.port = port or free_port()
        self.also_ports = tuple(also_ports)  # further listeners of `conf_text` to wait for
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
        for port in (self.port, *self.also_ports):
            deadline = time.monotonic() + 10
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mosquitto did not start listening on {port}") from None
                    time.sleep(0.02)

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


class RawClient:
    """A paho MQTT v5 client that collects (topic, text) pairs in a queue, and every time it was dropped.

    With a `session_expiry` it keeps a persistent session, like the agent and the cameras; paho's
    loop reconnects it whenever it is dropped.
    """

    def __init__(self, port, username=None, password=None, ca=None, client_id="",
                 clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, session_expiry=None):
        self.messages: queue.Queue = queue.Queue()
        self.subscribed = threading.Event()
        self.connected = threading.Event()
        self.disconnects: list = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if ca:
            self.c.tls_set(ca_certs=str(ca))
        if username:
            self.c.username_pw_set(username, password)
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload.decode()))
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        properties = None
        if session_expiry is not None:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry
        self.c.connect("localhost" if ca else "127.0.0.1", port, clean_start=clean_start, properties=properties)
        self.c.loop_start()
        assert self.connected.wait(5), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.connected.clear()
        self.disconnects.append(reason_code)

    def subscribe(self, topic):
        self.subscribed.clear()
        self.c.subscribe(topic, qos=1)
        assert self.subscribed.wait(5), "no SUBACK"

    def publish(self, topic, payload):
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def wait_for(self, topic, payload=None, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if got[0] == topic and (payload is None or got[1] == payload):
                return got[1]
        return None

    def drain(self, seconds):
        time.sleep(seconds)
        out = []
        while not self.messages.empty():
            out.append(self.messages.get())
        return out

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


# ---- test PKI and the broker as deployed ----------------------------------------------------

def write_key_cert(dirpath: Path, name: str, subject_cn: str, issuer: tuple | None, ca: bool) -> tuple:
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

def make_pki(d: Path, name: str = "blockskip test") -> Path:
    """In folder d: ca.crt/key ("<name> CA"), server.crt/key (CN localhost, SAN 127.0.0.1) and
    client.crt/key, both signed by the CA."""
    d.mkdir(parents=True, exist_ok=True)
    ca = write_key_cert(d, "ca", f"{name} CA", None, ca=True)
    write_key_cert(d, "server", "localhost", ca, ca=False)
    write_key_cert(d, "client", "dev-a", ca, ca=False)
    return d


def mosquitto_passwd(path: Path, users: dict[str, str]) -> None:
    """Write a mosquitto password file with the real mosquitto_passwd tool."""
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is needed"
    path.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True)
    os.chmod(path, 0o600)


DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
PASSWORDS = {"dev-a": "pa55-dev-a", "dev-b": "pa55-dev-b", "operator": "pa55-operator", "host-01": "pa55-host-01",
             "dev-a-cam-01": "pa55-cam-01", "dev-a-cam-02": "pa55-cam-02"}
# dev-a's two cameras, added to the shipped ACL as deploy/mosquitto/README.md says ("Adding a device").
CAMERA_ACL = "".join(f"\nuser dev-a-cam-{n}\ntopic write blockskip/dev-a/capture/cam-{n}\n"
                     f"topic read blockskip/dev-a/capture/ack\n" for n in ("01", "02"))

def deployed_broker(work: Path, certs: Path, users: dict[str, str], acl: str | None = None,
                    port: int | None = None) -> Broker:
    """mosquitto running deploy/mosquitto/mosquitto.conf as deploy/mosquitto/README.md installs it,
    its paths moved into `work` (passwords for `users`, the ACL `acl` or acl.example), TLS from
    `certs` (ca.crt, server.crt, server.key), on a free loopback port. Not started."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "blockskip.acl").write_text(acl if acl is not None else (DEPLOY / "acl.example").read_text())
    mosquitto_passwd(work / "passwd", users)
    port = port or free_port()
    conf = (DEPLOY / "mosquitto.conf").read_text()
    for old, new in [("/etc/mosquitto/certs/", f"{certs}/"), ("/etc/mosquitto/", f"{work}/"),
                     ("/var/lib/mosquitto/", f"{work}/"), ("listener 8883", f"listener {port} 127.0.0.1"),
                     ("log_dest stderr", f"log_dest file {work}/log")]:
        assert old in conf, f"deploy/mosquitto/mosquitto.conf no longer has {old!r}"
        conf = conf.replace(old, new)
    return Broker(work, conf + f"\nuser {getpass.getuser()}\n", port=port)


def settings(broker, pki: Path, user: str | None, password: str | None = None, tls: bool = True, **kw) -> BrokerConfig:
    return BrokerConfig(host="127.0.0.1", port=broker.port, keepalive=5, reconnect_min_s=0.2, reconnect_max_s=1,
                        ca_file=str(pki / "ca.crt") if tls else None, username=user,
                        password_env="TEST_MQTT_PASSWORD" if password else None, **kw)


def login(broker, pki: Path, user: str) -> BrokerConfig:
    """Settings for `user` with its own password (from a file next to the PKI, as on a device)."""
    password_file = pki / f"{user}.password"
    password_file.write_text(PASSWORDS[user] + "\n")
    return settings(broker, pki, user, None, password_file=str(password_file))
