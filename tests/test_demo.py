"""The README's main job: `blockskip demo` finishes on the CPU, offline, and writes its report."""

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from blockskip.models import crops

ROOT = Path(__file__).resolve().parents[1]


def start_and_kill(args: list[str], after: str) -> None:
    """Start `blockskip ARGS`, kill it (SIGKILL, as a crash would) once it has printed `after`."""
    proc = subprocess.Popen(["blockskip", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if line.startswith(after):
                break
        else:
            pytest.fail(f"the demo ended before printing {after!r}")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--samples", "8", "--steps", "12"]
    start_and_kill(args, "[4/8]")  # an interrupted run must not block the next one
    assert (out / "demo-run.json").is_file() and not (out / "report.html").exists()
    proc = subprocess.run(["blockskip", *args], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clearing the unfinished demo run" in proc.stdout
    for step in range(1, 9):
        assert f"[{step}/8]" in proc.stdout
    assert "cached for the built-in model" in proc.stdout
    assert re.search(r"step +6/12 +loss [0-9.]+ .*ETA", proc.stdout), "training shows progress with an ETA"
    assert re.search(r"loss [0-9.]+ -> [0-9.]+ \(mean of the first and of the last 1 steps\)", proc.stdout)
    for noise in ("Skipping", "FutureWarning", "[torch.onnx]"):
        assert noise not in proc.stdout + proc.stderr, f"harmless library noise {noise!r} looks like an error"
    report = json.loads((out / "report.json").read_text())
    assert report["bundle_verified"] and report["backend"] == "onnxruntime"
    sizes = report["bundle_bytes"]  # the kept weights travel once, apart from the subject's features
    assert sizes["base pack"] > 0 and sizes["subject bundle"] > 0
    assert re.search(r"base pack [0-9.]+ [KM]iB \(the kept weights: installed once per model and plan\), "
                     r"subject bundle [0-9.]+ [KM]iB", proc.stdout)
    assert (out / "base-pack" / "manifest.sig").is_file() and not (out / "bundle" / "weights").exists()
    assert report["model"] == "builtin" and report["family"] == "flux"
    assert len(report["losses"]) == 12 and len(report["images_after"]) == 6
    # step 8: a small dataset with the adapter, in the image-folder form generate --dataset writes
    rows = report["dataset"]["rows"]
    adapter = hashlib.sha256((out / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()
    assert len(rows) == 6 and {r["label"] for r in rows} == {"subject"} and {r["adapter_sha256"] for r in rows} == {adapter}
    assert all((out / "dataset" / r["file_name"]).is_file() and
               (out / "dataset" / r["file_name"]).with_suffix(".txt").read_text().strip() == r["prompt"] for r in rows)
    assert "A generated dataset" in (out / "report.html").read_text()
    blocks = crops.FLUX_CONFIG["num_layers"] + crops.FLUX_CONFIG["num_single_layers"]
    assert report["plan"]["num_blocks"] == blocks
    assert report["plan"]["n"] + report["plan"]["m"] == blocks // 2, "the demo's default skips 50% of the blocks"
    scores = report["attribute_scores"]
    assert set(scores) == {"shape", "colour", "pattern"} == set(report["subject_attributes_after"])
    assert [scores[a]["chance"] for a in ("shape", "colour", "pattern")] == [1 / 5, 1 / 5, 1 / 4]
    assert all({"before", "after", "photos"} <= set(s) for s in scores.values()), "scores come with baselines"
    html = (out / "report.html").read_text()
    shown = re.findall(r"<img src='data:image/png;base64,[^']*' width=(\d+) height=(\d+)", html)
    assert len(shown) == 5 + 2 * 6 + 6, "subject photos, every sample before and after, the dataset's images"
    assert len(set(shown)) == 1, "every photo and sample is shown at the same scale"
    for sample in report["samples"]:
        assert f"&ldquo;{sample['prompt']}&rdquo;, seed {sample['seed']}" in html, "each sample shows its prompt"
    assert "Seconds per stage" in html and "chance" in html
    before = [Path(p).read_bytes() for p in report["images_before"]]
    after = [Path(p).read_bytes() for p in report["images_after"]]
    assert before != after, "the trained adapter must change the generated images"


@pytest.mark.slow
def test_demo_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    proc = subprocess.run(["blockskip", "demo", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_demo_never_overwrites_a_finished_report(tmp_path):
    (tmp_path / "demo-run.json").write_text("{}")
    (tmp_path / "report.html").write_text("an earlier run")
    proc = subprocess.run(["blockskip", "demo", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "finished demo report" in proc.stderr
    assert (tmp_path / "report.html").read_text() == "an earlier run"


@pytest.mark.slow
@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "--steps must be >= 1"),
    ("--samples", "0", "--samples must be >= 1"),
    ("--skip-ratio", "1", "--skip-ratio must be in [0, 1)"),
    ("--train-size", "64", "--train-size (64) must be <= --size (32)"),
    ("--size", "33", "--size must be a multiple of 2"),
])
def test_demo_checks_its_arguments_before_any_work(tmp_path, option, value, message):
    out = tmp_path / "demo"
    proc = subprocess.run(["blockskip", "demo", "--out", str(out), option, value], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "[1/8]" not in proc.stdout and not out.exists(), "nothing ran, nothing was written"


def test_loss_plot_has_axis_values(tmp_path):
    from PIL import Image

    from blockskip.demo_report import loss_plot, loss_summary, nice_ticks

    losses = [0.3 - 0.002 * i + 0.03 * (-1) ** i for i in range(100)]
    assert loss_summary(losses)["window"] == 10
    assert loss_summary(losses)["first"] == pytest.approx(sum(losses[:10]) / 10)
    ticks = nice_ticks(min(losses), max(losses))
    assert ticks[0] <= min(losses) and ticks[-1] >= max(losses) and 3 <= len(ticks) <= 8
    assert all(float(t).is_integer() for t in nice_ticks(0, 12, integer=True))
    image = Image.open(loss_plot(losses, tmp_path / "loss.png")).convert("L")
    width, height = image.size

    def labels(box, along_rows: bool) -> int:
        """Separate runs of inked rows (or columns) in `box`: one per label; a bare axis line is one run."""
        region = image.crop(box)
        w, h = region.size
        px = region.load()
        lines = [any(px[x, y] < 128 for x in range(w)) for y in range(h)] if along_rows else \
                [any(px[x, y] < 128 for y in range(h)) for x in range(w)]
        return sum(1 for i, inked in enumerate(lines) if inked and (i == 0 or not lines[i - 1]))

    assert labels((0, 30, 80, height - 40), along_rows=True) >= 4, "values along the loss axis"
    assert labels((74, height - 48, width, height - 28), along_rows=False) >= 4, "values along the step axis"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    setup = [b for b in blocks if "pytest" in b or "blockskip demo" in b]
    assert len(setup) == 2, "README gives exactly two set-up commands"
    test_command = next(b for b in setup if "pytest" in b).strip()
    assert test_command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_demo_on_a_random_tiny_sana(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(["blockskip", "demo", "--model", "tiny-sana", "--out", str(out), "--samples", "4",
                           "--steps", "3", "--backend", "torch"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == "sana" and report["subject_attributes_after"] is None


@pytest.mark.slow
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
