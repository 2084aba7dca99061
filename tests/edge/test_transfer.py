"""File transfer over MQTT (blockskip.transfer) through a real mosquitto with persistence: round trip,
a 200 MB file across a broker restart, receiver and sender restarts, corrupted chunks, bad payloads."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockskip.transfer import FileOffer, FileReceiver, FileSender, ReceivePolicy, TransferError, offer_for, topics

PREFIX = "blockskip/dev-a/"


class Side:
    """One side of a transfer: a paho MQTT v5 client with a persistent session feeding a FileSender or
    a FileReceiver, as the agent and the host worker do."""

    def __init__(self, port: int, client_id: str, make):
        self.port = port
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.ready = threading.Event()
        self.end = make(self.publish)
        self.chunks_seen: list[tuple[int, bytes, str, bool]] = []  # (index, payload, sha256 property, dest existed)
        self.dest: Path | None = None

    def publish(self, topic: str, payload: bytes, properties: Properties | None) -> None:
        self.client.publish(topic, payload, qos=1, properties=properties)

    def _on_connect(self, client, userdata, flags, rc, props):
        if isinstance(self.end, FileReceiver):
            self.end.on_connect()
        client.subscribe([(t, 1) for t in self.end.subscriptions(PREFIX)])

    def _on_disconnect(self, *args):
        self.ready.clear()
        if isinstance(self.end, FileReceiver):
            self.end.on_disconnect()

    def _on_message(self, client, userdata, msg):
        if isinstance(self.end, FileReceiver):
            user = dict(getattr(msg.properties, "UserProperty", None) or [])
            if user.get("index", "").isdigit():
                self.chunks_seen.append((int(user["index"]), msg.payload, user.get("sha256"),
                                         self.dest is not None and self.dest.exists()))
            self.end.handle(msg.topic, msg.payload, msg.properties)
        else:
            self.end.handle(msg.topic, msg.payload)

    def start(self) -> "Side":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", self.port, 30, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.ready.wait(10), "no SUBACK from the broker"
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.end.close()


@pytest.fixture
def sides(broker):
    made: list[Side] = []

    def make(client_id: str, end_factory, start: bool = True) -> Side:
        side = Side(broker.port, client_id, end_factory)
        made.append(side)
        return side.start() if start else side

    yield make
    for side in made:
        side.close()


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        for start in range(0, size, 1 << 20):
            f.write(os.urandom(min(1 << 20, size - start)))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_small_file_round_trip(tmp_path, sides, wait_until):
    src = random_file(tmp_path / "bundle.tar", 10 * 1024 + 123)
    sender = sides("host", lambda pub: FileSender(pub, tmp_path / "send")).end
    offer = sender.offer(PREFIX, src, "t1", chunk_size=1024)
    assert (offer.chunks, offer.size, offer.sha256) == (11, src.stat().st_size, sha(src))
    offer = FileOffer.from_dict(json.loads(json.dumps(offer.to_dict())))  # as the receiver gets it

    dest = tmp_path / "board" / "bundles" / "bundle.tar"
    progress: list[dict] = []
    side = sides("board", lambda pub: FileReceiver(pub, tmp_path / "recv", window=3, retry_s=2))
    side.dest = dest
    side.end.receive(PREFIX, offer, dest, on_progress=progress.append)
    assert side.end.wait("t1", timeout=30) == dest
    assert dest.read_bytes() == src.read_bytes()
    assert sender.wait("t1", timeout=10) == {"ok": True, "sha256": offer.sha256}

    # every chunk carried the sha256 of its bytes; dest appeared only after the last one
    indices = sorted({i for i, _, _, _ in side.chunks_seen})
    assert indices == list(range(11))
    assert all(hashlib.sha256(p).hexdigest() == s for _, p, s, _ in side.chunks_seen)
    assert not any(existed for _, _, _, existed in side.chunks_seen)
    assert progress[-1] == {"transfer": "t1", "bytes": offer.size, "size": offer.size, "chunks_done": 11, "chunks": 11}
    assert all(p["chunks_done"] < 11 for p in progress[:-1])
    assert not list((tmp_path / "recv").iterdir()), "partial file and state are removed when done"
    assert sender.sent("t1") == 11


def test_partial_file_has_a_temporary_name(tmp_path, sides, wait_until):
    """While chunks are missing, the bytes sit in state_dir and dest does not exist."""
    src = random_file(tmp_path / "a.bin", 8 * 1024)
    offer = offer_for(src, "t-partial", chunk_size=1024)
    dest = tmp_path / "out" / "a.bin"
    receiver = sides("board", lambda pub: FileReceiver(pub, tmp_path / "recv", window=2)).end
    receiver.receive(PREFIX, offer, dest)  # no sender yet: nothing arrives
    probe = sides("probe", lambda pub: FileSender(pub))  # a client that publishes chunk 0 only
    data = src.read_bytes()[:1024]
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("index", "0"), ("sha256", hashlib.sha256(data).hexdigest())]
    probe.publish(topics(PREFIX, "t-partial")["chunk"], data, props)
    state = tmp_path / "recv" / "t-partial.json"
    wait_until(lambda: json.loads(state.read_text())["received"] == [[0, 0]])
    assert not dest.exists()
    assert (tmp_path / "recv" / "t-partial.part").read_bytes()[:1024] == data
    assert receiver.pending() == [(PREFIX, offer, dest)]


@pytest.mark.slow
def test_200mb_file_survives_a_broker_restart(tmp_path, broker, sides, wait_until):
    src = random_file(tmp_path / "big.bin", 200 * 1024 * 1024)
    sender = sides("host", lambda pub: FileSender(pub, tmp_path / "send")).end
    offer = sender.offer(PREFIX, src, "big")
    receiver = sides("board", lambda pub: FileReceiver(pub, tmp_path / "recv", retry_s=3)).end
    dest = tmp_path / "board" / "big.bin"
    receiver.receive(PREFIX, offer, dest)

    wait_until(lambda: sender.sent("big") >= offer.chunks // 2, timeout=300, interval=0.005)
    assert sender.result("big") is None and not dest.exists()
    broker.restart()  # SIGTERM (the broker saves its sessions) and start again on the same port
    sent_before = sender.sent("big")
    assert sent_before < offer.chunks

    assert receiver.wait("big", timeout=600) == dest
    assert sha(dest) == offer.sha256
    assert sender.wait("big", timeout=30)["ok"]
    assert sender.sent("big") > sent_before, "the transfer went on after the restart"
    assert sender.sent("big") - offer.chunks <= 2, f"{sender.sent('big') - offer.chunks} chunks re-sent"


def test_receiver_restart_resumes(tmp_path, sides, wait_until):
    src = random_file(tmp_path / "f.bin", 3 * 1024 * 1024 + 77)
    sender = sides("host", lambda pub: FileSender(pub, tmp_path / "send")).end
    offer = sender.offer(PREFIX, src, "r1", chunk_size=64 * 1024)  # 49 chunks
    dest = tmp_path / "board" / "f.bin"
    side = sides("board", lambda pub: FileReceiver(pub, tmp_path / "recv", window=4, retry_s=2))
    side.end.receive(PREFIX, offer, dest)
    wait_until(lambda: sender.sent("r1") >= 15, interval=0.001)
    side.close()  # the agent stops (or dies) mid-transfer
    received = json.loads((tmp_path / "recv" / "r1.json").read_text())["received"]
    assert received and received != [[0, offer.chunks - 1]] and not dest.exists()

    again = Side(side.port, "board", lambda pub: FileReceiver(pub, tmp_path / "recv", window=4, retry_s=2))
    [(prefix, pending, pending_dest)] = again.end.pending()
    assert (prefix, pending, pending_dest) == (PREFIX, offer, dest)
    again.end.receive(prefix, pending, pending_dest)  # resume before connecting, as the agent does at start
    again.start()
    try:
        assert again.end.wait("r1", timeout=60) == dest
    finally:
        again.close()
    assert sha(dest) == offer.sha256
    assert sender.sent("r1") - offer.chunks <= 4, f"{sender.sent('r1') - offer.chunks} chunks re-sent"


def test_sender_restart_serves_again(tmp_path, sides, wait_until):
    src = random_file(tmp_path / "g.bin", 2 * 1024 * 1024)
    host = sides("host", lambda pub: FileSender(pub, tmp_path / "send"))
    offer = host.end.offer(PREFIX, src, "s1", chunk_size=32 * 1024)  # 64 chunks
    dest = tmp_path / "board" / "g.bin"
    receiver = sides("board", lambda pub: FileReceiver(pub, tmp_path / "recv", window=2, retry_s=1)).end
    receiver.receive(PREFIX, offer, dest)
    wait_until(lambda: host.end.sent("s1") >= 20, interval=0.001)
    host.close()  # the host restarts; its offers are in its state_dir
    sent_first = host.end.sent("s1")
    assert not dest.exists()

    new_host = sides("host", lambda pub: FileSender(pub, tmp_path / "send"))
    assert new_host.end.result("s1") is None
    assert receiver.wait("s1", timeout=60) == dest
    assert sha(dest) == offer.sha256
    assert new_host.end.wait("s1", timeout=10)["ok"]
    assert new_host.end.sent("s1") > 0
    assert sent_first + new_host.end.sent("s1") - offer.chunks <= 2
    # the result is persisted: a third sender knows the transfer ended
    assert FileSender(lambda *a: None, tmp_path / "send").result("s1") == {"ok": True, "sha256": offer.sha256}


@pytest.mark.slow
def test_corrupted_chunks_are_refused_and_asked_again(tmp_path, broker, sides, probe_factory, wait_until):
    src = random_file(tmp_path / "c.bin", 4 * 1024)
    offer = offer_for(src, "c1", chunk_size=1024)
    data = src.read_bytes()
    probe = probe_factory(broker.port, [topics(PREFIX, "c1")["want"]], client_id="probe-c")
    dest = tmp_path / "board" / "c.bin"
    receiver = sides("board", lambda pub: FileReceiver(pub, tmp_path / "recv", window=2, retry_s=3)).end
    receiver.receive(PREFIX, offer, dest)
    wants = lambda: [w["chunks"] for w in probe.on("/want")]  # noqa: E731
    wait_until(lambda: wants() == [[0, 1]])

    def chunk(index: int, payload: bytes, sha256: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("index", str(index)), ("sha256", sha256)]
        probe.send(topics(PREFIX, "c1")["chunk"], payload, props)

    good0 = data[:1024]
    chunk(0, bytes(1024), hashlib.sha256(good0).hexdigest())  # wrong bytes, the real chunk's sha256
    wait_until(lambda: [0] in wants())
    chunk(0, good0, "0" * 64)  # right bytes, wrong sha256
    chunk(1, data[1024:1500], hashlib.sha256(data[1024:1500]).hexdigest())  # short chunk
    wait_until(lambda: len(wants()) >= 4)
    assert wants() == [[0, 1], [0], [0], [1]]
    assert not json.loads((tmp_path / "recv" / "c1.json").read_text())["received"]

    sender = sides("host", lambda pub: FileSender(pub)).end  # the real sender comes up; retries reach it
    sender.offer(PREFIX, src, "c1", chunk_size=1024)
    assert receiver.wait("c1", timeout=30) == dest
    assert dest.read_bytes() == data


def test_whole_file_mismatch_fails_without_dest(tmp_path, sides):
    src = random_file(tmp_path / "m.bin", 5000)
    sender = sides("host", lambda pub: FileSender(pub)).end
    offer = sender.offer(PREFIX, src, "m1", chunk_size=1024)
    told = dataclasses.replace(offer, sha256="ab" * 32)  # the receiver was told another file's sha256
    dest = tmp_path / "board" / "m.bin"
    receiver = sides("board", lambda pub: FileReceiver(pub, tmp_path / "recv")).end
    receiver.receive(PREFIX, told, dest)
    with pytest.raises(TransferError) as err:
        receiver.wait("m1", timeout=30)
    assert err.value.code == "sha_mismatch"
    with pytest.raises(TransferError) as err:
        sender.wait("m1", timeout=10)
    assert err.value.code == "sha_mismatch" and sender.result("m1")["ok"] is False
    assert not dest.exists()
    assert not list((tmp_path / "recv").iterdir()), "the partial file is removed"


def test_bad_payloads_do_not_stop_a_transfer(tmp_path, broker, sides, probe_factory):
    src = random_file(tmp_path / "b.bin", 6000)
    sender = sides("host", lambda pub: FileSender(pub)).end
    offer = sender.offer(PREFIX, src, "b1", chunk_size=1024)
    probe = probe_factory(broker.port, [PREFIX + "unused"], client_id="probe-b")
    t = topics(PREFIX, "b1")
    for payload in (b"not json", b"\xff\xfe", b"[1, 2]", b'{"chunks": "all"}', b'{"chunks": [6]}',
                    b'{"chunks": [-1]}', b'{"chunks": [true]}', b'{"chunks": []}', b"[" * 100_000,
                    b'{"chunks": [0], "ask": 5}', b'{"chunks": [0], "ask": "a/b"}',
                    json.dumps({"chunks": list(range(6)) * 300}).encode()):
        probe.send(t["want"], payload)
    for payload in (b"{}", b'{"ok": "yes"}', b'{"ok": true, "sha256": "00"}', b"nope"):
        probe.send(t["done"], payload)
    bad_index = Properties(PacketTypes.PUBLISH)
    bad_index.UserProperty = [("index", "99999999"), ("sha256", "0" * 64)]
    probe.send(t["chunk"], b"x", bad_index)
    probe.send(t["chunk"], b"x")  # no properties at all
    assert sender.result("b1") is None, "a bad done is not taken as the end"

    dest = tmp_path / "board" / "b.bin"
    receiver = sides("board", lambda pub: FileReceiver(pub, tmp_path / "recv", retry_s=1)).end
    receiver.receive(PREFIX, offer, dest)
    assert receiver.wait("b1", timeout=30) == dest
    assert dest.read_bytes() == src.read_bytes()
    assert sender.wait("b1", timeout=10)["ok"]


def test_a_redelivered_want_is_served_once(tmp_path, broker, sides, probe_factory, wait_until):
    """A want the broker delivers twice (QoS 1 after a restart) re-sends nothing; a new ask does."""
    src = random_file(tmp_path / "w.bin", 3000)
    sender = sides("host", lambda pub: FileSender(pub)).end
    sender.offer(PREFIX, src, "w1", chunk_size=1024)
    probe = probe_factory(broker.port, [topics(PREFIX, "w1")["chunk"]], client_id="probe-w")
    want = topics(PREFIX, "w1")["want"]
    probe.send(want, {"chunks": [0, 1], "ask": "x-1"})
    probe.send(want, {"chunks": [0, 1], "ask": "x-1"})
    probe.send(want, {"chunks": [2], "ask": "x-2"})
    wait_until(lambda: sender.sent("w1") == 3 and len(probe.messages) == 3)
    probe.send(want, {"chunks": [0], "ask": "x-3"})  # asked again (a retry): served again
    wait_until(lambda: sender.sent("w1") == 4 and len(probe.messages) == 4)
    assert sorted(p for _, p, _ in probe.messages) == sorted([src.read_bytes()[i * 1024:(i + 1) * 1024]
                                                              for i in (0, 0, 1, 2)])


@pytest.mark.parametrize("change", [
    {"transfer": "a/b"}, {"transfer": "+"}, {"name": "../etc/passwd"}, {"name": ".."}, {"name": ""},
    {"size": -1}, {"size": True}, {"size": "10"}, {"sha256": "XYZ"}, {"chunk_size": 0},
    {"chunk_size": 64 * 1024 * 1024}, {"chunk_size": 1024, "size": 10**10}, {"extra": 1},
])
def test_bad_offers_are_refused(change):
    good = {"transfer": "t", "name": "f.bin", "size": 10, "sha256": "0" * 64, "chunk_size": 1024}
    with pytest.raises(TransferError) as err:
        FileOffer.from_dict({**good, **change})
    assert err.value.code == "bad_offer"
    with pytest.raises(TransferError):
        FileOffer.from_dict([good])


def test_receiver_refuses_too_large_and_conflicting_offers(tmp_path):
    receiver = FileReceiver(lambda *a: None, tmp_path / "recv", policy=ReceivePolicy(max_file_bytes=1000))
    try:
        big = FileOffer("t", "f.bin", 1001, "0" * 64, 1024)
        with pytest.raises(TransferError) as err:
            receiver.receive(PREFIX, big, tmp_path / "f.bin")
        assert err.value.code == "too_large"
        small = dataclasses.replace(big, size=100)
        receiver.receive(PREFIX, small, tmp_path / "f.bin")
        with pytest.raises(TransferError) as err:
            receiver.receive(PREFIX, dataclasses.replace(small, size=200), tmp_path / "f.bin")
        assert err.value.code == "bad_offer"
        with pytest.raises(TransferError) as err:
            receiver.receive("blockskip/#/", small, tmp_path / "f.bin")
        assert err.value.code == "bad_prefix"
    finally:
        receiver.close()


def test_empty_file_and_a_finished_transfer_offered_again(tmp_path):
    published: list[tuple[str, bytes]] = []
    receiver = FileReceiver(lambda topic, payload, props: published.append((topic, payload)), tmp_path / "recv")
    try:
        empty = FileOffer("e1", "empty.txt", 0, hashlib.sha256(b"").hexdigest(), 1024)
        dest = tmp_path / "out" / "empty.txt"
        receiver.receive(PREFIX, empty, dest)
        assert receiver.wait("e1", timeout=5) == dest and dest.read_bytes() == b""
        assert published == [(topics(PREFIX, "e1")["done"], json.dumps({"ok": True, "sha256": empty.sha256}).encode())]
        # the same offer again (a repeated command): the file is here, done again, nothing asked
        receiver.receive(PREFIX, empty, dest)
        assert receiver.wait("e1", timeout=5) == dest
        assert [t for t, _ in published] == [topics(PREFIX, "e1")["done"]] * 2
    finally:
        receiver.close()


@pytest.mark.slow
@pytest.mark.parametrize("limit", ["idle_timeout", "deadline"])
def test_a_receive_that_stalls_or_runs_late_ends_with_its_code_and_leaves_nothing(tmp_path, limit):
    """A sender that stops sending (idle_timeout) or trickles past the deadline: the receive ends
    with its code, the partial file and state go, and the sender is told in a `done`."""
    sent: list[tuple[str, bytes]] = []
    policy = ReceivePolicy(idle_timeout_s=0.5 if limit == "idle_timeout" else 60,
                           deadline_s=0.8 if limit == "deadline" else 60)
    receiver = FileReceiver(lambda t, p, props=None: sent.append((t, p)), tmp_path / "recv", retry_s=0.2,
                            policy=policy)
    data = os.urandom(5000)
    offer = FileOffer("t", "f.bin", len(data), hashlib.sha256(data).hexdigest(), 1024)
    try:
        receiver.receive(PREFIX, offer, tmp_path / "f.bin")
        if limit == "deadline":  # a chunk now and then keeps it from being idle, never complete
            for index in range(3):
                chunk = data[index * 1024:(index + 1) * 1024]
                props = Properties(PacketTypes.PUBLISH)
                props.UserProperty = [("index", str(index)), ("sha256", hashlib.sha256(chunk).hexdigest())]
                receiver.handle(topics(PREFIX, "t")["chunk"], chunk, props)
                time.sleep(0.3)
        with pytest.raises(TransferError) as err:
            receiver.wait("t", timeout=10)
        assert err.value.code == limit
    finally:
        receiver.close()
    assert not list((tmp_path / "recv").iterdir()) and not (tmp_path / "f.bin").exists()
    done = [json.loads(p) for t, p in sent if t.endswith("/done")]
    assert done == [{"ok": False, "error": {"code": limit, "message": err.value.message}}]
