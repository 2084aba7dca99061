"""`blockskip profile`: the cross-attention masking sensitivity profile of a base model.

For every n, generate with image-query -> text-key attention masked in the first n blocks and
compare with the unmasked generation: `Dpre[n] = 1 - cos(E(x_full), E(x_first_n_masked))`;
likewise `Dsuf[m]` for the last m blocks. Averaged over prompts and seeds; computed once per
base model. `blockskip plan` turns it into a skip plan.

The profile also measures `stale[m]`: how much of a change at the input of the last m blocks
their cached residual misses. Training skips them by adding the frozen model's residual
`S(f) - f`; once LoRA moves their input f by d, the full model computes `S(f + d)` and the
reduced one `f + d + S(f) - f`. With the prompt changed (the next prompt of the list) in the
blocks before them standing in for d, on each reference image noised at a few timesteps:
`stale[m] = |v_B - v_stale| / |v_B - v_A|`, 0 when the last m blocks add a residual that does
not depend on their input, about 1 when their residual undoes the change.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blockskip.errors import InputError
from blockskip.models.pipeline import add_noise, load_model, sample, tiny_model

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["a photo of a leaf on soil", "a close-up photo of a plant in a field",
                   "a green leaf against the sky"]
PIXEL_SIZE = 32  # pixel-space models with no recorded size (tiny-flux, tiny-sana): the demo's size
LATENT_PROFILE_SIZE = 256  # latent-space models with no recorded size (FLUX, SANA folders)
# Timesteps at which `stale` compares the full and the reduced forward (noised reference images).
STALE_SIGMAS = (0.25, 0.5, 0.75)
TEXT_ENCODER_PLACES = ("a text_encoder/ folder (diffusers pipeline layout, with tokenizer/; FLUX also "
                       "text_encoder_2/ and tokenizer_2/), or a 'text_encoder' entry in blockskip.json "
                       "(the project's own hash and word encoders)")


@torch.no_grad()
def suffix_staleness(family, inputs_a: dict, inputs_b: dict) -> list[float]:
    """`stale[m]` for m = 0 .. num_blocks at one draw: the same noisy input under prompt A
    (`inputs_a`) and prompt B (`inputs_b`). The last m blocks S see B's state f_B in the full
    forward; in the reduced one they are skipped by the residual cached from A's state f_A (both
    with B's conditioning, so only their input differs): `v_stale = head(f_B + S(f_A) - f_A)`.
    Returns `|v_B - v_stale| / |v_B - v_A|` (image tokens; 0 at m = 0)."""
    key = family.image_key
    n_blocks = family.num_blocks
    state_a, cond_a = family.embed(**inputs_a)
    state_b, cond_b = family.embed(**inputs_b)
    states_a, states_b = [state_a], [state_b]  # states_x[i]: the state entering block i
    for i in range(n_blocks):
        states_a.append(family.run_blocks(states_a[-1], cond_a, i, i + 1))
        states_b.append(family.run_blocks(states_b[-1], cond_b, i, i + 1))
    v_a, v_b = family.head(states_a[-1], cond_a), family.head(states_b[-1], cond_b)
    change = (v_b - v_a).norm().clamp_min(1e-12)
    stale = [0.0]
    for m in range(1, n_blocks + 1):
        start = n_blocks - m
        f_a, f_b = states_a[start], states_b[start]
        residual = family.run_blocks(f_a, cond_b, start, n_blocks)[key] - f_a[key]  # (B, N_img, D)
        v_stale = family.head({**f_b, key: f_b[key] + residual}, cond_b)
        stale.append(((v_b - v_stale).norm() / change).item())
    return stale


def masking_profile(model, encoder, prompts: list[str], seeds: list[int], steps: int, size: int,
                    progress: bool = True) -> dict:
    """Dpre, Dsuf and stale (length num_blocks + 1; index 0 is 0 by definition) averaged over
    prompts x seeds (stale: and STALE_SIGMAS; prompt B is the next prompt of the list, the empty
    prompt when there is only one)."""
    family = model.family
    n_blocks = family.num_blocks
    d_pre = torch.zeros(n_blocks + 1, dtype=torch.float64)
    d_suf = torch.zeros(n_blocks + 1, dtype=torch.float64)
    stale = torch.zeros(n_blocks + 1, dtype=torch.float64)
    total = len(prompts) * len(seeds) * (2 * n_blocks + 2)
    bar = tqdm(total=total, desc="profile", unit="gen", disable=not progress)
    texts = [model.encode_text(prompt) for prompt in prompts]
    for p, text in enumerate(texts):
        other = texts[(p + 1) % len(texts)] if len(texts) > 1 else model.encode_text("")
        for seed in seeds:
            def generate(masked: range) -> torch.Tensor:
                with family.mask_text_attention(masked):
                    image = sample(model, text, seed=seed, steps=steps, height=size, width=size)
                bar.update(1)
                return image

            image = generate(range(0))
            reference = encoder.embed(image)
            for k in range(1, n_blocks + 1):
                d_pre[k] += 1 - F.cosine_similarity(reference, encoder.embed(generate(range(k))), dim=-1).mean().item()
                d_suf[k] += 1 - F.cosine_similarity(reference, encoder.embed(generate(range(n_blocks - k, n_blocks))),
                                                    dim=-1).mean().item()
            with torch.no_grad():
                latents = model.codec.encode(image)
            gen = torch.Generator().manual_seed(seed)
            for value in STALE_SIGMAS:
                sigma = torch.tensor([value])
                noisy, _ = add_noise(latents, torch.randn(latents.shape, generator=gen), sigma)
                stale += torch.tensor(suffix_staleness(family, family.make_inputs(noisy, sigma, text),
                                                       family.make_inputs(noisy, sigma, other)), dtype=torch.float64)
            bar.update(1)
    bar.close()
    count = len(prompts) * len(seeds)
    return {"d_pre": (d_pre / count).tolist(), "d_suf": (d_suf / count).tolist(),
            "stale": (stale / (count * len(STALE_SIGMAS))).tolist()}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile", help="measure the cross-attention masking sensitivity profile of a base model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="local model folder: a diffusers pipeline folder (transformer/, vae/, text_encoder/ "
                             "...) or a bare transformer folder (config.json at its root), or 'tiny-flux' / "
                             "'tiny-sana'")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--prompts", help="text file, one prompt per line (default: a few crop prompts)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per generation (default: %(default)s)")
    parser.add_argument("--size", type=int,
                        help="generation size in pixels (default: from the model: the image_size its "
                             "blockskip.json records, e.g. 32 for the built-in crop model; else "
                             f"{LATENT_PROFILE_SIZE} for a latent-space model (with vae/) and {PIXEL_SIZE} for a "
                             "pixel-space one such as tiny-flux)")
    parser.add_argument("--encoder", default="efficientnet-lite0",
                        help="image encoder: 'efficientnet-lite0' (default, ships with the host extra) or a "
                             "local DINO/CLIP folder in transformers' layout")
    parser.set_defaults(func=run)


def resolve_model(spec: str, text_encoder: bool = True):
    """A model folder, or a built-in tiny model ('tiny-flux', 'tiny-sana')."""
    if spec.startswith("tiny-"):
        return tiny_model(spec.removeprefix("tiny-"))
    return load_model(spec, text_encoder=text_encoder)


def recorded_size(model) -> int | None:
    """The image side the model was trained at, when its folder records it (blockskip.json
    `image_size`; the built-in crop model: 32)."""
    size = model.meta.get("image_size")
    return int(size) if size else None


def default_profile_size(model) -> tuple[int, str]:
    """(--size, where it comes from) when the user gives none."""
    size = recorded_size(model)
    if size:
        return size, "the image_size in the model's blockskip.json"
    if model.codec.kind == "pixel":
        return PIXEL_SIZE, "a pixel-space model with no recorded image_size"
    return LATENT_PROFILE_SIZE, "a latent-space model with no recorded image_size"


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    file = Path(path)
    if not file.is_file():
        raise InputError(f"prompt file {path!r} does not exist")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path!r} has no prompts")
    return prompts


def require_text_encoder(model, spec: str, why: str) -> None:
    """Host commands encode prompts themselves (the prompt bank is what they make for the board)."""
    if model.text_encoder is None:
        raise InputError(f"{why}, so it needs the model's text encoder, and {spec!r} has none: it looks for "
                         f"{TEXT_ENCODER_PLACES}. Point --model at the full pipeline folder")


def run(args: argparse.Namespace) -> int:
    from blockskip.host.encoders import load_encoder

    model = resolve_model(args.model)
    require_text_encoder(model, args.model, "profile generates images from prompts")
    size = args.size
    if size is None:
        size, source = default_profile_size(model)
        print(f"generation size {size} px ({source}; --size sets another)")
    if size % model.granularity:
        raise InputError(f"--size {size} must be a multiple of the model's granularity {model.granularity}")
    prompts = read_prompts(args.prompts)
    encoder = load_encoder(args.encoder)
    started = time.perf_counter()
    result = masking_profile(model, encoder, prompts, list(range(args.seeds)), args.steps, size)
    profile = {
        "kind": "blockskip-profile",
        "model": model.describe(),
        "encoder": encoder.name,
        "prompts": prompts,
        "seeds": args.seeds,
        "steps": args.steps,
        "size": size,
        **result,
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2))
    print(f"profile of {model.family.name} ({model.family.num_blocks} blocks) written to {out}")
    return 0
