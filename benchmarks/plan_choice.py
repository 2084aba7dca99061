"""Which split `blockskip plan` takes, with and without the profile's staleness term.

1. The built-in crop model (8 blocks), profiled as `benchmarks/quality.py` profiles it: Dpre,
   Dsuf and stale, and the split at 30%, 40% and 50% by the paper's argmin of Dpre[n] + Dsuf[m]
   and by the default score Dpre[n] + Dsuf[m] + stale[m] * Dpre[L] (`host/plan.py`).
2. FLUX.1-dev's depth (19 double + 38 single blocks) at width 256 with random weights (the pixel
   proxy of `cache_size.py`): its stale, by the profile's own `suffix_staleness` on random
   pictures noised at the profile's timesteps under two prompts (the mechanics only: random
   weights say nothing about a trained FLUX, and their masking profile means nothing either),
   combined with a FLUX-shaped Dpre / Dsuf on which the paper's argmin is its published
   (7, 10) / (13, 10) / (19, 10).

    python benchmarks/plan_choice.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from blockskip.host.encoders import EfficientNetLite0
from blockskip.host.plan import choose_split, skip_budget, split_scores
from blockskip.host.profile import STALE_SIGMAS, masking_profile, suffix_staleness
from blockskip.models.pipeline import add_noise
from blockskip.models.crops import caption, load_crop_model
from cache_size import proxy_model
from quality import SUBJECTS

RATIOS = (0.3, 0.4, 0.5)


def paper_shaped_profile(num_blocks: int = 57) -> dict:
    """Dpre rising slowly and Dsuf nearly flat up to 10 blocks, then steep: the paper's FLUX argmin,
    30% -> (7, 10), 40% -> (13, 10), 50% -> (19, 10); both end at the same Dpre[L] = Dsuf[L]."""
    whole = 0.6
    d_pre = [min(whole, 0.01 * n) for n in range(num_blocks + 1)]
    d_suf = [0.002 * m if m <= 10 else min(whole, 0.2 + 0.05 * (m - 10)) for m in range(num_blocks + 1)]
    d_pre[-1] = d_suf[-1] = whole
    return {"d_pre": d_pre, "d_suf": d_suf}


def proxy_staleness(model, prompts: list[str], pictures: int = 2) -> list[float]:
    """stale[m] averaged over random pictures x STALE_SIGMAS, prompt A -> prompt B."""
    family = model.family
    text_a, text_b = (model.encode_text(p) for p in prompts)
    gen = torch.Generator().manual_seed(0)
    total = torch.zeros(family.num_blocks + 1, dtype=torch.float64)
    for _ in range(pictures):
        latents = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
        for value in STALE_SIGMAS:
            sigma = torch.tensor([value])
            noisy, _ = add_noise(latents, torch.randn(latents.shape, generator=gen), sigma)
            total += torch.tensor(suffix_staleness(family, family.make_inputs(noisy, sigma, text_a),
                                                   family.make_inputs(noisy, sigma, text_b)), dtype=torch.float64)
    return (total / (pictures * len(STALE_SIGMAS))).tolist()


def splits(profile: dict, num_blocks: int) -> list[str]:
    rows = []
    for ratio in RATIOS:
        k = skip_budget(num_blocks, ratio)
        paper = choose_split(profile["d_pre"], profile["d_suf"], k)
        chosen = choose_split(profile["d_pre"], profile["d_suf"], k, stale=profile["stale"])
        scores = split_scores(profile["d_pre"], profile["d_suf"], k, profile["stale"])
        rows.append(f"| {ratio:.0%} | {k} | {paper} | {chosen} | {scores[chosen[0]]:.3f} | "
                    f"{scores[paper[0]]:.3f} | {profile['stale'][paper[1]]:.2f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for plan_choice.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = ["| skip | k | paper's argmin (n, m) | with staleness (n, m) | its score | the paper's split's score "
              "| stale[m] of the paper's split |", "|---|---|---|---|---|---|---|"]
    lines = []

    started = time.perf_counter()
    crop = load_crop_model()
    prompts = [caption(s) for s in SUBJECTS] + ["a green oval leaf on soil"]
    profile = masking_profile(crop, EfficientNetLite0(), prompts, [0], steps=8, size=32, progress=False)
    lines += ["## The built-in crop model (8 blocks)", "",
              f"Profiled as `benchmarks/quality.py` does ({len(prompts)} prompts, seed 0, 8 steps, 32 px; "
              f"{time.perf_counter() - started:.0f} s):", ""]
    lines += [f"- {name}: " + ", ".join(f"{v:.3f}" for v in profile[name]) for name in ("d_pre", "d_suf", "stale")]
    lines += ["", *header, *splits(profile, crop.family.num_blocks), ""]

    started = time.perf_counter()
    proxy = proxy_model()
    stale = proxy_staleness(proxy, ["a photo of sks leaf on soil", "a green leaf on sky"])
    shaped = {**paper_shaped_profile(proxy.family.num_blocks), "stale": stale}
    lines += ["## FLUX.1-dev's depth, random weights (57 blocks, width 256)", "",
              f"stale on the proxy (2 random 32 px pictures x {len(STALE_SIGMAS)} timesteps, 2 prompts; "
              f"{time.perf_counter() - started:.0f} s), m = 0 .. 57:", "",
              "- stale: " + ", ".join(f"{v:.3f}" for v in stale), "",
              "With a FLUX-shaped Dpre / Dsuf (Dpre[n] = 0.01 n; Dsuf[m] = 0.002 m up to 10, then 0.2 + 0.05 "
              "a block; both 0.6 at 57), whose argmin is the paper's:", "",
              *header, *splits(shaped, proxy.family.num_blocks), ""]
    text = "\n".join(["# Which split the plan takes", "", "`python benchmarks/plan_choice.py --out benchmarks/results`",
                      "", *lines])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_choice.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
