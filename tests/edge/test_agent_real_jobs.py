"""The agent's train and generate actions run the real trainer and generator end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from blockskip.models.pipeline import save_model, tiny_model
from test_train import make_bundle

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
