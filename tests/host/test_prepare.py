"""`blockskip prepare`: photos -> cache -> base pack + subject bundle in one command, the same
pipeline the host worker and the demo run (tests/test_architecture.py holds that they do)."""

from __future__ import annotations

import json
import subprocess

import pytest

from blockskip.bundle import verify_bundle
from blockskip.features import WEIGHTS_FILE
from blockskip.models.pipeline import tiny_model
from helpers import plan_for, subject_images


def _prepare(*args):
    return subprocess.run(["blockskip", "prepare", *map(str, args)], capture_output=True, text=True, timeout=280)


@pytest.mark.slow
def test_prepare_writes_a_signed_base_pack_and_subject_bundles_the_board_verifies(tmp_path):
    plan = plan_for(tiny_model("flux"), 2, 1, samples=4).save(tmp_path / "plan.json")
    photos = subject_images(tmp_path / "photos")[0].parent
    assert subprocess.run(["blockskip", "keygen", "--out", str(tmp_path / "host")]).returncode == 0
    common = ["--model", "tiny-flux", "--plan", plan, "--images", photos, "--sign", tmp_path / "host.key"]
    first = _prepare(*common, "--prompt", "a photo of sks leaf", "--bank-prompt", "sks leaf on soil",
                     "--out", tmp_path / "leaf", "--base-pack-out", tmp_path / "base")
    assert first.returncode == 0, first.stderr
    assert "wrote base pack" in first.stdout and "wrote subject bundle" in first.stdout
    base = verify_bundle(tmp_path / "base", public_key=tmp_path / "host.pub", require_signature=True)
    subject = verify_bundle(tmp_path / "leaf", public_key=tmp_path / "host.pub", require_signature=True)
    assert subject["base_pack"]["content_sha256"] == base["content_sha256"]
    assert subject["samples"] == 4 and subject["train_prompts"] == ["a photo of sks leaf"]
    assert subject["bank_prompts"] == ["sks leaf on soil"]
    assert (tmp_path / "leaf.staging" / "bundle.json").is_file(), "the cache stays for a re-seal"

    # a second subject of the same model and plan names the base pack and does not rewrite it
    before = (tmp_path / "base" / "manifest.json").stat().st_mtime_ns
    second = _prepare(*common, "--prompt", "a photo of xqz leaf", "--out", tmp_path / "other",
                      "--base-pack", tmp_path / "base")
    assert second.returncode == 0, second.stderr
    assert "(not rewritten)" in second.stdout and "wrote base pack" not in second.stdout
    assert (tmp_path / "base" / "manifest.json").stat().st_mtime_ns == before
    other = verify_bundle(tmp_path / "other", public_key=tmp_path / "host.pub", require_signature=True)
    assert other["base_pack"]["content_sha256"] == base["content_sha256"]


@pytest.mark.slow
def test_prepare_says_what_is_wrong_before_any_work(tmp_path):
    plan = plan_for(tiny_model("flux"), 2, 1, samples=4).save(tmp_path / "plan.json")
    photos = subject_images(tmp_path / "photos")[0].parent
    base = ["--model", "tiny-flux", "--prompt", "sks", "--out", tmp_path / "s"]
    cases = [
        ([*base, "--plan", plan, "--images", photos], "one of the arguments --base-pack-out --base-pack --single"),
        ([*base, "--plan", plan, "--images", tmp_path / "nowhere", "--single"], "image folder"),
        ([*base, "--plan", tmp_path / "none.json", "--images", photos, "--single"], "does not exist (run `blockskip plan`"),
        ([*base, "--plan", plan, "--images", photos, "--base-pack", tmp_path / "nope"], "base pack"),
        ([*base, "--plan", plan, "--images", photos, "--single", "--sign", tmp_path / "k.key"], "signing key"),
    ]
    for args, says in cases:
        result = _prepare(*args)
        assert result.returncode == 2 and says in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.staging").exists()


@pytest.mark.slow
def test_a_single_bundle_carries_the_weights_and_the_job_metadata(tmp_path):
    from blockskip.host.prepare import PrepareSettings, prepare

    model = tiny_model("flux")
    done = prepare(model, plan_for(model, 2, 1, samples=4), subject_images(tmp_path / "photos"), ["sks"],
                   tmp_path / "job", single=True, extra={"job": "j1"}, settings=PrepareSettings(tar=True),
                   progress=False)
    manifest = verify_bundle(done.subject)
    assert manifest["job"] == "j1" and WEIGHTS_FILE in manifest["files"]
    assert done.base_pack is None and (tmp_path / "job.tar").is_file()
    assert json.loads((done.staging / "bundle.json").read_text())["samples"] == 4
