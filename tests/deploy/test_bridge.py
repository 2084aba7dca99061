"""deploy/systemd/mosquitto-bridge.conf against real brokers: the board's bridged mosquitto and the
central broker of deploy/mosquitto/mosquitto.conf (TLS + passwords + ACL), both on loopback, with
certificates made here.

The shipped configs are rendered as deploy/README.md says (placeholders and /etc paths replaced);
the test only moves their listeners to free ports and adds `user root` (mosquitto would otherwise
drop to the mosquitto user, which cannot read pytest's private temp dir).
"""

from __future__ import annotations

import datetime
import ipaddress
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

mqtt = pytest.importorskip("paho.mqtt.client")
x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto") or not shutil.which("mosquitto_passwd"),
                                reason="needs mosquitto (apt-get install mosquitto)")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
CENTRAL_CONF = DEPLOY.parent / "mosquitto" / "mosquitto.conf"
DEVICE = "field-07"
CAMERAS = {"cam1": "camera-secret", "cam2": "camera2-secret"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cert(subject: str, issuer_key, issuer_name, key, ca: bool, days: int = 2):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path, name: str) -> dict[str, Path]:
    """A CA and a server certificate for localhost / 127.0.0.1 signed by it (PEM files in d)."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{name} test CA", ca_key, None, ca_key, ca=True)
    server = _cert("localhost", ca_key, ca.subject, key, ca=False)
    paths = {"ca": d / f"{name}-ca.crt", "cert": d / f"{name}-server.crt", "key": d / f"{name}-server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def _passwd(path: Path, users: dict[str, str]) -> None:
    path.touch()
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", path, user, password], check=True, capture_output=True)


def _start(conf: Path, ports: list[int]):
    log = open(conf.with_suffix(".log"), "w")
    proc = subprocess.Popen(["mosquitto", "-c", conf], stdout=log, stderr=subprocess.STDOUT)
    for port in ports:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, conf.with_suffix(".log").read_text()
                time.sleep(0.05)
    return proc


class Client:
    """A paho MQTT v5 client that collects what it receives (and every time it was dropped).

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


@pytest.fixture
def brokers(tmp_path, request):
    """The central broker (deploy/mosquitto/, server cert from `central_ca`) + the board's broker.

    `brokers(where, ...)` connects a Client to "central", "local" (the agent's listener) or "lan" (the
    cameras' listener).
    """
    rogue = getattr(request, "param", False)
    pki = make_pki(tmp_path, "central")
    served = make_pki(tmp_path, "rogue") if rogue else pki  # rogue: the central broker's cert is not from our CA
    central_port, local_port, lan_port = _free_port(), _free_port(), _free_port()
    _passwd(tmp_path / "central.passwd", {DEVICE: "device-secret", "operator": "operator-secret"})
    shutil.copy(CENTRAL_CONF.parent / "acl.example", tmp_path / "central.acl")
    (tmp_path / "central-db").mkdir()
    central = CENTRAL_CONF.read_text()
    for key, value in {"/etc/mosquitto/certs/ca.crt": served["ca"], "/etc/mosquitto/certs/server.crt": served["cert"],
                       "/etc/mosquitto/certs/server.key": served["key"],
                       "/etc/mosquitto/passwd": tmp_path / "central.passwd",
                       "/etc/mosquitto/blockskip.acl": tmp_path / "central.acl",
                       "/var/lib/mosquitto/": f"{tmp_path / 'central-db'}/",
                       "listener 8883": f"listener {central_port} 127.0.0.1"}.items():
        assert key in central, f"deploy/mosquitto/mosquitto.conf no longer has {key!r}"
        central = central.replace(key, str(value))
    (tmp_path / "central.conf").write_text("user root\n" + central)

    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    shutil.copy(pki["ca"], etc / "tls" / "ca.crt")
    _passwd(etc / "cameras.passwd", CAMERAS)
    (etc / "cameras.acl").write_text((DEPLOY / "cameras.acl").read_text().replace("@DEVICE_ID@", DEVICE))
    conf = (DEPLOY / "mosquitto-bridge.conf").read_text()
    for key, value in {"@DEVICE_ID@": DEVICE, "@CENTRAL_HOST@": "localhost", "@CENTRAL_PORT@": str(central_port),
                       "@BRIDGE_PASSWORD@": "device-secret", "/etc/blockskip/mosquitto/": f"{etc}/",
                       "/var/lib/blockskip-mosquitto/": f"{tmp_path}/"}.items():
        conf = conf.replace(key, value)
    assert "@" not in re.sub(r"#.*", "", conf), "a placeholder was left in the rendered config"
    conf, n = re.subn(r"^listener 1883 ", f"listener {local_port} ", conf, flags=re.M)
    conf, m = re.subn(r"^listener 1884$", f"listener {lan_port} 127.0.0.1", conf, flags=re.M)
    assert n == m == 1, "the shipped config must keep its two listeners"
    (tmp_path / "board.conf").write_text("user root\n" + conf)

    procs = [_start(tmp_path / "central.conf", [central_port]), _start(tmp_path / "board.conf", [local_port, lan_port])]
    clients = []

    def connect(where, *args, **kwargs):
        port = {"central": central_port, "local": local_port, "lan": lan_port}[where]
        client = Client(port, *args, ca=served["ca"] if where == "central" else None, **kwargs)
        clients.append(client)
        return client

    connect.ports = {"central": central_port, "local": local_port, "lan": lan_port}
    yield connect
    for client in clients:
        client.close()
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_bridge_relays_device_topics_over_tls(brokers):
    central = brokers("central", "operator", "operator-secret")
    central.subscribe("blockskip/#")
    assert central.wait_for(f"blockskip/{DEVICE}/bridge", "1") == "1", "the bridge did not connect over TLS"

    # Up: the agent's publish on the loopback listener reaches the central broker.
    agent = brokers("local")
    agent.subscribe(f"blockskip/{DEVICE}/cmd")
    agent.publish(f"blockskip/{DEVICE}/status", '{"state": "idle"}')
    assert central.wait_for(f"blockskip/{DEVICE}/status") == '{"state": "idle"}'

    # A camera with its password publishes its own captures; the ACL keeps it off other topics.
    camera = brokers("lan", "cam1", "camera-secret")
    camera.publish(f"blockskip/{DEVICE}/capture/cam1", "jpeg-bytes")
    assert central.wait_for(f"blockskip/{DEVICE}/capture/cam1") == "jpeg-bytes"
    camera.publish(f"blockskip/{DEVICE}/cmd", "forged command")
    camera.publish(f"blockskip/{DEVICE}/capture/cam2", "impersonation")
    # Only the device's own prefix goes up.
    agent.publish("blockskip/other-device/status", "not ours")

    # Down: a command from the fleet reaches the agent once, and is not echoed back up.
    central.publish(f"blockskip/{DEVICE}/cmd", '{"id": "c1"}')
    assert agent.wait_for(f"blockskip/{DEVICE}/cmd") == '{"id": "c1"}'
    seen_central = central.drain(1.5)
    seen_agent = agent.drain(0.1)
    assert seen_central.count((f"blockskip/{DEVICE}/cmd", '{"id": "c1"}')) == 1, seen_central
    assert all(payload not in ("forged command", "impersonation", "not ours") for _, payload in seen_central)
    assert seen_agent == [], "the forged camera command must not reach the agent"


def test_camera_needs_its_password(brokers):
    def pub(*auth):
        return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(brokers.ports["lan"]), "-q", "1",
                               *auth, "-t", f"blockskip/{DEVICE}/capture/cam1", "-m", "x"],
                              capture_output=True, text=True, timeout=10)

    assert pub("-u", "cam1", "-P", "camera-secret").returncode == 0
    for auth in (("-u", "cam1", "-P", "wrong"), ()):
        result = pub(*auth)
        assert result.returncode != 0 and "not authorised" in result.stderr.lower(), result


@pytest.mark.parametrize("brokers", [True], indirect=True, ids=["central-cert-from-another-ca"])
def test_bridge_refuses_a_central_broker_it_cannot_verify(brokers):
    # The central broker presents a certificate that our CA did not sign (a man in the middle):
    # the bridge must not connect, so nothing the board publishes reaches it.
    central = brokers("central", "operator", "operator-secret")  # the operator itself trusts the other CA
    central.subscribe("blockskip/#")
    agent = brokers("local")
    agent.publish(f"blockskip/{DEVICE}/status", "must not leave the board")
    seen = central.drain(4.0)
    assert seen == [], seen


@pytest.mark.parametrize("owner", ["agent", "camera"])
def test_a_camera_login_cannot_take_over_the_agents_or_another_cameras_client_id(brokers, owner):
    # Client ids are one namespace across the board broker's listeners. The LAN listener binds them to
    # the camera's login, so cam2 asking for the agent's id (field-07) or cam1's gets its own instead.
    central = brokers("central", "operator", "operator-secret")
    central.subscribe(f"blockskip/{DEVICE}/bridge")
    assert central.wait_for(f"blockskip/{DEVICE}/bridge", "1") == "1", "the bridge did not connect"
    if owner == "agent":  # the agent on the loopback listener; its commands come from the fleet
        where, login, client_id = "local", (), DEVICE
        topic, send = f"blockskip/{DEVICE}/cmd", central.publish
    else:  # camera cam1 on the LAN listener; its acks come from the agent on the board
        where, login, client_id = "lan", ("cam1", CAMERAS["cam1"]), "cam1"
        topic, send = f"blockskip/{DEVICE}/capture/ack", brokers("local").publish
    observer = brokers("local")
    observer.subscribe(topic)

    def connect_owner():
        return brokers(where, *login, client_id=client_id, clean_start=False, session_expiry=3600)

    # Online: the owner is not dropped and keeps getting its messages.
    owner_client = connect_owner()
    owner_client.subscribe(topic)
    intruder = brokers("lan", "cam2", CAMERAS["cam2"], client_id=client_id)  # paho reconnects it if dropped
    time.sleep(1.0)
    send(topic, "while-online")
    owner_client.wait_for(topic, "while-online", timeout=5)
    intruder.close()
    assert owner_client.disconnects == [], f"the {owner} was dropped: {owner_client.disconnects[:3]}"

    # Offline: what is queued for the owner survives a clean start in its name.
    owner_client.close()
    send(topic, "while-offline")
    assert observer.wait_for(topic, "while-offline") == "while-offline"  # on the board, queued for the owner
    brokers("lan", "cam2", CAMERAS["cam2"], client_id=client_id, clean_start=True).close()
    assert connect_owner().wait_for(topic, "while-offline") == "while-offline", "the queued message was wiped"
