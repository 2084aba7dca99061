"""One subject's cache split over ranks: `torchrun --nproc-per-node 2 -m blockskip cache` on the
CPU (gloo, loopback) stages the bytes one process stages, the bundle made from it verifies and
trains, and a rank restarted alone skips its complete shards."""

import json
import os
import subprocess
import sys

import pytest
import torch

from blockskip.cli import main as cli_main
from blockskip.edge.train import TrainConfig, train
from blockskip.errors import InputError
from blockskip.features import FeatureReader
from blockskip.host.bundle import TrustPolicy, verify_bundle
from blockskip.host.cache import build_cache
from blockskip.models.pipeline import tiny_model
from helpers import plan_for, subject_images
from mqtt_harness import free_port

PROMPTS = ["a photo of sks leaf", "sks leaf on soil"]


def staged(root):
    """{relative path: bytes} of every file in a staging folder."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_draws(a, b, prompt_keys):
    ra, rb = FeatureReader(a, prompt_keys), FeatureReader(b, prompt_keys)
    assert len(ra) == len(rb)
    for position in range(len(ra)):
        *tensors_a, info_a = ra.get(position)
        *tensors_b, info_b = rb.get(position)
        assert info_a == info_b and info_a["index"] == position, "draw order is draw index order"
        entry_a, residuals_a, cond_a, target_a = tensors_a
        entry_b, residuals_b, cond_b, target_b = tensors_b
        assert entry_a.keys() == entry_b.keys() and all(torch.equal(entry_a[k], entry_b[k]) for k in entry_a)
        assert residuals_a.keys() == residuals_b.keys()
        for span in residuals_a:
            assert all(torch.equal(residuals_a[span][k], residuals_b[span][k]) for k in residuals_a[span])
        assert cond_a.keys() == cond_b.keys() and all(torch.equal(cond_a[k], cond_b[k]) for k in cond_a)
        assert torch.equal(target_a, target_b)


def test_torchrun_two_ranks_stage_what_one_process_stages_and_the_bundle_trains(tmp_path):
    model = tiny_model("flux")
    images = subject_images(tmp_path / "images")[0].parent
    plan_for(model, 2, 1, samples=7).save(tmp_path / "plan.json")
    # 7 draws in shards of 2: rank 0 computes shards 0 and 2 (4 draws), rank 1 shards 1 and 3 (3 draws)
    args = ["cache", "--model", "tiny-flux", "--plan", str(tmp_path / "plan.json"), "--images", str(images),
            *[word for prompt in PROMPTS for word in ("--prompt", prompt)], "--bank-prompt", "sks leaf in the rain",
            "--shard-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.Popen([sys.executable, "-m", "blockskip", *args, "--out", str(tmp_path / "one")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                          "-m", "blockskip", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=240)
    out_one, err_one = one.communicate(timeout=240)
    assert one.returncode == 0, err_one
    assert two.returncode == 0, two.stderr
    assert out_one.count("features for 7 draws") == 1
    assert two.stdout.count("features for 7 draws (fp32") == 1 and "by 2 ranks" in two.stdout, "rank 0 alone reports"
    progress = two.stderr.replace("\r", "\n")
    assert "cache (rank 0 of 2): 100%" in progress and "4/4" in progress, "rank 0 computes its 4 draws of 7"
    assert "rank 1" not in progress, "one progress bar, rank 0's"

    a, b = staged(tmp_path / "one"), staged(tmp_path / "two")
    assert sorted(b) == sorted(a), "the same files: shards, prompts, weights, bank, bundle.json; no rank leftovers"
    assert [name for name in a if name.startswith("features/shard-")] == [
        f"features/shard-{k:05d}.safetensors" for k in range(4)]
    assert_same_draws(tmp_path / "one", tmp_path / "two", model.family.prompt_cond_keys)
    assert b == a, "byte for byte the staging of one process"

    manifests = []
    for run in ("one", "two"):
        assert cli_main(["bundle", str(tmp_path / run), "--base-pack-out", str(tmp_path / f"{run}.base"),
                         "--out", str(tmp_path / f"{run}.subject")]) == 0
        manifests.append([verify_bundle(tmp_path / f"{run}.{kind}")["files"] for kind in ("base", "subject")])
    assert manifests[0] == manifests[1], "the same base pack and subject bundle, file for file"
    train(tmp_path / "two.subject", tmp_path / "adapter", TrainConfig(steps=2, grad_accum=1, checkpoint_every=0),
          trust=TrustPolicy(allow_unsigned=True), base_pack=tmp_path / "two.base")
    losses = json.loads((tmp_path / "adapter" / "losses.json").read_text())
    assert losses and all(loss == loss for loss in losses), "finite training losses"


@pytest.mark.slow
def test_a_rank_writes_only_its_shards_and_rank_0_finishes_once_all_are_complete(tmp_path):
    """The library form without a process group: ranks run one after the other."""
    model = tiny_model("sana")
    paths = subject_images(tmp_path / "images", 2)
    plan_doc = plan_for(model, 1, 1, samples=5)

    def cache(out, rank, world_size):
        return build_cache(model, plan_doc, paths, PROMPTS, out, shard_size=2, progress=False, rank=rank,
                           world_size=world_size)

    single = cache(tmp_path / "single", 0, 1)
    out = tmp_path / "ranks"
    cache(out, 1, 2)
    assert sorted(staged(out)) == ["features/prompts.rank1.safetensors", "features/shard-00001.safetensors"], \
        "rank 1 writes its shards and its prompt conditioning, none of the shared files"
    (out / "features" / "shard-00001.safetensors").unlink()  # rank 1 crashed mid-shard
    with pytest.raises(InputError, match="shard-00001"):
        cache(out, 0, 2)
    assert not (out / "bundle.json").exists(), "no bundle.json while a shard is missing"
    done = {name: (out / "features" / name).stat().st_mtime_ns for name in ("shard-00000.safetensors",
                                                                            "shard-00002.safetensors")}
    cache(out, 1, 2)  # rank 1 restarted
    cache(out, 0, 2)  # rank 0 restarted: its shards are complete, it only merges and writes the shared files
    assert {name: (out / "features" / name).stat().st_mtime_ns for name in done} == done, "complete shards kept"
    assert staged(out) == staged(single)
    assert_same_draws(single, out, model.family.prompt_cond_keys)


def test_rank_must_be_one_of_the_world(tmp_path):
    model = tiny_model("flux")
    with pytest.raises(ValueError, match="rank"):
        build_cache(model, plan_for(model, 1, 1), subject_images(tmp_path / "i", 1), PROMPTS, tmp_path / "s",
                    rank=2, world_size=2)
