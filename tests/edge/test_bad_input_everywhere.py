"""Property-based: every parser the broker can feed, on the worker, the operator CLI, both ends of
a file transfer and the agent's captures and file topics, meets arbitrary payloads with a clear
refusal and never lets an exception escape into the network thread. A fixed example budget each."""

from __future__ import annotations

import hashlib
import json
import logging

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockskip.edge.agent import Agent, AgentConfig, BrokerConfig
from blockskip.host import fleet
from blockskip.host.jobs import JobError, parse_job
from blockskip.host.serve import DeviceLog, HostConfig, HostWorker
from blockskip.transfer import ERROR_CODES, FileOffer, FileReceiver, FileSender, TransferError, topics

BUDGET = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DEV = "dev-a"
PREFIX = f"blockskip/{DEV}/"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
deep = st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n)
payloads = st.one_of(st.binary(max_size=256), json_values.map(lambda v: json.dumps(v).encode()), deep,
                     st.dictionaries(st.sampled_from(["id", "job", "type", "path", "sha256", "ok", "result", "error",
                                                      "device", "state", "results", "chunks", "ask"]),
                                     json_values, max_size=6).map(lambda d: json.dumps(d).encode()))
user_properties = st.lists(st.tuples(st.sampled_from(["index", "sha256", "camera_id", "capture_time", "gps", "x"]),
                                     st.text(max_size=70)), max_size=4)


def message(topic: str, payload: bytes, props: list[tuple[str, str]] | None = None) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = payload
    msg.qos = 1
    if props:
        msg.properties = Properties(PacketTypes.PUBLISH)
        msg.properties.UserProperty = props
    return msg


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A host worker that is never connected: what it would publish is recorded instead."""
    root = tmp_path_factory.mktemp("worker")
    host = HostWorker(HostConfig(worker_id="host-01", work_dir=str(root),
                                 models={"flux": {"path": "tiny-flux", "board_model": "m"}}))
    host.published: list[tuple[str, dict]] = []
    host._publish_status = lambda job_id, body: host.published.append((job_id, body))
    log = DeviceLog(root / "device.jsonl", DEV, {"j1.train": {"action": "train", "out": None},
                                                 "j1.generate": {"action": "generate", "out": "generated/j1"}})
    host._logs["j1"] = log
    yield host, log
    host.file_receiver.close()


@pytest.mark.slow
@BUDGET
@given(payload=payloads)
def test_the_worker_refuses_any_bad_job_with_a_status_and_raises_nothing(worker, payload):
    host, _ = worker
    host.published.clear()
    try:
        parse_job(payload)
        valid = True
    except JobError:
        valid = False
    host._accept(payload)  # raises nothing
    if not valid:
        assert all(body["state"] == "failed" and body["error"].startswith("bad job: ") for _, body in host.published)


@pytest.mark.slow
@BUDGET
@given(device=st.sampled_from([DEV, "dev-b"]), kind=st.sampled_from(["reply/j1.train", "progress", "result", "files/x/chunk",
                                                                    "files/x/want", "status", "x"]),
       payload=payloads, props=user_properties)
def test_the_worker_takes_only_the_jobs_own_boards_word_and_raises_nothing(worker, device, kind, payload, props):
    host, log = worker
    before = (dict(log.replies), {k: list(v) for k, v in log.events.items()}, {k: list(v) for k, v in log.results.items()})
    host._on_message(host.client, None, message(f"blockskip/{device}/{kind}", payload, props))
    after = (log.replies, log.events, log.results)
    if device != DEV:
        assert after == before
    for record in log.results.get("j1.generate", []):
        assert record["path"].split("/")[-3:-1] == ["generated", "j1"] or "generated/j1/" in record["path"]
    assert set(log.replies) <= {"j1.train", "j1.generate"} and set(log.events) <= {"j1.train", "j1.generate"}


@pytest.mark.slow
@BUDGET
@given(event=st.dictionaries(st.sampled_from(["type", "stage", "bytes", "total_bytes", "loss", "step", "total",
                                              "count", "source", "result", "kept", "why", "message", "draws"]),
                             json_values, max_size=6)
       | st.fixed_dictionaries({"type": st.sampled_from(["stage", "progress", "photos", "bundle", "delivered",
                                                         "trained", "plan", "waiting", "done"])},
                               optional={"bytes": json_values, "total_bytes": json_values, "result": json_values,
                                         "loss": json_values}),
       status=payloads)
def test_the_operator_cli_reads_any_job_event_or_status(event, status):
    line = fleet._describe(event)
    assert line is None or isinstance(line, str)
    body = fleet._json_object(status)
    assert body is None or isinstance(body, dict)


@pytest.fixture
def receiver(tmp_path):
    sent: list[tuple[str, bytes]] = []
    end = FileReceiver(lambda t, p, props=None: sent.append((t, p)), tmp_path / "recv", retry_s=60)
    data = bytes(range(256)) * 20
    offer = FileOffer("t1", "f.bin", len(data), hashlib.sha256(data).hexdigest(), 1024)
    end.receive(PREFIX, offer, tmp_path / "f.bin")
    yield end, offer, data
    end.close()


@BUDGET
@given(transfer=st.sampled_from(["t1", "t2", "../x", "+"]), payload=st.binary(max_size=1100), props=user_properties,
       consistent=st.none() | st.integers(0, 7))
def test_a_receiver_stores_only_chunks_that_match_and_raises_nothing(receiver, transfer, payload, props, consistent):
    end, offer, data = receiver
    if consistent is not None:  # a chunk whose sha256 property matches its bytes (a lying sender's best try)
        props = [("index", str(consistent)), ("sha256", hashlib.sha256(payload).hexdigest())]
    handled = end.handle(f"{PREFIX}files/{transfer}/chunk", payload, _props(props))
    assert handled is (transfer == "t1")
    state = end._active.get("t1")
    if state is not None:
        assert state.received <= set(range(offer.chunks))
    else:  # ended: only ever as the offer's own file, or with a documented code
        try:
            path = end.wait("t1", timeout=1)
            assert hashlib.sha256(path.read_bytes()).hexdigest() == offer.sha256
        except TransferError as err:
            assert err.code in ERROR_CODES


def _props(pairs: list[tuple[str, str]]) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = pairs
    return props


@pytest.fixture
def sender(tmp_path):
    sent: list[tuple[str, bytes]] = []
    end = FileSender(lambda t, p, props=None: sent.append((t, p)), tmp_path / "send")
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(5000))
    end.offer(PREFIX, path, "t1", 1024)
    yield end, sent
    end.close()


@BUDGET
@given(kind=st.sampled_from(["want", "done", "chunk"]), payload=payloads)
def test_a_sender_serves_only_valid_wants_and_raises_nothing(sender, kind, payload):
    end, sent = sender
    sent.clear()
    assert isinstance(end.handle(f"{PREFIX}files/t1/{kind}", payload), bool)
    for topic, _ in sent:
        assert topic == topics(PREFIX, "t1")["chunk"]
    result = end.result("t1")
    if result is not None and not result["ok"]:
        assert result["error"]["code"] in ERROR_CODES or isinstance(result["error"]["code"], str)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """An agent that is never connected: its publishes go to its outbox."""
    root = tmp_path_factory.mktemp("agent")
    board = Agent(AgentConfig(device_id=DEV, data_dir=str(root / "data"), max_capture_bytes=4096,
                              broker=BrokerConfig(host="127.0.0.1", port=1)))
    yield board
    board.file_receiver.close()
    board.outbox.close()
    board.journal.close()


@BUDGET
@given(camera=st.sampled_from(["cam-01", "cam 01", "+", "x" * 70, "ack"]), payload=st.binary(max_size=512),
       props=user_properties, files=st.sampled_from(["files/t/chunk", "files/t/want", "files/t/done", "files/../x/want"]))
def test_the_agent_refuses_any_bad_capture_or_file_message_and_raises_nothing(agent, camera, payload, props, files,
                                                                              caplog):
    caplog.set_level(logging.ERROR)
    before = len(agent.outbox)
    agent._handle(message(PREFIX + f"capture/{camera}", payload, props))
    agent._handle(message(PREFIX + files, payload, props))
    assert not [r for r in caplog.records if r.exc_info]  # nothing escaped to a handler's boundary
    if camera != "ack":
        acks = [json.loads(m.payload) for m in agent.outbox.pending(limit=100_000)[before:]]
        assert acks and all(a["stored"] is False and a["error"]["code"] for a in acks if not a.get("stored"))
