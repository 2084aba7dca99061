"""The crop-leaf world: generator, held-out set, word encoder, and the committed pretrained
model + classifier (models/weights/): they load, and the model follows captions."""

import json

import numpy as np
import pytest
import torch

from blockskip.models import crops
from blockskip.models.pipeline import Model, load_model


def test_render_is_deterministic_and_seed_dependent():
    attrs = {"shape": "heart", "colour": "yellow", "pattern": "spots", "background": "soil"}
    a, b = crops.render(attrs, seed=7, size=32), crops.render(attrs, seed=7, size=32)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(crops.render(attrs, seed=8, size=32)))
    assert crops.render(attrs, seed=7, size=64).size == (64, 64)


def test_attributes_change_the_image():
    base = {"shape": "oval", "colour": "green", "pattern": "none", "background": "sky"}
    ref = np.asarray(crops.render(base, 3), dtype=np.float32)
    for key, values in crops.ATTRIBUTES.items():
        for value in values:
            if value != base[key]:
                other = np.asarray(crops.render({**base, key: value}, 3), dtype=np.float32)
                assert np.abs(other - ref).mean() > 1.0, (key, value)


def test_captions():
    assert crops.caption({"shape": "oval", "colour": "yellow", "pattern": "spots", "background": "soil"}) \
        == "a yellow oval leaf with spots on soil"
    assert crops.caption({"shape": "round", "colour": "green", "pattern": "none", "background": "sky"}) \
        == "a green round leaf on sky"
    assert crops.caption({"colour": "red", "pattern": "rings"}, identifier="sks") == "a sks red leaf with rings"


def test_held_out_combinations_are_never_sampled_for_pretraining():
    assert ("lobed", "purple", "rings", "canopy") in crops.HELD_OUT
    assert ("heart", "red", "stripes", "soil") in crops.HELD_OUT
    assert ("heart", "red", "spots", "soil") not in crops.HELD_OUT
    assert len(crops.HELD_OUT) == 5 * 4 + 4  # purple+rings (any shape, background), red heart stripes
    rng = np.random.default_rng(0)
    drawn = [crops.sample_attrs(rng) for _ in range(5000)]
    assert not any(tuple(a[k] for k in crops.KEYS) in crops.HELD_OUT for a in drawn)
    assert len({tuple(a.values()) for a in drawn}) > 300  # everything else is reachable
    rng = np.random.default_rng(0)
    assert any(crops.is_held_out(crops.sample_attrs(rng, allow_held_out=True)) for _ in range(2000))


def test_word_text_encoder_interface():
    enc = crops.WordTextEncoder(dim=64, pooled_dim=64, max_length=16)
    out = enc.encode("a photo of sks yellow oval leaf with spots on soil")
    assert out["encoder_hidden_states"].shape == (1, 16, 64)
    assert out["pooled_projections"].shape == (1, 64)
    assert torch.all(out["encoder_hidden_states"][0, 11:] == 0)  # padding
    assert enc.config()["kind"] == "words" and enc.family_name == "flux"
    assert {"sks", "xqz", "<pad>", "<unk>"} <= set(enc.vocab)
    ids, mask = enc.tokenize(["a zebra leaf"])
    assert ids[0, 1] == enc.index["<unk>"] and mask[0].sum() == 3
    assert not torch.equal(enc.encode("a red leaf")["pooled_projections"],
                           enc.encode("a green leaf")["pooled_projections"])


# ---- the committed weights ------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return crops.load_crop_model()


@pytest.fixture(scope="module")
def classifier():
    return crops.load_classifier()


def test_committed_weights_load(model):
    assert isinstance(model, Model) and model.family.name == "flux"
    cfg = model.family.model.config
    assert cfg.in_channels == 12 and not cfg.guidance_embeds
    assert model.family.num_blocks == cfg.num_layers + cfg.num_single_layers >= 8
    assert all(p.dtype == torch.float32 for p in model.family.model.parameters())
    assert model.granularity == 2
    text = model.encode_text("a red heart leaf with stripes on soil")
    assert text["encoder_hidden_states"].shape == (1, model.text_encoder.max_length, cfg.joint_attention_dim)
    assert text["pooled_projections"].shape == (1, cfg.pooled_projection_dim)
    size = sum(p.stat().st_size for p in crops.MODEL_DIR.rglob("*") if p.is_file())
    assert size + crops.CLASSIFIER_FILE.stat().st_size < 10 * 2**20
    # the folder is an ordinary model folder for the rest of the tools (transformer + scheduler)
    plain = load_model(crops.MODEL_DIR, text_encoder=False)
    assert torch.equal(next(iter(plain.family.model.state_dict().values())),
                       next(iter(model.family.model.state_dict().values())))


def test_identifier_tokens_were_never_trained(model):
    fresh = crops.WordTextEncoder(model.text_encoder.dim, model.text_encoder.pooled_dim,
                                  model.text_encoder.max_length, model.text_encoder.layers, model.text_encoder.seed)
    for word in crops.IDENTIFIERS:
        i = fresh.index[word]
        trained = model.text_encoder.tokens.weight[i]
        torch.testing.assert_close(trained, fresh.tokens.weight[i], atol=2e-3, rtol=2e-3)  # fp16 storage
    i = fresh.index["yellow"]
    assert not torch.allclose(model.text_encoder.tokens.weight[i], fresh.tokens.weight[i], atol=1e-2)


def test_classifier_reads_fresh_renders(classifier):
    rng = np.random.default_rng(2024)
    combos = [crops.sample_attrs(rng, allow_held_out=True) for _ in range(200)]
    images = crops.to_tensor([crops.render(a, 5 * 10**8 + i) for i, a in enumerate(combos)])
    pred, truth = classifier.predict(images), crops.labels(combos)
    for key in crops.KEYS:
        assert float((pred[key] == truth[key]).float().mean()) > 0.9, key


def test_pretrain_log_is_committed():
    log = json.loads((crops.WEIGHTS / "crop-pretrain-log.json").read_text())
    assert log["loss_curve"][-1]["loss"] < log["loss_curve"][0]["loss"]
    assert set(log["final_caption_accuracy"]["accuracy"]) == set(crops.KEYS)


# Measured with these settings (24 images, seed 0, 10 Euler steps; see models/CROPS.md):
# shape 0.79, colour 1.0, pattern 0.50, background 1.0. The floors leave slack below that and
# stay well above chance (shape 0.2, colour 0.2, pattern 0.25, background 0.25).
MIN_ACCURACY = {"shape": 0.5, "colour": 0.85, "pattern": 0.4, "background": 0.85}


@pytest.mark.slow
def test_model_follows_captions_better_than_chance(model, classifier):
    torch.manual_seed(0)
    acc = crops.caption_accuracy(model, classifier, n=24, seed=0, steps=10)
    for key, floor in MIN_ACCURACY.items():
        assert acc[key] >= floor, (key, acc)
        assert acc[key] > crops.CHANCE[key] + 0.1, (key, acc)
