"""`blockskip deploy` against a real sshd on loopback (the "board" is a temporary directory here).

The test starts its own `/usr/sbin/sshd` with a fresh host key and an authorized client key, so
it needs root (CI runs as root), openssh-server and rsync.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockskip.cli import main
from mqtt_harness import free_port

SSHD = "/usr/sbin/sshd"
pytestmark = [
    pytest.mark.skipif(not Path(SSHD).exists() or not shutil.which("rsync"),
                       reason="needs openssh-server and rsync (apt-get install openssh-server rsync)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starts sshd, which needs root"),
]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """A real sshd on a free loopback port; yields the ssh arguments for `blockskip deploy`."""
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host_key"], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "client_key"], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin yes\nStrictModes no\nUsePAM no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", d / "sshd_config"], stderr=open(d / "sshd.log", "w"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert proc.poll() is None, (d / "sshd.log").read_text()
            time.sleep(0.05)
    ssh_args = ["--port", str(port), "--identity", str(d / "client_key"),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    yield ssh_args
    proc.terminate()
    proc.wait(timeout=10)


def make_bundle(path: Path, sizes=(1_500_000, 1_200_000, 900_000, 4096), seed=0) -> Path:
    """A bundle directory: a few files of random bytes and manifest.json with their sha256 and size."""
    rng = __import__("random").Random(seed)
    files = {}
    for i, size in enumerate(sizes):
        rel = f"shards/shard-{i:03d}.safetensors" if i else "base/kept_blocks.safetensors"
        data = rng.randbytes(size)
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
        files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size}
    (path / "manifest.json").write_text(json.dumps({"format": 1, "files": files}, indent=1))
    return path


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def on_board(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def deploy(board, bundle, dest, *extra) -> int:
    return main(["deploy", str(bundle), f"127.0.0.1:{dest}", *board, *extra])


@pytest.mark.slow
def test_fresh_copy_verifies_and_installs(board, tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle")
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: field-07\nbackend: onnxruntime\n")
    dest = tmp_path / "board" / "bundles" / "maize"
    dest.parent.mkdir(parents=True)
    assert deploy(board, bundle, dest, "--config", str(config),
                  "--config-dest", str(tmp_path / "board/etc/agent.yaml")) == 0
    assert tree(dest) == tree(bundle)
    assert (tmp_path / "board/etc/agent.yaml").read_bytes() == config.read_bytes()
    assert not Path(f"{dest}.incoming").exists()
    assert "verified 4 files" in capsys.readouterr().out

    # A second deploy of a changed bundle replaces it; unchanged files are not sent again.
    (bundle / "shards/shard-003.safetensors").write_bytes(b"x" * 4096)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["shards/shard-003.safetensors"]["sha256"] = hashlib.sha256(b"x" * 4096).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert deploy(board, bundle, dest) == 0
    assert tree(dest) == tree(bundle)
    out = capsys.readouterr().out
    sent = int(out.split("copied ")[1].split(" new bytes")[0].replace(",", ""))
    assert sent < 100_000, out


@pytest.mark.slow
def test_interrupted_copy_resumes(board, tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle", sizes=(2_000_000, 2_000_000, 1_000_000), seed=1)
    dest = tmp_path / "board" / "maize"
    dest.parent.mkdir()
    # Throttled to ~1 MB/s and killed (the whole process group: python, rsync, ssh) mid-transfer.
    cmd = [sys.executable, "-m", "blockskip", "deploy", str(bundle), f"127.0.0.1:{dest}", *board, "--bwlimit", "1000"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    staging = Path(f"{dest}.incoming")
    deadline = time.monotonic() + 60
    while on_board(staging) < 1_500_000 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)  # the board-side rsync notices the dead connection and keeps its partial file
    kept = on_board(staging)
    assert not dest.exists(), "an interrupted copy must not appear at the destination"
    assert 0 < kept < 5_000_000, kept

    assert deploy(board, bundle, dest) == 0
    assert tree(dest) == tree(bundle)
    out = capsys.readouterr().out
    sent = int(out.split("copied ")[1].split(" new bytes")[0].replace(",", ""))
    assert sent <= 5_000_000 - kept + 100_000, (sent, kept, out)


@pytest.mark.slow
def test_corrupt_source_fails_and_keeps_live_bundle(board, tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle", seed=2)
    dest = tmp_path / "board" / "maize"
    dest.parent.mkdir()
    assert deploy(board, bundle, dest) == 0
    live = tree(dest)

    new = make_bundle(tmp_path / "new", seed=3)
    shard = new / "shards/shard-002.safetensors"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF  # corrupt after the manifest was written; size unchanged
    shard.write_bytes(bytes(data))
    assert deploy(board, new, dest) == 2
    err = capsys.readouterr().err
    assert "shards/shard-002.safetensors" in err and "local bundle is corrupt" in err
    assert tree(dest) == live


@pytest.mark.slow
def test_corrupt_copy_on_board_fails_then_checksum_repairs(board, tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle", seed=4)
    dest = tmp_path / "board" / "maize"
    dest.parent.mkdir()
    assert deploy(board, bundle, dest) == 0
    # Bit rot on the board, size and mtime kept, so rsync's quick check would call it unchanged.
    target = dest / "shards/shard-001.safetensors"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[12345] ^= 0x01
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = tree(dest)

    assert deploy(board, bundle, dest) == 2
    err = capsys.readouterr().err
    assert "verification on 127.0.0.1 failed for shards/shard-001.safetensors" in err, err
    assert "--checksum" in err
    assert tree(dest) == before, "a copy that failed verification must not replace the live bundle"

    assert deploy(board, bundle, dest, "--checksum") == 0
    assert tree(dest) == tree(bundle)


@pytest.mark.slow
def test_live_lock_refuses_and_stale_lock_proceeds(board, tmp_path, capsys, caplog):
    bundle = make_bundle(tmp_path / "bundle", sizes=(10_000, 20_000), seed=5)
    dest = tmp_path / "board" / "maize"
    dest.mkdir(parents=True)
    (dest / "old.bin").write_bytes(b"the bundle a job is training on")
    lock = Path(f"{dest}.inuse")
    job = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(json.dumps({"pid": job.pid, "job": "train-maize", "since": "2026-01-01T00:00:00Z"}))
        assert deploy(board, bundle, dest) == 2
        err = capsys.readouterr().err
        assert "refusing to overwrite" in err and "train-maize" in err and str(job.pid) in err
        assert tree(dest) == {"old.bin": b"the bundle a job is training on"}
    finally:
        job.kill()
        job.wait()

    # The job is gone, its lock stayed behind: warn and deploy.
    assert deploy(board, bundle, dest) == 0
    assert tree(dest) == tree(bundle)
    assert any("stale lock" in r.getMessage() for r in caplog.records)


def test_unreachable_board_is_a_clear_error(tmp_path, capsys):
    bundle = make_bundle(tmp_path / "bundle", sizes=(100,))
    port = str(free_port())
    assert main(["deploy", str(bundle), f"127.0.0.1:{tmp_path}/x", "--port", port,
                 "-o", "ConnectTimeout=2"]) == 2
    assert "cannot reach 127.0.0.1 over ssh" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["no-colon", ":/dest", "host:", "host:/"])
def test_bad_target_is_rejected(tmp_path, capsys, target):
    bundle = make_bundle(tmp_path / "bundle", sizes=(100,))
    assert main(["deploy", str(bundle), target]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("rel", ["../escape.bin", "/etc/passwd", "a//b", "manifest.json"])
def test_unsafe_manifest_paths_are_rejected(tmp_path, capsys, rel):
    bundle = make_bundle(tmp_path / "bundle", sizes=(100,))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": "0" * 64, "size": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert main(["deploy", str(bundle), "127.0.0.1:/tmp/x"]) == 2
    assert "unsafe or reserved" in capsys.readouterr().err
