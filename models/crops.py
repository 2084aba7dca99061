"""The built-in crop-leaf world: a procedural image generator, a word-level text encoder, the
small pretrained FLUX-family model that follows its captions, and an attribute classifier
that measures how well it does. See models/CROPS.md.

- `render(attrs, seed, size)`: a leaf of a given shape / colour / lesion pattern on a background,
  deterministic from the seed (random place, scale, rotation, background texture).
- `caption(attrs)`: "a yellow oval leaf with spots on soil" ("... leaf on sky" for no lesions).
- `HELD_OUT`: attribute combinations never rendered in pretraining (personalization subjects).
- `WordTextEncoder`: a fixed vocabulary, learned embeddings; the `HashTextEncoder` interface.
- `load_crop_model()`: the committed pretrained model (`models/weights/crop-flux/`).
- `AttributeClassifier` / `load_classifier()`: a small CNN with one head per attribute.
- `caption_accuracy(model, classifier, n, seed, steps)`: generate from random captions and
  classify; per-attribute accuracy (chance = 1 / number of values).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from blockskip.errors import InputError
from blockskip.models import text
from blockskip.models.codec import PixelCodec
from blockskip.models.flux import Flux
from blockskip.models.pipeline import DEFAULT_SCHEDULERS, load_model, Model, sample

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["oval", "round", "lance", "heart", "lobed"],
    "colour": ["green", "yellow", "red", "brown", "purple"],
    "pattern": ["none", "spots", "stripes", "rings"],
    "background": ["soil", "sky", "canopy", "straw"],
}
KEYS = tuple(ATTRIBUTES)

# Partial attribute combinations never rendered during pretraining: an image is held out when
# it matches every entry of one rule. Personalization subjects are drawn from these.
HELD_OUT_RULES: tuple[dict[str, str], ...] = (
    {"colour": "purple", "pattern": "rings"},
    {"colour": "red", "shape": "heart", "pattern": "stripes"},
)


def _all_combos() -> list[dict[str, str]]:
    import itertools

    return [dict(zip(KEYS, values)) for values in itertools.product(*ATTRIBUTES.values())]


def is_held_out(attrs: dict) -> bool:
    return any(all(attrs.get(k) == v for k, v in rule.items()) for rule in HELD_OUT_RULES)


# Every full combination (shape, colour, pattern, background) that pretraining never saw.
HELD_OUT: frozenset[tuple[str, str, str, str]] = frozenset(
    tuple(c[k] for k in KEYS) for c in _all_combos() if is_held_out(c))

WEIGHTS = Path(__file__).parent / "weights"
MODEL_DIR = WEIGHTS / "crop-flux"
CLASSIFIER_FILE = WEIGHTS / "crop-classifier.safetensors"


def sample_attrs(rng: np.random.Generator, allow_held_out: bool = False) -> dict[str, str]:
    """Uniform attributes; without `allow_held_out`, resample until the combo is not held out."""
    while True:
        attrs = {k: values[int(rng.integers(len(values)))] for k, values in ATTRIBUTES.items()}
        if allow_held_out or not is_held_out(attrs):
            return attrs


def caption(attrs: dict, identifier: str | None = None) -> str:
    """'a yellow oval leaf with spots on soil'; missing attributes are left out of the sentence;
    `identifier` (e.g. 'sks') goes before the leaf word: 'a sks yellow oval leaf ...'."""
    words = ["a"]
    if identifier:
        words.append(identifier)
    words += [attrs[k] for k in ("colour", "shape") if attrs.get(k)]
    words.append("leaf")
    if attrs.get("pattern") and attrs["pattern"] != "none":
        words += ["with", attrs["pattern"]]
    if attrs.get("background"):
        words += ["on", attrs["background"]]
    return " ".join(words)


# ---- rendering ------------------------------------------------------------------------------
LEAF_RGB = {"green": (62, 165, 48), "yellow": (232, 205, 45), "red": (200, 38, 32),
            "brown": (150, 88, 38), "purple": (128, 48, 165)}
LESION_DARK, LESION_PALE = (45, 25, 12), (240, 228, 165)
SUPERSAMPLE = 4


def _shape_outline(shape: str, n: int = 96) -> np.ndarray:
    """Leaf outline in leaf units (axis along y, tip at y = -1), shape (n, 2)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if shape == "oval":
        x, y = 0.58 * np.sin(t), np.cos(t)
    elif shape == "round":
        x, y = 0.88 * np.sin(t), 0.88 * np.cos(t)
    elif shape == "lance":
        s = np.sin(t)
        x, y = 0.32 * np.sign(s) * np.abs(s) ** 1.6, np.cos(t)
    elif shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        x, y = x / 17.0, -(y + 2.5) / 14.5  # point at +y (base), lobes at -y
    elif shape == "lobed":
        r = 0.62 + 0.36 * np.cos(5 * t)
        x, y = r * np.sin(t), r * np.cos(t)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.stack([x, y], axis=1)


def _noise(rng, size: int, cells: int, amp: float) -> np.ndarray:
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) * amp


def _background(kind: str, rng, S: int) -> np.ndarray:
    jitter = rng.uniform(-10, 10, 3)
    if kind == "soil":
        base = np.array([92, 64, 42]) + jitter
        img = np.ones((S, S, 3)) * base
        img += _noise(rng, S, 8, 14)[..., None] + rng.normal(0, 10, (S, S, 1))
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(5, 10))):  # pebbles and clods
            cx, cy, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0.02, 0.05) * S
            shade = tuple(int(v) for v in (base * rng.choice([0.6, 1.35])).clip(0, 255))
            draw.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=shade)
        return np.asarray(pil, dtype=np.float32)
    if kind == "sky":
        top, bottom = np.array([60, 120, 205]) + jitter, np.array([165, 205, 240]) + jitter
        ramp = np.linspace(0, 1, S)[:, None, None]
        img = top * (1 - ramp) + bottom * ramp + np.zeros((S, S, 3))
        cloud = Image.new("L", (S, S), 0)
        draw = ImageDraw.Draw(cloud)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0, S), rng.uniform(0, S)
            rx, ry = rng.uniform(0.12, 0.25) * S, rng.uniform(0.05, 0.1) * S
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=200)
        alpha = np.asarray(cloud.filter(ImageFilter.GaussianBlur(S * 0.03)), dtype=np.float32)[..., None] / 255
        return img * (1 - alpha) + 250 * alpha
    if kind == "canopy":
        img = np.ones((S, S, 3)) * (np.array([22, 52, 24]) + jitter * 0.5)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(10, 18))):  # out-of-focus leaves
            cx, cy, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0.06, 0.14) * S
            g = rng.uniform(60, 100)
            draw.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=(int(g * 0.4), int(g), int(g * 0.35)))
        pil = pil.filter(ImageFilter.GaussianBlur(S * 0.02))
        return np.asarray(pil, dtype=np.float32) + rng.normal(0, 5, (S, S, 1))
    if kind == "straw":
        img = np.ones((S, S, 3)) * (np.array([200, 178, 122]) + jitter)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        angle = rng.uniform(0, np.pi)
        for _ in range(int(rng.integers(25, 40))):  # straw stalks, roughly parallel
            a = angle + rng.normal(0, 0.15)
            cx, cy, half = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0.2, 0.5) * S
            dx, dy = math.cos(a) * half, math.sin(a) * half
            shade = (150, 122, 64) if rng.random() < 0.5 else (236, 218, 160)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=shade, width=max(1, S // 40))
        return np.asarray(pil, dtype=np.float32)
    raise ValueError(f"unknown background {kind!r}")


def _pattern_mask(pattern: str, rng, to_px, L: float, S: int) -> Image.Image:
    """Lesion mask in image pixels; drawn in leaf units through `to_px`, clipped later."""
    mask = Image.new("L", (S, S), 0)
    if pattern == "none":
        return mask
    draw = ImageDraw.Draw(mask)
    if pattern == "spots":
        for _ in range(int(rng.integers(6, 10))):
            (x, y), r = rng.uniform(-0.45, 0.45, 2) * [1, 1.5], rng.uniform(0.09, 0.13) * L
            (px, py), = to_px(np.array([[x, y]]))
            draw.ellipse([px - r, py - r, px + r, py + r], fill=255)
    elif pattern == "stripes":  # bands across the leaf
        offset, width = rng.uniform(0, 0.3), max(1, int(0.13 * L))
        for y in np.arange(-1.2 + offset, 1.2, 0.34):
            ends = to_px(np.array([[-1.2, y], [1.2, y]]))
            draw.line([tuple(ends[0]), tuple(ends[1])], fill=255, width=width)
    elif pattern == "rings":  # target spots: a ring with a dot
        for _ in range(int(rng.integers(2, 4))):
            x, y = rng.uniform(-0.2, 0.2), rng.uniform(-0.55, 0.55)
            (px, py), = to_px(np.array([[x, y]]))
            r, w = rng.uniform(0.24, 0.3) * L, max(1, int(0.09 * L))
            draw.ellipse([px - r, py - r, px + r, py + r], outline=255, width=w)
            d = 0.07 * L
            draw.ellipse([px - d, py - d, px + d, py + d], fill=255)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return mask


def render(attrs: dict, seed: int, size: int = 32) -> Image.Image:
    """A leaf with `attrs` (shape, colour, pattern, background), deterministic from `seed`."""
    rng = np.random.default_rng([seed, 0x1EAF])
    S = size * SUPERSAMPLE
    img = _background(attrs["background"], rng, S)
    L = rng.uniform(0.34, 0.43) * S  # leaf half-length in pixels
    theta = rng.uniform(-0.7, 0.7)
    centre = S / 2 + rng.uniform(-0.07, 0.07, 2) * S
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])

    def to_px(points: np.ndarray) -> np.ndarray:
        return points @ rot.T * L + centre

    leaf = Image.new("L", (S, S), 0)
    ImageDraw.Draw(leaf).polygon([tuple(p) for p in to_px(_shape_outline(attrs["shape"]))], fill=255)
    stem = to_px(np.array([[0.0, 0.8], [0.0, 1.22]]))
    colour = np.array(LEAF_RGB[attrs["colour"]]) + rng.uniform(-12, 12, 3)
    leaf_px = np.ones((S, S, 3)) * colour * (1 + _noise(rng, S, 4, 0.06)[..., None])
    lesion = LESION_DARK if attrs["colour"] in ("green", "yellow") else LESION_PALE
    pattern = np.asarray(_pattern_mask(attrs["pattern"], rng, to_px, L, S), dtype=np.float32)[..., None] / 255
    leaf_px = leaf_px * (1 - pattern) + np.array(lesion) * pattern
    stem_img = Image.new("L", (S, S), 0)
    ImageDraw.Draw(stem_img).line([tuple(stem[0]), tuple(stem[1])], fill=255, width=max(1, S // 48))
    alpha = np.asarray(leaf, dtype=np.float32)[..., None] / 255
    stem_a = np.asarray(stem_img, dtype=np.float32)[..., None] / 255 * (1 - alpha)
    img = img * (1 - alpha) + leaf_px * alpha
    img = img * (1 - stem_a) + colour * 0.7 * stem_a
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return out.resize((size, size), Image.Resampling.BOX)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


# ---- text encoder ---------------------------------------------------------------------------
GLUE = ["a", "an", "the", "leaf", "with", "on", "photo", "of", "close", "up", "picture", "and"]
IDENTIFIERS = ["sks", "xqz"]
VOCAB = ["<pad>", "<unk>"] + [w for values in ATTRIBUTES.values() for w in values if w != "none"] + GLUE + IDENTIFIERS


class WordTextEncoder(text.WordTextEncoder):
    """The crop world's word encoder: text.WordTextEncoder over VOCAB. Identifier tokens ("sks",
    "xqz") never occur in pretraining captions, so their embeddings stay at their random init: a
    rare token to bind a personalized subject to."""

    def __init__(self, dim: int = 64, pooled_dim: int = 64, max_length: int = 16, layers: int = 1,
                 seed: int = 0, vocab: list[str] | None = None):
        super().__init__(dim, pooled_dim, max_length, layers, seed, vocab=VOCAB if vocab is None else vocab)

    @classmethod
    def load(cls, root: str | Path) -> "WordTextEncoder":
        enc = super().load(root)
        if enc.vocab != VOCAB:
            raise ValueError(f"{root}: text encoder vocabulary differs from this version's")
        return enc


# ---- its committed sensitivity profile ---------------------------------------------------------
PROFILE_FILE = WEIGHTS / "crop-profile.json"
PROFILE_PROMPTS = ("a photo of sks leaf", "a photo of sks leaf on soil")


def profile_settings(size: int) -> dict:
    """The committed profile's measurement (masking_profile arguments besides the model and
    encoder): what the demo and a host worker serving the built-in model use."""
    return {"prompts": list(PROFILE_PROMPTS), "seeds": [0], "steps": 4, "size": size}


def profile_key(model_dir: Path, size: int) -> dict:
    """What the demo's profile depends on: the weights' bytes, the encoder and the settings."""
    import hashlib

    weights = Path(model_dir) / "transformer" / "diffusion_pytorch_model.safetensors"
    return {"weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), **profile_settings(size),
            "encoder": "efficientnet-lite0"}


def cached_profile(key: dict | None) -> dict | None:
    """The committed profile of the built-in model when it was measured with exactly `key`."""
    path = PROFILE_FILE
    if key is None or not path.is_file():
        return None
    profile = json.loads(path.read_text())
    return profile if profile.get("key") == key else None


# ---- the model ------------------------------------------------------------------------------
FLUX_CONFIG = dict(patch_size=1, in_channels=12, num_layers=2, num_single_layers=6, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
                   guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def new_crop_model(seed: int = 0, **overrides):
    """A freshly initialized crop model (diffusers init) with its word encoder, for pretraining."""
    from diffusers import FluxTransformer2DModel


    config = {**FLUX_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**config)
    text = WordTextEncoder(config["joint_attention_dim"], config["pooled_projection_dim"], seed=seed)
    return Model(Flux(transformer), PixelCodec(), text, dict(DEFAULT_SCHEDULERS["flux"]))


def save_crop_model(model, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write a `load_model`-compatible folder: transformer/ (diffusers layout), text_encoder.*,
    blockskip.json. Weights are stored in `dtype` (fp16 keeps the folder small)."""
    import copy

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model.family.model).to(dtype).save_pretrained(root / "transformer")
    text = copy.deepcopy(model.text_encoder).to(dtype)
    text.save(root)
    meta = {"family": model.family.name, "scheduler": model.scheduler_config, "text_encoder": text.config(),
            "codec": {"kind": "pixel"}, "image_size": 32,
            # the LoRA that plan, the worker and the demo use on this model (benchmarks/results/quality.md)
            "lora": {"rank": 8, "alpha": 8.0, "scope": "all"}}
    (root / "blockskip.json").write_text(json.dumps(meta, indent=2))
    return root


def load_crop_model(path: str | Path | None = None):
    """The pretrained crop model (fp32): `models/weights/crop-flux/` by default."""
    root = Path(path) if path else MODEL_DIR
    if not (root / "text_encoder.json").is_file():
        raise InputError(f"{root} is not a crop model folder (text_encoder.json missing)")
    model = load_model(root, torch_dtype=torch.float32, text_encoder=False)
    model.text_encoder = WordTextEncoder.load(root)
    return model


# ---- attribute classifier -------------------------------------------------------------------
class AttributeClassifier(nn.Module):
    """A small CNN on 32x32 images in [-1, 1], one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(3, width // 2), nn.MaxPool2d(2), block(width // 2, width), nn.MaxPool2d(2),
                                      block(width, 2 * width), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(8 * width, len(v)) for k, v in ATTRIBUTES.items()})
        self.eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        was = self.training
        self.eval()
        out = {k: v.argmax(1) for k, v in self(images.float()).items()}
        self.train(was)
        return out


def load_classifier(path: str | Path | None = None) -> AttributeClassifier:
    from safetensors.torch import load_file

    clf = AttributeClassifier()
    clf.load_state_dict({k: v.float() for k, v in load_file(str(path or CLASSIFIER_FILE)).items()})
    return clf.eval()


def labels(attrs_list: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([ATTRIBUTES[k].index(a[k]) for a in attrs_list]) for k in KEYS}


def caption_accuracy(model, classifier: AttributeClassifier, n: int = 24, seed: int = 0, steps: int = 10,
                     return_images: bool = False, size: int = 32):
    """Generate `n` images (size x size; classified after upsampling to 32) from captions of random
    non-held-out combos and classify them; returns {attribute: accuracy} (chance: 1 / len(values))."""
    rng = np.random.default_rng([seed, 0xCA9])
    combos = [sample_attrs(rng) for _ in range(n)]
    images = torch.cat([sample(model, model.encode_text(caption(a)), seed=seed * 1000 + i, steps=steps,
                               height=size, width=size) for i, a in enumerate(combos)])
    if size != 32:
        images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    pred, truth = classifier.predict(images), labels(combos)
    acc = {k: float((pred[k] == truth[k]).float().mean()) for k in KEYS}
    return (acc, images, combos) if return_images else acc


CHANCE = {k: 1 / len(v) for k, v in ATTRIBUTES.items()}
