"""The agent's file actions over MQTT against real mosquitto: `upload` offers captures and
generated images and refuses everything else; `receive` installs a bundle only once it verified
under the board's trust policy, refuses a bundle signed by another key and a name that is taken,
and resumes a receive cut off by an agent restart."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from PIL import Image

from blockskip.host.bundle import build_bundle, generate_keypair
from blockskip.transfer import FileReceiver, FileSender, TransferError
from helpers import make_bundle

DEV = "dev-a"
PREFIX = f"blockskip/{DEV}/"


class Host:
    """A host-side client: sends commands, and serves/receives files with blockskip.transfer."""

    def __init__(self, port: int, tmp: Path, client_id: str = "host-01"):
        self.replies: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.paused = threading.Event()  # while set, the sender ignores the receiver's requests
        publish = lambda t, p, props=None: self.client.publish(t, p, qos=1, properties=props)  # noqa: E731
        self.sender = FileSender(publish, tmp / "send")
        self.receiver = FileReceiver(publish, tmp / "receive", retry_s=0.5)
        self.client.on_message = self._message
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(10)
        topics = [PREFIX + "reply/+"] + self.sender.subscriptions(PREFIX) + self.receiver.subscriptions(PREFIX)
        self.client.subscribe([(t, 1) for t in topics])

    def _message(self, client, userdata, msg) -> None:
        if self.receiver.handle(msg.topic, msg.payload, msg.properties):
            return
        if "/files/" in msg.topic:
            if not self.paused.is_set():
                self.sender.handle(msg.topic, msg.payload)
            return
        with self.lock:
            body = json.loads(msg.payload)
            self.replies[body["id"]] = body

    def request(self, wait_until, command: dict) -> dict:
        self.client.publish(PREFIX + "cmd", json.dumps(command), qos=1).wait_for_publish(10)
        return wait_until(lambda: self.replies.get(command["id"]), 30)

    def close(self) -> None:
        self.receiver.close()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def host(broker, tmp_path):
    made = []

    def make() -> Host:
        made.append(Host(broker.port, tmp_path / f"host-{len(made)}"))
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """A bundle tar signed by the host's key and the same bundle signed by another key."""
    root = tmp_path_factory.mktemp("files")
    make_bundle(root, "flux", 2, 1, samples=2)
    for name in ("host", "other"):
        generate_keypair(root / f"{name}.key", root / f"{name}.pub")
        metadata = json.loads((root / "stage" / "bundle.json").read_text())
        build_bundle(root / "stage", root / f"by-{name}", metadata, signing_key=root / f"{name}.key", tar=True)
    return root


def test_upload_offers_captures_and_images_and_nothing_else(broker, start_agent, host, tmp_path, wait_until):
    stale = tmp_path / "data" / "transfers" / "send" / "old-upload.0.json"  # an offer nobody fetched for 2 days
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    agent = start_agent()
    assert not stale.exists()
    data = agent.data_dir
    image = tmp_path / "leaf.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image)
    stored = agent.spool.store(image.read_bytes(), {"camera_id": "cam-01", "capture_time": None, "gps": None})
    (data / "generated" / "g1").mkdir(parents=True)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(data / "generated" / "g1" / "0.png")
    h = host()

    reply = h.request(wait_until, {"id": "u1", "action": "upload",
                                   "args": {"captures": [stored.sha256], "paths": ["generated/g1/0.png"]}})
    assert reply["ok"], reply
    files = reply["result"]["files"]
    assert files[0]["capture"]["camera_id"] == "cam-01" and files[0]["offer"]["sha256"] == stored.sha256
    for index, item in enumerate(files):
        h.receiver.receive(PREFIX, item["offer"], tmp_path / "got" / f"{index}.png")
    for item in files:
        h.receiver.wait(item["offer"]["transfer"], timeout=30)
    assert (tmp_path / "got" / "0.png").read_bytes() == image.read_bytes()
    assert (tmp_path / "got" / "1.png").read_bytes() == (data / "generated" / "g1" / "0.png").read_bytes()

    for number, (args, code) in enumerate([
            ({"paths": ["journal.sqlite3"]}, "bad_path"),  # the agent's own files are not for upload
            ({"paths": ["spool/" + stored.path.name]}, "bad_path"),  # captures go by sha256
            ({"paths": ["../../etc/passwd"]}, "bad_path"),
            ({"paths": ["generated/g1"]}, "bad_path"),  # a folder
            ({"captures": ["0" * 64]}, "not_found"),
            ({"captures": ["not-a-sha"]}, "not_found"),
            ({}, "bad_args")]):
        reply = h.request(wait_until, {"id": f"bad-{number}", "action": "upload", "args": args})
        assert not reply["ok"] and reply["error"]["code"] == code, (args, reply)


@pytest.mark.slow
def test_receive_installs_only_a_bundle_the_board_trusts(broker, start_agent, host, bundles, wait_until):
    agent = start_agent(trusted_keys=[str(bundles / "host.pub")], transfer_retry_s=0.5)
    data = agent.data_dir
    h = host()

    forged = h.sender.offer(PREFIX, bundles / "by-other.tar", "t-forged", 4096)
    reply = h.request(wait_until, {"id": "r1", "action": "receive",
                                   "args": {"offer": {**forged.to_dict(), "name": "leaf.tar"}, "kind": "bundle"}})
    assert reply["ok"] and reply["result"]["state"] == "receiving", reply
    with pytest.raises(TransferError) as refused:
        h.sender.wait("t-forged", timeout=60)
    assert refused.value.code == "bad_bundle" and "signature does not verify" in str(refused.value)
    assert not (data / "bundles" / "leaf.tar").exists() and not (data / "bundles" / "leaf").exists()

    good = h.sender.offer(PREFIX, bundles / "by-host.tar", "t-good", 4096)
    offer = {**good.to_dict(), "name": "leaf.tar"}
    assert h.request(wait_until, {"id": "r2", "action": "receive", "args": {"offer": offer, "kind": "bundle"}})["ok"]
    assert h.sender.wait("t-good", timeout=60)["ok"]
    assert (data / "bundles" / "leaf.tar").read_bytes() == (bundles / "by-host.tar").read_bytes()
    assert (data / "bundles" / "leaf" / "manifest.sig").is_file()  # unpacked and verified where train finds it
    again = h.request(wait_until, {"id": "r3", "action": "receive", "args": {"offer": offer, "kind": "bundle"}})
    assert again["result"]["state"] == "installed"
    other = {**h.sender.offer(PREFIX, bundles / "by-other.tar", "t-other", 4096).to_dict(), "name": "leaf.tar"}
    taken = h.request(wait_until, {"id": "r4", "action": "receive", "args": {"offer": other, "kind": "bundle"}})
    assert not taken["ok"] and taken["error"]["code"] == "exists"
    for number, args in enumerate([{"offer": {**offer, "name": "../x.tar"}, "kind": "bundle"},
                                   {"offer": {**offer, "name": "leaf.zip"}, "kind": "bundle"},
                                   {"offer": {**offer, "size": -1}, "kind": "bundle"},
                                   {"offer": "leaf.tar", "kind": "bundle"},
                                   {"offer": offer, "kind": "model"}]):
        reply = h.request(wait_until, {"id": f"bad-{number}", "action": "receive", "args": args})
        assert not reply["ok"] and reply["error"]["code"] == "bad_args", (args, reply)
    assert h.request(wait_until, {"id": "s", "action": "status"})["ok"]


@pytest.mark.slow
def test_a_receive_cut_off_by_an_agent_restart_resumes(broker, start_agent, host, bundles, wait_until):
    agent = start_agent(trusted_keys=[str(bundles / "host.pub")], transfer_retry_s=0.5)
    data = agent.data_dir
    h = host()
    offer = h.sender.offer(PREFIX, bundles / "by-host.tar", "t-resume", 1024)
    assert offer.chunks > 20
    h.request(wait_until, {"id": "r1", "action": "receive",
                           "args": {"offer": {**offer.to_dict(), "name": "leaf.tar"}, "kind": "bundle"}})
    wait_until(lambda: h.sender.sent("t-resume") >= 10, 30, interval=0.001)
    h.paused.set()  # the host stops answering; the agent goes down mid-transfer
    agent.stop(flush_timeout_s=1)
    assert list((data / "transfers" / "receive").glob("*.part")) and not (data / "bundles" / "leaf.tar").exists()
    sent_before = h.sender.sent("t-resume")
    h.paused.clear()
    start_agent(trusted_keys=[str(bundles / "host.pub")], transfer_retry_s=0.5)
    assert h.sender.wait("t-resume", timeout=60)["ok"]
    assert hashlib.sha256((data / "bundles" / "leaf.tar").read_bytes()).hexdigest() == offer.sha256
    # it went on from the chunks it had: at most the window's chunks in flight at the stop were sent twice
    assert h.sender.sent("t-resume") - offer.chunks <= 2 < sent_before


def sparse_tar(path: Path, bundle: Path, name: str, real_size: int) -> Path:
    """A tar holding a real bundle's signed manifest and one old-GNU sparse ('S') member of one
    512-byte block that declares `real_size` bytes: tarfile extracts it as that many bytes."""
    import tarfile

    def header(member: str, size: int, kind: bytes, extra: dict[int, bytes]) -> bytes:
        block = bytearray(512)
        fields = {0: member.encode(), 100: b"0000644\0", 108: b"0000000\0", 116: b"0000000\0",
                  124: b"%011o\0" % size, 136: b"%011o\0" % 0, 156: kind, 257: b"ustar  \0", **extra}
        for offset, value in fields.items():
            block[offset:offset + len(value)] = value
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        return bytes(block)

    data = bytearray()
    for member in ("manifest.json", "manifest.sig"):
        body = (bundle / member).read_bytes()
        info = tarfile.TarInfo(member)
        info.size = len(body)
        data += info.tobuf(tarfile.GNU_FORMAT) + body + b"\0" * (-len(body) % 512)
    sparse_map = {386: b"%011o\0" % 0, 398: b"%011o\0" % 512, 482: b"\0", 483: b"%011o\0" % real_size}
    data += header(name, 512, b"S", sparse_map) + b"\1" * 512 + b"\0" * 1024
    path.write_bytes(bytes(data))
    return path


def test_a_sparse_tar_writes_nothing_on_any_path(broker, start_agent, host, bundles, tmp_path, wait_until, capsys):
    """A 3.5 KB tar whose sparse member would expand to 256 MiB is refused by `blockskip verify`,
    `blockskip train` and the agent's receive before a byte of it is written."""
    from blockskip.cli import main

    listed = sorted(json.loads((bundles / "by-host" / "manifest.json").read_text())["files"])[0]
    tar = sparse_tar(tmp_path / "sparse.tar", bundles / "by-host", listed, 256 << 20)
    assert tar.stat().st_size < 8192

    def written(root: Path) -> int:
        return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file() and p != tar)

    assert main(["verify", str(tar), "--key", str(bundles / "host.pub")]) != 0
    assert "is a sparse file; bundles hold regular files only" in capsys.readouterr().err
    assert main(["train", str(tar), "--out", str(tmp_path / "adapter"), "--key", str(bundles / "host.pub")]) != 0
    assert "is a sparse file" in capsys.readouterr().err
    assert written(tmp_path) < 1 << 20 and not (tmp_path / "sparse").exists()

    agent = start_agent(trusted_keys=[str(bundles / "host.pub")], transfer_retry_s=0.5)
    h = host()
    offer = h.sender.offer(PREFIX, tar, "t-sparse", 4096)
    reply = h.request(wait_until, {"id": "r1", "action": "receive",
                                   "args": {"offer": {**offer.to_dict(), "name": "leaf.tar"}, "kind": "bundle"}})
    assert reply["ok"], reply
    with pytest.raises(TransferError) as refused:
        h.sender.wait("t-sparse", timeout=60)
    assert refused.value.code == "bad_bundle" and "sparse file" in str(refused.value)
    assert written(agent.data_dir) < 1 << 20
    assert not (agent.data_dir / "bundles" / "leaf").exists() and not (agent.data_dir / "bundles" / "leaf.tar").exists()
    assert h.request(wait_until, {"id": "s", "action": "status"})["ok"]


@pytest.mark.slow
def test_receive_offers_are_bounded_in_sum_against_free_disk_and_expire(broker, start_agent, probe_factory, tmp_path,
                                                                        wait_until):
    """Offers that each fit but not together: the one past max_pending_receive_bytes is refused
    (pending_limit), the one that would eat the disk margin (no_space), the one over the file
    limit (too_large), each with its code; an unfinished receive past its deadline is dropped at
    the next start, its sender told `expired`, and never asked for again."""
    import shutil

    (tmp_path / "data").mkdir()
    free = shutil.disk_usage(tmp_path / "data").free
    size = free // 3
    probe = probe_factory(broker.port, [PREFIX + "reply/+", PREFIX + "files/+/want", PREFIX + "files/+/done"])

    def offer(transfer: str, nbytes: int) -> dict:
        return {"transfer": transfer, "name": f"{transfer}.tar", "size": nbytes, "sha256": "0" * 64,
                "chunk_size": 16 * 1024 * 1024}

    def receive(command_id: str, transfer: str, nbytes: int) -> dict:
        return probe.request(DEV, {"id": command_id, "action": "receive",
                                   "args": {"offer": offer(transfer, nbytes), "kind": "bundle"}}, timeout=20)

    limits = dict(max_receive_bytes=2 * size, max_pending_receive_bytes=2 * size + size // 2,
                  receive_disk_margin_bytes=free // 10)
    agent = start_agent(**limits)
    assert receive("big", "t-big", 3 * size)["error"]["code"] == "too_large"
    assert receive("r1", "t-1", size)["result"]["state"] == "receiving"
    assert receive("r2", "t-2", size)["result"]["state"] == "receiving"
    third = receive("r3", "t-3", size)
    assert third["error"]["code"] == "pending_limit", third
    agent.stop(flush_timeout_s=1)

    agent = start_agent(**{**limits, "max_pending_receive_bytes": 100 * free})  # the two resume
    third = receive("r3b", "t-3", size)
    assert third["error"]["code"] == "no_space" and "disk_margin_bytes" in third["error"]["message"], third
    parts = agent.data_dir / "transfers" / "receive"
    assert sorted(p.name for p in parts.glob("*.part")) == ["t-1.part", "t-2.part"]
    agent.stop(flush_timeout_s=1)

    time.sleep(1.5)
    wants_before = len(probe.on("/want"))
    start_agent(**limits, transfer_deadline_s=1.0)
    expired = wait_until(lambda: [d for d in probe.on("/done") if d.get("error", {}).get("code") == "expired"], 10)
    assert len(expired) == 2
    assert not list(parts.glob("*"))
    time.sleep(1.0)
    assert len(probe.on("/want")) == wants_before  # nothing asked for again


BLOCK_HOST = """
import importlib.abc, sys

class NoHostCode(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "blockskip.host" or name.startswith("blockskip.host."):
            raise ImportError(f"{name}: a board has no host code")

sys.meta_path.insert(0, NoHostCode())
from blockskip.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_agent_receives_verifies_and_trains_with_the_host_code_blocked(broker, host, bundles, tmp_path,
                                                                           probe_factory, wait_until):
    """A board installs no host code: with `blockskip.host` unimportable, `blockskip verify` checks a
    bundle and `blockskip agent` receives one over MQTT, verifies it under its trust policy and
    trains on it."""
    import subprocess
    import sys

    import yaml

    run = [sys.executable, "-c", BLOCK_HOST]
    verified = subprocess.run(run + ["verify", str(bundles / "by-host.tar"), "--key", str(bundles / "host.pub")],
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and verified.stdout.startswith("OK "), verified.stderr
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"device_id": DEV, "data_dir": str(tmp_path / "data"),
                                      "trusted_keys": [str(bundles / "host.pub")], "transfer_retry_s": 0.5,
                                      "broker": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5,
                                                 "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}}))
    log = tmp_path / "agent.log"
    agent = subprocess.Popen(run + ["agent", "--config", str(config)], stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, text=True)
    try:
        watch = probe_factory(broker.port, [PREFIX + "status"], "watch")
        wait_until(lambda: any(s["state"] == "online" for s in watch.on("/status")), 60)
        h = host()
        assert h.request(wait_until, {"id": "s", "action": "status"})["ok"]
        offer = h.sender.offer(PREFIX, bundles / "by-host.tar", "t-board", 64 * 1024)
        reply = h.request(wait_until, {"id": "r", "action": "receive",
                                       "args": {"offer": {**offer.to_dict(), "name": "leaf.tar"}, "kind": "bundle"}})
        assert reply["ok"], reply
        assert h.sender.wait("t-board", timeout=60)["ok"]
        started = h.request(wait_until, {"id": "t", "action": "train",
                                         "args": {"bundle": "bundles/leaf.tar", "steps": 2}})
        assert started["ok"], started
        wait_until(lambda: (tmp_path / "data" / "adapters" / "t" / "pytorch_lora_weights.safetensors").is_file(), 120)
    finally:
        agent.terminate()
        agent.wait(timeout=60)
    assert "a board has no host code" not in log.read_text(), log.read_text()
