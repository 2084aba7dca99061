"""A model as the tools use it: transformer family + image codec + text conditioning +
flow-matching scheduler, loaded from a local folder (diffusers layout), never from a hub.

Folder layout (diffusers' own, plus one optional file of ours):
    transformer/            config.json + weights (required)
    vae/                    AutoencoderKL / AutoencoderDC (absent: pixel space)
    scheduler/              scheduler_config.json (absent: the family's default)
    text_encoder*/, tokenizer*/   the pipeline's text encoders (absent: prompt bank or hash encoder)
    blockskip.json          {"family": ..., "text_encoder": {"kind": "hash", ...}, "image_size": ...}
                            (optional)

A bare transformer folder (config.json + weights at its root, what
`FluxTransformer2DModel.from_pretrained(folder)` reads) is accepted too; the other parts are then
looked up beside config.json in the same folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from blockskip.errors import InputError
from blockskip.models import FAMILIES, Family, family_class
from blockskip.models.codec import PixelCodec, VaeCodec
from blockskip.models.text import DiffusersTextEncoder, HashTextEncoder, WordTextEncoder

# The families' own flow-matching schedulers (FLUX.1-dev, SANA 1.0 configs).
DEFAULT_SCHEDULERS = {
    "flux": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096),
    "sana": dict(shift=3.0, use_dynamic_shifting=False),
}
CLASS_TO_FAMILY = {cls.model_cls.__name__: name for name, cls in FAMILIES.items()}


@dataclass
class Model:
    family: Family
    codec: PixelCodec | VaeCodec = field(default_factory=PixelCodec)
    text_encoder: HashTextEncoder | DiffusersTextEncoder | None = None
    scheduler_config: dict = field(default_factory=dict)
    path: str | None = None
    meta: dict = field(default_factory=dict)  # the folder's blockskip.json ({} when it has none)

    @property
    def granularity(self) -> int:
        """Pixels per token side: crops and image sizes must be multiples of it."""
        return self.codec.factor * self.family.token_patch

    def encode_text(self, prompt: str) -> dict[str, torch.Tensor]:
        if self.text_encoder is None:
            raise InputError(f"no text encoder in model {self.path!r}: use a prompt from the bundle's prompt bank")
        return self.text_encoder.encode(prompt)

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(**self.scheduler_config)

    def shift_for(self, height: int, width: int) -> float:
        """The timestep shift at this image size (FLUX shifts with the token count)."""
        cfg = self.scheduler_config
        if not cfg.get("use_dynamic_shifting"):
            return float(cfg.get("shift", 1.0))
        return math.exp(_mu(self, height, width))

    def describe(self) -> dict:
        return {"family": self.family.name, "config": self.family.json_config(),
                "config_hash": self.family.config_hash(), "codec": self.codec.config(),
                "text_encoder": self.text_encoder.config() if self.text_encoder else None,
                "scheduler": self.scheduler_config, "granularity": self.granularity}


def _mu(model: Model, height: int, width: int) -> float:
    cfg = model.scheduler_config
    patch = model.granularity
    seq_len = (height // patch) * (width // patch)
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return seq_len * slope + cfg["base_shift"] - slope * cfg["base_image_seq_len"]


def tiny_model(family_name: str = "flux", seed: int = 0) -> Model:
    """A tiny pixel-space model with the hash text encoder (tests and the demo)."""
    family = family_class(family_name).tiny(seed=seed)
    text = HashTextEncoder(family_name, family.text_shapes(), seed=seed)
    return Model(family, PixelCodec(), text, dict(DEFAULT_SCHEDULERS[family_name]))


def save_model(model: Model, path: str | Path) -> Path:
    """Write a model folder that `load_model` reads (transformer + our small config)."""
    root = Path(path)
    model.family.model.save_pretrained(root / "transformer")
    meta = {"family": model.family.name, "scheduler": model.scheduler_config}
    if isinstance(model.text_encoder, HashTextEncoder):
        meta["text_encoder"] = model.text_encoder.config()
    (root / "blockskip.json").write_text(json.dumps(meta, indent=2))
    return root


LAYOUTS = ("a diffusers pipeline folder with transformer/config.json (and optional vae/, scheduler/, "
           "text_encoder/), or a bare transformer folder with config.json at its root")


def load_model(path: str | Path, torch_dtype: torch.dtype = torch.float32, text_encoder: bool = True,
               weights: bool = True) -> Model:
    """A model folder as a Model. With `weights=False` the transformer is built on the meta
    device from its config alone (backends that run an exported graph need only its shapes)."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"model folder {str(root)!r} does not exist; expected {LAYOUTS}")
    config_path = root / "transformer" / "config.json"
    if not config_path.is_file():
        config_path = root / "config.json"
    if not config_path.is_file():
        raise InputError(f"{str(root)!r} is not a model folder: neither transformer/config.json nor config.json "
                         f"is in it; expected {LAYOUTS}")
    meta = json.loads((root / "blockskip.json").read_text()) if (root / "blockskip.json").is_file() else {}
    config = json.loads(config_path.read_text())
    class_name = config.get("_class_name")
    name = meta.get("family") or CLASS_TO_FAMILY.get(class_name)
    if name is None:
        raise InputError(f"{config_path}: class {class_name!r} is not a supported transformer "
                         f"({', '.join(sorted(CLASS_TO_FAMILY))}); expected {LAYOUTS}")
    cls = family_class(name)
    vae_config = root / "vae" / "config.json"
    _check_in_channels(cls, config, config_path, root)
    if weights:
        family = cls.from_pretrained(str(root), torch_dtype=torch_dtype)
    else:
        with torch.device("meta"):
            family = cls(cls.model_cls.from_config(config).eval())
    codec = VaeCodec.from_pretrained(str(root / "vae")) if vae_config.is_file() else PixelCodec()
    encoder = None
    if text_encoder:
        text_meta = meta.get("text_encoder")
        if text_meta and text_meta.get("kind") == "hash":
            encoder = HashTextEncoder(name, text_meta["dims"], text_meta["max_length"], text_meta["seed"])
        elif text_meta and text_meta.get("kind") == "words":  # the built-in crop model's encoder
            encoder = WordTextEncoder.load(root)
        elif (root / "text_encoder").is_dir():
            encoder = DiffusersTextEncoder(name, str(root))
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        scheduler = {k: v for k, v in json.loads(scheduler_file.read_text()).items() if not k.startswith("_")}
    else:
        scheduler = meta.get("scheduler") or dict(DEFAULT_SCHEDULERS[name])
    return Model(family, codec, encoder, scheduler, str(root), meta)


def _check_in_channels(cls: type[Family], config: dict, config_path: Path, root: Path) -> None:
    """The transformer's `in_channels` must be what the codec feeds it: the image's channels
    (3 in pixel space, the VAE's latent channels otherwise) times the family's token packing
    (FLUX packs 2 x 2 latent pixels per token)."""
    side = getattr(cls, "latent_packing", 1)
    packing = side * side
    in_channels = config.get("in_channels")
    vae_config = root / "vae" / "config.json"
    if vae_config.is_file():
        channels = json.loads(vae_config.read_text()).get("latent_channels")
        if channels is not None and in_channels != channels * packing:
            raise InputError(f"{config_path}: the transformer takes in_channels={in_channels}, but the VAE in "
                             f"{vae_config.parent} has {channels} latent channels, which give {channels * packing}; "
                             "use the VAE that belongs to this transformer")
        return
    expected = PixelCodec.channels * packing
    if in_channels != expected:
        packed = f" ({PixelCodec.channels} RGB channels x {side} x {side} packing)" if side > 1 else " (RGB)"
        raise InputError(f"{config_path}: the transformer takes in_channels={in_channels}, but a model without a "
                         f"vae/ folder runs in pixel space, which needs in_channels={expected}{packed}. For a latent-space "
                         f"model add its VAE as {root / 'vae'}/ (diffusers layout: config.json + weights), or point "
                         "--model at the pipeline folder that holds both transformer/ and vae/")


# ---- flow matching ------------------------------------------------------------------------
def training_sigmas(gen: torch.Generator, count: int, shift: float = 1.0) -> torch.Tensor:
    """Timesteps from the FLUX/SD3 training distribution: logit-normal(0, 1), then the
    model's shift `s * u / (1 + (s - 1) * u)`."""
    u = torch.sigmoid(torch.randn(count, generator=gen))
    return shift * u / (1 + (shift - 1) * u)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """Rectified-flow interpolation and its velocity target: x_t = (1 - s) x0 + s noise,
    v = noise - x0."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


@torch.no_grad()
def sample(model: Model, text: dict, *, seed: int, steps: int, height: int, width: int,
           batch: int = 1, predict: Callable[[dict], torch.Tensor] | None = None,
           on_step: Callable[[int, int], None] | None = None, negative: dict | None = None,
           guidance_scale: float | None = None) -> torch.Tensor:
    """Flow-matching Euler sampling with diffusers' scheduler; returns images (B, 3, H, W).

    `predict(inputs) -> output` runs the transformer (default: the torch model); other
    backends (ONNX Runtime, TensorRT) pass their own. Classifier-free guidance runs where the
    family uses it (SANA: scale 4.5 by default) and a `negative` conditioning (the empty
    prompt's) is given: v = v_neg + scale * (v - v_neg). FLUX is guidance-distilled: its scale
    enters as the `guidance` input instead.
    """
    g = model.granularity
    if height % g or width % g:
        raise InputError(f"image size {width}x{height} must be a multiple of {g} for this model")
    family = model.family
    predict = predict or (lambda inputs: family.diffusers_forward(**inputs))
    f = model.codec.factor
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, model.codec.channels, height // f, width // f, generator=gen)
    scale = family.cfg_scale if guidance_scale is None else guidance_scale
    scheduler = model.scheduler()
    kwargs = {"mu": _mu(model, height, width)} if model.scheduler_config.get("use_dynamic_shifting") else {}
    scheduler.set_timesteps(num_inference_steps=steps, **kwargs)
    for i, t in enumerate(scheduler.timesteps):
        sigma = (t / 1000).expand(batch)
        velocity = family.output_to_latents(predict(family.make_inputs(latents, sigma, text)),
                                            latents.shape[2], latents.shape[3])
        if negative is not None and scale != 1.0:
            unconditional = family.output_to_latents(predict(family.make_inputs(latents, sigma, negative)),
                                                     latents.shape[2], latents.shape[3])
            velocity = unconditional + scale * (velocity - unconditional)
        latents = scheduler.step(velocity, t, latents).prev_sample
        if on_step:
            on_step(i + 1, steps)
    return model.codec.decode(latents)
