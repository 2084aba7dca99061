"""The agent's train and generate actions run the real trainer and generator end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from blockskip.models.pipeline import save_model, tiny_model
from helpers import make_bundle

DEV = "dev-a"


def test_agent_trains_then_generates_with_the_real_code(broker, start_agent, probe_factory, wait_until):
    agent = start_agent(progress_interval_s=0.0, allow_unsigned_bundles=True)  # signatures: test_trust.py
    data = agent.data_dir
    make_bundle(data / "work", "flux", 2, 1, samples=4)
    save_model(tiny_model("flux"), data / "flux-model")
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])

    reply = probe.request(DEV, {"id": "t1", "action": "train",
                                "args": {"bundle": "work/bundle", "out": "adapters/t1", "steps": 3}})
    assert reply["ok"], reply
    done = wait_until(lambda: [e for e in probe.on("/progress") if e.get("type") in ("done", "failed")], 120)
    assert done[-1]["type"] == "done", done
    steps = [e["step"] for e in probe.on("/progress") if e.get("type") == "progress" and e.get("job") == "t1"]
    assert steps[-1] == 3
    adapter = data / "adapters" / "t1" / "pytorch_lora_weights.safetensors"
    assert adapter.is_file()

    bank = json.loads((data / "work" / "bundle" / "prompts" / "bank.json").read_text())["prompts"] \
        if (data / "work" / "bundle" / "prompts" / "bank.json").is_file() else None
    prompts = bank[:1] if bank else ["a photo of sks leaf"]
    reply = probe.request(DEV, {"id": "g1", "action": "generate",
                                "args": {"model": "flux-model", "adapter": "adapters/t1", "prompts": prompts,
                                         "steps": 2, "height": 16, "width": 16, "backend": "torch"}})
    assert reply["ok"], reply
    done = wait_until(lambda: [e for e in probe.on("/progress")
                               if e.get("job") == "g1" and e.get("type") in ("done", "failed")], 120)
    assert done[-1]["type"] == "done", done
    result = wait_until(lambda: probe.on("/result"))[0]
    path = Path(result["path"])
    assert path.is_relative_to(data) and hashlib.sha256(path.read_bytes()).hexdigest() == result["sha256"]
    assert result["prompt"] == prompts[0]


def test_an_agent_with_a_memory_budget_refuses_jobs_over_it_and_keeps_running(broker, start_agent, probe_factory,
                                                                              wait_until):
    """The budget of the agent's config reaches the jobs: a train and a generate over it fail at
    their start with the estimate in the message, and the agent answers the next command."""
    agent = start_agent(progress_interval_s=0.0, allow_unsigned_bundles=True, memory_budget_gib=0.01)
    data = agent.data_dir
    make_bundle(data / "work", "flux", 2, 1, samples=4)
    save_model(tiny_model("flux"), data / "flux-model")
    probe = probe_factory(broker.port, [f"blockskip/{DEV}/#"])

    for command in ({"id": "t1", "action": "train", "args": {"bundle": "work/bundle", "out": "adapters/t1"}},
                    {"id": "g1", "action": "generate",
                     "args": {"model": "flux-model", "prompts": ["a leaf"], "steps": 1, "height": 16, "width": 16,
                              "backend": "torch"}}):
        assert probe.request(DEV, command)["ok"]
        ended = wait_until(lambda: [e for e in probe.on("/progress") if e.get("job") == command["id"]
                                    and e.get("type") in ("done", "failed")], 120)
        assert ended[-1]["type"] == "failed", ended
        assert "needs about" in json.dumps(ended[-1]) and "--memory-budget 0.01 GiB allows" in json.dumps(ended[-1])
    assert not (data / "adapters" / "t1" / "pytorch_lora_weights.safetensors").exists()
    assert probe.request(DEV, {"id": "s1", "action": "status", "args": {}})["ok"]
