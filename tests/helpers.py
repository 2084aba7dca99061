"""Helpers the test modules share (tiny bundles, adapters, photos, fake jobs): one copy each, so no
test module imports another. tests/conftest.py puts this folder on sys.path: `from helpers import ...`."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blockskip.bundle import TrustPolicy
from blockskip.edge.agent import JobContext
from blockskip.edge.lora import lora_config_dict, read_adapter, save_adapter
from blockskip.features import FeatureReader
from blockskip.host.bundle import build_bundle
from blockskip.host.cache import build_cache
from blockskip.host.patches import PatchSchedule
from blockskip.host.plan import LoraSettings, make_plan
from blockskip.models.pipeline import load_model, tiny_model
from blockskip.models.skip import reduced_forward

PROMPTS = ["a photo of sks leaf"]
UNSIGNED_OK = TrustPolicy(allow_unsigned=True)  # for tests that are not about signatures (tests/edge/test_trust.py is)


def make_bundle(tmp, name, n, m, samples=8, images=2, lora=None, feature_dtype=None, quant="none"):
    model = tiny_model(name)
    folder = tmp / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    base = (rng.random((8, 8, 3)) * 255).astype("uint8")  # one subject: a blocky pattern, seen twice
    for i in range(images):
        Image.fromarray(np.kron(base, np.ones((6, 6, 1), dtype="uint8"))[i:]).save(folder / f"{i}.png")
    size = model.family.num_blocks
    profile = {"model": {"config_hash": model.family.config_hash()},
               "d_pre": [0.0 if i <= n else 9.0 for i in range(size + 1)],
               "d_suf": [0.0 if i <= m else 9.0 for i in range(size + 1)]}
    schedule = PatchSchedule(s_min=16, s_max=32, granularity=model.granularity)
    plan = make_plan(profile, model, n + m, schedule, lora or LoraSettings(rank=4, alpha=8), samples, quant=quant)
    stage = build_cache(model, plan, sorted(folder.iterdir()), PROMPTS, tmp / "stage", shard_size=4, progress=False,
                        feature_dtype=feature_dtype)
    bundle = build_bundle(stage, tmp / "bundle", json.loads((stage / "bundle.json").read_text()))
    return model, plan, bundle


def bundle_loss(bundle, adapter_dir=None, weights=None, part=""):
    """The flow-matching loss over every cached draw of `bundle` (its kept weights, or `weights`:
    a base pack's), with the trained adapter in `adapter_dir` or at LoRA's zero init; `part`
    "prior": over its prior draws instead."""
    from peft import set_peft_model_state_dict

    from blockskip.edge.reduced import build_reduced
    from blockskip.edge.train import _inject_lora

    manifest = json.loads((bundle / "manifest.json").read_text())
    family, plan = build_reduced(bundle, manifest, **({"weights": weights} if weights else {}))
    tensors, config = read_adapter(adapter_dir) if adapter_dir else ({}, {})
    alpha = config.get("lora_alpha", manifest["lora"]["alpha"])  # the file's scale
    _inject_lora(family, plan, {**manifest["lora"], "alpha": alpha}, 0)
    if adapter_dir:
        set_peft_model_state_dict(family.model, {k.removeprefix("transformer."): v for k, v in tensors.items()},
                                  adapter_name="default")
    reader = FeatureReader(bundle / part if part else bundle, family.prompt_cond_keys)
    losses = []
    with torch.no_grad():
        for i in range(len(reader)):
            entry, residuals, cond, target, _ = reader.get(i)
            out = family.output_to_latents(reduced_forward(family, plan, entry, residuals, cond), *target.shape[2:])
            losses.append(torch.nn.functional.mse_loss(out, target).item())
    return sum(losses) / len(losses)


def make_adapter(model_dir, out_dir, blocks, seed, scale=0.3):
    """An adapter in the trainer's file format: peft LoRA on `blocks`, lora_B randomized."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = load_model(model_dir, text_encoder=False)
    targets = [name for i in blocks for name in model.family.lora_targets(i)]
    transformer = model.family.model
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator: seed it too
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    save_adapter(get_peft_model_state_dict(transformer), lora_config_dict(4, 8, targets), out_dir)
    return str(out_dir)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def plan_for(model, n, m, samples=6):
    k = n + m
    size = model.family.num_blocks
    profile = {"model": {"config_hash": model.family.config_hash()},
               "d_pre": [0.0 if i <= n else 9.0 for i in range(size + 1)],
               "d_suf": [0.0 if i <= m else 9.0 for i in range(size + 1)]}
    schedule = PatchSchedule(s_min=16, s_max=32, granularity=model.granularity)
    return make_plan(profile, model, k, schedule, LoraSettings(rank=4, alpha=4), samples)


def subject_images(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = (rng.random((40 + 9 * i, 48 + 5 * i, 3)) * 255).astype("uint8")
        paths.append(folder / f"subject{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def gen(cid: str, **args) -> dict:
    return {"id": cid, "action": "generate", "args": {"model": "model", "prompts": ["a photo of sks maize leaf"], **args}}


def png_job(delay: float = 0.0):
    """A real small job: emits progress per step, writes a real PNG, publishes it as a result."""

    def factory():
        def run(ctx: JobContext) -> dict:
            total = ctx.args.get("steps", 5)
            t0 = time.monotonic()
            for step in range(1, total + 1):
                if ctx.should_stop():
                    return {"stopped": True, "step": step - 1}
                time.sleep(delay)
                rate = step / max(time.monotonic() - t0, 1e-6)
                ctx.emit({"type": "progress", "step": step, "total": total, "loss": 1.0 / step,
                          "steps_per_s": rate, "peak_mem_bytes": 1, "eta_s": (total - step) / rate})
            out = Path(ctx.args["out"])
            out.mkdir(parents=True, exist_ok=True)
            path = out / "0.png"
            Image.new("RGB", (16, 16), (ctx.args.get("seed", 0) % 256, 80, 160)).save(path)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            ctx.publish_result({"path": path, "sha256": sha, "prompt": ctx.args["prompts"][0], "seed": ctx.args.get("seed", 0)})
            return {"images": 1}

        return run

    return factory
