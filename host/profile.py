"""`blockskip profile`: the cross-attention masking sensitivity profile of a base model.

For every n, generate with image-query -> text-key attention masked in the first n blocks and
compare with the unmasked generation: `Dpre[n] = 1 - cos(E(x_full), E(x_first_n_masked))`;
likewise `Dsuf[m]` for the last m blocks. Averaged over prompts and seeds; computed once per
base model. `blockskip plan` turns it into a skip plan.
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

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = ["a photo of a leaf on soil", "a close-up photo of a plant in a field",
                   "a green leaf against the sky"]


def masking_profile(model, encoder, prompts: list[str], seeds: list[int], steps: int, size: int,
                    progress: bool = True) -> dict:
    """Dpre and Dsuf (length num_blocks + 1; index 0 is 0 by definition) averaged over
    prompts x seeds."""
    from blockskip.models.pipeline import sample

    family = model.family
    n_blocks = family.num_blocks
    d_pre = torch.zeros(n_blocks + 1, dtype=torch.float64)
    d_suf = torch.zeros(n_blocks + 1, dtype=torch.float64)
    total = len(prompts) * len(seeds) * (2 * n_blocks + 1)
    bar = tqdm(total=total, desc="profile", unit="gen", disable=not progress)
    for prompt in prompts:
        text = model.encode_text(prompt)
        for seed in seeds:
            def generate(masked: range) -> torch.Tensor:
                with family.mask_text_attention(masked):
                    image = sample(model, text, seed=seed, steps=steps, height=size, width=size)
                bar.update(1)
                return encoder.embed(image)

            reference = generate(range(0))
            for k in range(1, n_blocks + 1):
                d_pre[k] += 1 - F.cosine_similarity(reference, generate(range(k)), dim=-1).mean().item()
                d_suf[k] += 1 - F.cosine_similarity(reference, generate(range(n_blocks - k, n_blocks)),
                                                    dim=-1).mean().item()
    bar.close()
    count = len(prompts) * len(seeds)
    return {"d_pre": (d_pre / count).tolist(), "d_suf": (d_suf / count).tolist()}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile", help="measure the cross-attention masking sensitivity profile of a base model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="local diffusers model folder (transformer/ ...), or 'tiny-flux' / 'tiny-sana'")
    parser.add_argument("--out", required=True, help="profile JSON to write")
    parser.add_argument("--prompts", help="text file, one prompt per line (default: a few crop prompts)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps per generation (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="generation size in pixels (default: %(default)s)")
    parser.add_argument("--encoder", default="efficientnet-lite0",
                        help="image encoder: 'efficientnet-lite0' (default, ships with the host extra) or a "
                             "local DINO/CLIP folder in transformers' layout")
    parser.set_defaults(func=run)


def resolve_model(spec: str, text_encoder: bool = True):
    """A model folder, or a built-in tiny model ('tiny-flux', 'tiny-sana')."""
    from blockskip.models.pipeline import load_model, tiny_model

    if spec.startswith("tiny-"):
        return tiny_model(spec.removeprefix("tiny-"))
    return load_model(spec, text_encoder=text_encoder)


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


def run(args: argparse.Namespace) -> int:
    from blockskip.host.encoders import load_encoder

    model = resolve_model(args.model)
    if args.size % model.granularity:
        raise InputError(f"--size {args.size} must be a multiple of the model's granularity {model.granularity}")
    prompts = read_prompts(args.prompts)
    encoder = load_encoder(args.encoder)
    started = time.perf_counter()
    result = masking_profile(model, encoder, prompts, list(range(args.seeds)), args.steps, args.size)
    profile = {
        "kind": "blockskip-profile",
        "model": model.describe(),
        "encoder": encoder.name,
        "prompts": prompts,
        "seeds": args.seeds,
        "steps": args.steps,
        "size": args.size,
        **result,
        "seconds": round(time.perf_counter() - started, 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=2))
    print(f"profile of {model.family.name} ({model.family.num_blocks} blocks) written to {out}")
    return 0
