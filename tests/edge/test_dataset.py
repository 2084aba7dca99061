"""`blockskip generate --dataset SPEC`: an image-folder dataset that Hugging Face `datasets` loads
as is, with a caption per image and a record of what made each one; a run killed halfway resumes to
the same set without making an image twice; a SPEC mistake names its line and field."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockskip.edge.dataset import generate_dataset
from blockskip.edge.dataset_spec import load_spec
from blockskip.edge.generate import GenerateConfig
from blockskip.errors import InputError

CROP = Path(__file__).resolve().parents[2] / "models" / "weights" / "crop-flux"  # has its text encoder
SPEC = """\
seed: 3
images_per_combination: 2
variables:
  background: [soil, sky]
  light: [dawn, noon]
classes:
  - name: sks_leaf
    prompt: "a photo of sks leaf on {background}"
  - name: green_leaf
    prompts: ["a photo of a green oval leaf on {background}", "a green leaf at {light}"]
    images_per_combination: 1
"""
FIELDS = {"file_name", "label", "prompt", "seed", "variables", "model", "adapter_sha256", "plan", "backend", "steps",
          "height", "width"}


def _write_spec(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def _cli(spec: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blockskip", "generate", "--dataset", str(spec), "--model", str(CROP), "--out",
            str(out), "--steps", "2", "--height", "32", "--width", "32", "--backend", "torch", *extra]


def _digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.suffix in (".png", ".txt")}


@pytest.mark.slow
def test_a_generated_dataset_loads_with_the_datasets_library_and_resumes_after_a_kill(tmp_path):
    datasets = pytest.importorskip("datasets")  # a dev dependency: present in CI
    spec = _write_spec(tmp_path)
    whole = subprocess.run(_cli(spec, tmp_path / "whole"), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert "8 of 8 images (sks_leaf 4, green_leaf 4); 8 made now, 0 kept" in whole.stdout

    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "whole"), split="train")
    assert loaded.num_rows == 8
    assert sorted(set(loaded["label"])) == ["green_leaf", "sks_leaf"]
    assert FIELDS - {"file_name"} <= set(loaded.column_names)
    assert loaded[0]["image"].size == (32, 32)
    assert sorted(loaded["seed"]) == list(range(3, 11))
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metadata.jsonl").read_text().splitlines()]
    assert all(set(r) == FIELDS and r["backend"] == "torch" and r["model"] == str(CROP) for r in rows)
    for row in rows:  # the caption beside each image is its prompt
        assert (tmp_path / "whole" / row["file_name"]).with_suffix(".txt").read_text().strip() == row["prompt"]
    assert {r["prompt"] for r in rows if r["label"] == "green_leaf"} == {
        "a photo of a green oval leaf on soil", "a photo of a green oval leaf on sky", "a green leaf at dawn",
        "a green leaf at noon"}

    # killed halfway (SIGKILL, no chance to clean up), then the same command again
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(spec, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        metadata = out / "metadata.jsonl"
        if metadata.is_file() and len(metadata.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    made_before = len((out / "metadata.jsonl").read_text().splitlines())
    assert 3 <= made_before < 8, "the kill should land mid-run"
    again = subprocess.run(_cli(spec, out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{8 - made_before} made now, {made_before} kept from before" in again.stdout
    assert _digests(out) == _digests(tmp_path / "whole"), "the resumed set is the uninterrupted one"
    assert (out / "metadata.jsonl").read_text() == (tmp_path / "whole" / "metadata.jsonl").read_text()


@pytest.mark.slow
def test_a_stopped_library_run_resumes_and_another_spec_is_refused_in_its_folder(tmp_path):
    spec = load_spec(_write_spec(tmp_path))
    config = GenerateConfig(model=str(CROP), prompts=spec.prompts(), out_dir=str(tmp_path / "ds"), steps=2,
                            height=32, width=32, backend="torch")
    images = []
    first = generate_dataset(spec, config, on_event=lambda e: images.append(e) if e["type"] == "image" else None,
                             should_stop=lambda: len(images) >= 2)
    assert first["stopped"] and first["made"] == 2
    second = generate_dataset(spec, config)
    assert not second["stopped"] and second["made"] == 6 and second["kept"] == 2
    assert second["classes"] == {"sks_leaf": 4, "green_leaf": 4}
    other = load_spec(_write_spec(tmp_path, SPEC.replace("seed: 3", "seed: 4")))
    with pytest.raises(InputError, match="another spec or other settings"):
        generate_dataset(other, config)


@pytest.mark.parametrize("edit,message", [
    (("seed: 3", "seed: -1"), "line 1: seed: must be an integer from 0"),
    (("  light: [dawn, noon]", "  light: dawn"), "line 5: variables.light: must be a non-empty list"),
    (("{background}\"\n  - name: green", "{weather}\"\n  - name: green"),
     "line 8: classes[0].prompt: {weather} is not a variable (variables: background, light)"),
    (("  - name: green_leaf", "  - name: sks_leaf"), "line 9: classes[1].name: class 'sks_leaf' is listed twice"),
    (("  - name: green_leaf", "  - name: green/leaf"), "line 9: classes[1].name: must be 1-64 characters"),
    (("    images_per_combination: 1", "    images_per_combination: 0"),
     "line 11: classes[1].images_per_combination: must be an integer from 1"),
    (("    images_per_combination: 1", "    colour: red"), "line 11: classes[1].colour: unknown field"),
    (("images_per_combination: 2\n", "images_per_combinations: 2\n"), "line 2: images_per_combinations: unknown field"),
    (("  - name: sks_leaf\n    prompt:", "  - name: sks_leaf\n    prompts:"),
     "line 8: classes[0].prompts: must be a list of non-empty strings"),
    (("variables:", "variables: [\n"), "not valid YAML"),
], ids=["seed", "variable-list", "unknown-variable", "duplicate-class", "class-name", "count", "class-field",
        "top-field", "prompts-type", "yaml"])
def test_a_spec_mistake_names_its_line_and_field(tmp_path, edit, message):
    old, new = edit
    assert old in SPEC
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")):
        load_spec(_write_spec(tmp_path, SPEC.replace(old, new, 1)))


def test_the_cli_refuses_a_bad_spec_and_prompts_beside_it_in_one_line(tmp_path):
    spec = _write_spec(tmp_path, SPEC.replace("seed: 3", "seed: x"))
    bad = subprocess.run(_cli(spec, tmp_path / "o"), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "line 1: seed: must be an integer" in bad.stderr and "Traceback" not in bad.stderr
    both = subprocess.run(_cli(_write_spec(tmp_path), tmp_path / "o", "--prompt", "x"), capture_output=True,
                          text=True, timeout=120)
    assert both.returncode == 2 and "--dataset takes its prompts and counts from the spec" in both.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_agent_makes_a_dataset_over_mqtt_and_refuses_a_bad_spec_or_an_adapter_outside(
        broker, start_agent, probe_factory, wait_until):
    import shutil

    datasets = pytest.importorskip("datasets")
    agent = start_agent(progress_interval_s=0.0)
    shutil.copytree(CROP, agent.data_dir / "models" / "crop")
    probe = probe_factory(broker.port, ["blockskip/dev-a/#"])
    spec = {"seed": 1, "variables": {"background": ["soil", "sky"]},
            "classes": [{"name": "sks_leaf", "prompt": "a photo of sks leaf on {background}"},
                        {"name": "green", "prompt": "a photo of a green leaf"}]}
    args = {"model": "models/crop", "steps": 2, "height": 32, "width": 32, "backend": "torch"}

    bad = probe.request("dev-a", {"id": "d0", "action": "dataset",
                                  "args": {**args, "spec": {**spec, "classes": [{"name": "x", "prompt": "{rain}"}]}}})
    assert not bad["ok"] and bad["error"]["code"] == "bad_args"
    assert "classes[0].prompt: {rain} is not a variable" in bad["error"]["message"]
    outside = probe.request("dev-a", {"id": "d1", "action": "dataset", "args": {**args, "spec": {
        "classes": [{"name": "x", "prompt": "a leaf", "adapter": "/etc"}]}}})
    assert not outside["ok"] and outside["error"]["code"] == "bad_path"

    reply = probe.request("dev-a", {"id": "d2", "action": "dataset", "args": {**args, "spec": spec}})
    assert reply["ok"], reply
    ended = wait_until(lambda: [e for e in probe.on("/progress")
                                if e.get("job") == "d2" and e.get("type") in ("done", "failed")], 180)
    assert ended[-1]["type"] == "done", ended
    assert [e for e in probe.on("/progress") if e.get("job") == "d2" and e.get("type") == "progress"]
    result = wait_until(lambda: [r for r in probe.on("/result") if r.get("job") == "d2"])[0]
    assert result["classes"] == {"sks_leaf": 2, "green": 1} and result["made"] == 3
    out = agent.data_dir / "datasets" / "d2"
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert loaded.num_rows == 3 and sorted(set(loaded["label"])) == ["green", "sks_leaf"]
    assert probe.request("dev-a", {"id": "s1", "action": "status", "args": {}})["ok"]
