"""`blockskip demo`: the end-to-end job on a built-in tiny model; no downloads, no GPU.

Runs the parts of the pipeline that exist in this build, in order, and writes what it did to
a report folder. Today: tiny FLUX and SANA models, a first/last skip plan, features from the
frozen full model, and the cached-feature forward checked against the full forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from blockskip.models import FAMILIES
from blockskip.models.skip import SkipPlan, compute_features, reduced_forward


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the end-to-end demo on the built-in tiny model (CPU, offline)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="blockskip-demo", help="report folder (default: %(default)s)")
    parser.add_argument("--skip-ratio", type=float, default=0.5,
                        help="fraction of blocks to skip, split between first and last (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny models and inputs")
    parser.set_defaults(func=run)


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, family_cls in FAMILIES.items():
        family = family_cls.tiny(seed=args.seed)
        k = max(1, round(args.skip_ratio * family.num_blocks))
        k = min(k, family.num_blocks - 1)
        plan = SkipPlan.first_last(family.num_blocks, k // 2, k - k // 2)
        inputs = family.example_inputs(seed=args.seed)
        entry, residuals, cond, _ = compute_features(family, plan, inputs)
        with torch.no_grad():
            full = family.diffusers_forward(**inputs)
            cached = reduced_forward(family, plan, entry, residuals, cond)
        kept_bytes = sum(_param_bytes(family.block(i)) for i in plan.kept)
        blocks_bytes = sum(_param_bytes(family.block(i)) for i in range(family.num_blocks))
        report[name] = {
            "blocks": family.num_blocks,
            "plan": plan.to_dict(),
            "max_abs_diff_cached_vs_full": (cached - full).abs().max().item(),
            "kept_block_weight_fraction": kept_bytes / blocks_bytes,
        }
        print(f"{name:5s}: skip {plan.skipped} of {family.num_blocks} blocks; cached forward vs full "
              f"max |diff| = {report[name]['max_abs_diff_cached_vs_full']:.2e}; kept block weights "
              f"{100 * report[name]['kept_block_weight_fraction']:.0f}% of all blocks")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'report.json'}")
    return 0
