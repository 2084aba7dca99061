"""The README's main job: `blockskip demo` finishes on the CPU, offline, and writes its report."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from blockskip.models import crops

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(["blockskip", "demo", "--out", str(out), "--samples", "8", "--steps", "12"],
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in range(1, 8):
        assert f"[{step}/7]" in proc.stdout
    assert "cached for the built-in model" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["bundle_verified"] and report["backend"] == "onnxruntime"
    assert report["model"] == "builtin" and report["family"] == "flux"
    assert len(report["losses"]) == 12 and len(report["images_after"]) == 6
    blocks = crops.FLUX_CONFIG["num_layers"] + crops.FLUX_CONFIG["num_single_layers"]
    assert report["plan"]["num_blocks"] == blocks
    assert report["plan"]["n"] + report["plan"]["m"] == blocks // 2, "the demo's default skips 50% of the blocks"
    assert set(report["subject_attributes_after"]) == {"shape", "colour", "pattern"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    before = [Path(p).read_bytes() for p in report["images_before"]]
    after = [Path(p).read_bytes() for p in report["images_after"]]
    assert before != after, "the trained adapter must change the generated images"


def test_demo_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run(["blockskip", "demo", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    setup = [b for b in blocks if "pytest" in b or "blockskip demo" in b]
    assert len(setup) == 2, "README gives exactly two set-up commands"
    test_command = next(b for b in setup if "pytest" in b).strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_demo_on_a_random_tiny_sana(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(["blockskip", "demo", "--model", "tiny-sana", "--out", str(out), "--samples", "4",
                           "--steps", "3", "--backend", "torch"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "sana" and report["subject_attributes_after"] is None


def test_cached_builtin_profile_is_what_the_demo_would_measure():
    """The committed profile belongs to the committed weights and settings, and still measures the same."""
    from blockskip import demo
    from blockskip.host.encoders import EfficientNetLite0
    from blockskip.host.profile import masking_profile
    from blockskip.models.crops import MODEL_DIR
    from blockskip.models.pipeline import load_model

    key = demo.profile_key(MODEL_DIR, 32)
    cached = demo.cached_profile(key)
    assert cached is not None, "retrained weights: rewrite models/weights/crop-profile.json (see this test)"
    assert demo.cached_profile({**key, "steps": 5}) is None and demo.cached_profile(None) is None
    fresh = masking_profile(load_model(MODEL_DIR), EfficientNetLite0(), key["prompts"], key["seeds"],
                            steps=key["steps"], size=key["size"], progress=False)
    for name in ("d_pre", "d_suf"):
        assert fresh[name] == pytest.approx(cached[name], abs=1e-4), name
