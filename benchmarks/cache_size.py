"""Feature-cache size per training draw and per subject for each feature storage, and what fp8
costs in error.

1. Measured: `blockskip cache` on the tiny models and a FLUX-depth proxy (19 double + 38 single
   blocks, narrower width) at the paper's FLUX plans (30% and 50%), for each storage; bytes per
   draw on disk next to the plan's analytic estimate (`host/plan.py` `feature_bytes`), and the
   subject bundle (features + prompt bank) next to its estimate.
2. Analytic, checked by 1: the same estimate at FLUX.1-dev's and SANA 1.6B's real shapes (the
   paper's 256 and 512 px training crops, 512 and 300 text tokens): bytes per draw and the subject
   bundle for the paper's 500 steps x 4 with as many unique draws, or fewer reused.
3. fp8 error: relative L2 error of the stored states and of the reduced forward's output, fp8
   with one scale per token or per channel (bf16 for scale), on the built-in crop model (trained
   weights) and the tiny models (random weights).

    python benchmarks/cache_size.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blockskip.host.cache import build_cache
from blockskip.host.patches import PatchSchedule
from blockskip.host.plan import LoraSettings, feature_bytes, make_plan, skip_budget
from blockskip.models import Flux, family_class
from blockskip.models.pipeline import DEFAULT_SCHEDULERS, Model, tiny_model
from blockskip.models.skip import SkipPlan
from blockskip.models.text import HashTextEncoder

PROXY = dict(patch_size=1, in_channels=12, num_layers=19, num_single_layers=38, attention_head_dim=64,
             num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
             axes_dims_rope=(8, 28, 28))
STORAGES = ("fp32", "bf16", "fp8")  # fp16 stores the bytes of bf16
# Full-size shapes (diffusers configs): FLUX.1-dev 19 double + 38 single blocks of width 3072, 64
# packed latent channels, 16 px per token, T5 512 tokens (text stream 4096 wide, pooled 768);
# SANA 1.6B 20 blocks of width 2240, DC-AE 32 latent channels, 32 px per token, Gemma 300 tokens
# of 2304. Training crops: the paper's s_min (FLUX 512 -> 256, SANA 1024 -> 512).
# The prompt bank holds the text encoder's fp32 output per prompt (SANA also an int64 mask, and the
# empty prompt once for classifier-free guidance).
FULL = {
    "FLUX.1-dev": dict(family="flux", blocks=57, hidden=3072, s_min=256, granularity=16, channels=64,
                       text_len=512, bank_per_prompt=(512 * 4096 + 768) * 4, bank_extra=0,
                       splits={"30%": (7, 10), "50%": (19, 10)}),
    "SANA 1.6B": dict(family="sana", blocks=20, hidden=2240, s_min=512, granularity=32, channels=32,
                      text_len=300, bank_per_prompt=300 * (2304 * 4 + 8), bank_extra=1,
                      splits={"50% first only": (10, 0), "50% first + last": (5, 5)}),
}
BANK_PROMPTS = ["a photo of sks leaf on soil", "a photo of sks leaf on sky", "sks leaf, close-up",
                "a painting of sks leaf"]


def proxy_model() -> Model:
    family = Flux.tiny(**PROXY)
    return Model(family, text_encoder=HashTextEncoder("flux", family.text_shapes(), max_length=64),
                 scheduler_config=dict(DEFAULT_SCHEDULERS["flux"]))


def paper_plan(model: Model, ratio: float, draws: int, s_min: int, s_max: int, feature_dtype: str) -> dict:
    """The plan skipping up to 10 blocks at the end, the paper's FLUX splits on 57 blocks."""
    n_blocks = model.family.num_blocks
    k = skip_budget(n_blocks, ratio)
    m_cap = min(10, k)
    profile = {"model": {"config_hash": model.family.config_hash()},
               "d_pre": [0.01 * i for i in range(n_blocks + 1)],
               "d_suf": [0.0 if i <= m_cap else 1.0 + i for i in range(n_blocks + 1)]}
    schedule = PatchSchedule(s_min=s_min, s_max=s_max, granularity=model.granularity)
    return make_plan(profile, model, k, schedule, LoraSettings(), draws, text_len=model.text_encoder.max_length,
                     feature_dtype=feature_dtype)


def measure(name: str, model: Model, ratio: float, s_min: int, s_max: int, draws: int, tmp: Path) -> list[dict]:
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((s_max, s_max, 3)) * 255).astype("uint8")).save(images / "a.png")
    rows = []
    for feature_dtype in STORAGES:
        plan = paper_plan(model, ratio, draws, s_min, s_max, feature_dtype)
        out = tmp / f"{name}-{ratio}-{feature_dtype}"
        start = time.perf_counter()
        build_cache(model, plan, [images / "a.png"], ["a photo of sks leaf"], out, BANK_PROMPTS, shard_size=draws,
                    progress=False)
        seconds = time.perf_counter() - start
        shards = sum(p.stat().st_size for p in (out / "features").glob("shard-*.safetensors"))
        subject = sum(p.stat().st_size for folder in ("features", "prompts") for p in (out / folder).iterdir())
        weights = (out / "weights" / "kept_blocks.safetensors").stat().st_size
        full = sum(t.numel() * t.element_size() for t in model.family.model.state_dict().values())
        est = plan.estimates
        bank = len(BANK_PROMPTS) + (model.family.cfg_scale != 1.0)  # + the empty prompt for CFG
        rows.append({"model": name, "skip": f"{ratio:.0%} ({plan.choice['n']}+{plan.choice['m']})",
                     "tokens": (s_min // model.granularity) ** 2, "storage": feature_dtype,
                     "bytes_per_draw": shards / draws, "estimate": est["cache_bytes_per_draw"],
                     "subject": subject, "subject_estimate": est["cache_bytes"] + est["bank_bytes_per_prompt"] * bank,
                     "s_per_draw": seconds / draws, "weights_fraction": weights / full})
    return rows


def full_size_rows(samples: list[int], bank: int) -> list[dict]:
    rows = []
    for name, shape in FULL.items():
        n_img = (shape["s_min"] // shape["granularity"]) ** 2
        for split, (n, m) in shape["splits"].items():
            plan = SkipPlan.first_last(shape["blocks"], n, m)
            for feature_dtype in STORAGES:
                per_draw, per_prompt = feature_bytes(family_class(shape["family"]), plan, shape["hidden"], n_img, shape["text_len"],
                                                     n_img * shape["channels"], feature_dtype)
                bank_bytes = (bank + shape["bank_extra"]) * shape["bank_per_prompt"]
                for count in samples:
                    rows.append({"model": name, "skip": f"{split} ({n}+{m})", "tokens": n_img, "storage": feature_dtype,
                                 "draws": count, "bytes_per_draw": per_draw,
                                 "subject": per_draw * count + per_prompt + bank_bytes})
    return rows


def stored(x: torch.Tensor, storage: str) -> torch.Tensor:
    """A (tokens, channels) state as it comes back from `storage`: bf16, fp8 per token or per channel."""
    from blockskip.features import dequantize_fp8, quantize_fp8

    return x.bfloat16().float() if storage == "bf16" else dequantize_fp8(*quantize_fp8(x, storage.split()[-1]))


def fp8_errors(draws: int) -> list[dict]:
    """Relative L2 error of the stored entry states and residuals (mean, and the worst token) and of
    the reduced forward's output, against fp32."""
    from blockskip.host.cache import draw_inputs
    from blockskip.host.patches import load_image
    from blockskip.models.crops import load_crop_model, render
    from blockskip.models.skip import compute_features, reduced_forward

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = []
        for i in range(3):
            render({"shape": "heart", "colour": "red", "pattern": "stripes", "background": "soil"}, seed=i,
                   size=32).save(Path(tmp) / f"{i}.png")
            photos.append((f"{i}.png", load_image(Path(tmp) / f"{i}.png")))
        models = {"crop model (trained)": load_crop_model(), "tiny-flux (random)": tiny_model("flux"),
                  "tiny-sana (random)": tiny_model("sana")}
        for name, model in models.items():
            blocks = model.family.num_blocks
            plan = SkipPlan.first_last(blocks, 1, 3 if blocks == 8 else 2)  # crop model: the profile's 50% plan
            schedule = PatchSchedule(s_min=16, s_max=32, granularity=model.granularity)
            texts = [model.encode_text("a photo of sks leaf")]
            for storage in ("fp8 per token", "fp8 per channel", "bf16"):
                state, worst, output = [], [], []
                for index in range(draws):
                    inputs, _, _ = draw_inputs(model, schedule, photos, texts, 1, 0, index)
                    entry, residuals, cond, _ = compute_features(model.family, plan, inputs)
                    states = [entry] + list(residuals.values())
                    back = [{k: stored(v[0], storage)[None] for k, v in d.items()} for d in states]
                    for exact, approx in zip(states, back):
                        for key in exact:
                            x, y = exact[key][0], approx[key][0]
                            state.append(float((y - x).norm() / x.norm()))
                            worst.append(float(((y - x).norm(dim=1) / x.norm(dim=1)).max()))
                    with torch.no_grad():
                        want = reduced_forward(model.family, plan, entry, residuals, cond)
                        got = reduced_forward(model.family, plan, back[0], dict(zip(residuals, back[1:])), cond)
                    output.append(float((got - want).norm() / want.norm()))
                rows.append({"model": name, "skipped": plan.skipped, "storage": storage, "state": float(np.mean(state)),
                             "worst": max(worst), "output": float(np.mean(output))})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=8, help="draws cached per measured configuration")
    parser.add_argument("--samples", type=int, nargs="+", default=[2000, 500, 300],
                        help="unique draws per subject at full size (default: 2000 500 300; the paper trains "
                             "500 steps x 4 = 2000 micro-steps)")
    parser.add_argument("--bank", type=int, default=10, help="prompt-bank prompts in the full-size subject bundle")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in (0.3, 0.5):
            rows += measure("tiny-flux", tiny_model("flux"), ratio, 32, 64, args.draws, Path(tmp))
            rows += measure("tiny-sana", tiny_model("sana"), ratio, 32, 64, args.draws, Path(tmp))
            rows += measure("flux-proxy", proxy_model(), ratio, 64, 128, args.draws, Path(tmp))
    print(f"Measured: `blockskip cache` of {args.draws} draws, one training prompt and a {len(BANK_PROMPTS)}-prompt "
          "bank; the estimate is the plan's (tensor bytes; the file adds a header of about 100 bytes a tensor).\n")
    print("| model | skip (n+m) | image tokens | storage | KiB / draw | estimate KiB | measured / estimate | "
          "vs fp32 | subject KiB | estimate KiB | host s / draw | kept weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fp32 = {(r["model"], r["skip"]): r["bytes_per_draw"] for r in rows if r["storage"] == "fp32"}
    for r in rows:
        print(f"| {r['model']} | {r['skip']} | {r['tokens']} | {r['storage']} | {r['bytes_per_draw'] / 1024:.1f} | "
              f"{r['estimate'] / 1024:.1f} | {r['bytes_per_draw'] / r['estimate']:.3f} | "
              f"{r['bytes_per_draw'] / fp32[(r['model'], r['skip'])]:.2f} | {r['subject'] / 1024:.0f} | "
              f"{r['subject_estimate'] / 1024:.0f} | {r['s_per_draw']:.3f} | {r['weights_fraction']:.0%} |")
    print(f"\nFull-size shapes, analytic (the estimate above): features for one training prompt and N unique "
          f"draws, plus a prompt bank of {args.bank} prompts (fp32 text-encoder output).\n")
    print("| model | skip (n+m) | image tokens | storage | MiB / draw | unique draws | subject bundle GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in full_size_rows(args.samples, args.bank):
        print(f"| {r['model']} | {r['skip']} | {r['tokens']} | {r['storage']} | {r['bytes_per_draw'] / 2**20:.2f} | "
              f"{r['draws']} | {r['subject'] / 2**30:.2f} |")
    print(f"\nStorage error, mean over {args.draws} draws: relative L2 error of each stored state (entry state, "
          "residuals) and of its worst token, and of the reduced forward's output.\n")
    print("| model | skipped | storage | state error | worst token | output error |")
    print("|---|---|---|---|---|---|")
    for r in fp8_errors(args.draws):
        print(f"| {r['model']} | {r['skipped']} | {r['storage']} | {r['state']:.4f} | {r['worst']:.4f} | "
              f"{r['output']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
