"""Bad commands: each gets its documented error and the agent keeps serving."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockskip.edge import messages
from blockskip.edge.messages import ACTIONS, ERROR_CODES, CommandError, parse_command, resolve_in

DEV = "dev-a"


@pytest.mark.slow
@pytest.mark.parametrize(
    "payload, code",
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (json.dumps({"action": "status"}).encode(), "bad_request"),
        (json.dumps({"id": "a/b", "action": "status"}).encode(), "bad_request"),
        (json.dumps({"id": "#", "action": "status"}).encode(), "bad_request"),
    ],
)
def test_commands_without_a_usable_id_get_an_error_event(broker, start_agent, probe_factory, wait_until, payload, code):
    start_agent()
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    probe.send(f"blockskip/{DEV}/cmd", payload)
    event = wait_until(lambda: probe.on("/error"))[0]
    assert event["type"] == "error" and event["ok"] is False and event["error"]["code"] == code
    assert probe.request(DEV, {"id": "alive", "action": "status"})["result"]["state"] == "online"


@pytest.mark.slow
def test_each_bad_command_gets_its_error_reply_and_the_agent_keeps_serving(broker, start_agent, probe_factory,
                                                                           tmp_path, wait_until):
    agent = start_agent(max_command_bytes=2048)
    outside = tmp_path / "outside"
    outside.mkdir()
    (agent.data_dir / "escape").symlink_to(outside)
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])
    cases = {
        "unknown": ({"action": "selfdestruct"}, "unknown_action"),
        "types": ({"action": "captures", "args": {"limit": "ten"}}, "bad_args"),
        "bool-as-int": ({"action": "captures", "args": {"limit": True}}, "bad_args"),
        "extra-arg": ({"action": "status", "args": {"verbose": 1}}, "bad_args"),
        "args-list": ({"action": "status", "args": [1]}, "bad_args"),
        "missing": ({"action": "train", "args": {}}, "bad_args"),
        "dotdot": ({"action": "train", "args": {"bundle": "../../etc"}}, "bad_path"),
        "absolute": ({"action": "train", "args": {"bundle": "/etc"}}, "bad_path"),
        "symlink": ({"action": "train", "args": {"bundle": "escape"}}, "bad_path"),
        "missing-file": ({"action": "train", "args": {"bundle": "nope"}}, "not_found"),
        "gen-out": ({"action": "generate", "args": {"model": "model", "prompts": ["p"], "out": "../x"}}, "bad_path"),
        "gen-prompts": ({"action": "generate", "args": {"model": "model", "prompts": "p"}}, "bad_args"),
    }
    for cid, (body, code) in cases.items():
        reply = probe.request(DEV, {"id": cid, **body})
        assert reply["id"] == cid and reply["ok"] is False and reply["error"]["code"] == code, (cid, reply)
        assert reply["error"]["message"]
    big = json.dumps({"id": "big", "action": "status", "args": {"pad": "x" * 4000}})
    probe.send(f"blockskip/{DEV}/cmd", big)
    event = wait_until(lambda: probe.on("/error"))[0]
    assert event["error"]["code"] == "too_large"
    reply = probe.request(DEV, {"id": "alive", "action": "status"})
    assert reply["ok"] and reply["result"]["state"] == "online"
    assert all(len(probe.on(f"/reply/{cid}")) == 1 for cid in cases)  # exactly one reply each
    assert not os.listdir(outside)


def test_resolve_in_confines_paths(tmp_path):
    root = tmp_path / "data"
    (root / "bundles" / "b1").mkdir(parents=True)
    assert resolve_in(root, "bundles/b1", must_exist=True) == (root / "bundles" / "b1").resolve()
    assert resolve_in(root, str(root / "bundles")) == (root / "bundles").resolve()
    for bad in ("../x", "bundles/../../x", "/tmp", str(tmp_path)):
        with pytest.raises(CommandError) as err:
            resolve_in(root, bad)
        assert err.value.code == "bad_path"


# ---- property-based: the command parser never crashes and never accepts an invalid command -----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
arg_names = st.sampled_from(sorted({name for spec in ACTIONS.values() for name in spec} | {"bogus"}))
commands = st.fixed_dictionaries(
    {"id": st.one_of(st.from_regex(messages.ID_PATTERN, fullmatch=True), json_values),
     "action": st.one_of(st.sampled_from(sorted(ACTIONS)), json_values)},
    optional={"args": st.one_of(st.dictionaries(arg_names, json_values, max_size=5), json_values),
              "extra": json_values},
)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.one_of(commands.map(lambda c: json.dumps(c).encode()), st.binary(max_size=200)))
def test_parser_accepts_only_valid_commands_and_fails_with_documented_codes(payload):
    try:
        cmd = parse_command(payload)
    except CommandError as err:
        assert err.code in ERROR_CODES and err.message
        return
    raw = json.loads(payload)
    assert messages.ID_PATTERN.match(cmd.id) and cmd.action in ACTIONS and set(raw) <= {"id", "action", "args"}
    spec = ACTIONS[cmd.action]
    assert set(cmd.args) <= set(spec)
    assert all(name in cmd.args for name, arg in spec.items() if arg.required)
    for name, value in cmd.args.items():
        assert isinstance(value, spec[name].types) and (not isinstance(value, bool) or bool in spec[name].types)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=1000), st.from_regex(messages.ID_PATTERN, fullmatch=True))
def test_parser_round_trips_valid_commands(limit, cid):
    cmd = parse_command(json.dumps({"id": cid, "action": "captures", "args": {"limit": limit}}).encode())
    assert (cmd.id, cmd.action, cmd.args) == (cid, "captures", {"limit": limit})


def test_generate_takes_a_precision_and_refuses_unknown_ones():
    args = {"model": "m", "prompts": ["a leaf"], "backend": "onnxruntime"}
    cmd = parse_command(json.dumps({"id": "g1", "action": "generate", "args": {**args, "precision": "int8"}}).encode())
    assert cmd.args["precision"] == "int8"
    with pytest.raises(CommandError) as err:
        parse_command(json.dumps({"id": "g2", "action": "generate", "args": {**args, "precision": "int4"}}).encode())
    assert err.value.code in ERROR_CODES and "precision" in err.value.message


def test_error_reply_payloads_name_code_and_message():
    assert json.loads(messages.reply_error("c1", "busy", "job x is running")) == {
        "id": "c1", "ok": False, "error": {"code": "busy", "message": "job x is running"}}
    assert json.loads(messages.reply_error(None, "bad_json", "nope"))["type"] == "error"
    with pytest.raises(AssertionError):
        CommandError("made_up", "x")
