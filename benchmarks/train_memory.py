"""Peak training memory and step time: standard LoRA vs patch sampling vs block skipping vs
DiT-BlockSkip, each configuration in its own process, printed as ratios to standard LoRA measured
in the same run (these machines are noisy), next to an analytic lower bound.

CPU (default): a FLUX-depth proxy (19 double + 38 single blocks, narrower width), fp32, the peak
of live tensor bytes in one extra training step (blockskip.memory.TensorMemory).
CUDA (`--device cuda`): the real FLUX.1-dev configuration with random bf16 weights (weights do not
change memory), 512 -> 256, `torch.cuda.max_memory_allocated`, comparable to the paper's table
(35.99 GiB LoRA, 10.42 GiB DiT-BlockSkip 50%).

    python benchmarks/train_memory.py                 # CPU proxy
    python benchmarks/train_memory.py --device cuda   # real FLUX.1-dev shapes on a GPU
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
# name: (skip ratio (paper's (n, m) on FLUX), training resolution in pixels)
CONFIGS = {
    "a LoRA (full model, 512)": (None, 512),
    "b patch sampling only (256)": (None, 256),
    "c block skip 50% only (512)": ((19, 10), 512),
    "d DiT-BlockSkip 30% (256)": ((7, 10), 256),
    "d DiT-BlockSkip 50% (256)": ((19, 10), 256),
}


def child(name: str, device: str, steps: int, text_len: int, rank: int) -> dict:
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from blockskip.memory import TensorMemory
    from blockskip.models import Flux
    from blockskip.models.skip import SkipPlan, reduced_forward

    torch.manual_seed(0)
    if device == "cuda":
        from blockskip.edge.train import avoid_cudnn_attention_backward

        avoid_cudnn_attention_backward()
    skip, resolution = CONFIGS[name]
    config = FLUX_DEV if device == "cuda" else PROXY
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device("meta"):
        model = Flux.model_cls(**config)
    plan = SkipPlan.first_last(57, *(skip or (0, 0)))
    family = Flux(model)
    # materialize only what the configuration holds: all blocks for LoRA, kept ones otherwise
    keep = [family.block(i) for i in plan.kept] + [model.norm_out, model.proj_out]
    if skip is None:
        keep += [model.x_embedder, model.context_embedder, model.time_text_embed]
    for module in keep:
        module.to_empty(device=device)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
        module.to(dtype)
    targets = [t for i in plan.kept for t in family.lora_targets(i)]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
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
    kept_params = sum(p.numel() for m in keep for n, p in m.named_parameters() if "lora_" not in n)
    lora_params = sum(p.numel() for p in params)
    bytes_per = 2 if device == "cuda" else 4
    seq = tokens + text_len
    # lower bound: weights held + LoRA (fp32 value, grad, two AdamW moments) + what backward must keep
    # at the least: each kept block's input state (its output is the next one's input)
    activations = len(plan.kept) * seq * hidden * bytes_per
    bound = kept_params * bytes_per + lora_params * 16 + activations
    return {"name": name, "peak_bytes": int(peak), "step_s": sorted(times)[len(times) // 2],
            "bound_bytes": int(bound), "kept_blocks": len(plan.kept)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="training steps per configuration (median time)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default: 128 CPU, 512 CUDA)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    text_len = args.text_len or (512 if args.device == "cuda" else 128)
    if args.child:
        print(json.dumps(child(args.child, args.device, args.steps, text_len, args.rank)))
        return 0
    rows = []
    for name in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--device", args.device,
                               "--steps", str(args.steps), "--text-len", str(text_len), "--rank", str(args.rank)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]
    unit = 2**30 if args.device == "cuda" else 2**20
    label = "GiB" if args.device == "cuda" else "MiB"
    what = "FLUX.1-dev shapes, bf16, cuda max_memory_allocated" if args.device == "cuda" else \
        "FLUX-depth proxy (57 blocks, width 256), fp32, peak tensor bytes"
    print(f"# training memory: {what}; text {text_len} tokens, LoRA rank {args.rank}, batch 1\n")
    print(f"| configuration | kept blocks | peak {label} | vs LoRA | bound {label} | step s | vs LoRA |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['kept_blocks']} | {row['peak_bytes'] / unit:.1f} | "
              f"{row['peak_bytes'] / base['peak_bytes']:.2f} | {row['bound_bytes'] / unit:.1f} | "
              f"{row['step_s']:.2f} | {row['step_s'] / base['step_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
