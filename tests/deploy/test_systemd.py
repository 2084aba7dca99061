"""The systemd units under deploy/systemd pass `systemd-analyze verify` with no warning at all.

`verify` checks that ExecStart's binary exists, so the test verifies a temporary copy in which
/opt/blockskip/venv/bin/blockskip (the board's venv) points at this machine's `blockskip`;
everything else is the shipped unit. `verify` exits 0 on unknown keys and bad values (it only
warns), so any output counts as a failure; the broken-unit cases prove that this catches them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd (apt-get install systemd)")

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
BOARD_BLOCKSKIP = "/opt/blockskip/venv/bin/blockskip"


def localize(unit: Path, dest: Path) -> Path:
    """Copy a unit, pointing the board's venv at this machine's blockskip."""
    text = unit.read_text()
    if BOARD_BLOCKSKIP in text:
        local = shutil.which("blockskip")
        assert local, "blockskip is not installed here (pip install -e .)"
        text = text.replace(BOARD_BLOCKSKIP, local)
    out = dest / unit.name
    out.write_text(text)
    return out


def verify(unit: Path) -> str:
    """`systemd-analyze verify` output; '' means the unit is clean."""
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          cwd=unit.parent, timeout=60)
    return (proc.stdout + proc.stderr).strip() or ("" if proc.returncode == 0 else f"exit {proc.returncode}")


@pytest.mark.parametrize("name", ["blockskip-agent.service", "blockskip-mosquitto-bridge.service"])
def test_unit_verifies_clean(name, tmp_path):
    unit = localize(UNITS / name, tmp_path)
    if "/usr/sbin/mosquitto" in unit.read_text() and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("needs mosquitto installed (apt-get install mosquitto)")
    assert verify(unit) == ""


@pytest.mark.parametrize("name", ["blockskip-agent.service", "blockskip-mosquitto-bridge.service"])
def test_unit_is_hardened(name, tmp_path):
    """`systemd-analyze security` rates the unit at most 4.0 (its 'OK' band)."""
    unit = localize(UNITS / name, tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=40", str(unit)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr


def test_agent_unit_keeps_what_the_agent_needs():
    text = (UNITS / "blockskip-agent.service").read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))
    assert settings["Restart"] == "on-failure"
    assert settings["User"] == "blockskip" and settings["StateDirectory"] == "blockskip"
    assert "--config /etc/blockskip/agent.yaml" in settings["ExecStart"]
    # These would break the GPU (device nodes) or CUDA/TensorRT/ONNX Runtime (JIT code pages).
    for breaking in ("PrivateDevices", "MemoryDenyWriteExecute", "SystemCallFilter"):
        assert breaking not in settings, breaking


@pytest.mark.parametrize("mutation", [
    ("Restart=on-failure", "Restart=on-falure"),  # bad value
    ("ProtectHome=yes", "ProtectHom=yes"),  # misspelled key
    (BOARD_BLOCKSKIP, "/opt/blockskip/venv/bin/no-such-binary"),  # missing program
    ("ExecStart=" + BOARD_BLOCKSKIP, "ExecStart=blockskip/bin"),  # relative path
    ("[Service]", "[Servce]"),  # misspelled section
], ids=["bad-value", "unknown-key", "missing-binary", "relative-exec", "bad-section"])
def test_broken_unit_is_caught(mutation, tmp_path):
    old, new = mutation
    text = (UNITS / "blockskip-agent.service").read_text()
    assert old in text
    broken = tmp_path / "blockskip-agent.service"
    broken.write_text(text.replace(old, new, 1).replace(BOARD_BLOCKSKIP, shutil.which("blockskip") or "/bin/true"))
    assert verify(broken) != ""
