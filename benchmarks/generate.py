"""Seconds per image, peak memory and image PSNR of `generate` per backend and precision, as
ratios to `torch` and to ONNX Runtime fp32, all measured in the same run.

    python benchmarks/generate.py [--model tiny|crop|wide|DIR] [--family flux] [--size 64]
                                  [--steps 8] [--images 3] [--threads N]
                                  [--backends torch,onnxruntime:fp32,onnxruntime:int8,tensorrt]

Each row runs in a fresh process (so its peak memory is its own): the ONNX export, int8
quantization or engine build happens first in a process of its own and is not timed, then one
warm-up image, then `--images` timed images (seeds 1..images, the same for every row). Peak
memory is the process's peak resident set (host RAM: on a Jetson that is the shared memory the
GPU uses too), plus torch's peak CUDA allocation where there is a GPU (it does not see ONNX
Runtime's or TensorRT's own allocations). PSNR compares each row's images with ONNX Runtime
fp32's (else torch's), same seeds, pixels in [0, 255].

Models: `tiny` (the tests' tiny model of --family), `crop` (the built-in crop-leaf FLUX model,
its word text encoder), `wide` (a random FLUX-shaped model: 8 heads of 128 (width 1024), 2
double + 4 single blocks, FLUX's RoPE axes; big enough for int8 matmuls to matter), or a folder.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of sks maize leaf with rust, close-up"
WIDE = dict(attention_head_dim=128, num_attention_heads=8, num_layers=2, num_single_layers=4,
            joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=(16, 56, 56))


def wide_model(path: Path) -> Path:
    """A random FLUX-shaped model (WIDE config) saved like the tiny ones."""
    from blockskip.models import family_class
    from blockskip.models.codec import PixelCodec
    from blockskip.models.pipeline import DEFAULT_SCHEDULERS, Model, save_model
    from blockskip.models.text import HashTextEncoder

    family = family_class("flux").tiny(seed=0, **WIDE)
    text = HashTextEncoder("flux", family.text_shapes(), seed=0)
    return save_model(Model(family, PixelCodec(), text, dict(DEFAULT_SCHEDULERS["flux"])), path)


def encode(model_dir: str, crop: bool, weights: bool):
    """The model with its text encoder; the transformer's weights only when `weights` (rows that
    run an export must not count torch's copy of them in their peak)."""
    from blockskip.models.crops import WordTextEncoder
    from blockskip.models.pipeline import load_model

    model = load_model(model_dir, text_encoder=not crop, weights=weights)
    if crop:
        model.text_encoder = WordTextEncoder.load(model_dir)
    return model


def child(args) -> None:
    import numpy as np
    import torch

    from blockskip.edge.backends import OrtBackend, pick_backend
    from blockskip.edge.generate import sampling_model
    from blockskip.edge.onnx_export import Shapes, cached_onnx
    from blockskip.models.pipeline import sample

    if args.threads:
        torch.set_num_threads(args.threads)
    name, _, precision = args.backend.partition(":")
    text_model = encode(args.model, args.crop, weights=name == "torch")
    text = text_model.encode_text(PROMPT)
    full = text_model if name == "torch" else None
    del text_model
    model = sampling_model(args.model, full)
    shapes = Shapes(args.size, args.size, text["encoder_hidden_states"].shape[1])
    if name == "onnxruntime":  # opened here to pass --threads
        backend = OrtBackend(cached_onnx(args.model, None, shapes, args.cache_dir, precision or "fp32",
                                         load=None), threads=args.threads)
    else:
        backend = pick_backend(name, args.model, None, shapes, args.cache_dir, precision or None,
                               load=(lambda: full) if full is not None else None)
    if args.prepare:  # export / quantization / engine build, in its own process so it is not in the peak
        return
    run = dict(text=text, steps=args.steps, height=args.size, width=args.size, predict=backend.predict)
    sample(model, seed=0, **run)  # warm-up
    images, start = [], time.perf_counter()
    for i in range(args.images):
        images.append(sample(model, seed=i + 1, **run))
    seconds = (time.perf_counter() - start) / args.images
    pixels = ((torch.cat(images).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.save(Path(args.cache_dir) / f"images-{args.backend.replace(':', '-')}.npy", pixels)
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"backend": backend.name, "detail": backend.describe(), "s_per_image": seconds,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "peak_cuda_torch": cuda_peak}))


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def onnx_mib(cache_dir: str, precision: str) -> float | None:
    """Size on disk of the export of that precision (graph + weights)."""
    folders = sorted((Path(cache_dir) / "onnx").glob(f"*-{precision}-*"))
    return sum(f.stat().st_size for f in folders[0].iterdir()) / 2**20 if folders else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux", choices=["flux", "sana"], help="family of --model tiny")
    parser.add_argument("--model", default="tiny", help="tiny | crop | wide | a model folder (default: tiny)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=3, help="timed images per row")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: theirs)")
    parser.add_argument("--backends", default="torch,onnxruntime:fp32,onnxruntime:int8,tensorrt",
                        help="rows: backend[:precision], comma-separated (default: %(default)s)")
    parser.add_argument("--cache-dir", help="export/engine cache (default: a temporary folder)")
    parser.add_argument("--child", dest="backend", help=argparse.SUPPRESS)
    parser.add_argument("--crop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend:
        child(args)
        return 0

    import numpy as np

    from blockskip.edge.backends import available_backends
    from blockskip.models.crops import MODEL_DIR
    from blockskip.models.pipeline import save_model, tiny_model

    tmp = tempfile.TemporaryDirectory()
    label = args.model
    if args.model == "tiny":
        args.model, label = str(save_model(tiny_model(args.family), Path(tmp.name) / "model")), f"tiny {args.family}"
    elif args.model == "wide":
        args.model, label = str(wide_model(Path(tmp.name) / "model")), "wide random FLUX-shaped (width 1024)"
    elif args.model == "crop":
        args.model, args.crop, label = str(MODEL_DIR), True, "built-in crop-leaf FLUX model"
    args.cache_dir = args.cache_dir or str(Path(tmp.name) / "cache")
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    available = available_backends()
    rows = {}
    for spec in [b for b in args.backends.split(",") if b]:
        name = spec.partition(":")[0]
        if name not in available:
            print(f"# {spec}: not available here, skipped", file=sys.stderr)
            continue
        cmd = [sys.executable, __file__, "--child", spec, "--model", args.model, "--size", str(args.size),
               "--steps", str(args.steps), "--images", str(args.images), "--cache-dir", args.cache_dir]
        cmd += (["--crop"] if args.crop else []) + (["--threads", str(args.threads)] if args.threads else [])
        if name != "torch":
            prepared = subprocess.run(cmd + ["--prepare"], capture_output=True, text=True)
            if prepared.returncode != 0:
                print(f"# {spec} export failed:\n{prepared.stderr[-2000:]}", file=sys.stderr)
                continue
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"# {spec} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[spec] = json.loads(done.stdout.strip().splitlines()[-1])
        rows[spec]["images"] = np.load(Path(args.cache_dir) / f"images-{spec.replace(':', '-')}.npy")
    if "torch" not in rows:
        print("torch (the baseline) did not run", file=sys.stderr)
        return 1
    base = rows["torch"]
    ref_name = "onnxruntime:fp32" if "onnxruntime:fp32" in rows else "torch"
    ref = rows[ref_name]
    print(f"{label}, {args.size}x{args.size}, {args.steps} steps, {args.images} images per row, "
          f"threads: {args.threads or 'default'}; PSNR vs {ref_name}, same seeds")
    print("| backend | precision | where | s/image | x torch | speed-up vs ORT fp32 | peak RSS MiB | x torch "
          "| ONNX MiB | PSNR dB |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for spec, row in rows.items():
        detail = row["detail"]
        where = ",".join(detail.get("providers", [])) or detail.get("device", "") or "cuda"
        precision = detail.get("precision") or detail.get("dtype", "").removeprefix("torch.")
        speedup = f"{ref['s_per_image'] / row['s_per_image']:.2f}" if ref_name != "torch" else "-"
        size = onnx_mib(args.cache_dir, detail["precision"]) if spec.startswith("onnxruntime") else None
        print(f"| {row['backend']} | {precision} | {where} | {row['s_per_image']:.3f} "
              f"| {row['s_per_image'] / base['s_per_image']:.2f} | {speedup} "
              f"| {row['peak_rss'] / 2**20:.0f} | {row['peak_rss'] / base['peak_rss']:.2f} "
              f"| {'-' if size is None else f'{size:.1f}'} | {psnr(row['images'], ref['images']):.1f} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
