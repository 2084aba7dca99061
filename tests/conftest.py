import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `from helpers import ...` from every test folder

import mqtt_harness as harness  # noqa: E402
from blockskip.models import Flux, Sana  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(params=[Flux, Sana], ids=["flux", "sana"])
def family(request):
    """A tiny model of each family, seeded, fp32 on CPU."""
    return request.param.tiny(seed=0)


@pytest.fixture
def flux():
    return Flux.tiny(seed=0)


@pytest.fixture
def sana():
    return Sana.tiny(seed=0)


# ---- MQTT: one harness (tests/mqtt_harness.py), these fixtures -------------------------------

@pytest.fixture
def broker(tmp_path: Path):
    """A plain mosquitto (anonymous, persistent) on a free loopback port, restartable."""
    b = harness.Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def probe_factory():
    made: list[harness.Probe] = []

    def make(port: int, topics: list[str], client_id: str = "probe") -> harness.Probe:
        p = harness.Probe(port, topics, client_id)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """ca.crt/key, server.crt/key (CN localhost, SAN 127.0.0.1), client.crt/key, all signed by the CA."""
    return harness.make_pki(tmp_path / "pki")


@pytest.fixture
def secure_broker(tmp_path, pki):
    """mosquitto running deploy/mosquitto/mosquitto.conf and acl.example (with dev-a's two cameras
    added as deploy/mosquitto/README.md says), paths moved into tmp."""
    acl = (harness.DEPLOY / "acl.example").read_text() + harness.CAMERA_ACL
    broker = harness.deployed_broker(tmp_path / "secure", pki, harness.PASSWORDS, acl)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(name="wait_until")
def wait_until_fixture():
    """`wait_until(predicate, timeout)`: poll until truthy or fail the test."""
    return harness.wait_until


@pytest.fixture
def mq():
    """The harness, for tests that need more than the fixtures."""
    return harness


BROKER_FIXTURES = {"broker", "secure_broker", "brokers"}  # each starts a real mosquitto


def pytest_collection_modifyitems(config, items):
    """`mqtt` on every test that starts mosquitto through a broker fixture: `-m "not mqtt"` runs
    where no mosquitto is installed."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mqtt)
