"""Feature-cache size and host time per training draw, for the tiny models and a FLUX-depth
proxy (19 double + 38 single blocks, narrower width), at the paper's FLUX plans (30% and 50%).

    python benchmarks/cache_size.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from blockskip.host.cache import build_cache
from blockskip.host.patches import PatchSchedule
from blockskip.host.plan import LoraSettings, make_plan, skip_budget
from blockskip.models import Flux
from blockskip.models.pipeline import DEFAULT_SCHEDULERS, Model, tiny_model
from blockskip.models.text import HashTextEncoder

PROXY = dict(patch_size=1, in_channels=12, num_layers=19, num_single_layers=38, attention_head_dim=64,
             num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
             axes_dims_rope=(8, 28, 28))


def proxy_model() -> Model:
    family = Flux.tiny(**PROXY)
    return Model(family, text_encoder=HashTextEncoder("flux", family.text_shapes(), max_length=64),
                 scheduler_config=dict(DEFAULT_SCHEDULERS["flux"]))


def measure(name: str, model: Model, ratio: float, s_min: int, s_max: int, draws: int, tmp: Path) -> dict:
    n_blocks = model.family.num_blocks
    k = skip_budget(n_blocks, ratio)
    # a profile that makes the paper's split the argmin: prefer skipping up to 10 suffix blocks
    m_cap = min(10, k)
    profile = {"model": {"config_hash": model.family.config_hash()},
               "d_pre": [0.01 * i for i in range(n_blocks + 1)],
               "d_suf": [0.0 if i <= m_cap else 1.0 + i for i in range(n_blocks + 1)]}
    schedule = PatchSchedule(s_min=s_min, s_max=s_max, granularity=model.granularity)
    plan = make_plan(profile, model, k, schedule, LoraSettings(), draws, text_len=model.text_encoder.max_length)
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    Image.fromarray((np.random.default_rng(0).random((s_max, s_max, 3)) * 255).astype("uint8")).save(images / "a.png")
    out = tmp / f"{name}-{ratio}"
    start = time.perf_counter()
    build_cache(model, plan, [images / "a.png"], ["a photo of sks leaf"], out, shard_size=draws, progress=False)
    seconds = time.perf_counter() - start
    feature_bytes = sum(p.stat().st_size for p in (out / "features").glob("shard-*.safetensors"))
    weights = (out / "weights" / "kept_blocks.safetensors").stat().st_size
    full = sum(t.numel() * t.element_size() for t in model.family.model.state_dict().values())
    return {"model": name, "blocks": n_blocks, "skip": f"{ratio:.0%} ({plan['plan']['n']}+{plan['plan']['m']})",
            "tokens": (s_min // model.granularity) ** 2, "bytes_per_draw": feature_bytes / draws,
            "estimate": plan["estimates"]["cache_bytes_per_draw"], "s_per_draw": seconds / draws,
            "weights_fraction": weights / full}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in (0.3, 0.5):
            rows.append(measure("tiny-flux", tiny_model("flux"), ratio, 32, 64, args.draws, Path(tmp)))
            rows.append(measure("tiny-sana", tiny_model("sana"), ratio, 32, 64, args.draws, Path(tmp)))
            rows.append(measure("flux-proxy", proxy_model(), ratio, 64, 128, args.draws, Path(tmp)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| model | blocks | skip (n+m) | image tokens | KiB / draw | plan estimate KiB | host s / draw | kept weights |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['blocks']} | {r['skip']} | {r['tokens']} | {r['bytes_per_draw'] / 1024:.1f} | "
              f"{r['estimate'] / 1024:.1f} | {r['s_per_draw']:.3f} | {r['weights_fraction']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
