"""Model folders: a real diffusers VAE in the folder, a local vision encoder for the profile."""

import json
import subprocess

import pytest
import torch
from diffusers import AutoencoderKL

from blockskip.errors import InputError
from blockskip.models import Flux
from blockskip.models.codec import VaeCodec
from blockskip.models.pipeline import load_model, sample, save_model, tiny_model


def test_folder_with_a_vae_samples_in_latent_space(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=32, scaling_factor=0.5, shift_factor=0.1)
    model = tiny_model("flux")
    model.family = Flux.tiny(in_channels=16)  # 4 latent channels x 2 x 2 packing
    save_model(model, tmp_path / "m")
    vae.save_pretrained(tmp_path / "m" / "vae")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.codec, VaeCodec)
    assert loaded.codec.factor == 2 and loaded.granularity == 4
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    latents = loaded.codec.encode(images)
    assert latents.shape == (1, 4, 8, 8)
    out = sample(loaded, loaded.encode_text("a leaf"), seed=0, steps=2, height=16, width=16)
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(InputError, match="multiple of 4"):
        sample(loaded, loaded.encode_text("a leaf"), seed=0, steps=2, height=18, width=16)


def test_profile_encoder_from_a_local_transformers_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from blockskip.host.encoders import load_encoder

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path / "dino")
    encoder = load_encoder(str(tmp_path / "dino"))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    emb = encoder.embed(a)
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()
    assert torch.allclose(encoder.embed(a), emb) and not torch.allclose(encoder.embed(b), emb)
    with pytest.raises(InputError, match="config.json"):
        load_encoder(str(tmp_path))


def test_not_a_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="transformer/config.json") as info:
        load_model(tmp_path)
    assert "a bare transformer folder with config.json at its root" in str(info.value)


@pytest.mark.slow
def test_bare_transformer_folder_is_a_model_folder(tmp_path):
    """What `FluxTransformer2DModel.from_pretrained(folder)` reads: config.json at the root."""
    model = tiny_model("flux")
    model.family.model.save_pretrained(tmp_path / "bare")
    loaded = load_model(tmp_path / "bare", text_encoder=False)
    assert loaded.family.config_hash() == model.family.config_hash()
    for name, tensor in model.family.model.state_dict().items():
        assert torch.equal(loaded.family.model.state_dict()[name], tensor), name
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"model": {"config_hash": model.family.config_hash()}, "size": 32,
                                   "d_pre": [0.0] * 7, "d_suf": [0.0] * 7}))
    result = subprocess.run(["blockskip", "plan", "--profile", str(profile), "--model", str(tmp_path / "bare"),
                             "--skip-ratio", "0.5", "--out", str(tmp_path / "plan.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "plan.json").read_text())["model"]["config_hash"] == model.family.config_hash()


@pytest.mark.slow
def test_pixel_space_model_with_latent_in_channels_is_a_clear_error(tmp_path):
    """A latent-space transformer (in_channels 16 = 4 latent channels x 2 x 2) without its vae/."""
    model = tiny_model("flux")
    model.family = Flux.tiny(in_channels=16)
    save_model(model, tmp_path / "m")
    result = subprocess.run(["blockskip", "profile", "--model", str(tmp_path / "m"), "--out",
                             str(tmp_path / "p.json"), "--size", "16"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "in_channels=16" in result.stderr and "pixel space, which needs in_channels=12" in result.stderr
    assert f"add its VAE as {tmp_path / 'm' / 'vae'}/" in result.stderr


def test_vae_of_another_model_is_a_clear_error(tmp_path):
    model = tiny_model("flux")  # pixel space: in_channels 12
    save_model(model, tmp_path / "m")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                  norm_num_groups=4).save_pretrained(tmp_path / "m" / "vae")
    with pytest.raises(InputError, match="in_channels=12, but the VAE in .* has 4 latent channels, which give 16"):
        load_model(tmp_path / "m")
