"""Timestep-aware dynamic patch sampling (DiT-BlockSkip; the repository's DESIGN.md, "The method",
step 1).

For a training draw with timestep t in [0, T] the crop side is

    s(t) = s_min + (t / T) * (s_max - s_min)

rounded to the nearest multiple of the model's pixel granularity (VAE factor x patch size: 16 for
FLUX, 32 for SANA), taken at a uniformly random place in the image and resized to s_min x s_min.
High noise sees the whole picture downsized (global structure); low noise sees native-scale detail.

Schedules (the paper's ablation found `low-to-high` best; all stay selectable):

| schedule      | crop side                                                  |
| ------------- | ---------------------------------------------------------- |
| `low-to-high` | s(t): s_min at t = 0, s_max at t = T (default, the paper)  |
| `high-to-low` | reversed: s_max at t = 0, s_min at t = T                   |
| `random`      | uniform on the granularity grid in [s_min, s_max], any t   |
| `resize`      | no crop: the largest centered square, resized to s_min     |

Images of any size and aspect ratio are accepted as long as their shorter side is at least s_min.
When s(t) is larger than the image's shorter side, the crop side is clamped to the shorter side
rounded down to the granularity (never below s_min), so a crop is always a real square of the
image and nothing is padded or distorted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from blockskip.errors import ConfigError, InputError

SCHEDULES = ("low-to-high", "high-to-low", "random", "resize")
# Downsizing filter: every crop is at least s_min, so resizing to s_min only ever shrinks.
RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class PatchSchedule:
    s_min: int = 256  # training resolution: every patch is resized to s_min x s_min (FLUX paper: 256)
    s_max: int = 512  # crop side at the far end of the schedule (FLUX paper: 512; SANA: 1024 -> 512)
    granularity: int = 16  # crop sides are multiples of this (VAE factor x patch size; FLUX 8 x 2)
    schedule: str = "low-to-high"  # one of SCHEDULES; see the module docstring
    t_max: float = 1.0  # T: the largest timestep (1.0 for a flow-matching sigma, 1000 for DDPM steps)

    def __post_init__(self):
        for name in ("s_min", "s_max", "granularity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.s_min % self.granularity:
            raise ConfigError(f"s_min must be a multiple of granularity {self.granularity}, got {self.s_min}")
        if self.s_max % self.granularity:
            raise ConfigError(f"s_max must be a multiple of granularity {self.granularity}, got {self.s_max}")
        if self.s_min > self.s_max:
            raise ConfigError(f"s_min must be <= s_max, got s_min={self.s_min}, s_max={self.s_max}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if not (isinstance(self.t_max, (int, float)) and math.isfinite(self.t_max) and self.t_max > 0):
            raise ConfigError(f"t_max must be a positive finite number, got {self.t_max!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PatchSchedule":
        unknown = set(data) - {"s_min", "s_max", "granularity", "schedule", "t_max"}
        if unknown:
            raise ConfigError(f"unknown patch schedule field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def _round(self, side: float) -> int:
        """Nearest multiple of the granularity (halves round up, independent of float parity)."""
        g = self.granularity
        return int(math.floor(side / g + 0.5)) * g

    def crop_side(self, t: float, rng: np.random.Generator | None = None) -> int | None:
        """The crop side for timestep t before clamping to an image; None for `resize` (whole image).

        `rng` is only drawn from by the `random` schedule.
        """
        if not (math.isfinite(t) and 0.0 <= t <= self.t_max):
            raise ConfigError(f"timestep t must be in [0, {self.t_max}], got {t}")
        frac = t / self.t_max
        span = self.s_max - self.s_min
        if self.schedule == "low-to-high":
            side = self._round(self.s_min + frac * span)
        elif self.schedule == "high-to-low":
            side = self._round(self.s_max - frac * span)
        elif self.schedule == "random":
            if rng is None:
                raise ConfigError("the random schedule needs an rng")
            g = self.granularity
            side = int(rng.integers(self.s_min // g, self.s_max // g + 1)) * g
        else:  # resize
            return None
        assert self.s_min <= side <= self.s_max, f"crop side {side} outside [{self.s_min}, {self.s_max}]"
        return side

    def sample_patch(self, image: Image.Image, t: float, rng: np.random.Generator) -> tuple[Image.Image, dict]:
        """One training patch: an RGB s_min x s_min image and where it came from.

        info: {"side": crop side in source pixels, "left": x of the crop, "top": y of the crop}.
        Draw order from rng (for reproducibility): crop side (random schedule only), left, top.
        """
        if image.mode != "RGB":
            raise InputError(f"sample_patch needs an RGB image (use load_image), got mode {image.mode}")
        width, height = image.size
        short = min(width, height)
        if short < self.s_min:
            source = image.info.get("source", "image")
            raise InputError(f"{source}: {width}x{height} is smaller than the training resolution: its shorter "
                             f"side {short} must be at least s_min={self.s_min}")
        side = self.crop_side(t, rng)
        if side is None:  # resize: the largest centered square, nothing distorted
            side = short
            left, top = (width - side) // 2, (height - side) // 2
        else:
            side = min(side, short // self.granularity * self.granularity)
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
        # Crop, then resize: resize(box=...) would let the filter read pixels outside the crop.
        patch = image.crop((left, top, left + side, top + side))
        if side != self.s_min:
            patch = patch.resize((self.s_min, self.s_min), RESAMPLE)
        return patch, {"side": side, "left": left, "top": top}


def load_image(path: str | Path, min_side: int = 0) -> Image.Image:
    """Read an image file as 8-bit RGB, upright.

    - EXIF orientation is applied (a phone photo taken in portrait comes out in portrait).
    - Transparency (RGBA, LA, palette with a transparent colour) is composited on white: a cut-out
      subject on a transparent background becomes the subject on white, not on black garbage.
    - Grayscale, 1-bit, palette and CMYK become RGB; 16-bit grayscale is scaled to 8 bits.
    - `min_side`: pass the schedule's s_min to reject images whose shorter side is too small.
    The path is kept in `image.info["source"]` for later error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable image ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data inside a known format
        raise InputError(f"{path}: the image data is corrupt or truncated ({err})") from err
    image = _to_rgb(image, path)
    if min(image.size) < min_side:
        raise InputError(f"{path}: image is {image.width}x{image.height}; its shorter side must be at least "
                         f"{min_side} (s_min), use a larger photo or a smaller s_min")
    image.info["source"] = str(path)
    return image


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        values = np.asarray(image, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise InputError(f"{path}: 32-bit integer image with values outside 16 bits is not supported; "
                             f"save it as 8- or 16-bit")
        image = Image.fromarray((values / 257.0).round().astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise InputError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1], the range the VAE encoder expects."""
    if image.mode != "RGB":
        raise InputError(f"to_tensor needs an RGB image (use load_image), got mode {image.mode}")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)
