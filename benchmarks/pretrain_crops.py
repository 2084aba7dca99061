"""Pretrain the built-in crop model: attribute classifier, then a small FLUX-family
text-to-image model on procedural crop-leaf images (models/crops.py) at 32 px and, every third
step, on 16 px patches (crops resized, as patch sampling makes them); 2 CPU cores or a GPU, seeded.

    python benchmarks/pretrain_crops.py --steps 2300 --out models/weights                 # 2 CPU cores, ~37 min
    python benchmarks/pretrain_crops.py --steps 2300 --device cuda --workers 12 ...      # a GPU, ~4 min

writes OUT/crop-flux/ (load_crop_model), OUT/crop-classifier.safetensors (load_classifier) and
OUT/crop-pretrain-log.json (settings, loss curve, caption-following accuracy, classifier accuracy).
`--steps` fixes the run (learning-rate schedule, data); `--minutes` only caps the wall time
(a capped run is then no longer step-for-step reproducible). `--double-blocks`, `--single-blocks`
and `--heads` pretrain another shape than the built-in one (an experiment; point
`benchmarks/quality.py --model OUT/crop-flux` at the result). See models/CROPS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blockskip.models import crops
from blockskip.models.flux import pack_latents
from blockskip.models.pipeline import add_noise, training_sigmas


POOL = None  # optional multiprocessing pool for rendering (--workers); results are identical either way


def _render_all(combos: list[dict], seeds: list[int]) -> list:
    jobs = [(a, s, 32) for a, s in zip(combos, seeds)]
    return POOL.starmap(crops.render, jobs, chunksize=4) if POOL else [crops.render(*job) for job in jobs]


def render_batch(combos: list[dict], seeds: list[int]) -> torch.Tensor:
    return crops.to_tensor(_render_all(combos, seeds))


def render_patches(combos: list[dict], seeds: list[int], size: int, rng: np.random.Generator) -> torch.Tensor:
    """Low-resolution training images the way patch sampling makes them: a random square crop of
    side in [size, 32] (the whole picture included), resized to size x size. Pretraining on these
    too makes a 16 px patch as familiar to the model as 256 px is to FLUX, so the paper's
    512 -> 256 patch sampling has its small-scale counterpart (32 -> 16)."""
    from blockskip.host.patches import PatchSchedule

    schedule = PatchSchedule(s_min=size, s_max=32, granularity=2, schedule="random")
    return crops.to_tensor([schedule.sample_patch(image, 0.0, rng)[0] for image in _render_all(combos, seeds)])


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise, brightness and flips so the classifier also reads imperfect generations."""
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < 0.4
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3), x)
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.12
    x = x + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.2
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.clamp(-1, 1)


def classifier_accuracy(clf, n: int, seed: int, held_out_only: bool = False) -> dict:
    rng = np.random.default_rng([seed, 0xACC])
    combos = []
    while len(combos) < n:
        a = crops.sample_attrs(rng, allow_held_out=True)
        if not held_out_only or crops.is_held_out(a):
            combos.append(a)
    images = render_batch(combos, [10**9 + seed * 10**6 + i for i in range(n)])
    pred, truth = clf.predict(images), crops.labels(combos)
    return {k: float((pred[k] == truth[k]).float().mean()) for k in crops.KEYS}


def train_classifier(args, log: dict) -> crops.AttributeClassifier:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 0xC1A])
    t0 = time.perf_counter()
    combos = [crops.sample_attrs(rng, allow_held_out=True) for _ in range(args.clf_pool)]
    pool = render_batch(combos, [2 * 10**8 + i for i in range(args.clf_pool)])
    truth = crops.labels(combos)
    clf = crops.AttributeClassifier().train()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.clf_steps, pct_start=0.1)
    for step in range(args.clf_steps):
        idx = torch.randint(0, args.clf_pool, (128,), generator=gen)
        out = clf(_augment(pool[idx], gen))
        loss = sum(F.cross_entropy(out[k], truth[k][idx]) for k in crops.KEYS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == args.clf_steps - 1:
            print(f"classifier step {step} loss {loss.item():.3f}", flush=True)
    clf.eval()
    log["classifier"] = {"steps": args.clf_steps, "pool": args.clf_pool, "seconds": time.perf_counter() - t0,
                         "params": sum(p.numel() for p in clf.parameters()),
                         "accuracy_fresh_renders": classifier_accuracy(clf, 1000, args.seed),
                         "accuracy_held_out_combos": classifier_accuracy(clf, 300, args.seed, held_out_only=True)}
    print("classifier:", json.dumps(log["classifier"]), flush=True)
    return clf


def training_caption(attrs: dict, rng: np.random.Generator, partial: float) -> str:
    """The full caption, or with probability `partial` one with some attributes left out."""
    if rng.random() < partial:
        attrs = {k: v for k, v in attrs.items() if rng.random() < 0.5}
    return crops.caption(attrs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/weights")
    parser.add_argument("--steps", type=int, default=2300, help="diffusion training steps (schedule length)")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-time cap for the diffusion training")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--low-res-every", type=int, default=3,
                        help="every Nth step trains on 16 px patches (crops resized), 0: never")
    parser.add_argument("--low-res-batch", type=int, default=64, help="batch size of those 16 px steps")
    parser.add_argument("--partial-captions", type=float, default=0.15)
    parser.add_argument("--clf-steps", type=int, default=1500)
    parser.add_argument("--clf-pool", type=int, default=12000)
    parser.add_argument("--classifier", help="reuse this classifier file instead of training one")
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--eval-n", type=int, default=48, help="generations in the final caption-following eval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the diffusion training runs (data, draws and evals stay on the CPU)")
    parser.add_argument("--workers", type=int, default=0, help="processes that render training images")
    parser.add_argument("--double-blocks", type=int, default=crops.FLUX_CONFIG["num_layers"],
                        help="double-stream blocks (default: the built-in model's %(default)s)")
    parser.add_argument("--single-blocks", type=int, default=crops.FLUX_CONFIG["num_single_layers"],
                        help="single-stream blocks (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=crops.FLUX_CONFIG["num_attention_heads"],
                        help="attention heads of 32 dims each; the width is 32 x heads (default: %(default)s)")
    args = parser.parse_args(argv)
    global POOL
    if args.workers:
        import multiprocessing

        POOL = multiprocessing.get_context("fork").Pool(args.workers)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    shape = {"num_layers": args.double_blocks, "num_single_layers": args.single_blocks,
             "num_attention_heads": args.heads}
    if min(shape.values()) < 1:
        parser.error(f"--double-blocks, --single-blocks and --heads must be at least 1, got {shape}")
    log: dict = {"args": vars(args), "flux_config": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in {**crops.FLUX_CONFIG, **shape}.items()},
                 "held_out_rules": list(crops.HELD_OUT_RULES), "torch": torch.__version__}

    if args.classifier:
        clf = crops.load_classifier(args.classifier)
        log["classifier"] = {"reused": args.classifier,
                             "accuracy_fresh_renders": classifier_accuracy(clf, 1000, args.seed),
                             "accuracy_held_out_combos": classifier_accuracy(clf, 300, args.seed, held_out_only=True)}
    else:
        clf = train_classifier(args, log)
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in clf.state_dict().items()},
              str(out / "crop-classifier.safetensors"))

    # ---- diffusion pretraining -----------------------------------------------------------
    model = crops.new_crop_model(seed=args.seed, **shape)
    device = torch.device(args.device)
    transformer, text = model.family.model.train().to(device), model.text_encoder.train().to(device)
    ema_model = copy.deepcopy(model)
    ema_params = list(ema_model.family.model.parameters()) + list(ema_model.text_encoder.parameters())
    params = list(transformer.parameters()) + list(text.parameters())
    log["params"] = {"transformer": sum(p.numel() for p in transformer.parameters()),
                     "text_encoder": sum(p.numel() for p in text.parameters())}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = min(100, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng([args.seed, 0xF1A])
    shift, shift_low = model.shift_for(32, 32), model.shift_for(16, 16)
    losses, evals, window = [], [], []
    t_train = time.perf_counter()
    step = 0
    for step in range(args.steps):
        if time.perf_counter() - t_train > args.minutes * 60:
            print(f"time cap reached at step {step}", flush=True)
            break
        low = args.low_res_every > 0 and step % args.low_res_every == args.low_res_every - 1
        batch = args.low_res_batch if low else args.batch
        combos = [crops.sample_attrs(rng) for _ in range(batch)]
        seeds = [step * 1000 + i for i in range(batch)]
        x0 = render_patches(combos, seeds, 16, rng) if low else render_batch(combos, seeds)
        ids, mask = text.tokenize([training_caption(a, rng, args.partial_captions) for a in combos])
        sigma = training_sigmas(gen, batch, shift_low if low else shift)
        noise = torch.randn(x0.shape, generator=gen)  # drawn on the CPU: the same draws on any device
        x0, noise, sigma, ids, mask = (v.to(device) for v in (x0, noise, sigma, ids, mask))
        xt, target = add_noise(x0, noise, sigma)
        inputs = model.family.make_inputs(xt, sigma, text(ids, mask))
        pred = model.family.diffusers_forward(**inputs)
        loss = F.mse_loss(pred, pack_latents(target))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, params):
                e.lerp_(p, 1 - decay)
        window.append(loss.item())
        if len(window) == 25:
            losses.append({"step": step + 1, "loss": sum(window) / len(window),
                           "seconds": time.perf_counter() - t_train})
            window = []
            print(f"step {step + 1} loss {losses[-1]['loss']:.4f} lr {lr_at(step):.2e} "
                  f"{losses[-1]['seconds']:.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            ema_model.family.model.eval().cpu()
            ema_model.text_encoder.eval().cpu()
            acc = crops.caption_accuracy(ema_model, clf, n=16, seed=1, steps=8)
            acc["16px"] = crops.caption_accuracy(ema_model, clf, n=16, seed=1, steps=8, size=16)
            ema_model.family.model.to(device)
            ema_model.text_encoder.to(device)
            evals.append({"step": step + 1, "accuracy": acc})
            print(f"eval step {step + 1}: {json.dumps(acc)}", flush=True)
    steps_done = step + 1
    train_seconds = time.perf_counter() - t_train

    ema_model.family.model.eval().cpu()
    ema_model.text_encoder.eval().cpu()
    crops.save_crop_model(ema_model, out / "crop-flux")
    loaded = crops.load_crop_model(out / "crop-flux")  # evaluate exactly what was saved (fp16 -> fp32)
    final = crops.caption_accuracy(loaded, clf, n=args.eval_n, seed=12345, steps=10)
    final_16 = crops.caption_accuracy(loaded, clf, n=args.eval_n, seed=12345, steps=10, size=16)
    print("final caption-following accuracy:", json.dumps(final), "at 16 px:", json.dumps(final_16),
          "chance:", json.dumps(crops.CHANCE), flush=True)
    log.update({"steps_done": steps_done, "train_seconds": train_seconds, "seconds_per_step": train_seconds / steps_done,
                "loss_curve": losses, "evals": evals,
                "final_caption_accuracy": {"n": args.eval_n, "seed": 12345, "euler_steps": 10, "accuracy": final,
                                           "accuracy_16px": final_16, "chance": crops.CHANCE},
                "total_seconds": time.perf_counter() - start,
                "weights_bytes": sum(p.stat().st_size for p in (out / "crop-flux").rglob("*") if p.is_file())})
    (out / "crop-pretrain-log.json").write_text(json.dumps(log, indent=2))
    print(f"done in {log['total_seconds'] / 60:.1f} min; weights {log['weights_bytes'] / 2**20:.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
