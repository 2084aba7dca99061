"""Model folders: a real diffusers VAE in the folder, a local vision encoder for the profile."""

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
    with pytest.raises(InputError, match="transformer/config.json"):
        load_model(tmp_path)
