"""What fits where: for each built-in board and FLUX.1-dev, SANA 1.6B and SANA 0.6B (their
diffusers configs, built on the meta device: no weights), what `blockskip plan --board NAME
--skip-ratio R` chooses for training at 30% and 50% skipped, and what the board can generate with.

Training: the first of kept weights as they are / int8 / NF4 at the paper's training size, then
at 3/4 and 1/2 of it, whose estimated peak (`host/plan.py` `estimate` + the runtime) fits the
board's usable memory. Generation at the model's usual size (FLUX 1024, SANA 1024): the heaviest
backend and weight precision whose estimate (`blockskip.boards.generation_estimate`) fits.

    python benchmarks/fits.py
"""

from __future__ import annotations

import argparse

import torch

from blockskip.boards import BOARDS, RUNTIME_BYTES, budget_from, generation_options, gib
from blockskip.errors import ConfigError
from blockskip.host.fit import choose
from blockskip.host.patches import PatchSchedule
from blockskip.host.plan import LoraSettings, make_plan, skip_budget
from blockskip.models import Flux, Sana
from blockskip.models.codec import VaeCodec
from blockskip.models.pipeline import DEFAULT_SCHEDULERS, Model
from board_fit import FLUX_VAE
from train_memory import FLUX_DEV

# transformer/config.json of Efficient-Large-Model/Sana_1600M_1024px_diffusers and Sana_600M_1024px_diffusers
# (SANA 1.6B is diffusers' SanaTransformer2DModel default); FLUX.1-dev's and its VAE's come from the
# memory benchmarks
SANA_16 = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
               num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
               caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1)
SANA_06 = dict(SANA_16, num_attention_heads=36, num_layers=28, num_cross_attention_heads=16,
               cross_attention_head_dim=72, cross_attention_dim=1152)
# name: (family, config, training s_min (the paper's), text tokens, generation side)
MODELS = {"FLUX.1-dev": (Flux, FLUX_DEV, 256, 512, 1024), "SANA 1.6B": (Sana, SANA_16, 512, 300, 1024),
          "SANA 0.6B": (Sana, SANA_06, 512, 300, 1024)}


def meta_model(family_cls, config) -> Model:
    from diffusers import AutoencoderDC, AutoencoderKL

    with torch.device("meta"):
        family = family_cls(family_cls.model_cls(**config).eval())
        vae = AutoencoderKL(**FLUX_VAE) if family_cls is Flux else AutoencoderDC()
    return Model(family, VaeCodec(vae), None, dict(DEFAULT_SCHEDULERS[family.name]))


def paper_profile(model: Model) -> dict:
    """A profile whose argmin skips at most 10 blocks at the end, as the paper's FLUX plans do."""
    n = model.family.num_blocks
    return {"model": {"config_hash": model.family.config_hash()}, "d_pre": [0.01 * i for i in range(n + 1)],
            "d_suf": [0.0 if i <= 10 else 1.0 + i for i in range(n + 1)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    rows = []
    for name, (family_cls, config, s_min, text_len, side) in MODELS.items():
        model = meta_model(family_cls, config)
        profile = paper_profile(model)

        def make(ratio, quant, size, model=model, profile=profile, s_min=s_min, text_len=text_len):
            k = skip_budget(model.family.num_blocks, ratio)
            schedule = PatchSchedule(s_min=size, s_max=2 * s_min, granularity=model.granularity)
            return make_plan(profile, model, k, schedule, LoraSettings(), 300, text_len, "fp32", quant=quant)

        for board in BOARDS.values():
            budget = budget_from(board.name)
            cells = []
            for ratio in (0.3, 0.5):
                try:
                    chosen, _ = choose(make, budget, s_min, model.granularity, ratio)
                    quant = "" if chosen.quant == "none" else f" {chosen.quant}"
                    res = "" if chosen.s_min == s_min else f" at {chosen.s_min} px"
                    cells.append(f"yes{quant}{res} ({gib(chosen.need)})")
                except ConfigError:
                    lightest = make(ratio, "nf4", s_min // 2).estimates["train_memory_bytes"] + RUNTIME_BYTES
                    cells.append(f"no ({gib(lightest)} at the lightest)")
            options = generation_options(model, board, side, side, text_len)
            fit = next((o for o in options if o["peak_bytes"] <= budget.bytes), None)
            cells.append(f"{fit['backend']} {fit['precision']} ({gib(fit['peak_bytes'])})" if fit
                         else f"no ({gib(options[-1]['peak_bytes'])} with {options[-1]['backend']} "
                              f"{options[-1]['precision']})")
            rows.append((board.name, f"{board.usable_bytes / 2**30:.1f}", name, *cells))
    print("| board | usable GiB | model | train, 30% skipped | train, 50% skipped | generate 1024x1024 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
