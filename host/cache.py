"""`blockskip cache`: run the frozen full model once per training draw and store what the kept
blocks need (the repository's DESIGN.md, "The method", step 3), as a staging folder that
`blockskip bundle` seals.

A draw is (subject image, crop by the patch schedule at the draw's timestep, timestep from the
model's flow-matching training distribution, noise, prompt). Every draw is seeded from
(seed, draw index), so an interrupted run resumes at the first missing shard and produces the
same features as an uninterrupted one. Text conditioning is encoded once per prompt. The kept
weights (`weights/kept_blocks.safetensors`) are written as the plan's `quant` says: with int8 / nf4
the kept blocks' Linear weights are quantized here, on the host (host/BUNDLE.md, "Quantized kept
weights"); the features always come from the full-precision model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from blockskip.errors import InputError
from blockskip.features import (FEATURE_DTYPES, FP8_SCALE, PROMPTS_FILE, SHARD_PATTERN, WEIGHTS_FILE, _batched,
                                 draw_tensors, read_prompt_cond, storage_dtype, store_draw)
from blockskip.models.skip import SkipPlan, compute_features
from blockskip.quant import QUANT_SCHEMES

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder {str(folder)!r} does not exist")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputError(f"image folder {str(folder)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def kept_weights(family, plan: SkipPlan, quant: str = "none") -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """(base weights of the kept blocks and the head under the full model's key names, safetensors
    metadata): with `quant` int8 / nf4 the kept blocks' Linear weights are quantized
    (blockskip.quant; the metadata describes them), everything else stays in the model's dtype."""
    from blockskip.host.plan import kept_linears
    from blockskip.quant import quantize_state

    prefixes = [family.block_names()[i] + "." for i in plan.kept]
    heads = family.head_module_names()
    out = {}
    for name, tensor in family.model.state_dict().items():
        if any(name.startswith(p) for p in prefixes) or any(name == h or name.startswith(h + ".") for h in heads):
            out[name] = tensor.detach().contiguous().clone()
    if quant == "none":
        return out, None
    return quantize_state(out, [path for path, _ in kept_linears(family, plan)], quant)


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _shard_complete(path: Path, expected: int) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return len(json.loads(handle.metadata()["draws"])) == expected
    except Exception:  # a torn or foreign file: recompute it
        return False


def draw_inputs(model, schedule, images, texts, prompt_count: int, seed: int, index: int):
    """The diffusers-forward inputs of draw `index`, its flow-matching target and its info."""
    from blockskip.host.patches import to_tensor
    from blockskip.models.pipeline import add_noise, training_sigmas

    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    rng = np.random.default_rng(int.from_bytes(digest[8:16], "little"))
    image_index = index % len(images)
    prompt_index = index % prompt_count
    sigma = training_sigmas(gen, 1, model.shift_for(schedule.s_min, schedule.s_min))
    patch, crop = schedule.sample_patch(images[image_index][1], float(sigma), rng)
    x0 = model.codec.encode(to_tensor(patch)[None])  # (1, C, h, w)
    noise = torch.randn(x0.shape, generator=gen)
    noisy, target = add_noise(x0, noise, sigma)
    inputs = model.family.make_inputs(noisy, sigma, texts[prompt_index])
    info = {"index": index, "prompt": prompt_index, "sigma": float(sigma), "image": images[image_index][0],
            "crop": crop}
    return inputs, target, info


def make_draw(model, plan: SkipPlan, schedule, images, texts, prompt_count: int, seed: int, index: int,
              feature_dtype: str):
    """One training draw through the frozen full model -> (tensors stored as `feature_dtype`,
    per-prompt cond, info)."""
    family = model.family
    inputs, target, info = draw_inputs(model, schedule, images, texts, prompt_count, seed, index)
    entry, residuals, cond, _ = compute_features(family, plan, inputs)
    tensors = store_draw(draw_tensors(index, entry, residuals, cond, target, family.prompt_cond_keys), feature_dtype)
    prompt_cond = {k: (v[0] if _batched(k, v) else v).contiguous().clone()
                   for k, v in cond.items() if k in family.prompt_cond_keys}
    return tensors, prompt_cond, info


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache", help="precompute the kept blocks' features with the frozen full model (host)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="local model folder with its text encoder (diffusers pipeline layout), or tiny-flux / "
                             "tiny-sana")
    parser.add_argument("--plan", required=True, help="plan JSON from `blockskip plan`")
    parser.add_argument("--images", required=True, help="folder of subject photos")
    parser.add_argument("--prompt", action="append", required=True,
                        help="training prompt with the identifier, e.g. 'a photo of sks leaf' (repeatable)")
    parser.add_argument("--bank-prompt", action="append", default=[],
                        help="generation prompt to precompute into the prompt bank (repeatable)")
    parser.add_argument("--bank-file", help="text file of generation prompts, one per line")
    parser.add_argument("--out", required=True, help="staging folder (resumed when it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default: %(default)s)")
    parser.add_argument("--samples", type=int, help="override the plan's sample count")
    parser.add_argument("--shard-size", type=int, default=32, help="draws per shard (default: %(default)s)")
    parser.add_argument("--feature-dtype", choices=list(FEATURE_DTYPES),
                        help="storage of the features (default: the plan's feature_dtype; fp32 for a plan without "
                             "one): fp32 keeps the cached forward exact; bf16 and fp16 halve the bytes; fp8 stores "
                             "the entry state and residuals as float8 e4m3 with a per-token scale and the rest in "
                             "bf16, about a quarter of fp32 at FLUX.1-dev's shapes")
    parser.set_defaults(func=run)


def build_cache(model, plan_doc: dict, image_paths: list[Path], prompts: list[str], out: Path,
                bank_prompts: list[str] = (), seed: int = 0, samples: int | None = None,
                shard_size: int = 32, feature_dtype: str | None = None, progress: bool = True) -> Path:
    """Cache `samples` draws (default: the plan's) in `feature_dtype` (default: the plan's, fp32
    for a plan that names none)."""
    from blockskip.host.patches import PatchSchedule, load_image

    family = model.family
    if plan_doc.get("model", {}).get("config_hash") != family.config_hash():
        raise InputError("the plan was made for another model (config hash mismatch); re-run `blockskip plan`")
    plan = SkipPlan.from_dict(plan_doc["plan"])
    schedule = PatchSchedule.from_dict(plan_doc["patch_schedule"])
    samples = samples or int(plan_doc["samples"])
    if shard_size < 1 or samples < 1:
        raise InputError("--samples and --shard-size must be >= 1")
    feature_dtype = feature_dtype or plan_doc.get("feature_dtype", "fp32")
    if feature_dtype not in FEATURE_DTYPES:
        raise InputError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
    quant = plan_doc.get("quant", "none")
    if quant not in QUANT_SCHEMES:
        raise InputError(f"the plan's quant must be one of {', '.join(QUANT_SCHEMES)}, got {quant!r}")
    job = {**({"quant": quant} if quant != "none" else {}), "plan": plan_doc["plan"], "patch_schedule": plan_doc["patch_schedule"], "prompts": prompts,
           "seed": seed, "samples": samples, "shard_size": shard_size, "feature_dtype": feature_dtype,
           "images": [p.name for p in image_paths], "model": family.config_hash()}
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "cache_job.json"
    if job_file.exists() and json.loads(job_file.read_text()) != job:
        raise InputError(f"{out} holds a cache made with other settings; use a new --out folder")
    job_file.write_text(json.dumps(job, indent=2))
    images = [(p.name, load_image(p, min_side=schedule.s_min)) for p in image_paths]
    texts = [model.encode_text(p) for p in prompts]  # once per prompt
    weights = out / WEIGHTS_FILE
    if not weights.exists():
        tensors, quant_metadata = kept_weights(family, plan, quant)
        _atomic_save(tensors, weights, quant_metadata)
    prompts_path = out / "features" / PROMPTS_FILE
    prompt_cond = read_prompt_cond(prompts_path)
    shards = (samples + shard_size - 1) // shard_size
    bar = tqdm(total=samples, desc="cache", unit="draw", disable=not progress)
    prompt_dtype = storage_dtype(feature_dtype, "prompt")
    for shard in range(shards):
        indices = range(shard * shard_size, min(samples, (shard + 1) * shard_size))
        path = out / "features" / SHARD_PATTERN.format(shard)
        if _shard_complete(path, len(indices)):
            bar.update(len(indices))
            continue
        tensors, draws = {}, []
        for index in indices:
            draw, cond, info = make_draw(model, plan, schedule, images, texts, len(prompts), seed, index,
                                         feature_dtype)
            tensors.update(draw)
            prompt_cond.setdefault(info["prompt"], cond)
            draws.append(info)
            bar.update(1)
        # per-prompt conditioning first, so that a complete shard never refers to a missing prompt
        _atomic_save({f"{p}/{k}": v.to(prompt_dtype) if v.is_floating_point() else v
                      for p, cond in prompt_cond.items() for k, v in cond.items()} or {"none": torch.zeros(1)},
                     prompts_path)
        _atomic_save(tensors, path, {"draws": json.dumps(draws)})
    bar.close()
    if bank_prompts:
        from blockskip.edge.prompt_bank import write_prompt_bank

        write_prompt_bank(out, model, list(bank_prompts))
    metadata = {
        "model": model.describe(),
        "transformer_config": family.json_config(),
        "plan": plan_doc["plan"],
        "patch_schedule": plan_doc["patch_schedule"],
        "lora": plan_doc["lora"],
        "samples": samples,
        "train_prompts": prompts,
        "bank_prompts": list(bank_prompts),
        "feature_dtype": feature_dtype,
        "quant": quant,
        **({"fp8_scale": f"per-{FP8_SCALE}"} if feature_dtype == "fp8" else {}),
        "estimates": plan_doc.get("estimates"),
    }
    (out / "bundle.json").write_text(json.dumps(metadata, indent=2, default=list))
    job_file.unlink()
    return out


def run(args: argparse.Namespace) -> int:
    from blockskip.host.profile import read_prompts, require_text_encoder, resolve_model

    plan_path = Path(args.plan)
    if not plan_path.is_file():
        raise InputError(f"plan {args.plan!r} does not exist (run `blockskip plan` first)")
    plan_doc = json.loads(plan_path.read_text())
    model = resolve_model(args.model)
    require_text_encoder(model, args.model, "cache encodes the training and prompt-bank prompts")
    bank = list(args.bank_prompt) + (read_prompts(args.bank_file) if args.bank_file else [])
    out = build_cache(model, plan_doc, list_images(args.images), args.prompt, Path(args.out), bank,
                      args.seed, args.samples, args.shard_size, args.feature_dtype)
    meta = json.loads((out / "bundle.json").read_text())
    size = sum(p.stat().st_size for p in (out / "features").glob("*.safetensors"))
    print(f"features for {meta['samples']} draws ({meta['feature_dtype']}, {size / 2**20:.1f} MiB) in {out}; seal it "
          f"with `blockskip bundle {out} --base-pack-out BASE --out SUBJECT` (the first subject of this model and "
          f"plan) or `--base-pack BASE --out SUBJECT` (a base pack made before)")
    return 0
