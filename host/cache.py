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

Over the GPUs (or CPU processes) of one host, under torchrun:

    torchrun --nproc-per-node 2 -m blockskip cache --device cuda ... --out STAGING

Shard k (draws [k*S, (k+1)*S)) is computed and written by rank k % WORLD_SIZE, so the shards are
the ones a single process writes, under the same names; each rank keeps the per-prompt
conditioning it met in features/prompts.rank<R>.safetensors until the end. Rank 0 alone writes
the shared files (cache_job.json, the kept weights, the prompt bank, bundle.json) and, after all
ranks are done, merges the per-prompt conditioning into features/prompts.safetensors. Each rank
runs on cuda:LOCAL_RANK with --device cuda (process group: nccl), else on the CPU (gloo). A
restarted run, with any number of ranks, skips every complete shard.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from blockskip.files import write_atomic
from blockskip.errors import InputError
from blockskip.features import (FEATURE_DTYPES, FP8_SCALE, PROMPTS_FILE, SHARD_PATTERN, WEIGHTS_FILE, _batched,
                                 draw_tensors, read_prompt_cond, storage_dtype, store_draw)
from blockskip.host.patches import load_image, to_tensor
from blockskip.host.plan import kept_linears
from blockskip.host.profile import read_prompts, require_text_encoder, resolve_model
from blockskip.models.pipeline import add_noise, training_sigmas
from blockskip.models.skip import SkipPlan, compute_features
from blockskip.plan import PlanDocument
from blockskip.prompt_bank import write_prompt_bank
from blockskip.quant import quantize_state

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
RANK_PROMPTS = "prompts.rank{}.safetensors"  # a rank's per-prompt conditioning until rank 0 merges it
# Ranks wait at a barrier for the slowest rank's shards (minutes to hours on a large model); a rank
# that dies is caught by torchrun, which stops the others.
BARRIER_TIMEOUT = timedelta(hours=24)


def list_images(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder {str(folder)!r} does not exist")
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise InputError(f"image folder {str(folder)!r} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def read_captions(photos: list[Path], captions_file: str | Path | None = None) -> dict[str, str]:
    """Each photo's own caption (file name -> text): a sidecar `NAME.txt` beside the photo (the
    kohya / SimpleTuner convention: its first line), and/or `captions_file`, JSON Lines of
    {"file_name": ..., "text": ...} (Hugging Face's imagefolder metadata.jsonl), which wins.
    Photos with neither have none."""
    captions = {}
    for photo in photos:
        sidecar = photo.with_suffix(".txt")
        if sidecar.is_file():
            text = sidecar.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            if text and text[0].strip():
                captions[photo.name] = text[0].strip()
    if captions_file is not None:
        path = Path(captions_file)
        if not path.is_file():
            raise InputError(f"captions file {str(captions_file)!r} does not exist")
        names = {p.name for p in photos}
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}, line {number}: not JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) \
                    or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise InputError(f"{path}, line {number}: needs \"file_name\" and a non-empty \"text\" (strings)")
            if row["file_name"] not in names:
                raise InputError(f"{path}, line {number}: no photo named {row['file_name']!r} in the image folder")
            captions[row["file_name"]] = row["text"].strip()
    return captions


def kept_weights(family, plan: SkipPlan, quant: str = "none") -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """(base weights of the kept blocks and the head under the full model's key names, safetensors
    metadata): with `quant` int8 / nf4 the kept blocks' Linear weights are quantized
    (blockskip.quant; the metadata describes them), everything else stays in the model's dtype."""
    prefixes = [family.block_names()[i] + "." for i in plan.kept]
    heads = family.head_module_names()
    out = {}
    for name, tensor in family.model.state_dict().items():
        if any(name.startswith(p) for p in prefixes) or any(name == h or name.startswith(h + ".") for h in heads):
            out[name] = tensor.detach().cpu().contiguous().clone()
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


def draw_inputs(model, schedule, images, texts, prompt_count: int, seed: int, index: int,
                image_prompts: list[int | None] | None = None):
    """The diffusers-forward inputs of draw `index`, its flow-matching target and its info. The
    draw's prompt is its image's own (`image_prompts[i]`, a caption's index in `texts`) where the
    image has one, else the training prompts in turn."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    rng = np.random.default_rng(int.from_bytes(digest[8:16], "little"))
    image_index = index % len(images)
    own = image_prompts[image_index] if image_prompts else None
    prompt_index = own if own is not None else index % prompt_count
    sigma = training_sigmas(gen, 1, model.shift_for(schedule.s_min, schedule.s_min))
    patch, crop = schedule.sample_patch(images[image_index][1], float(sigma), rng)
    x0 = model.codec.encode(to_tensor(patch)[None]).cpu()  # (1, C, h, w)
    noise = torch.randn(x0.shape, generator=gen)
    noisy, target = add_noise(x0, noise, sigma)
    inputs = model.family.make_inputs(noisy, sigma, texts[prompt_index])
    info = {"index": index, "prompt": prompt_index, "sigma": float(sigma), "image": images[image_index][0],
            "crop": crop}
    return inputs, target, info


def make_draw(model, plan: SkipPlan, schedule, images, texts, prompt_count: int, seed: int, index: int,
              feature_dtype: str, image_prompts: list[int | None] | None = None):
    """One training draw through the frozen full model -> (tensors stored as `feature_dtype`,
    per-prompt cond, info)."""
    family = model.family
    inputs, target, info = draw_inputs(model, schedule, images, texts, prompt_count, seed, index, image_prompts)
    device = next(family.model.parameters()).device  # the inputs are made on the CPU, from CPU generators
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    entry, residuals, cond, _ = compute_features(family, plan, inputs)
    tensors = store_draw(draw_tensors(index, entry, residuals, cond, target, family.prompt_cond_keys), feature_dtype)
    prompt_cond = {k: (v[0] if _batched(k, v) else v).cpu().contiguous().clone()
                   for k, v in cond.items() if k in family.prompt_cond_keys}
    return {k: v.cpu() for k, v in tensors.items()}, prompt_cond, info


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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the frozen model runs (default: %(default)s); under torchrun each rank uses "
                             "cuda:LOCAL_RANK")
    parser.set_defaults(func=run)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device). Under torchrun (WORLD_SIZE > 1 in the environment)
    joins the process group from torchrun's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT: nccl on
    cuda:LOCAL_RANK with `device` "cuda", gloo on the CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda, but torch sees no CUDA device; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"rank with LOCAL_RANK {local_rank} has no GPU: this host shows "
                             f"{torch.cuda.device_count()}; start at most that many processes per node")
        target, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(target)
    else:
        target, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return dist.get_rank(), world_size, target


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_prompt_cond(features: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The per-prompt conditioning in prompts.safetensors and every rank's own file."""
    merged = read_prompt_cond(features / PROMPTS_FILE)
    for path in sorted(features.glob(RANK_PROMPTS.format("*"))):
        for prompt, cond in read_prompt_cond(path).items():
            merged.setdefault(prompt, cond)
    return merged


def _save_prompt_cond(prompt_cond: dict, path: Path, feature_dtype: str) -> None:
    dtype = storage_dtype(feature_dtype, "prompt")
    _atomic_save({f"{p}/{k}": v.to(dtype) if v.is_floating_point() else v
                  for p, cond in prompt_cond.items() for k, v in cond.items()} or {"none": torch.zeros(1)}, path)


def build_cache(model, plan_doc: PlanDocument, image_paths: list[Path], prompts: list[str], out: Path,
                bank_prompts: list[str] = (), seed: int = 0, samples: int | None = None,
                shard_size: int = 32, feature_dtype: str | None = None, progress: bool = True,
                rank: int | None = None, world_size: int | None = None, captions: dict[str, str] | None = None,
                features_only: bool = False, desc: str = "cache") -> Path:
    """Cache `samples` draws (default: the plan's) in `feature_dtype` (default: the plan's, fp32
    for a plan that names none), on the device of the model's transformer.

    `captions` (image file name -> its own caption) gives a photo its own training prompt: its
    draws use the caption, the photos without one take `prompts` in turn. `features_only` writes
    only features/ (the prior draws of host/prior.py: no kept weights, prompt bank or bundle.json).

    With `world_size` > 1 this process is `rank` of that many (default: the torch.distributed
    process group's, or 0 of 1 without one): it computes shards rank, rank + world_size, ... and
    rank 0 writes the shared files once every shard is complete (a barrier when the process group
    is initialised; without one, run ranks 1.. first and rank 0 last)."""
    if rank is None and world_size is None:
        rank, world_size = dist_rank_world()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    family = model.family
    if plan_doc.config_hash != family.config_hash():
        raise InputError("the plan was made for another model (config hash mismatch); re-run `blockskip plan`")
    plan, schedule = plan_doc.skip, plan_doc.schedule
    samples = samples or plan_doc.samples
    if shard_size < 1 or samples < 1:
        raise InputError("--samples and --shard-size must be >= 1")
    feature_dtype = feature_dtype or plan_doc.feature_dtype
    if feature_dtype not in FEATURE_DTYPES:
        raise InputError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
    quant = plan_doc.quant
    captions = {name: text for name, text in (captions or {}).items() if text}
    unknown = sorted(set(captions) - {p.name for p in image_paths})
    if unknown:
        raise InputError(f"captions name photos that are not among the images: {', '.join(unknown[:5])}")
    if not prompts and len(captions) < len(image_paths):
        raise InputError("no training prompt, and not every photo has a caption: give a prompt for the others")
    prompts = list(prompts)
    train_prompts = prompts + sorted(set(captions.values()) - set(prompts))
    image_prompts = [train_prompts.index(captions[p.name]) if p.name in captions else None for p in image_paths]
    document = plan_doc.to_dict()
    job = {**({"quant": quant} if quant != "none" else {}), "plan": document["plan"],
           "patch_schedule": document["patch_schedule"], "prompts": train_prompts,
           **({"captions": captions} if captions else {}),
           "seed": seed, "samples": samples, "shard_size": shard_size, "feature_dtype": feature_dtype,
           "images": [p.name for p in image_paths], "model": family.config_hash()}
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "cache_job.json"
    if job_file.exists() and json.loads(job_file.read_text()) != job:
        raise InputError(f"{out} holds a cache made with other settings; use a new --out folder")
    if rank == 0:
        write_atomic(job_file, json.dumps(job, indent=2).encode())
    images = [(p.name, load_image(p, min_side=schedule.s_min)) for p in image_paths]
    texts = [model.encode_text(p) for p in train_prompts]  # once per prompt
    weights = out / WEIGHTS_FILE
    if rank == 0 and not weights.exists() and not features_only:
        tensors, quant_metadata = kept_weights(family, plan, quant)
        _atomic_save(tensors, weights, quant_metadata)
    features = out / "features"
    # one process: prompts.safetensors itself; a rank of several: its own file, merged by rank 0
    own_prompts = features / (PROMPTS_FILE if world_size == 1 else RANK_PROMPTS.format(rank))
    prompt_cond = _all_prompt_cond(features)
    shards = (samples + shard_size - 1) // shard_size
    if rank == 0 and shards < world_size:
        logger.warning("%d shard(s) of %d draws for %d ranks: ranks %d..%d have nothing to compute; a smaller "
                       "--shard-size spreads the draws", shards, shard_size, world_size, shards, world_size - 1)
    mine = range(rank, shards, world_size)

    def draws_of(shard: int) -> range:
        return range(shard * shard_size, min(samples, (shard + 1) * shard_size))

    bar = tqdm(total=sum(len(draws_of(shard)) for shard in mine), unit="draw", disable=not progress or rank != 0,
               desc=desc if world_size == 1 else f"{desc} (rank 0 of {world_size})")
    for shard in mine:
        indices = draws_of(shard)
        path = features / SHARD_PATTERN.format(shard)
        if _shard_complete(path, len(indices)):
            bar.update(len(indices))
            continue
        tensors, draws = {}, []
        for index in indices:
            draw, cond, info = make_draw(model, plan, schedule, images, texts, max(len(prompts), 1), seed, index,
                                         feature_dtype, image_prompts)
            tensors.update(draw)
            prompt_cond.setdefault(info["prompt"], cond)
            draws.append(info)
            bar.update(1)
        # per-prompt conditioning first, so that a complete shard never refers to a missing prompt
        _save_prompt_cond(prompt_cond, own_prompts, feature_dtype)
        _atomic_save(tensors, path, {"draws": json.dumps(draws)})
    bar.close()
    _barrier(world_size)
    if rank == 0:
        missing = [SHARD_PATTERN.format(shard) for shard in range(shards)
                   if not _shard_complete(features / SHARD_PATTERN.format(shard), len(draws_of(shard)))]
        if missing:
            raise InputError(f"{out}: {len(missing)} shard(s) not complete ({', '.join(missing[:4])}...): another "
                             f"rank has not finished; run the cache again to compute them")
        rank_files = sorted(features.glob(RANK_PROMPTS.format("*")))
        if rank_files:
            _save_prompt_cond(_all_prompt_cond(features), features / PROMPTS_FILE, feature_dtype)
            for path in rank_files:
                path.unlink()
        if not features_only:
            _write_shared(out, model, plan_doc, train_prompts, bank_prompts, samples, feature_dtype, quant, captions)
        job_file.unlink()
    _barrier(world_size)  # every rank returns a complete staging folder
    return out


def _write_shared(out: Path, model, plan_doc: PlanDocument, prompts: list[str], bank_prompts: list[str], samples: int,
                  feature_dtype: str, quant: str, captions: dict[str, str]) -> None:
    """The prompt bank and bundle.json (rank 0, once every shard is complete)."""
    if bank_prompts:
        write_prompt_bank(out, model, list(bank_prompts))
    document = plan_doc.to_dict()
    metadata = {
        "model": model.describe(),
        "transformer_config": model.family.json_config(),
        "plan": document["plan"],
        "patch_schedule": document["patch_schedule"],
        "lora": document["lora"],
        "samples": samples,
        "train_prompts": prompts,
        **({"captions": captions} if captions else {}),
        "bank_prompts": list(bank_prompts),
        "feature_dtype": feature_dtype,
        "quant": quant,
        **({"fp8_scale": f"per-{FP8_SCALE}"} if feature_dtype == "fp8" else {}),
        "estimates": plan_doc.estimates,
    }
    (out / "bundle.json").write_text(json.dumps(metadata, indent=2, default=list))


def run(args: argparse.Namespace) -> int:
    plan_doc = PlanDocument.load(args.plan)
    rank, world_size, device = init_distributed(args.device)
    try:
        model = resolve_model(args.model)
        require_text_encoder(model, args.model, "cache encodes the training and prompt-bank prompts")
        model.family.model.to(device)
        if getattr(model.codec, "vae", None) is not None:
            model.codec.vae.to(device)
        bank = list(args.bank_prompt) + (read_prompts(args.bank_file) if args.bank_file else [])
        out = build_cache(model, plan_doc, list_images(args.images), args.prompt, Path(args.out), bank,
                          args.seed, args.samples, args.shard_size, args.feature_dtype, rank=rank,
                          world_size=world_size)
    finally:
        if world_size > 1:
            dist.destroy_process_group()
    if rank != 0:
        return 0
    meta = json.loads((out / "bundle.json").read_text())
    size = sum(p.stat().st_size for p in (out / "features").glob("*.safetensors"))
    ranks = f" by {world_size} ranks" if world_size > 1 else ""
    print(f"features for {meta['samples']} draws ({meta['feature_dtype']}, {size / 2**20:.1f} MiB){ranks} in {out}; "
          f"seal it with `blockskip bundle {out} --base-pack-out BASE --out SUBJECT` (the first subject of this model "
          f"and plan) or `--base-pack BASE --out SUBJECT` (a base pack made before)")
    return 0
