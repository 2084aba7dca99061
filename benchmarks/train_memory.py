"""Peak training memory and step time: standard LoRA vs patch sampling vs block skipping vs
DiT-BlockSkip, each configuration in its own process, printed as ratios to standard LoRA measured
in the same run (these machines are noisy), next to an analytic lower bound.

CPU (default): a FLUX-depth proxy (19 double + 38 single blocks, narrower width), fp32, the peak
of live tensor bytes in one extra training step (blockskip.memory.TensorMemory).
CUDA (`--device cuda`): the real FLUX.1-dev configuration with random bf16 weights (weights do not
change memory), 512 -> 256, `torch.cuda.max_memory_allocated`, comparable to the paper's table
(35.99 GiB LoRA, 10.42 GiB DiT-BlockSkip 50%).
`--shape flux-dev` on the CPU: the real FLUX.1-dev shapes with the tensor counter (slow; pick rows
with `--only`). The "+ int8" / "+ NF4" rows hold the kept blocks' Linear weights quantized
(blockskip.quant.QuantLinear, as `blockskip plan --quant` ships them); "estimate" is the plan's
(host/plan.py `estimate`) for the same plan, precision and quantization.

    python benchmarks/train_memory.py                 # CPU proxy
    python benchmarks/train_memory.py --device cuda   # real FLUX.1-dev shapes on a GPU
    python benchmarks/train_memory.py --shape flux-dev --only a,f --text-len 512   # real shapes, CPU counter
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

PROXY = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=64,
             num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
             axes_dims_rope=(8, 28, 28))
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# name: (skip ratio (paper's (n, m) on FLUX), training resolution in pixels, kept weights' quantization)
CONFIGS = {
    "a LoRA (full model, 512)": (None, 512, "none"),
    "b patch sampling only (256)": (None, 256, "none"),
    "c block skip 50% only (512)": ((19, 10), 512, "none"),
    "d DiT-BlockSkip 30% (256)": ((7, 10), 256, "none"),
    "d DiT-BlockSkip 50% (256)": ((19, 10), 256, "none"),
    "e DiT-BlockSkip 50% + int8 (256)": ((19, 10), 256, "int8"),
    "f DiT-BlockSkip 50% + NF4 (256)": ((19, 10), 256, "nf4"),
}
IDS = dict(zip(["a", "b", "c", "d30", "d50", "e", "f"], CONFIGS))  # for --only


def plan_estimate(family, plan, resolution: int, text_len: int, rank: int, precision: str, quant: str) -> int:
    """The plan's training-memory estimate for this configuration (kept blocks; meta shapes do)."""
    from blockskip.host.plan import LoraSettings, estimate

    desc = {"granularity": 16, "config": dict(family.config)}
    return estimate(desc, family, plan, LoraSettings(rank, rank), resolution, text_len, precision,
                    quant=quant)["train_memory_bytes"]


def child(name: str, device: str, steps: int, text_len: int, rank: int, shape: str) -> dict:
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from blockskip.memory import TensorMemory
    from blockskip.models import Flux
    from blockskip.models.skip import SkipPlan, reduced_forward
    from blockskip.quant import quantize_linears, register_with_peft

    torch.manual_seed(0)
    if device == "cuda":
        from blockskip.edge.train import avoid_cudnn_attention_backward

        avoid_cudnn_attention_backward()
    skip, resolution, quant = CONFIGS[name]
    config = FLUX_DEV if device == "cuda" or shape == "flux-dev" else PROXY
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"):
        model = Flux.model_cls(**config)
    plan = SkipPlan.first_last(57, *(skip or (0, 0)))
    family = Flux(model)
    estimate_bytes = plan_estimate(family, plan, resolution, text_len, rank, "bf16" if device == "cuda" else "fp32",
                                   quant)
    # materialize only what the configuration holds: all blocks for LoRA, kept ones otherwise
    keep = [family.block(i) for i in plan.kept] + [model.norm_out, model.proj_out]
    if skip is None:
        keep += [model.x_embedder, model.context_embedder, model.time_text_embed]
    for module in keep:  # one at a time, quantized as soon as it exists (the board never holds them in full)
        module.to_empty(device=device)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
        module.to(dtype)
        if quant != "none" and any(module is family.block(i) for i in plan.kept):
            quantize_linears(module, quant)
    targets = [t for i in plan.kept for t in family.lora_targets(i)]
    lora_config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    register_with_peft(lora_config)
    inject_adapter_in_model(lora_config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = (resolution // 16) ** 2
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    def train_step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if skip is None:  # full model from the embedding
                inputs = family.example_inputs(height=resolution // 16, width=resolution // 16, text_len=text_len)
                inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                          for k, v in inputs.items()}
                out = family.forward(**inputs)
            else:  # cached features: entry state, final-span image residual, conditioning
                entry = {"hidden_states": torch.randn(1, tokens, hidden, device=device, dtype=dtype),
                         "encoder_hidden_states": torch.randn(1, text_len, hidden, device=device, dtype=dtype)}
                from blockskip.models.flux import image_ids
                cond = {"temb": torch.randn(1, hidden, device=device, dtype=dtype),
                        "txt_ids": torch.zeros(text_len, 3, device=device),
                        "img_ids": image_ids(resolution // 16, resolution // 16).to(device)}
                residuals = {span: {"hidden_states": torch.randn(1, tokens, hidden, device=device, dtype=dtype)}
                             for span in plan.residual_spans}
                out = reduced_forward(family, plan, entry, residuals, cond)
            loss = out.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # one more step with its tensor bytes counted (the process RSS cannot see them)
        with TensorMemory() as tracker:
            train_step()
        peak = tracker.peak_bytes
    held = sum(t.numel() * t.element_size() for m in keep for n, t in [*m.named_parameters(), *m.named_buffers()]
               if "lora_" not in n)  # the frozen weights as held (quantized ones as their codes and scales)
    lora_params = sum(p.numel() for p in params)
    bytes_per = 2 if device == "cuda" else 4
    seq = tokens + text_len
    # lower bound: weights held + LoRA (fp32 value, grad, two AdamW moments) + what backward must keep
    # at the least: each kept block's input state (its output is the next one's input)
    activations = len(plan.kept) * seq * hidden * bytes_per
    bound = held + lora_params * 16 + activations
    return {"name": name, "peak_bytes": int(peak), "step_s": sorted(times)[len(times) // 2],
            "bound_bytes": int(bound), "kept_blocks": len(plan.kept), "estimate_bytes": int(estimate_bytes),
            "weight_bytes": int(held)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration (median time)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default: 128 CPU, 512 CUDA)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shape", default=None, choices=["proxy", "flux-dev"],
                        help="model shapes (default: proxy on CPU, flux-dev on CUDA)")
    parser.add_argument("--only", default=",".join(IDS),
                        help=f"rows to run, comma-separated from {', '.join(IDS)} (default: all); ratios are "
                             f"to the first row run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    text_len = args.text_len or (512 if args.device == "cuda" else 128)
    shape = args.shape or ("flux-dev" if args.device == "cuda" else "proxy")
    if args.child:
        print(json.dumps(child(args.child, args.device, args.steps, text_len, args.rank, shape)))
        return 0
    unknown = [key for key in args.only.split(",") if key not in IDS]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; choose from {', '.join(IDS)}")
    rows = []
    for key in args.only.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", IDS[key], "--device", args.device,
                               "--steps", str(args.steps), "--text-len", str(text_len), "--rank", str(args.rank),
                               "--shape", shape], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]
    big = args.device == "cuda" or shape == "flux-dev"
    unit, label = (2**30, "GiB") if big else (2**20, "MiB")
    dtype = "bf16" if args.device == "cuda" else "fp32"
    counter = "cuda max_memory_allocated" if args.device == "cuda" else "peak tensor bytes (blockskip.memory)"
    model = "FLUX.1-dev shapes (57 blocks, width 3072)" if shape == "flux-dev" else \
        "FLUX-depth proxy (57 blocks, width 256)"
    print(f"# training memory: {model}, {dtype}, {counter}; text {text_len} tokens, LoRA rank {args.rank}, "
          f"batch 1\n")
    print(f"| configuration | kept blocks | weights {label} | peak {label} | vs {base['name'].split(' (')[0]} | "
          f"plan estimate {label} | estimate / peak | bound {label} | step s | vs first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['kept_blocks']} | {row['weight_bytes'] / unit:.2f} | "
              f"{row['peak_bytes'] / unit:.2f} | {row['peak_bytes'] / base['peak_bytes']:.2f} | "
              f"{row['estimate_bytes'] / unit:.2f} | {row['estimate_bytes'] / row['peak_bytes']:.2f} | "
              f"{row['bound_bytes'] / unit:.2f} | {row['step_s']:.2f} | {row['step_s'] / base['step_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
