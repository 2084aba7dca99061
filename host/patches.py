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

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from blockskip.errors import InputError
from blockskip.plan import RESAMPLE, SCHEDULES, PatchSchedule  # noqa: F401  (the schedule is part of the plan)


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
