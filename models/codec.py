"""Images <-> latents: a real diffusers VAE from a local folder, or pixel space for tiny models.

Images are float tensors (B, 3, H, W) in [-1, 1]. `factor` is the pixels per latent pixel; with
the family's token patch it gives the model's pixel granularity (FLUX: 8 x 2 = 16).
"""

from __future__ import annotations

import torch


class PixelCodec:
    """Latents are the pixels themselves (tiny and demo models)."""

    kind = "pixel"
    factor = 1
    channels = 3

    def config(self) -> dict:
        return {"kind": self.kind}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class VaeCodec:
    """diffusers' AutoencoderKL (FLUX, SD3) or AutoencoderDC (SANA), with the model's own
    scaling (and shift) factors from its config."""

    kind = "vae"

    def __init__(self, vae: torch.nn.Module, path: str | None = None):
        self.vae = vae.eval()
        self.path = path
        cfg = vae.config
        self.scaling = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        if hasattr(cfg, "block_out_channels"):  # AutoencoderKL
            self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        else:  # AutoencoderDC: one downsample per stage but the first
            self.factor = 2 ** (len(cfg.encoder_block_out_channels) - 1)
        self.channels = cfg.latent_channels

    @classmethod
    def from_pretrained(cls, path: str) -> "VaeCodec":
        import json
        from pathlib import Path

        from diffusers import AutoencoderDC, AutoencoderKL

        class_name = json.loads((Path(path) / "config.json").read_text()).get("_class_name", "AutoencoderKL")
        vae_cls = AutoencoderDC if class_name == "AutoencoderDC" else AutoencoderKL
        return cls(vae_cls.from_pretrained(path, local_files_only=True), path)

    def config(self) -> dict:
        return {"kind": self.kind, "path": self.path}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(images.to(self.vae.device, self.vae.dtype))
        latents = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latent
        return (latents - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((latents / self.scaling + self.shift).to(self.vae.dtype)).sample
        return images.float().clamp(-1, 1)
