"""The agent config that deploy/pi/install.sh writes loads in the real agent."""

from __future__ import annotations

import re
import subprocess
import sys
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


INSTALL = TEMPLATE.parent / "install.sh"
TORCH_WHEEL = TEMPLATE.parent / "torch_wheel.py"


def _torch_wheel(*args):
    return subprocess.run([sys.executable, str(TORCH_WHEEL), "--machine", "aarch64", "--python-version", "3.11", *args],
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_the_torch_a_pi_install_picks_is_a_cpu_build_on_aarch64():
    """What install.sh would install on a Pi, read from the wheel's own metadata through pip's
    dry-run report (PyPI, aarch64, Python 3.11 as on bookworm): no nvidia-* or triton requirement
    applies. The same check refuses 2.13.0, whose aarch64 wheel is a CUDA 13 build."""
    spec, index = subprocess.run(["bash", str(INSTALL), "--print-torch", "aarch64"], capture_output=True, text=True,
                                 check=True).stdout.split()
    chosen = _torch_wheel("--index-url", index, spec)
    assert chosen.returncode == 0, chosen.stderr
    assert "aarch64.whl: a CPU build on aarch64" in chosen.stdout
    cuda = _torch_wheel("--index-url", "https://pypi.org/simple", "torch==2.13.0")
    assert cuda.returncode == 1 and "a CUDA build on aarch64" in cuda.stderr and "nvidia-" in cuda.stderr
