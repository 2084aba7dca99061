"""Prior preservation on the host: DreamBooth's class-prior loss at no generation cost on the board.

A few photos and a rare identifier teach the model the subject, and with nothing else in the loss
it drifts: every prompt that names the subject's class comes out as the training photo again
("language drift", the field's name; benchmarks/results/quality.md measures it as context
accuracy). DreamBooth's answer is to train on the class's own images too, made by the frozen model
from the class prompt ("a photo of a leaf"), so the class keeps what it was. Generating them needs
the full model, which only the host has, so the host does it here:

    class prompt -> `count` images from the frozen full model (seeds 0..count-1) -> the same cache
    as the subject's (plan, patch schedule, feature storage), written to STAGING/prior/features/

The subject bundle then carries `prior/` beside `features/` and `bundle.json` names it (`prior`);
`blockskip train --prior-weight W` adds W x the loss on a prior draw to each step's (edge/train.py).
The images themselves stay on the host, next to the cache (STAGING.prior-images/), never sealed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from blockskip.errors import InputError
from blockskip.host.cache import build_cache
from blockskip.models.pipeline import sample
from blockskip.plan import PlanDocument

PRIOR_DIR = "prior"  # the prior draws' features, inside the staging folder and the bundle


def images_dir(staging: Path) -> Path:
    """Where the class images go: beside the staging folder, so no bundle seals them."""
    return Path(staging).with_name(Path(staging).name + ".prior-images")


@dataclass(frozen=True)
class PriorSettings:
    prompt: str  # the class prompt, without the identifier: "a photo of a leaf"
    images: int = 8  # class images the frozen model generates
    samples: int | None = None  # prior draws cached (None: as many as the subject's)
    steps: int = 20  # sampling steps per class image
    seed: int = 0  # of the class images (image i: seed + i) and of the prior draws

    def __post_init__(self):
        if not self.prompt or not self.prompt.strip():
            raise InputError("the prior's class prompt is empty; give one such as 'a photo of a leaf'")
        if self.images < 1 or self.steps < 1 or (self.samples is not None and self.samples < 1):
            raise InputError("prior images, samples and steps must be >= 1")


def _to_image(image: torch.Tensor) -> Image.Image:
    array = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def class_images(model, settings: PriorSettings, size: int, out: Path, progress: bool = True) -> list[Path]:
    """`settings.images` images of the class prompt from the frozen full model, `size` px square,
    as PNGs in `out` (an image already there from an earlier run is kept: the seeds fix them)."""
    out.mkdir(parents=True, exist_ok=True)
    text = model.encode_text(settings.prompt)
    negative = model.encode_text("") if getattr(model.family, "cfg_scale", 1.0) != 1.0 else None
    paths = []
    for i in tqdm(range(settings.images), desc="class images", unit="image", disable=not progress):
        path = out / f"class-{i:04d}.png"
        if not path.is_file():
            with torch.no_grad():
                image = sample(model, text, seed=settings.seed + i, steps=settings.steps, height=size, width=size,
                               negative=negative)[0]
            tmp = path.with_name(path.name + ".tmp")
            _to_image(image).save(tmp, format="PNG")
            tmp.replace(path)
        paths.append(path)
    return paths


def build_prior(model, plan: PlanDocument, settings: PriorSettings, staging: Path, samples: int,
                feature_dtype: str | None = None, shard_size: int = 32, progress: bool = True) -> dict:
    """Class images and their cached draws into `staging` (resumable like the cache); returns the
    bundle metadata entry `prior`."""
    if model.text_encoder is None:
        raise InputError("prior preservation generates class images from the class prompt: the model needs its "
                         "text encoder")
    size = plan.schedule.s_max
    images = class_images(model, settings, size, images_dir(staging), progress)
    prior_samples = settings.samples or samples
    build_cache(model, plan, images, [settings.prompt], Path(staging) / PRIOR_DIR, seed=settings.seed + 1,
                samples=prior_samples, shard_size=shard_size, feature_dtype=feature_dtype, progress=progress,
                features_only=True, desc="prior cache")
    return {**asdict(settings), "samples": prior_samples, "size": size}
