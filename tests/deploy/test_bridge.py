"""deploy/systemd/mosquitto-bridge.conf against real brokers: the board's bridged mosquitto and the
central broker of deploy/mosquitto/mosquitto.conf (TLS + passwords + ACL), both on loopback, with
certificates made here.

The shipped configs are rendered as deploy/README.md says (placeholders and /etc paths replaced);
the test only moves their listeners to free ports and adds `user root` (mosquitto would otherwise
drop to the mosquitto user, which cannot read pytest's private temp dir).
"""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mqtt_harness import Broker, RawClient, deployed_broker, free_port, make_pki, mosquitto_passwd

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto") or not shutil.which("mosquitto_passwd"),
                                reason="needs mosquitto (apt-get install mosquitto)")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
DEVICE = "field-07"
CAMERAS = {"cam1": "camera-secret", "cam2": "camera2-secret"}


@pytest.fixture
def brokers(tmp_path, request):
    """The central broker (deploy/mosquitto/, server cert from `central_ca`) + the board's broker.

    `brokers(where, ...)` connects a RawClient to "central", "local" (the agent's listener) or "lan"
    (the cameras' listener).
    """
    rogue = getattr(request, "param", False)
    pki = make_pki(tmp_path / "central-pki", "central test")
    served = make_pki(tmp_path / "rogue-pki", "rogue test") if rogue else pki  # rogue: not from our CA
    central = deployed_broker(tmp_path / "central", served, {DEVICE: "device-secret", "operator": "operator-secret"})
    local_port, lan_port = free_port(), free_port()

    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    shutil.copy(pki / "ca.crt", etc / "tls" / "ca.crt")
    mosquitto_passwd(etc / "cameras.passwd", CAMERAS)
    (etc / "cameras.acl").write_text((DEPLOY / "cameras.acl").read_text().replace("@DEVICE_ID@", DEVICE))
    conf = (DEPLOY / "mosquitto-bridge.conf").read_text()
    for key, value in {"@DEVICE_ID@": DEVICE, "@CENTRAL_HOST@": "localhost", "@CENTRAL_PORT@": str(central.port),
                       "@BRIDGE_PASSWORD@": "device-secret", "/etc/blockskip/mosquitto/": f"{etc}/",
                       "/var/lib/blockskip-mosquitto/": f"{tmp_path}/"}.items():
        conf = conf.replace(key, value)
    assert "@" not in re.sub(r"#.*", "", conf), "a placeholder was left in the rendered config"
    conf, n = re.subn(r"^listener 1883 ", f"listener {local_port} ", conf, flags=re.M)
    conf, m = re.subn(r"^listener 1884$", f"listener {lan_port} 127.0.0.1", conf, flags=re.M)
    assert n == m == 1, "the shipped config must keep its two listeners"
    board = Broker(tmp_path / "board", conf + f"\nuser {getpass.getuser()}\n", port=local_port, also_ports=(lan_port,))
    central.start()
    board.start()
    clients = []
    ports = {"central": central.port, "local": local_port, "lan": lan_port}

    def connect(where, *args, **kwargs):
        client = RawClient(ports[where], *args, ca=served / "ca.crt" if where == "central" else None, **kwargs)
        clients.append(client)
        return client

    connect.ports = ports
    yield connect
    for client in clients:
        client.close()
    board.stop()
    central.stop()


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
