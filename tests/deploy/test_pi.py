"""The agent config that deploy/pi/install.sh writes loads in the real agent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

agent = pytest.importorskip("blockskip.edge.agent")

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "pi" / "agent.yaml"


def test_pi_default_config_loads(tmp_path):
    text = TEMPLATE.read_text()
    for key, value in {"@DEVICE_ID@": "field-07", "@BROKER_HOST@": "mqtt.example.org", "@BROKER_PORT@": "8883"}.items():
        text = text.replace(key, value)
    from blockskip.host.bundle import generate_keypair

    generate_keypair(tmp_path / "host.key", tmp_path / "host.pub")  # install.sh says to put it there
    assert "/etc/blockskip/host.pub" in text, "the board trusts the host's key by default"
    text = text.replace("/etc/blockskip/host.pub", str(tmp_path / "host.pub"))
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder was left"
    (tmp_path / "agent.yaml").write_text(text)
    config = agent.load_config(tmp_path / "agent.yaml")
    assert config.device_id == "field-07"
    assert config.data_dir == "/var/lib/blockskip"
    assert config.backend == "onnxruntime", "CPU boards generate through ONNX Runtime by default"
    assert config.broker.host == "mqtt.example.org" and config.broker.port == 8883
    assert config.broker.ca_file and config.broker.password_file and config.broker.username == "field-07"
    assert config.trust_policy().keys and not config.allow_unsigned_bundles
