"""Prior preservation (host/prior.py, `train --prior-weight`) and per-photo captions: the class
images' draws are the frozen full model's, sealed in the subject bundle and not the images; training
adds their loss at the same peak memory; weight 0 is exactly the training without them; a photo's
caption is the prompt its draws train on."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from PIL import Image

from blockskip.bundle import verify_bundle
from blockskip.edge.train import TrainConfig, train
from blockskip.errors import InputError
from blockskip.features import FeatureReader
from blockskip.host.cache import build_cache, draw_inputs, read_captions
from blockskip.host.patches import load_image
from blockskip.host.prepare import PrepareSettings, prepare
from blockskip.host.prior import PriorSettings, images_dir
from blockskip.models.pipeline import tiny_model
from blockskip.models.skip import reduced_forward
from helpers import UNSIGNED_OK, bundle_loss, plan_for, read_adapter, subject_images

CLASS = "a photo of a leaf"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The same subject prepared without and with a prior (tiny FLUX, 2 + 1 blocks skipped)."""
    tmp = tmp_path_factory.mktemp("prior")
    model = tiny_model("flux")
    plan = plan_for(model, 2, 1, samples=8)
    photos = subject_images(tmp / "photos")
    plain = prepare(model, plan, photos, ["a photo of sks leaf"], tmp / "plain", single=True, progress=False)
    prior = prepare(model, plan, photos, ["a photo of sks leaf"], tmp / "prior", single=True, progress=False,
                    settings=PrepareSettings(prior=PriorSettings(CLASS, images=3, steps=4)))
    return {"model": model, "plan": plan, "plain": plain.subject, "prior": prior.subject,
            "staging": prior.staging, "tmp": tmp}


def test_the_bundle_carries_the_class_draws_of_the_frozen_full_model(bundles):
    model, plan = bundles["model"], bundles["plan"]
    manifest = verify_bundle(bundles["prior"])
    assert manifest["prior"] == {"prompt": CLASS, "images": 3, "samples": 8, "steps": 4, "seed": 0, "size": 32}
    files = sorted(manifest["files"])
    assert "prior/features/shard-00000.safetensors" in files and "prior/features/prompts.safetensors" in files
    # the class images stay on the host, beside the staging folder; no image file is sealed
    images = sorted(images_dir(bundles["staging"]).glob("*.png"))
    assert len(images) == 3 and all(Image.open(p).size == (32, 32) for p in images)
    assert not [f for f in files if f.endswith(".png")]
    # every prior draw is the full model's forward on a class image with the class prompt
    reader = FeatureReader(bundles["prior"] / "prior", model.family.prompt_cond_keys)
    assert len(reader) == 8
    loaded = [(p.name, load_image(p)) for p in images]
    text = [model.encode_text(CLASS)]
    for position in range(len(reader)):
        entry, residuals, cond, target, info = reader.get(position)
        inputs, expected, _ = draw_inputs(model, plan.schedule, loaded, text, 1, 1, info["index"])
        with torch.no_grad():
            full = model.family.diffusers_forward(**inputs)
            cached = reduced_forward(model.family, plan.skip, entry, residuals, cond)
        assert (cached - full).abs().max().item() < 1e-5
        assert torch.equal(target, expected)
    # and the subject's own draws are the same as without a prior
    plain = verify_bundle(bundles["plain"])["files"]
    assert {k: v for k, v in manifest["files"].items() if k.startswith("features/")} == \
        {k: v for k, v in plain.items() if k.startswith("features/")}


@pytest.mark.slow
def test_training_with_the_prior_keeps_the_class_and_weight_zero_is_the_plain_training(bundles):
    tmp = bundles["tmp"]
    config = dict(steps=30, grad_accum=1, lr=5e-3, seed=0, checkpoint_every=0, device="cpu", track_memory=True)
    events = []
    plain = train(bundles["plain"], tmp / "a-plain", TrainConfig(**config), trust=UNSIGNED_OK)
    off = train(bundles["prior"], tmp / "a-off", TrainConfig(**config, prior_weight=0), trust=UNSIGNED_OK)
    on = train(bundles["prior"], tmp / "a-on", TrainConfig(**config, prior_weight=1), trust=UNSIGNED_OK,
               on_event=events.append)
    # weight 0: bit for bit the training of the bundle without prior draws
    a, b = read_adapter(tmp / "a-plain")[0], read_adapter(tmp / "a-off")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert off["prior_weight"] == 0 and on["prior_weight"] == 1
    assert all("prior_loss" in e for e in events if e["type"] == "progress")
    # the class-prior term is in the loss: the adapter trained with it fits the class draws better
    # than the one trained without (whether that keeps prompts followed is benchmarks/quality.py's
    # question, on the crop model where there is something to forget)
    assert bundle_loss(bundles["prior"], tmp / "a-on", part="prior") < \
        bundle_loss(bundles["prior"], tmp / "a-plain", part="prior")
    # ... while the subject is still learned
    start = bundle_loss(bundles["prior"])
    assert bundle_loss(bundles["prior"], tmp / "a-on") < start
    # at the peak memory of the training without it (each loss has its own backward pass)
    assert on["peak_tensor_bytes"] <= 1.05 * plain["peak_tensor_bytes"]


def test_train_refuses_a_negative_prior_weight():
    with pytest.raises(Exception, match="prior_weight"):
        TrainConfig(prior_weight=-1)
    with pytest.raises(InputError, match="class prompt"):
        PriorSettings("  ")


def test_a_photo_trains_on_its_own_caption(tmp_path):
    model = tiny_model("flux")
    photos = subject_images(tmp_path / "photos")
    photos[0].with_suffix(".txt").write_text("a photo of sks leaf on soil\nsecond line ignored\n")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file_name": photos[1].name,
                                                         "text": "a photo of sks leaf in rain"}) + "\n")
    captions = read_captions(photos, tmp_path / "captions.jsonl")
    assert captions == {photos[0].name: "a photo of sks leaf on soil", photos[1].name: "a photo of sks leaf in rain"}
    out = build_cache(model, plan_for(model, 2, 1, samples=6), photos, ["a photo of sks leaf"], tmp_path / "stage",
                      captions=captions, progress=False)
    meta = json.loads((out / "bundle.json").read_text())
    prompts = meta["train_prompts"]
    reader = FeatureReader(out, model.family.prompt_cond_keys)
    for position in range(len(reader)):
        draw = reader.get(position)[4]
        assert prompts[draw["prompt"]] == captions.get(draw["image"], "a photo of sks leaf"), draw
    assert meta["captions"] == captions


@pytest.mark.parametrize("line,message", [
    ("not json", "line 2: not JSON"),
    ('{"file_name": "subject0.png"}', 'line 2: needs "file_name" and a non-empty "text"'),
    ('{"file_name": "nope.png", "text": "x"}', "line 2: no photo named 'nope.png'"),
])
def test_a_bad_captions_file_is_refused_naming_the_line(tmp_path, line, message):
    photos = subject_images(tmp_path / "photos")
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps({"file_name": photos[0].name, "text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        read_captions(photos, path)


@pytest.mark.slow
def test_prepare_cli_with_captions_for_every_photo_and_a_prior(tmp_path):
    plan = plan_for(tiny_model("flux"), 2, 1, samples=4).save(tmp_path / "plan.json")
    photos = subject_images(tmp_path / "photos")
    common = ["blockskip", "prepare", "--model", "tiny-flux", "--plan", str(plan), "--images", str(photos[0].parent),
              "--single"]
    missing = subprocess.run([*common, "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "3 of 3 photos have no caption: give --prompt" in missing.stderr
    for i, photo in enumerate(photos):
        photo.with_suffix(".txt").write_text(f"a photo of sks leaf number {i}")
    done = subprocess.run([*common, "--out", str(tmp_path / "s"), "--prior-prompt", CLASS, "--prior-images", "2",
                           "--prior-steps", "2"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "3 with their own caption; prior: 2 class images of 'a photo of a leaf'" in done.stdout
    manifest = verify_bundle(tmp_path / "s")
    assert manifest["prior"]["prompt"] == CLASS and len(manifest["captions"]) == 3
