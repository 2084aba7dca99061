"""The plan's training-memory estimate (`host/plan.py` `estimate`) against every peak measured by
`benchmarks/train_memory.py`, as committed in benchmarks/results/train_memory_quant.md: FLUX.1-dev
shapes in bf16 on one H200 (`torch.cuda.max_memory_allocated`) and in fp32 with the exact tensor
counter on a CPU, and the 57-block width-256 proxy in fp32 on 2 CPU cores. The estimate's
activation term was fitted to these rows (ACTIVATION_BYTES); this prints how close it comes to
each, and what per-token activation values each row implies.

    python benchmarks/estimate_check.py
"""

from __future__ import annotations

import torch

from blockskip.host.plan import LoraSettings, estimate
from blockskip.models import Flux
from blockskip.models.skip import SkipPlan
from train_memory import CONFIGS, FLUX_DEV, IDS, PROXY

GIB, MIB = 2**30, 2**20
# (where, config, text tokens, precision, row, measured peak bytes)
MEASURED = [("H200, FLUX.1-dev", FLUX_DEV, 512, "bf16", row, peak * GIB)
            for row, peak in dict(a=30.79, d50=9.49, e=5.89, f=4.18).items()]
MEASURED += [("CPU, FLUX.1-dev", FLUX_DEV, 512, "fp32", "f", 5.23 * GIB)]
MEASURED += [("CPU, proxy", PROXY, 128, "fp32", row, peak * MIB) for row, peak in
             dict(a=1147.30, b=599.13, c=504.24, d30=412.99, d50=240.03, e=162.46, f=149.72).items()]


def main() -> int:
    print("| measured on | configuration | peak MiB | estimate MiB | estimate / peak | activation values per token x width x block |")
    print("|---|---|---|---|---|---|")
    for where, config, text_len, precision, row, peak in MEASURED:
        skip, resolution, quant = CONFIGS[IDS[row]]
        with torch.device("meta"):
            family = Flux(Flux.model_cls(**config))
        plan = SkipPlan.first_last(57, *(skip or (0, 0)))
        est = estimate({"granularity": 16, "config": dict(family.config)}, family, plan, LoraSettings(16, 16),
                       resolution, text_len, precision, quant=quant)
        rest = est["train_memory_bytes"] - est["activation_bytes"]
        seq = (resolution // 16) ** 2 + text_len
        width = config["num_attention_heads"] * config["attention_head_dim"]
        values = (peak - rest) / (len(plan.kept) * seq * width * (2 if precision == "bf16" else 4))
        print(f"| {where} ({precision}) | {IDS[row]} | {peak / MIB:.0f} | {est['train_memory_bytes'] / MIB:.0f} | "
              f"{est['train_memory_bytes'] / peak:.2f} | {values:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
