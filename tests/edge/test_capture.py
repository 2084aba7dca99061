"""Field-camera captures: two concurrent cameras, a broker restart, refusals, the CLI."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from blockskip.cli import main
from blockskip.edge.agent import BrokerConfig
from blockskip.edge.capture import CaptureConfig, publish_folder

DEV = "dev-a"


def make_images(folder: Path, count: int, salt: int) -> list[Path]:
    """`count` distinct small PNG/JPEG files."""
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        img = Image.new("RGB", (8, 8), (i % 256, i // 256, salt))
        path = folder / (f"{i:04d}.png" if i % 5 else f"{i:04d}.jpg")
        img.save(path, **({} if i % 5 else {"comment": f"frame {i} camera {salt}"}))  # distinct bytes
        paths.append(path)
    assert len({hashlib.sha256(p.read_bytes()).digest() for p in paths}) == count
    return paths


def camera(broker, camera_id: str, **kw) -> CaptureConfig:
    fields = dict(device_id=DEV, camera_id=camera_id, ack_timeout_s=3.0, rounds=10, window=16, gps="52.37,4.89",
                  broker=BrokerConfig(host="127.0.0.1", port=broker.port, keepalive=5,
                                      reconnect_min_s=0.1, reconnect_max_s=0.5))
    fields.update(kw)
    return CaptureConfig(**fields)


@pytest.mark.slow
def test_520_captures_from_two_cameras_survive_a_broker_restart(broker, start_agent, tmp_path, wait_until):
    agent = start_agent()
    folders = {"cam-1": tmp_path / "cam-1", "cam-2": tmp_path / "cam-2"}
    for salt, folder in enumerate(folders.values()):
        make_images(folder, 260, salt)
    reports = {}

    def send(cam: str) -> None:
        reports[cam] = publish_folder(camera(broker, cam), folders[cam])

    threads = [threading.Thread(target=send, args=(cam,)) for cam in folders]
    for t in threads:
        t.start()
    wait_until(lambda: agent.spool.count() >= 150, 60)
    stored_before_restart = agent.spool.count()
    broker.restart(down_s=0.5)
    assert stored_before_restart < 520 and any(t.is_alive() for t in threads)  # the restart was mid-run
    for t in threads:
        t.join(120)
    assert all(not t.is_alive() for t in threads)
    for cam, report in reports.items():
        assert report.ok, (cam, report.refused, report.unacked[:5])
        assert len(report.stored) == 260
        for path in report.stored:  # acked as stored => on disk, same bytes
            data = path.read_bytes()
            stored = next(agent.spool.root.glob(hashlib.sha256(data).hexdigest() + ".*[gG]"))
            assert stored.read_bytes() == data
    assert agent.spool.count() == 520
    total, records = agent.spool.list(limit=1000, camera_id="cam-2")
    assert total == 260 and all(r["gps"] == "52.37,4.89" and r["capture_time"] for r in records)
    assert not list(agent.spool.root.glob(".*.tmp"))


def test_refused_and_duplicate_captures_get_their_ack(broker, start_agent, probe_factory, tmp_path, wait_until):
    agent = start_agent(max_capture_bytes=4096)
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/capture/ack", f"blockskip/{DEV}/reply/#"])
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    png = buf.getvalue()
    sha = hashlib.sha256(png).hexdigest()

    def send(payload: bytes, **user) -> dict:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = list(user.items())
        n = len(probe.on("/capture/ack"))
        probe.send(f"blockskip/{DEV}/capture/cam-9", payload, props)
        return wait_until(lambda: probe.on("/capture/ack")[n:])[0]

    assert send(png, sha256=sha) == {"camera_id": "cam-9", "sha256": sha, "stored": True, "duplicate": False}
    assert send(png, sha256=sha)["duplicate"] is True  # stored once, acked again
    assert len(list(agent.spool.root.glob(f"{sha}.*"))) == 2  # the image and its metadata
    bad_sha = send(png, sha256="0" * 64)
    assert bad_sha["stored"] is False and bad_sha["error"]["code"] == "bad_sha256" and bad_sha["sha256"] == "0" * 64
    not_image = send(b"this is not an image at all")
    assert not_image["stored"] is False and not_image["error"]["code"] == "not_image"
    truncated = send(png[: len(png) // 2])
    assert truncated["error"]["code"] == "not_image"
    big = send(b"\x89PNG" + bytes(5000))
    assert big["stored"] is False and big["error"]["code"] == "too_large"
    spoofed = send(png, camera_id="cam-other")
    assert spoofed["error"]["code"] == "bad_properties"
    assert agent.spool.count() == 1
    reply = probe.request(DEV, {"id": "list", "action": "captures"})
    assert reply["result"]["total"] == 1 and reply["result"]["captures"][0]["sha256"] == sha
    assert probe.request(DEV, {"id": "st", "action": "status"})["result"]["state"] == "online"


def test_capture_cli_reports_stored_and_refused(broker, start_agent, tmp_path, capsys):
    start_agent()
    folder = tmp_path / "field"
    make_images(folder, 3, 7)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    config = tmp_path / "cam.yaml"
    config.write_text(f"device_id: {DEV}\ncamera_id: cam-cli\nack_timeout_s: 5\nrounds: 2\n"
                      f"broker:\n  host: 127.0.0.1\n  port: {broker.port}\n  reconnect_min_s: 0.1\n")
    assert main(["capture", "--config", str(config), str(folder)]) == 1
    out = capsys.readouterr().out
    assert "3 stored, 1 refused, 0 not acknowledged" in out and "broken.png: not_image" in out
    (folder / "broken.png").unlink()
    assert main(["capture", "--config", str(config), str(folder)]) == 0
